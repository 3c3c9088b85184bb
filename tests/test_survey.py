"""The survey: every part that applies, within a budget, resumable after a kill, as atlas.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from netanatomy.atlas import parts as P
from netanatomy.atlas.survey import SurveySettings, run_survey
from netanatomy.data import open_dataset
from netanatomy.models import load_model

MODEL = "zoo:minception-fmnist"
SMALL = dict(layers=("conv1", "mixed1"), steps=4, shuffles=2, n_random=2, examples=200)


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def data():
    return open_dataset("bundled", "test", limit=200)


def _stable(doc: dict) -> dict:
    """atlas.json without what depends on the clock (run times, re-used or not)."""
    doc = json.loads(json.dumps(doc))
    doc.pop("survey")
    return doc


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "files").rglob("*.png"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, loaded, data):
    root = tmp_path_factory.mktemp("atlas") / "a"
    doc = run_survey(root, SurveySettings(model=MODEL, data="bundled", **SMALL), loaded=loaded, dataset=data,
                     build=False)
    return root, doc


def test_every_part_runs_and_lands_in_the_atlas(uninterrupted):
    root, doc = uninterrupted
    parts = doc["survey"]["parts"]
    for name in ("layers", "banding", "weights", "svd", "families", "connections", "probes", "branches", "clusters",
                 "importance", "coherence", "examples/conv1", "examples/mixed1", "render/0", "diversity"):
        assert parts[name]["status"] == "done", (name, parts[name])
    layers = {lay["name"]: lay for lay in doc["layers"]}
    assert layers["mixed1"]["kind"] == "concat" and len(layers["mixed1"]["branches"]) == 4
    assert layers["mixed1_3x3"]["reads"] == ["mixed1_3x3_bottleneck"] and layers["conv1"]["reads"] == ["input"]
    assert layers["conv1"]["banding"] is not None and "weights" in layers["conv1"]["figures"]
    assert layers["mixed1"]["branch_stats"]["correlation"]["n_permutations"] == 999
    unit = doc["units"]["mixed1"]["20"]
    assert unit["branch"] == "mixed1_3x3" and unit["render"] and unit["examples"] and unit["weights"]
    assert (root / unit["render"]).is_file() and (root / unit["examples"]).is_file()
    samples = doc["units"]["conv1"]["2"]["diversity"]
    assert len(samples) == 3 and len(set(samples)) == 3 and all((root / f).is_file() for f in samples)
    assert len({(root / f).read_bytes() for f in samples}) == 3     # three different images
    assert doc["units"]["conv1"]["12"]["diversity"] == []           # only the first 8 units of a layer
    assert unit["upstream"] == [] and unit["downstream"]            # read by mixed2's convs
    up = doc["units"]["conv1"]["3"]["upstream"]
    assert up and up[0]["layer"] == "input"
    assert doc["clusters"] and sum(c["size"] for c in doc["clusters"]) > 0
    assert doc["clusterability"]["shuffles"] == 2
    with_lesions = [c for c in doc["clusters"] if c["importance"]]
    assert with_lesions and all(len(t["random_drops"]) == 2 for c in with_lesions for t in c["importance"]["by_layer"])
    # every file the atlas names exists
    for lay in doc["layers"]:
        for path in lay["figures"].values():
            assert (root / path).is_file(), path
    assert (root / "atlas.json").is_file()


def test_a_killed_survey_finishes_with_the_same_atlas(tmp_path, loaded, data, uninterrupted, monkeypatch):
    first_root, first = uninterrupted
    root = tmp_path / "b"
    settings = SurveySettings(model=MODEL, data="bundled", **SMALL)
    real = P.examples_part
    calls = {"n": 0}

    def dies_on_the_second_layer(ctx, layer, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(ctx, layer, *a, **k)

    monkeypatch.setattr(P, "examples_part", dies_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run_survey(root, settings, loaded=loaded, dataset=data, build=False)
    assert not (root / "atlas.json").exists()
    monkeypatch.setattr(P, "examples_part", real)
    again = run_survey(root, settings, loaded=loaded, dataset=data, build=False)
    reused = {n for n, p in again["survey"]["parts"].items() if p["status"] == "done (re-used)"}
    assert {"layers", "banding", "probes", "clusters", "examples/conv1"} <= reused
    assert again["survey"]["parts"]["examples/mixed1"]["status"] == "done"
    assert _stable(again) == _stable(first)
    assert _files(root) == _files(first_root)


def test_a_tight_budget_leaves_out_parts_and_says_why(tmp_path, loaded, data):
    settings = SurveySettings(model=MODEL, data="bundled", budget_min=0.001, **SMALL)
    doc = run_survey(tmp_path / "c", settings, loaded=loaded, dataset=data, build=False)
    parts = doc["survey"]["parts"]
    left = {n: p for n, p in parts.items() if p["status"] == "left out"}
    assert "render/0" in left and "the budget" in left["render/0"]["reason"]
    assert parts["layers"]["status"] == "done"            # the cheap parts always run
    assert doc["units"]["conv1"]["0"]["render"] is None   # and the pages say what is missing


def test_importance_is_skipped_when_labels_are_not_the_models_classes(tmp_path, loaded):
    photos = open_dataset("photos?n=40&channels=1&size=28", "test")
    settings = SurveySettings(model=MODEL, data="photos", **{**SMALL, "layers": ("conv1",)})
    doc = run_survey(tmp_path / "d", settings, loaded=loaded, dataset=photos, build=False)
    assert doc["survey"]["parts"]["importance"]["status"] == "skipped"
    assert "not the model's classes" in doc["survey"]["parts"]["importance"]["reason"]


def test_a_concatenation_with_paged_paths_shows_its_paths_pictures(loaded):
    from netanatomy.atlas.survey import _unit_entry, own_pictures
    from netanatomy.models.layers import discover_layers

    lm = discover_layers(loaded.module, loaded.input_shape)
    paths = [b.name for b in lm.resolve("mixed1").branches]
    assert own_pictures(lm, ["conv1", *paths, "mixed1"]) == ["conv1", *paths]
    assert own_pictures(lm, ["conv1", "mixed1"]) == ["conv1", "mixed1"]
    layers_doc = [{"name": "mixed1", "kind": "concat",
                   "branches": [{"name": b.name, "start": b.start, "stop": b.stop} for b in lm.resolve("mixed1").branches]}]
    part = {"mixed1_3x3": {"0": "a.png", "23": "b.png"}}
    # mixed1_3x3 starts at unit 16 of mixed1
    assert [_unit_entry(part, layers_doc, "mixed1", u) for u in (16, 39, 17, 0)] == ["a.png", "b.png", None, None]


def test_connections_skip_links_a_depthwise_conv_does_not_have():
    from torch import nn

    from netanatomy.atlas.parts import SurveyContext, connections_part
    from netanatomy.models.layers import discover_layers

    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.ReLU())
    lm = discover_layers(model, (3, 8, 8))
    ctx = SurveyContext(type("L", (), {"module": model})(), lm, None, Path("."), [], 0, "cpu", 1, None)
    out = connections_part(ctx)
    down = out["0"]["2"]["downstream"]
    assert [d["unit"] for d in down] == [2]          # channel 2 feeds depthwise unit 2 only


def test_a_survey_killed_inside_a_part_resumes_from_its_finished_tasks(tmp_path, loaded, data, uninterrupted,
                                                                       monkeypatch):
    """Killed after the first render batch of a part: the re-run takes that batch from the part's
    task store (OUT/results/tasks/PART/), computes only the rest, and gives the same atlas."""
    import importlib

    R = importlib.import_module("netanatomy.visualize.render")
    first_root, first = uninterrupted
    root = tmp_path / "c"
    settings = SurveySettings(model=MODEL, data="bundled", **SMALL)
    real = R._render_task

    def dies_on_the_second_batch(job, chunk):   # of a part (the calibration renders are single batches)
        if chunk[0] > 0:
            raise KeyboardInterrupt
        return real(job, chunk)

    monkeypatch.setattr(R, "_render_task", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_survey(root, settings, loaded=loaded, dataset=data, build=False)
    stores = [p for p in (root / "results" / "tasks").iterdir() if any(p.glob("*.npz"))]
    assert len(stores) == 1 and len(list(stores[0].glob("*.npz"))) == 1
    seen = []
    monkeypatch.setattr(R, "_render_task", lambda job, chunk: seen.append(chunk) or real(job, chunk))
    again = run_survey(root, settings, loaded=loaded, dataset=data, build=False)
    # render/0 is conv1 + mixed1, 72 images in batches (0, 64) and (64, 72); its stored first batch is
    # not rendered again: (0, 64) runs once, for the rate calibration (a 64-image render)
    assert (64, 72) in seen and seen.count((0, 64)) == 1, seen
    assert _stable(again) == _stable(first)
    assert _files(root) == _files(first_root)
    assert not (root / "results" / "tasks").exists()
