import json

import numpy as np
import pytest
import torch

from netanatomy.cli.main import run
from netanatomy.labs.branches import (
    ANCHOR,
    ARMS,
    QUICK,
    group_difference_test,
    group_stats,
    unsplit_svd,
)
from netanatomy.models.layers import discover_layers
from netanatomy.models.zoo.alexnet import AlexNet

STAGES = {f"{arm}_{stage}" for arm in ARMS for stage in ("train", "measure")}
SPLIT_KEYS = {"test_accuracy", "colourfulness", "frequency", "colour_group", "colourfulness_difference",
              "colourfulness_p", "colourfulness_z", "frequency_difference", "frequency_p",
              "colour_group_lower_frequency"}


def lab(capsys, *args: str) -> dict:
    code = run(["lab", "branches", "--quick", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def numbers(rows: list[dict]) -> list[dict]:
    """Rows without what depends on the run rather than the result (timings, re-use)."""
    return [{k: v for k, v in r.items() if k not in ("reused", "seconds")} for r in rows]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """An uninterrupted quick run of seeds 0 and 1 (shared by the tests that compare with it)."""
    out = tmp_path_factory.mktemp("lab") / "fresh"
    assert run(["lab", "branches", "--quick", "--seeds", "0-1", "--out", str(out), "--json"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_lab_writes_the_table_and_the_pictures(two_seeds, capsys):
    out, doc = two_seeds
    assert doc["lab"] == "branches" and doc["anchor"] == ANCHOR and [r["seed"] for r in doc["rows"]] == [0, 1]
    for row in doc["rows"]:
        assert SPLIT_KEYS <= set(row["split"]) and set(row["reused"]) == STAGES
        assert set(row["unsplit"]["svd"]) == {"raw", "centered"}
        assert 0 <= row["split"]["colourfulness_p"] <= 1 and 0 < row["split"]["test_accuracy"] <= 1
        for arm in ARMS:
            measured = json.loads((out / f"seed_{row['seed']}/{arm}/measure.json").read_text())["result"]
            groups = measured["groups"]
            # the row's numbers are the unit values' group means, the colour group the larger one
            col = np.array(groups["unit_colourfulness"])
            half = len(col) // 2
            assert [g["colourfulness"] for g in groups["groups"]] == pytest.approx([col[:half].mean(),
                                                                                    col[half:].mean()])
            assert groups["colour_group"] == int(col[half:].mean() > col[:half].mean())
        for name in ("filters.png", "unsplit_svd.png", "split/model.pt", "unsplit/model.pt"):
            assert (out / f"seed_{row['seed']}" / name).is_file(), name
    # the unsplit arm is the same network without groups
    assert doc["model_args"]["split"]["towers"] == 2 and doc["model_args"]["unsplit"]["towers"] == 1
    across = doc["across_seeds"]
    assert across["seeds"] == 2 and 0 <= across["colour_group_seeds"] <= 2
    assert len(doc["summary"]) == 5
    text = (out / "results.md").read_text()
    assert "| article |" in text and "| article (InceptionV1) |" in text
    assert "seed_0/filters.png" in text and "seed_1/filters.png" in text
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]

    again = lab(capsys, "--out", str(out), "--seeds", "0-1")  # re-used, not recomputed
    assert all(r["reused"] == {s: True for s in STAGES} for r in again["rows"])
    assert numbers(again["rows"]) == numbers(doc["rows"])


def test_a_run_interrupted_after_the_first_seed_finishes_with_the_same_results(two_seeds, tmp_path, capsys):
    out = tmp_path / "lab"
    first = lab(capsys, "--out", str(out), "--seeds", "0")
    resumed = lab(capsys, "--out", str(out), "--seeds", "0-1")
    assert resumed["rows"][0]["reused"] == {s: True for s in STAGES}
    assert resumed["rows"][1]["reused"] == {s: False for s in STAGES}
    assert numbers(resumed["rows"]) == numbers(two_seeds[1]["rows"])
    assert numbers(first["rows"]) == numbers(two_seeds[1]["rows"][:1])


def test_a_run_killed_mid_training_resumes_from_its_checkpoint(two_seeds, tmp_path, monkeypatch, capsys):
    import netanatomy.training.loop as loop

    real = loop._checkpoint
    calls = []

    def die_after_first_epoch(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_checkpoint", die_after_first_epoch)
    out = tmp_path / "lab"
    assert run(["lab", "branches", "--quick", "--out", str(out)]) == 130  # as after Ctrl-C
    assert calls == [1] and (out / "seed_0/split/model.pt.resume.pt").is_file()
    assert not (out / "seed_0/split/train.json").exists()
    monkeypatch.setattr(loop, "_checkpoint", real)
    doc = lab(capsys, "--out", str(out))
    train = json.loads((out / "seed_0/split/train.json").read_text())["result"]
    assert train["resumed_from"] == 1 and train["epochs"] == QUICK.epochs
    assert numbers(doc["rows"]) == numbers(two_seeds[1]["rows"][:1])


def planted_filters(colour_group: int, units: int = 16, seed: int = 0) -> torch.Tensor:
    """conv1 filters [units, 3, 5, 5]: one group opponent colour (off the grey axis), the other grey."""
    gen = torch.Generator().manual_seed(seed)
    half = units // 2
    grey = torch.randn(half, 1, 5, 5, generator=gen).repeat(1, 3, 1, 1)  # the same weights on R, G and B
    colour = torch.randn(half, 3, 5, 5, generator=gen)
    colour = colour - colour.mean(dim=1, keepdim=True)                    # no grey component at all
    return torch.cat([colour, grey] if colour_group == 0 else [grey, colour])


@pytest.mark.parametrize("colour_group", [0, 1])
def test_planted_model_colour_group_is_found_with_small_p(colour_group):
    model = AlexNet(small=True, width=0.25, num_classes=5)
    with torch.no_grad():
        model.conv1.weight.copy_(planted_filters(colour_group, model.conv1.out_channels))
    stats = group_stats(model.conv1.weight.detach(), permutations=999, seed=0)
    assert stats["colour_group"] == colour_group
    assert stats["groups"][colour_group]["colourfulness"] == pytest.approx(1.0)
    assert stats["groups"][1 - colour_group]["colourfulness"] == pytest.approx(0.0, abs=1e-12)
    assert stats["colourfulness_difference"] == pytest.approx(1.0)
    # only the true split and its mirror are as extreme: p is at (or next to) the floor 1/1000
    assert stats["colourfulness_test"]["p"] <= 3 / 1000


def test_group_difference_test_against_its_definition():
    values = np.array([0.1, 0.3, 0.2, 0.9, 0.7, 0.8])
    groups = np.array([0, 0, 0, 1, 1, 1])
    test = group_difference_test(values, groups, permutations=500, seed=3)
    assert test["observed"] == pytest.approx(0.6) and test["n"] == 500 and test["tail"] == "right"
    # of the 20 splits of 6 units into 3 + 3 only the true one and its mirror reach 0.6: about
    # 500 / 10 relabellings are as extreme, so p is near (50 + 1) / 501
    assert 0.05 < test["p"] < 0.16
    same = group_difference_test(np.ones(6), groups, permutations=50, seed=0)
    assert same["observed"] == 0 and same["p"] == 1.0  # no difference: every relabelling is as extreme


def test_planted_unsplit_net_svd_lines_up_with_colour():
    """conv1 units 0-7 colour, 8-15 grey; conv2's first half reads the colour units strongly and
    the grey ones weakly, its second half the reverse: the main contrast of |W| is colour."""
    model = AlexNet(small=True, width=0.25, num_classes=5, towers=1)
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    gen = torch.Generator().manual_seed(1)
    strength = torch.full((c2, c1), 0.05)
    strength[: c2 // 2, : c1 // 2] = 1.0
    strength[c2 // 2:, c1 // 2:] = 1.0
    signs = torch.sign(torch.randn(model.conv2.weight.shape, generator=gen))
    with torch.no_grad():
        model.conv1.weight.copy_(planted_filters(0, c1))
        model.conv2.weight.copy_(signs * strength[:, :, None, None] * (1 + 0.1 * torch.rand(
            model.conv2.weight.shape, generator=gen)))
    summary, report = unsplit_svd(model, discover_layers(model, model.netanatomy_input_shape))
    assert summary["lower"] == "conv1" and summary["upper"] == "conv2" and report.svd.centered
    centred = summary["centered"]["correlations"]["vector_0"]["colourfulness"]
    assert abs(centred["pearson"]) > 0.99 and centred["pearson_p"] < 1e-6
    raw = summary["raw"]["correlations"]["vector_1"]["colourfulness"]  # raw M: vector 0 is overall strength
    assert abs(raw["pearson"]) > 0.99


def test_alexnet_unsplit_has_no_groups_and_the_same_widths():
    split, unsplit = AlexNet(small=True, width=0.5), AlexNet(small=True, width=0.5, towers=1)
    assert [getattr(unsplit, f"conv{i}").groups for i in range(1, 6)] == [1] * 5
    assert [getattr(split, f"conv{i}").out_channels for i in range(1, 6)] == \
        [getattr(unsplit, f"conv{i}").out_channels for i in range(1, 6)]
    assert unsplit.norm1.groups == 1 and split.norm1.groups == 2
    assert AlexNet(small=True, stride1=2).conv1.stride == (2, 2)
    assert AlexNet(small=True).conv1.stride == (1, 1)  # the default is unchanged
    planted = AlexNet(small=True, conv1_std=0.01)
    weight, bias = planted.conv1.weight.detach(), planted.conv1.bias.detach()
    assert 0.008 < float(weight.std()) < 0.012 and float(bias.abs().max()) == 0


@pytest.mark.parametrize("args", [["--seeds", "a,b"], ["--seeds", "0,0"], ["--epochs", "0"], ["--data", "nosuchdata"],
                                  ["--data", "bundled"], ["--width", "0"]])
def test_bad_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args):
    out = tmp_path / "x"
    assert run(["lab", "branches", "--quick", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netanatomy: error:") and "\n" not in err
    assert not out.exists()
    if args == ["--data", "bundled"]:
        assert "colour" in err


def test_unwritable_out_exits_2_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(["lab", "branches", "--quick", "--out", str(blocker / "lab"), "--data", "nosuchdata"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nosuchdata" not in err  # the output is checked first
