"""The weight-banding lab: the axis test, the measurements on planted nets, the table, resume."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from netanatomy.cli.main import run
from netanatomy.core.banding import axis_test, banding_score
from netanatomy.labs.banding import (
    ANCHOR,
    QUICK,
    BandingSettings,
    direction,
    measure,
    scored_layers,
    summarize,
    table,
    tasks_of,
)
from netanatomy.models.zoo.bandingnet import VARIANTS, BandingNet

VARIANTS_RUN = "baseline,rotate"


# ---------------------------------------------------------------------------------------------
# The axis test


def banded(units: int, channels: int, strength: float, seed: int = 0) -> torch.Tensor:
    """[units, channels, 3, 3]: noise plus a row pattern (horizontal bands) of the given strength."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(units, channels, 3, 1, generator=gen).expand(-1, -1, 3, 3)
    return torch.randn(units, channels, 3, 3, generator=gen) + strength * rows


def smooth_isotropic(units: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Kernels with H and V both far above chance and no preferred axis: random blurs of noise
    by a symmetric kernel (the same along x and y)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(units * channels, 1, 5, 5, generator=gen)
    blur = torch.tensor([0.25, 0.5, 0.25])
    blur = (blur[:, None] * blur[None, :]).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(noise, blur)[:, :, :, :].reshape(units, channels, 3, 3)


def naive_index(w: torch.Tensor) -> float:
    """H - V from the two-way ANOVA written out kernel by kernel in float64."""
    rows = cols = total = 0.0
    for kernel in w.double().reshape(-1, w.shape[-2], w.shape[-1]).numpy():
        c = kernel - kernel.mean()
        rows += kernel.shape[1] * ((c.mean(axis=1)) ** 2).sum()
        cols += kernel.shape[0] * ((c.mean(axis=0)) ** 2).sum()
        total += (c ** 2).sum()
    return (rows - cols) / total


def test_axis_test_finds_planted_bands_and_their_transpose():
    w = banded(48, 8, strength=0.6)
    h = axis_test(w, seed=1)
    v = axis_test(w.transpose(2, 3), seed=1)
    assert h.index == pytest.approx(naive_index(w), abs=1e-12) and h.index > 0.1
    assert v.index == pytest.approx(-h.index, abs=1e-12)
    assert h.p < 0.001 and v.p < 0.001 and h.z > 4 and v.z < -4


def test_axis_test_is_not_fooled_by_smooth_isotropic_kernels():
    w = smooth_isotropic(64, 8)
    permutation = banding_score(w, n_permutations=199, seed=0)
    assert permutation.p_horizontal <= 0.01 and permutation.p_vertical <= 0.01  # both far above chance
    assert axis_test(w, seed=0).p > 0.05


def test_axis_test_p_matches_the_exact_sign_flip_distribution():
    w = banded(10, 4, strength=0.2, seed=3)
    centred = w.double() - w.double().mean(dim=(2, 3), keepdim=True)
    total = float(centred.pow(2).sum())
    d = np.array([naive_index(w[u:u + 1]) * float(centred[u].pow(2).sum()) / total for u in range(10)])
    observed = abs(d.sum())
    flips = np.array(list(itertools.product([-1.0, 1.0], repeat=10)))
    exact = float((np.abs(flips @ d) >= observed - 1e-12).mean())
    assert axis_test(w, draws=40000, seed=0).p == pytest.approx(exact, abs=0.01)


def test_axis_test_skips_what_it_cannot_transpose():
    assert axis_test(torch.randn(4, 2, 3, 5)).skipped and axis_test(torch.randn(4, 2, 1, 1)).skipped


# ---------------------------------------------------------------------------------------------
# Measurements of one network


def planted_net(variant: str, transpose: bool) -> BandingNet:
    net = BandingNet(variant=variant, width=4, in_channels=1, input_size=28)
    with torch.no_grad():
        for g in (4, 5, 6):
            conv = getattr(net, f"g{g}").conv1
            w = banded(conv.out_channels, conv.in_channels, strength=0.8, seed=g)
            conv.weight.copy_(w.transpose(2, 3) if transpose else w)
    return net


@pytest.mark.parametrize("transpose,expect", [(False, "horizontal"), (True, "vertical")])
def test_measure_reads_planted_bands_in_the_last_three_layers(transpose, expect):
    result = measure(planted_net("baseline", transpose), "baseline", permutations=99, seed=0)
    assert list(result["layers"]) == ["g4.conv1", "g5.conv1", "g6.conv1"] and result["last"] == "g6.conv1"
    for record in result["layers"].values():
        assert record["direction"] == expect and record["orientation"] == expect
        assert (record["index"] > 0.1) == (expect == "horizontal")
    assert result["head"] is None


def test_an_untrained_net_has_no_direction():
    result = measure(BandingNet(width=4, in_channels=1, input_size=28), "baseline", permutations=99, seed=0)
    assert {r["direction"] for r in result["layers"].values()} == {"none"}


def test_heads_that_see_every_position_are_scored_too():
    for variant, head, kernel in (("no_gap", "fc", [7, 7]), ("split16", "split", [7, 7])):
        net = BandingNet(variant=variant, width=4, in_channels=1, input_size=28)
        assert scored_layers(net, variant) == (["g4.conv1", "g5.conv1", "g6.conv1"], head)
        record = measure(net, variant, permutations=49, seed=0)["head"]
        assert record["layer"] == head and record["kernel"] == kernel and record["skipped"] is None


def test_direction_needs_a_significant_axis_test():
    assert direction({"axis": {"index": 0.02, "p": 0.004}}) == "horizontal"
    assert direction({"axis": {"index": -0.02, "p": 0.004}}) == "vertical"
    assert direction({"axis": {"index": 0.3, "p": 0.02}}) == "none"
    assert direction({"axis": {"index": None, "p": None, "skipped": "1x1"}}) == "none"


# ---------------------------------------------------------------------------------------------
# Across seeds


def fake_row(variant: str, seed: int, calls: dict[str, str]) -> dict:
    layers = {name: {"horizontal": 0.3, "vertical": 0.25, "index": 0.05, "effective_kernels": 100.0,
                     "share_h_over_v": 0.6, "orientation": "none", "direction": calls[name]}
              for name in ("g4.conv1", "g5.conv1", "g6.conv1")}
    return {"data": "d", "variant": variant, "seed": seed, "test_accuracy": 0.9, "layers": layers,
            "last": "g6.conv1", "head": None}


def test_agreement_is_a_majority_of_seeds_in_the_layer_the_article_is_about():
    settings = BandingSettings(variants=("baseline", "rotate", "xpool"), seeds=(0, 1, 2), data=("d",))
    h = {"g4.conv1": "none", "g5.conv1": "none", "g6.conv1": "horizontal"}
    h5 = {"g4.conv1": "none", "g5.conv1": "horizontal", "g6.conv1": "none"}
    rows = ([fake_row("baseline", s, h) for s in (0, 1)] + [fake_row("baseline", 2, h5)]
            + [fake_row("rotate", s, h) for s in (0, 1, 2)]
            + [fake_row("xpool", 0, h5), fake_row("xpool", 1, h5), fake_row("xpool", 2, h)])
    by = {v["variant"]: v for v in summarize(rows, settings)}
    assert (by["baseline"]["matching_seeds"], by["baseline"]["agrees"]) == (2, True)
    assert (by["rotate"]["matching_seeds"], by["rotate"]["agrees"]) == (0, False)
    assert by["xpool"]["target_layer"] == "g5.conv1" and by["xpool"]["matching_seeds"] == 2
    assert by["baseline"]["layers"]["g6.conv1"]["directions"] == ["horizontal", "horizontal", "none"]


def test_every_variant_has_the_articles_finding_and_tasks_go_seed_by_seed():
    assert set(ANCHOR) == set(VARIANTS)
    assert ANCHOR["rotate"]["expect"] == "vertical" and ANCHOR["no_gap"]["expect"] == "none"
    tasks = tasks_of(BandingSettings(variants=("baseline", "rotate"), seeds=(0, 1), data=("a",)))
    assert [(t.variant, t.seed) for t in tasks] == [("baseline", 0), ("rotate", 0), ("baseline", 1), ("rotate", 1)]


# ---------------------------------------------------------------------------------------------
# The lab through the CLI


def lab_args(out, *extra: str) -> list[str]:
    return ["lab", "banding", "--quick", "--variants", VARIANTS_RUN, "--seeds", "0,1", "--epochs", "3",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("banding") / "fresh"
    assert run(lab_args(out, "--json")) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_lab_writes_the_table_the_pictures_and_the_page(uninterrupted):
    out, doc = uninterrupted
    assert doc["lab"] == "banding" and [(r["variant"], r["seed"]) for r in doc["rows"]] == [
        ("baseline", 0), ("rotate", 0), ("baseline", 1), ("rotate", 1)]
    for r in doc["rows"]:
        assert (out / r["picture"]).is_file() and r["picture"].startswith("bundled/")
        assert set(r["layers"]) == {"g4.conv1", "g5.conv1", "g6.conv1"}
        assert r["layers"]["g6.conv1"]["n_kernels"] == 32 * 32 and r["layers"]["g6.conv1"]["axis"]["units"] == 32
        trained = json.loads((out / r["picture"]).parent.joinpath("train.json").read_text())["result"]
        assert r["test_accuracy"] == trained["test_accuracy"] and trained["epochs"] == 3
    assert [v["variant"] for v in doc["variants"]] == ["baseline", "rotate"]
    assert (out / "banding_index.png").stat().st_size > 10_000
    page = (out / "results.md").read_text()
    assert ANCHOR["rotate"]["article"] in page and "(bundled/rotate/seed_1/weights.png)" in page
    assert doc["settings"]["width"] == QUICK.width and doc["data"]["bundled"]["channels"] == 1


def test_a_lab_killed_mid_training_finishes_with_the_same_table(uninterrupted, tmp_path):
    """A real kill (SIGKILL of the whole process group, workers included) while networks train,
    then a plain re-run: the same table as the uninterrupted run. The killed run used two jobs
    and the re-run one, so the table also does not depend on how tasks were split."""
    out = tmp_path / "killed"
    env = {**os.environ, "NETANATOMY_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from netanatomy.cli.main import main; main()",
                             *lab_args(out, "--jobs", "2")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(not p.with_name("train.json").exists() for p in out.glob("*/*/seed_*/model.pt.resume.pt")):
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the lab finished before it could be killed"
    assert not (out / "results.json").exists()
    mid = [p for p in out.glob("*/*/seed_*/model.pt.resume.pt") if not p.with_name("train.json").exists()]
    assert mid, "no network was mid-training when killed"
    assert run(lab_args(out)) == 0
    doc = json.loads((out / "results.json").read_text())
    assert table(doc) == table(uninterrupted[1])
    assert any(r["reused"]["train"] is False for r in doc["rows"])
    resumed = [json.loads(p.with_name("train.json").read_text())["result"]["resumed_from"] for p in mid]
    assert min(resumed) >= 1  # each picked up its epoch checkpoint


def test_a_finished_lab_is_reused_whole(uninterrupted, capsys):
    out, doc = uninterrupted
    assert run(lab_args(out, "--json")) == 0
    again = json.loads(capsys.readouterr().out)
    assert table(again) == table(doc) and all(r["reused"] == {"train": True, "measure": True} for r in again["rows"])


@pytest.mark.parametrize("args", [["--variants", "baseline,nosuch"], ["--variants", ","], ["--seeds", "0,0"],
                                  ["--data", "nosuchdata"], ["--width", "1"], ["--jobs", "0"], ["--epochs", "0"]])
def test_bad_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args):
    out = tmp_path / "x"
    assert run(["lab", "banding", "--quick", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netanatomy: error:") and "\n" not in err
    assert not out.exists()
    if args[0] == "--width":
        assert "split16" in err


def test_unwritable_out_exits_2_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(["lab", "banding", "--quick", "--out", str(blocker / "lab"), "--data", "nosuchdata"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nosuchdata" not in err  # the output is checked first
