import json

import numpy as np
import pytest

from netanatomy.cli.commands.lab import parse_seeds
from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.labs.specialization import (
    ANCHOR,
    QUICK,
    LabSettings,
    open_lab_data,
    record_data_used,
    results_markdown,
)
from netanatomy.labs.stages import read_stage, run_stage, settings_key

STAGES = ("train", "clusters", "importance", "coherence")
ROW_KEYS = {"seed", "test_accuracy", "ncut", "shuffled_mean", "shuffled_std", "z", "p", "shuffles", "sub_clusters",
            "important", "class_specific", "coherent", "beats_all_random", "fisher", "reused", "seconds"}


def lab(capsys, *args: str) -> dict:
    code = run(["lab", "specialization", "--quick", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def numbers(row: dict) -> dict:
    """A row without what depends on the run rather than the result (timings, re-use)."""
    return {k: v for k, v in row.items() if k not in ("reused", "seconds")}


def test_quick_lab_runs_resumes_and_recomputes_what_changed(tmp_path, capsys):
    out = tmp_path / "lab"
    doc = lab(capsys, "--out", str(out))
    assert doc["lab"] == "specialization" and doc["anchor"] == ANCHOR
    assert doc["anchor"]["ncut"] == [9.86, 9.91] and doc["anchor"]["shuffled_mean"] == [10.06, 10.11]
    (row,) = doc["rows"]
    assert ROW_KEYS <= set(row) and row["seed"] == 0 and row["shuffles"] == QUICK.shuffles
    assert 0.3 < row["test_accuracy"] <= 1.0  # one epoch on 3000 examples is far above chance (0.1)
    # the row's statistics, recomputed from the raw shuffled n-cuts the clusters stage kept
    ncuts = np.array(json.loads((out / "seed_0/clusters.json").read_text())["result"]["ncuts"])
    assert len(ncuts) == QUICK.shuffles
    assert row["shuffled_mean"] == pytest.approx(ncuts.mean()) and row["shuffled_std"] == pytest.approx(ncuts.std())
    assert row["z"] == pytest.approx((row["ncut"] - ncuts.mean()) / ncuts.std())
    assert row["p"] == pytest.approx((np.sum(ncuts <= row["ncut"]) + 1) / (len(ncuts) + 1))
    # with 4 random sets the smallest p is 1/5: no sub-cluster can pass BH at q < 0.05
    assert row["sub_clusters"] > 0 and row["important"] == 0 and row["class_specific"] == 0
    assert row["coherent"]["any"] == 0
    assert set(row["coherent"]) == {"dataset", "correlation", "visualization_entropy", "visualization_objective",
                                    "any"}
    assert set(row["fisher"]) >= {"importance_drop", "coherence_visualization_entropy"}
    assert set(row["beats_all_random"]) == {"importance_drop", "importance_specificity", "dataset", "correlation",
                                            "visualization_entropy", "visualization_objective"}
    assert row["reused"] == {s: False for s in STAGES} and len(doc["summary"]) == 1
    assert doc["compute_s"] == pytest.approx(sum(row["seconds"].values()))
    for name in ("results.json", "results.md", "seed_0/model.pt", "seed_0/renders.png",
                 *(f"seed_0/{s}.json" for s in STAGES)):
        assert (out / name).is_file(), name
    assert not (out / "seed_0/clusters.tasks").exists()  # the shuffle checkpoint is gone once done
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]
    assert "| anchor |" in (out / "results.md").read_text()
    mtimes = {s: (out / f"seed_0/{s}.json").stat().st_mtime_ns for s in STAGES}

    again = lab(capsys, "--out", str(out))
    assert again["rows"][0]["reused"] == {s: True for s in STAGES}
    assert numbers(again["rows"][0]) == numbers(row)
    assert {s: (out / f"seed_0/{s}.json").stat().st_mtime_ns for s in STAGES} == mtimes

    changed = lab(capsys, "--out", str(out), "--random", "3")  # only the stages that use random sets rerun
    assert changed["rows"][0]["reused"] == {"train": True, "clusters": True, "importance": False, "coherence": False}
    assert changed["rows"][0]["ncut"] == row["ncut"]

    fresh = lab(capsys, "--out", str(tmp_path / "fresh"), "--random", "3")  # same seed, from scratch
    assert fresh["rows"][0]["reused"] == {s: False for s in STAGES}
    assert numbers(fresh["rows"][0]) == numbers(changed["rows"][0])

    # an interrupted shuffle run resumes from its finished shuffles: plant 5 done n-cuts, ask for 6
    from netanatomy.core.clusterability import shuffle_key
    from netanatomy.scale import TaskStore

    settings = json.loads((out / "seed_0/clusters.json").read_text())["settings"]
    store = TaskStore(out / "seed_0/clusters.tasks", {k: v for k, v in settings.items() if k != "shuffles"})
    for i in range(5):
        store.put(shuffle_key(i), {"ncut": np.asarray(100.0)})
    resumed = lab(capsys, "--out", str(out), "--shuffles", "6")
    ncuts = json.loads((out / "seed_0/clusters.json").read_text())["result"]["ncuts"]
    assert ncuts[:5] == [100.0] * 5 and ncuts[5] < 100 and resumed["rows"][0]["shuffles"] == 6
    assert not (out / "seed_0/clusters.tasks").exists()


@pytest.mark.parametrize("args", [["--seeds", "a,b"], ["--seeds", "0,0"], ["--k", "1"], ["--epochs", "0"],
                                  ["--data", "nosuchdata"]])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args):
    assert run(["lab", "specialization", "--quick", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netanatomy: error:") and "\n" not in err


def test_unknown_lab_exits_2(capsys):
    assert run(["lab", "nosuchlab"]) == 2


def test_parse_seeds():
    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds("3-5") == (3, 4, 5) and parse_seeds("7") == (7,)


def test_stages_reuse_only_same_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    first = run_stage(tmp_path, "s", {"a": 1, "b": [1, 2]}, compute)
    assert not first.reused and first.result == {"value": 1} and first.key == settings_key({"b": [1, 2], "a": 1})
    same = run_stage(tmp_path, "s", {"b": [1, 2], "a": 1}, compute)
    assert same.reused and same.result == {"value": 1} and same.key == first.key and len(calls) == 1
    other = run_stage(tmp_path, "s", {"a": 2, "b": [1, 2]}, compute)
    assert not other.reused and other.result == {"value": 2} and other.key != first.key
    assert read_stage(tmp_path, "s", {"a": 1, "b": [1, 2]}) is None  # overwritten by the new settings
    missing = run_stage(tmp_path, "s", {"a": 2, "b": [1, 2]}, compute, requires=[tmp_path / "weights.pt"])
    assert not missing.reused and len(calls) == 3


def test_quick_falls_back_to_bundled_sample_only_in_quick_mode(monkeypatch, tmp_path):
    import netanatomy.data.spec as spec

    monkeypatch.setattr(spec, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    data = open_lab_data(QUICK)
    assert data.spec == "bundled" and "bundled" in data.note and len(data.test) == QUICK.test_limit
    with pytest.raises(UsageError, match="Fashion-MNIST"):
        open_lab_data(LabSettings())
    # what is recorded is the data used, so that the recorded command gives the same results
    used, command = record_data_used(QUICK, data, "netanatomy lab specialization --out o --data fashion-mnist --quick")
    assert used.data == "bundled" and command == "netanatomy lab specialization --out o --data bundled --quick"
    assert record_data_used(QUICK, data, "netanatomy lab specialization")[1].endswith(" --data bundled")
    real = open_lab_data(LabSettings(data="bundled", test_limit=10))
    assert record_data_used(LabSettings(data="bundled"), real, "x --data bundled") == (LabSettings(data="bundled"),
                                                                                    "x --data bundled")


def test_quick_lab_on_the_fallback_records_bundled(monkeypatch, tmp_path, capsys):
    import netanatomy.data.spec as spec

    monkeypatch.setattr(spec, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    doc = lab(capsys, "--out", str(tmp_path / "lab"), "--shuffles", "1", "--random", "1", "--steps", "1")
    assert doc["data"]["spec"] == "bundled" and "not available" in doc["data"]["note"]
    assert doc["settings"]["data"] == "bundled"
    assert "--data bundled" in doc["command"] and "fashion-mnist" not in doc["command"]


def test_results_markdown_puts_rows_beside_the_anchor():
    row = {"seed": 4, "test_accuracy": 0.891, "ncut": 9.9, "shuffled_mean": 10.1, "shuffled_std": 0.04, "z": -5.0,
           "p": 0.0196, "sub_clusters": 20, "important": 3, "class_specific": 1,
           "coherent": {"dataset": 1, "correlation": 2, "visualization_entropy": 0, "visualization_objective": 5},
           "beats_all_random": {"importance_drop": 6, "importance_specificity": 2, "dataset": 0, "correlation": 7,
                                "visualization_entropy": 3, "visualization_objective": 8}}
    doc = {"command": "netanatomy lab specialization", "settings": {"recipe": "Adam", "n_random": 19},
           "data": {"spec": "fashion-mnist", "test_examples": 10000, "note": ""}, "wall_s": 12.0, "compute_s": 300.0,
           "machine": {"cpus": 2, "torch_threads": 2, "device": "cpu"}, "anchor": ANCHOR, "rows": [row],
           "summary": ["seed 4: ..."]}
    text = results_markdown(doc)
    assert "| 4 | 0.8910 | 9.900 | 10.100 | 0.040 | -5.00 | 0.0196 | 20 | 3 | 1 | 1 / 2 / 0 / 5 |" in text
    assert "| anchor | | 9.86 to 9.91 | 10.06 to 10.11 |" in text and "- seed 4: ..." in text
    assert "| 4 | 6 | 2 | 0 | 7 | 3 | 8 |" in text
    assert "no single test can reach q < 0.05" in text  # 19 random sets: the smallest p is 0.05
