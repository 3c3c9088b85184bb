import json

import numpy as np
import pytest
import scipy.stats as sps
import torch

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.models.zoo.mlp import MLP
from netanatomy.specialization.coherence import (
    coherence,
    full_spearman_squared,
    mean_pair_correlation,
    prediction_entropy,
    scaled_transforms,
    top_inputs_entropy,
    visualization_scores,
)
from netanatomy.specialization.subclusters import Cluster


def planted_values(n: int = 600, units: int = 200, seed: int = 0):
    """Units 0-7 fire together for class 0 (one shared latent, as strong as the noise of one unit);
    the others are class-blind noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    latent = (labels == 0) * 1.5 + 0.5 * rng.normal(size=n)
    values = rng.normal(size=(n, units))
    values[:, :8] = latent[:, None] + 0.5 * rng.normal(size=(n, 8))
    return {"h": values}, labels


def test_planted_set_is_coherent_random_sets_are_not():
    values, labels = planted_values()
    module = Cluster(0, tuple(("h", u) for u in range(8)))
    blind = Cluster(1, tuple(("h", u) for u in range(20, 28)))
    result = coherence(values, labels, [module, blind], n_random=99, seed=0)
    by = {(t.cluster, t.kind): t for t in result.tests}
    assert by[0, "dataset"].value == 0.0                  # its top 10 inputs are all class 0
    assert by[0, "dataset"].p < 0.05 and by[0, "dataset"].tail == "left"  # ties at 0 count as extreme
    assert by[0, "correlation"].value > 0.3
    assert by[0, "correlation"].p == pytest.approx(0.01) and by[0, "correlation"].tail == "right"
    assert by[1, "dataset"].p > 0.05 and by[1, "correlation"].p > 0.05
    assert all(t.q >= t.p for t in result.tests)
    doc = result.to_json()
    assert set(doc["fisher"]) == {"dataset", "correlation"}
    again = coherence(values, labels, [module, blind], n_random=99, seed=0)
    assert [t.p for t in again.tests] == [t.p for t in result.tests]


def test_top_inputs_entropy_by_hand():
    values = np.array([[5.0, 0.0], [4.0, 0.0], [0.0, 9.0], [-6.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    # unit 0 alone: top 2 by |value| are examples 3 (label 0) and 0 (label 0) -> entropy 0
    # units {0, 1}: scores 5, 4, 9, 6 -> examples 2 and 3, labels 1 and 0 -> 1 bit
    ent = top_inputs_entropy(values, labels, np.array([[0], [1]]), top=2)
    np.testing.assert_allclose(ent, [0.0, 1.0])  # unit 1: example 2, then the first of the zero ties
    ent = top_inputs_entropy(values, labels, np.array([[0, 1]]), top=2)
    np.testing.assert_allclose(ent, [1.0])


def test_mean_pair_correlation_matches_scipy():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(50, 6))
    v[:, 1] += v[:, 0]
    v[:, 4] = 1.0  # zero variance: correlations 0
    r2 = full_spearman_squared(v)
    sets = np.array([[0, 1, 2], [3, 4, 5]])
    rho = sps.spearmanr(v[:, [0, 1, 2]]).statistic ** 2
    expected0 = (rho.sum() - 3) / 6
    got = mean_pair_correlation(r2, sets)
    assert got[0] == pytest.approx(expected0)
    # unit 4 has no variance: its pairs count 0, so the set {3, 4, 5} averages one pair over three
    assert r2[4].sum() == 0.0 and got[1] == pytest.approx(sps.spearmanr(v[:, 3], v[:, 5]).statistic ** 2 / 3)


def planted_class_mlp(hidden: int = 64, seed: int = 0) -> MLP:
    """784-hidden-10 MLP: hidden units 0-3 share one input direction and alone feed class 0's
    logit; every other unit feeds nothing, so rendering them leaves the logits near 0."""
    g = torch.Generator().manual_seed(seed)
    net = MLP(widths=(hidden,), num_classes=10, normalize=False)
    with torch.no_grad():
        net.fc1.weight.copy_(torch.randn(hidden, 784, generator=g) / 28.0)
        net.fc1.bias.zero_()
        shared = torch.randn(784, generator=g) / 28.0
        net.fc1.weight[:4] = shared + 0.1 * net.fc1.weight[:4]
        net.fc2.weight.zero_()
        net.fc2.bias.zero_()
        net.fc2.weight[0, :4] = 1.0
    return net.eval()


def planted_class_values(net: MLP, n: int = 400) -> dict[str, np.ndarray]:
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {"fc1": net.fc1(x.flatten(1)).double().numpy()}


def test_visualization_planted_class_unit_is_coherent(monkeypatch):
    import netanatomy.visualize as visualize

    net = planted_class_mlp()
    values = planted_class_values(net)
    scales = {"fc1": (values["fc1"].mean(0), values["fc1"].std(0))}
    module = Cluster(0, tuple(("fc1", u) for u in range(4)))
    blind = Cluster(1, tuple(("fc1", u) for u in range(20, 24)))
    calls = []
    real_render = visualize.render
    monkeypatch.setattr(visualize, "render", lambda model, objs, **kw: calls.append(len(objs)) or
                        real_render(model, objs, **kw))
    result = coherence(values, None, [module, blind], kinds=["visualization"], model=net, unit_scale=scales,
                       n_random=59, steps=64, seed=0)
    assert calls == [2 * 60]  # every sub-cluster and every random set in one batched render
    by = {(t.cluster, t.kind): t for t in result.tests}
    ent, obj = by[0, "visualization_entropy"], by[0, "visualization_objective"]
    assert ent.value < 0.1 and ent.tail == "left"  # the rendering is confidently class 0
    assert ent.p == pytest.approx(1 / 60) and ent.q < 0.05
    assert obj.value > obj.random.max() and obj.p == pytest.approx(1 / 60) and obj.tail == "right"
    assert by[1, "visualization_entropy"].p > 0.05 and by[1, "visualization_objective"].p > 0.05
    doc = result.to_json()
    assert set(doc["fisher"]) == {"visualization_entropy", "visualization_objective"}
    assert doc["render"]["objective"] == "standardized" and doc["render"]["images"] == 120
    assert doc["render"]["transforms"]["pad"] == 2  # Lucid's pad 12 scaled to a 28-pixel input
    assert tuple(result.renderings[0, "fc1"].shape) == (1, 28, 28)
    again = coherence(values, None, [module, blind], kinds=["visualization"], model=net, unit_scale=scales,
                      n_random=59, steps=64, seed=0)
    assert [t.value for t in again.tests] == [t.value for t in result.tests]


def test_visualization_scores_standardize_per_unit():
    net = planted_class_mlp(hidden=16)
    values = planted_class_values(net, 200)
    mean, std = values["fc1"].mean(0), values["fc1"].std(0)
    scores = visualization_scores(net, [("fc1", [0, 1]), ("fc1", [5, 9, 12])], unit_scale={"fc1": (mean, std)},
                                  steps=8, transforms=None)
    with torch.no_grad():
        pre = net.fc1(scores.images.flatten(1)).double().numpy()
    np.testing.assert_allclose(scores.raw, [pre[0, [0, 1]].mean(), pre[1, [5, 9, 12]].mean()], rtol=1e-5)
    expected = [((pre[0, [0, 1]] - mean[[0, 1]]) / std[[0, 1]]).mean(),
                ((pre[1, [5, 9, 12]] - mean[[5, 9, 12]]) / std[[5, 9, 12]]).mean()]
    np.testing.assert_allclose(scores.objective, expected, rtol=1e-4)
    with torch.no_grad():
        p = torch.softmax(net(scores.images).double(), 1)
    np.testing.assert_allclose(scores.entropy, -(p * torch.log2(p)).sum(1).numpy(), rtol=1e-6)
    assert scores.standardized and scores.images.shape == (2, 1, 28, 28)


def test_prediction_entropy_and_scaled_transforms():
    np.testing.assert_allclose(prediction_entropy(torch.zeros(2, 8)), [3.0, 3.0])
    # logits (200, 0): p1 = 1 / (1 + e^200), entropy = p1 (200 + 1) / ln 2 to first order (float64: not 0)
    p1 = 1.0 / (1.0 + np.exp(200.0))
    assert prediction_entropy(torch.tensor([[200.0, 0.0]]))[0] == pytest.approx(p1 * 201 / np.log(2), rel=1e-9)
    t = scaled_transforms(28, 28)
    assert (t.pad, t.jitter, t.jitter2, t.scale, t.angle) == (2, 1, 1, (0.9, 1.1), (-10.0, 10.0))
    assert scaled_transforms(224, 224).pad == 12


def test_coherence_kinds_are_checked():
    values, labels = planted_values(100)
    two = [Cluster(0, (("h", 0), ("h", 1)))]
    with pytest.raises(UsageError, match="needs the model"):
        coherence(values, labels, two, kinds=["visualization"])
    with pytest.raises(UsageError, match="unknown coherence kind"):
        coherence(values, labels, two, kinds=["vision"])
    with pytest.raises(UsageError):
        coherence(values, None, two, kinds=["dataset"])


def test_cli_coherence(tmp_path, capsys):
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps({"clusters": [
        {"id": 0, "units": [{"layer": "fc2", "index": i} for i in range(20)]},
        {"id": 1, "units": [{"layer": "fc3", "index": i} for i in range(0, 60, 3)] + [{"layer": "input", "index": 5}]},
    ]}))
    code = run(["coherence", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled", "--random", "5",
                "--limit", "300", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["examples"] == 300 and doc["random"] == 5
    assert {(t["cluster"], t["layer"], t["kind"]) for t in doc["tests"]} == {
        (0, "fc2", "dataset"), (0, "fc2", "correlation"), (1, "fc3", "dataset"), (1, "fc3", "correlation")}
    code = run(["coherence", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled", "--random", "3",
                "--limit", "300", "--kind", "visualization", "--steps", "8", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(t["cluster"], t["kind"]) for t in doc["tests"]] == [
        (0, "visualization_entropy"), (0, "visualization_objective"),
        (1, "visualization_entropy"), (1, "visualization_objective")]
    assert doc["render"] == {"steps": 8, "lr": 0.05, "objective": "standardized", "images": 8,
                             "transforms": {"pad": 2, "jitter": 1, "scale": [0.9, 1.1], "angle": [-10.0, 10.0],
                                            "jitter2": 1}}
    assert run(["coherence", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled",
                "--kind", "visualisation"]) == 2
    assert "unknown coherence kind 'visualisation'" in capsys.readouterr().err
