"""`netanatomy equivariance` on a planted first layer: what the text says, the figure, the boundary.

The planted layer (5x5, or 3x3 with k=3): an oriented edge (dark left, bright right, so its
stripes run vertically: 90 degrees) at four quarter turns, a weaker copy of it (a duplicate
of the reference), a centre-surround blob with a weaker copy (a family of duplicates with no
orientation), and noise. A second conv plants a family turned by quarter turns deeper down.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from netanatomy.cli.main import run

MODEL = '''
import torch
from torch import nn

EDGES = [1, 4, 7, 10]          # the edge at 0, 90, 180 and 270 degrees
DUP, BLOB, BLOB_COPY = 12, 3, 9


class Planted(nn.Module):
    netanatomy_input_shape = (3, 24, 24)

    def __init__(self, k=5, deeper=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        c = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        edge = torch.sign(c)[None, :].expand(k, k) * torch.tensor([1.0, 0.4, -0.6])[:, None, None]
        r2 = c[:, None] ** 2 + c[None, :] ** 2
        tint = torch.tensor([0.5, 0.8, 1.0])[:, None, None]
        blob = (torch.exp(-r2 / 2) - 0.4 * torch.exp(-r2 / 8)).expand(3, k, k) * tint
        noisy = lambda w, s=0.05: w + s * torch.randn(w.shape, generator=g)
        w = torch.randn(14, 3, k, k, generator=g) * 0.3
        w[EDGES[0]] = edge                                  # the clean one is the best-matched: the reference
        for r, u in enumerate(EDGES[1:], 1):
            w[u] = noisy(torch.rot90(edge, r, dims=(-2, -1)))
        w[DUP] = noisy(0.7 * edge)
        w[BLOB], w[BLOB_COPY] = blob, noisy(0.5 * blob, 0.02)
        self.conv1 = nn.Conv2d(3, 14, k, padding=k // 2, bias=False)
        self.conv1.weight.data.copy_(w)
        self.conv2 = None
        if deeper:                                          # units 0-3: one kernel turned 0-3 quarter turns
            self.conv2 = nn.Conv2d(14, 6, 3, padding=1, bias=False)
            w2 = torch.randn(6, 14, 3, 3, generator=g) * 0.3
            a = torch.randn(14, 3, 3, generator=g)
            for r in range(4):
                w2[r] = 0.0
                for i, ch in enumerate(EDGES):              # turning the image moves edge channel i to i + r
                    w2[r, EDGES[(i + r) % 4]] = torch.rot90(a[ch], r, dims=(-2, -1))
                w2[r, BLOB] = torch.rot90(a[BLOB], r, dims=(-2, -1))
            self.conv2.weight.data.copy_(w2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if self.conv2 is not None:
            x = torch.relu(self.conv2(x))
        return x.mean(dim=(2, 3))


def build(k: int = 5, deeper: bool = False):
    return Planted(k, deeper)
'''
EDGES, DUP, BLOB, BLOB_COPY = [1, 4, 7, 10], 12, 3, 9


@pytest.fixture(scope="module")
def model_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "planted.py"
    path.write_text(MODEL)
    return f"{path}:build"


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _family_line(out: str, unit: int) -> str:
    """The line of the human output of the family holding `unit`."""
    for line in out.splitlines():
        if line.startswith("family ") and (f" {unit}@" in line or f" {unit}," in line or line.endswith(f" {unit}")):
            return line
    raise AssertionError(f"no family line with unit {unit} in:\n{out}")


@pytest.mark.parametrize("k, resolution", [(5, 22.5), (3, 45.0)])
def test_human_output_names_duplicates_orientation_and_resolution(model_spec, capsys, k, resolution):
    code, out, err = _run(capsys, ["equivariance", model_spec, "--layer", "conv1", "--model-arg", f"k={k}"])
    assert code == 0, err
    assert f"angles to the nearest {resolution:g} deg: a {k}x{k} kernel resolves no finer" in out
    edges = _family_line(out, EDGES[0])
    assert "rotated, 1 duplicate of the reference, period 360" in edges
    assert f"reference {EDGES[0]} oriented 90 deg, coherence 1.00" in edges
    members = edges.rsplit(": ", 1)[1]
    assert members == f"{EDGES[0]}@0, {DUP}@0 dup, {EDGES[1]}@90, {EDGES[2]}@180, {EDGES[3]}@270"
    blobs = _family_line(out, BLOB)
    assert "duplicates (copies at 0 degrees)" in blobs and "no orientation (coherence 0.00)" in blobs
    assert blobs.endswith(f": {BLOB}, {BLOB_COPY}")
    assert "period 90" in blobs if k == 3 else "no period" in blobs   # a 3x3 ring turned by 45 moves corners to edges
    assert sum(line.startswith("family ") for line in out.splitlines()) == 2  # the noise joins nothing


def test_json_is_the_families_plus_resolution(model_spec, capsys):
    code, out, err = _run(capsys, ["equivariance", model_spec, "--layer", "conv1", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["resolution"] == 22.5 and doc["mode"] == "any angle"
    first = doc["families"][0]
    assert set(first) == {"units", "angles", "reference", "period", "scores", "kind", "duplicates", "resolution",
                          "orientation", "coherence"}
    assert first["kind"] == "rotated" and first["duplicates"] == [DUP] and first["reference"] == EDGES[0]
    assert doc["families"][1]["kind"] == "duplicates" and doc["families"][1]["orientation"] is None
    assert "figure" not in doc                                           # no --out, no files


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_out_writes_the_figure_and_the_families(model_spec, capsys, tmp_path: Path):
    out_dir = tmp_path / "eqv"
    code, out, err = _run(capsys, ["equivariance", model_spec, "--layer", "conv1", "--out", str(out_dir), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["families.json", "families.png"]   # no temporary left
    assert doc["figure"] == str(out_dir / "families.png")
    saved = json.loads((out_dir / "families.json").read_text())
    assert saved == doc
    img = _png(out_dir / "families.png")
    h, w, _ = img.shape
    assert 600 <= w <= 4000 and 400 <= h <= 6000                         # two rows of five filters at most
    assert w > h                                                         # two families: a wide strip
    # real content: the edge's colours (saturated, not grey) and some dark text, not a blank page
    spread = img.max(axis=2).astype(int) - img.min(axis=2)
    assert (spread > 100).mean() > 0.02
    assert (img.max(axis=2) < 80).mean() > 0.005
    # the human output names the files
    code, out, _ = _run(capsys, ["equivariance", model_spec, "--layer", "conv1", "--out", str(out_dir)])
    assert code == 0 and f"figure:   {out_dir / 'families.png'}" in out


def test_deeper_layer_is_drawn_with_a_colour_bar(model_spec, capsys, tmp_path: Path):
    code, out, err = _run(capsys, ["equivariance", model_spec, "--layer", "conv2", "--model-arg", "deeper=True",
                                   "--out", str(tmp_path)])
    assert code == 0, err
    assert "angles in quarter turns (90 deg)" in out
    line = _family_line(out, 0)
    assert line.startswith("family 0: 4 units, rotated, period 360") and "oriented" not in line
    assert sorted(int(m.split("@")[0]) for m in line.rsplit(": ", 1)[1].split(", ")) == [0, 1, 2, 3]
    img = _png(tmp_path / "families.png")
    red = (img[..., 0] > 150) & (img[..., 2] < 120)
    blue = (img[..., 2] > 150) & (img[..., 0] < 120)
    assert red.mean() > 0.002 and blue.mean() > 0.002                   # the diverging map, both signs


def test_unwritable_out_is_exit_2_before_the_work(model_spec, capsys, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (blocker / "eqv", blocker):
        code, out, err = _run(capsys, ["equivariance", model_spec, "--layer", "conv1", "--out", str(target)])
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "--out" in err and "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert blocker.read_text() == "not a folder"


def test_figure_of_many_families_says_how_many_are_left_out():
    from netanatomy.anatomy import family_figure

    w = torch.randn(80, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    fams = [{"units": [2 * i, 2 * i + 1], "angles": [0.0, 90.0], "reference": 2 * i, "period": 360.0,
             "scores": [1.0, 0.9], "kind": "rotated", "duplicates": [], "resolution": 45.0,
             "orientation": None, "coherence": 0.2} for i in range(30)]
    fig = family_figure(w, fams, title="t", resolution=45.0)
    texts = [t.get_text() for t in fig.texts]
    assert any("the 24 largest drawn" in t for t in texts)
    assert any("6 smaller families not drawn" in t for t in texts)
    assert sum(t.startswith("family ") for t in texts) == 24
