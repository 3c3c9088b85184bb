"""Branch statistics for any layer with branches: the `branches` command and its adapter.

Planted structure: the article's chance numbers through the CLI with a labels CSV (a 32-of-256
branch holding all 9 labelled units), residual sums laid out as summands side by side, and
activations that correlate within branches by construction.
"""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from netanatomy.anatomy.branch_stats import (
    BranchPopulation,
    branch_population,
    label_categories,
    read_labels_csv,
    run_branch_stats,
)
from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Concat(nn.Module):
        """Two paths joined along channels: a 32-unit branch and a 224-unit one (256 units)."""
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.small = nn.Conv2d(8, 32, 1)
            self.large = nn.Conv2d(8, 224, 1)
            self.head = nn.Linear(256, 4)
        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.cat([self.small(x), self.large(x)], 1)
            return self.head(torch.relu(x).mean((2, 3)))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 6, 3, padding=1)
            self.block = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Linear(6, 4)
        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + self.block(x)
            return self.head(torch.relu(x).mean((2, 3)))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.head = nn.Linear(4, 2)
        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    class Grouped(nn.Module):
        """conv1's units 0-7 feed group 0 of conv2, units 8-15 group 1 (so conv1 has two branches).
        Planted: group 0 colourful filters (red-green opponent blobs), group 1 grey Gabors."""
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 8, 3, padding=1, groups=2)
            self.head = nn.Linear(8, 3)
            yy, xx = torch.meshgrid(torch.arange(5.0) - 2, torch.arange(5.0) - 2, indexing="ij")
            blob = torch.exp(-(xx ** 2 + yy ** 2) / 4.0)
            with torch.no_grad():
                w = torch.zeros(16, 3, 5, 5)
                for u in range(8):
                    sign = 1.0 if u % 2 == 0 else -1.0
                    # red against green, weights summing to 0 over the channels: blind to grey images
                    w[u, 0], w[u, 1] = sign * blob * (1 + 0.1 * u), -sign * blob * (1 + 0.1 * u)
                for u in range(8, 16):
                    theta = (u - 8) * 3.14159 / 8
                    gabor = blob * torch.cos(1.6 * (xx * torch.cos(torch.tensor(theta)) + yy * torch.sin(torch.tensor(theta))))
                    w[u] = gabor
                self.conv1.weight.copy_(w)
                self.conv1.bias.zero_()
        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return self.head(x.mean((2, 3)))

    def grouped():
        torch.manual_seed(0)
        return Grouped()

    def concat():
        torch.manual_seed(0)
        return Concat()

    def residual():
        torch.manual_seed(0)
        return Residual()

    def plain():
        return Plain()
''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "branchy.py"
    path.write_text(MODELS)
    return path


def _cli_json(capsys, argv):
    code = run(argv + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _write(path, rows):
    path.write_text("layer,unit,category\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


def test_article_chance_number_through_the_cli(model_file, tmp_path, capsys):
    # 9 labelled units, all in the 32-unit branch of a 256-unit layer: the article's ~2.5e-9
    labels = _write(tmp_path / "labels.csv", [("cat", u, "colour") for u in (0, 3, 5, 8, 13, 17, 21, 30, 31)])
    r = _cli_json(capsys, ["branches", f"{model_file}:concat", "--input-shape", "1,12,12", "--layer", "cat",
                           "--labels", str(labels), "--probe", "none", "--data", "bundled?limit=40&size=12",
                           "--permutations", "9"])
    (layer,) = r["layers"]
    assert layer["units"] == 256 and [b["units"] for b in layer["branches"]] == [32, 224]
    small = {t["category"]: t for t in layer["branches"][0]["categories"]}["colour"]
    large = {t["category"]: t for t in layer["branches"][1]["categories"]}["colour"]
    assert small["count"] == 9 and small["expected"] == pytest.approx(9 * 32 / 256)
    assert small["p"] == pytest.approx(2.5e-9, rel=0.01)
    assert large["count"] == 0 and large["p"] == pytest.approx(1.0)
    # two tests in the run: BH multiplies the smaller p by 2
    assert r["tests"] == 2 and small["q"] == pytest.approx(2 * small["p"], rel=1e-9)


def test_labels_name_a_branch_source_layer_or_the_layer(model_file):
    lm = discover_layers(_build(model_file, "concat"), (1, 12, 12))
    pop = branch_population(lm, "cat")
    labels = read_labels_csv(_write_tmp([("large", 0, "x"), ("cat", 1, "x"), ("small", 2, "y")]))
    cats = label_categories(pop, labels, lm)
    assert np.flatnonzero(cats["x"]).tolist() == [1, 32]   # large's unit 0 is population unit 32
    assert np.flatnonzero(cats["y"]).tolist() == [2]


def _build(path, factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"branchy_{factory}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, factory)()


def _write_tmp(rows):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "labels.csv"
    return _write(path, rows)


def test_residual_population_is_the_summands_side_by_side(model_file, tmp_path, capsys):
    lm = discover_layers(_build(model_file, "residual"), (1, 10, 10))
    (res,) = [layer for layer in lm.values() if layer.kind == "residual"]
    pop = branch_population(lm, res.name)
    assert pop.units == 12 and [p.size for p in pop.parts] == [6, 6]
    assert {p.source for p in pop.parts} == {"stem", "block"}
    # the block's units labelled by their own layer land in the block's half
    block = next(p for p in pop.parts if p.source == "block")
    labels = _write(tmp_path / "res.csv", [("block", u, "late") for u in range(6)])
    r = _cli_json(capsys, ["branches", f"{model_file}:residual", "--input-shape", "1,10,10", "--labels", str(labels),
                           "--probe", "none", "--data", "bundled?limit=30&size=10", "--permutations", "9"])
    (layer,) = r["layers"]
    got = next(b for b in layer["branches"] if b["source"] == "block")
    assert got["range"] == [block.start, block.stop]
    assert got["categories"][0]["count"] == 6
    # 6 of 6 in a 6-of-12 branch: 1 / C(12, 6)
    assert got["categories"][0]["p"] == pytest.approx(1 / math.comb(12, 6), rel=1e-9)


def test_correlation_test_finds_planted_within_branch_correlation():
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
    values = np.hstack([a + 0.3 * rng.normal(size=(n, 10)), b + 0.3 * rng.normal(size=(n, 10))])
    from netanatomy.anatomy.branch_stats import BranchPart

    pop = BranchPopulation("L", "concat", (BranchPart("A", "concat", 0, 10, "L", 0), BranchPart("B", "concat", 10, 20, "L", 10)))
    (stats,) = run_branch_stats([pop], {"L": {}}, {"L": {}}, {"L": values}, n_permutations=199, seed=0)
    assert stats.correlation.within > 0.8 and stats.correlation.between < 0.2
    assert stats.correlation.p <= 2 / 200
    # and it does not fire on independent units
    flat = rng.normal(size=(n, 20))
    (null,) = run_branch_stats([pop], {"L": {}}, {"L": {}}, {"L": flat}, n_permutations=199, seed=0)
    assert null.correlation.p > 0.05


def test_bh_runs_across_every_layer_of_the_run():
    from netanatomy.anatomy.branch_stats import BranchPart

    def pop(name):
        return BranchPopulation(name, "concat", (BranchPart("A", "concat", 0, 8, name, 0),
                                                 BranchPart("B", "concat", 8, 16, name, 8)))

    mask = np.zeros(16, dtype=bool)
    mask[:4] = True
    cats = {"L1": {"c": mask}, "L2": {"c": mask}}
    stats = run_branch_stats([pop("L1"), pop("L2")], cats, {"L1": {}, "L2": {}}, None)
    ps = [t.p_tail for s in stats for t in s.tests]
    qs = [t.q for s in stats for t in s.tests]
    assert len(ps) == 4
    # BH over 4 tests: the two equal smallest p get q = p * 4 / 2
    p_min = min(ps)
    assert sorted(qs)[0] == pytest.approx(p_min * 4 / 2)


@pytest.mark.parametrize("argv, message", [
    (["--layer", "conv"], "has no branches"),
    (["--probe", "colour"], "needs a 3-channel model"),
    (["--probe", "nonsense"], "unknown probe"),
])
def test_bad_usage_exit_2(model_file, capsys, argv, message):
    code = run(["branches", f"{model_file}:plain", "--input-shape", "1,8,8", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_no_branches_anywhere_exit_2(model_file, capsys):
    code = run(["branches", f"{model_file}:plain", "--input-shape", "1,8,8", "--probe", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "no layer with branches" in err


@pytest.mark.parametrize("rows, message", [
    ("layer,unit,category\nnope,0,x\n", "unknown layer 'nope'"),
    ("cat,999,x\n", "out of range"),
    ("cat,zero,x\n", "not a whole number"),
    ("cat,1\n", "expected 3 columns"),
    ("", "has no rows"),
])
def test_bad_labels_exit_2(model_file, tmp_path, capsys, rows, message):
    path = tmp_path / "bad.csv"
    path.write_text(rows)
    out = tmp_path / "out"
    code = run(["branches", f"{model_file}:concat", "--input-shape", "1,12,12", "--labels", str(path),
                "--probe", "none", "--data", "bundled?limit=10&size=12", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_depthwise_layer_is_not_branched():
    from torch import nn

    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, groups=8)

        def forward(self, x):
            return self.dw(torch.relu(self.a(x)))

    lm = discover_layers(DW(), (3, 9, 9))
    with pytest.raises(UsageError, match="depthwise"):
        branch_population(lm, "dw")


def test_figures_written_and_labelled(model_file, tmp_path, capsys):
    labels = _write(tmp_path / "labels.csv", [("cat", u, "first") for u in range(8)])
    out = tmp_path / "figs"
    r = _cli_json(capsys, ["branches", f"{model_file}:concat", "--input-shape", "1,12,12", "--labels", str(labels),
                           "--probe", "none", "--data", "bundled?limit=40&size=12", "--permutations", "9",
                           "--out", str(out)])
    figures = r["layers"][0]["figures"]
    assert set(figures) == {"correlation", "categories"}  # the concat feeds no conv: no SVD figure
    for path in figures.values():
        from PIL import Image

        with Image.open(path) as im:
            assert im.size[0] > 400 and im.size[1] > 300
    saved = json.loads((out / "branches.json").read_text())
    assert saved["layers"][0]["branches"][0]["categories"][0]["count"] == 8


def test_planted_grouped_layer_colour_in_group_0_not_in_group_1(model_file, capsys):
    """Group 0 of conv1 colourful filters, group 1 grey Gabors: the filter and colour probes put
    colour in group 0 with a small adjusted p, and grey in group 1."""
    r = _cli_json(capsys, ["branches", f"{model_file}:grouped", "--input-shape", "3,24,24", "--layer", "conv1",
                           "--probe", "filter,colour", "--data", "photos?n=40&size=24", "--permutations", "19"])
    (layer,) = r["layers"]
    assert [b["name"] for b in layer["branches"]] == ["conv1.group0", "conv1.group1"]
    tests = {(b["name"], t["category"]): t for b in layer["branches"] for t in b["categories"]}
    colourful = tests[("conv1.group0", "colourful filter")]
    assert colourful["count"] == 8 and colourful["expected"] == pytest.approx(4.0)
    assert colourful["p"] == pytest.approx(1 / math.comb(16, 8), rel=1e-6) and colourful["q"] < 1e-3
    assert tests[("conv1.group1", "colourful filter")]["count"] == 0
    assert tests[("conv1.group1", "colourful filter")]["p"] == pytest.approx(1.0)
    grey = tests[("conv1.group1", "grey filter")]
    assert grey["count"] == 8 and grey["q"] < 1e-3
    # the activation probe agrees: colour-selective units sit in group 0 only
    colour0 = tests.get(("conv1.group0", "colour"))
    assert colour0 is not None and colour0["count"] == 8 and colour0["q"] < 1e-3
    assert tests[("conv1.group1", "colour")]["count"] == 0
