import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from netanatomy.cli.main import run
from netanatomy.util.io import dumps
from netanatomy.models.layers import discover_layers
from netanatomy.specialization.importance import importance, lesion_test, specificity
from netanatomy.specialization.lesion import LesionEvaluator
from netanatomy.specialization.subclusters import Cluster, SubCluster, random_sets, sub_clusters

CLASSES = 8
PER_CLASS = 8  # hidden units per class


def planted_model() -> nn.Sequential:
    """8 features -> 64 hidden -> 8 logits. Hidden units 0-7 (module A) alone carry class 0;
    every other class has its own 8 redundant units. Each logit is the mean of its units."""
    model = nn.Sequential(nn.Linear(CLASSES, CLASSES * PER_CLASS), nn.ReLU(), nn.Linear(CLASSES * PER_CLASS, CLASSES))
    with torch.no_grad():
        w1 = torch.zeros(CLASSES * PER_CLASS, CLASSES)
        w2 = torch.zeros(CLASSES, CLASSES * PER_CLASS)
        for j in range(CLASSES * PER_CLASS):
            w1[j, j // PER_CLASS] = 1.0
            w2[j // PER_CLASS, j] = 1.0 / PER_CLASS
        model[0].weight.copy_(w1)
        model[0].bias.zero_()
        model[2].weight.copy_(w2)
        model[2].bias.zero_()
    return model.eval()


def planted_data(n_per_class: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = 3.0 * nn.functional.one_hot(y, CLASSES).float() + 0.3 * torch.randn(y.numel(), CLASSES, generator=g)
    return x, y


def module_a() -> Cluster:
    return Cluster(0, tuple(("0", u) for u in range(PER_CLASS)))


def test_planted_module_is_important_and_class_specific():
    model = planted_model()
    x, y = planted_data()
    layer_map = discover_layers(model, (CLASSES,))
    # a "cluster" of 8 units spread over the redundant classes 1..7: no more damage than random
    spread = Cluster(1, tuple(("0", u) for u in [8, 17, 26, 35, 44, 53, 62, 15]))
    result = importance(model, layer_map, [module_a(), spread], x, y, n_random=99, seed=0)
    assert result.accuracy > 0.95
    true, other = result.tests
    assert true.cluster == 0 and other.cluster == 1
    assert true.drop == pytest.approx(1 / CLASSES, abs=0.01)          # class 0 is lost
    assert true.class_drop[0] > 0.9 and np.all(np.abs(true.class_drop[1:]) < 0.02)
    assert true.p_drop == pytest.approx(0.01) and true.p_specificity == pytest.approx(0.01)
    assert true.q_drop < 0.05 and true.q_specificity < 0.05
    assert true.effect_factor > 10
    assert other.p_drop > 0.05 and other.p_specificity > 0.05
    from scipy.stats import combine_pvalues

    assert result.fisher_drop == pytest.approx(combine_pvalues([true.p_drop, other.p_drop], method="fisher").pvalue)
    doc = result.to_json()
    json.loads(dumps(doc))  # strict JSON
    assert {"p_drop", "q_drop", "specificity", "p_specificity", "effect_factor"} <= set(doc["sub_clusters"][0])


def test_same_seed_same_numbers():
    model = planted_model()
    x, y = planted_data(30)
    layer_map = discover_layers(model, (CLASSES,))
    a = importance(model, layer_map, [module_a()], x, y, n_random=9, seed=4)
    b = importance(model, layer_map, [module_a()], x, y, n_random=9, seed=4)
    np.testing.assert_array_equal(a.tests[0].random_drop, b.tests[0].random_drop)
    assert a.tests[0].p_drop == b.tests[0].p_drop
    sub = SubCluster(0, "0", np.arange(8), 64)
    assert not np.array_equal(random_sets(sub, 5, 1), random_sets(sub, 5, 2))


def test_sub_cluster_rules():
    c = Cluster(0, (("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1), ("c", 2), ("input", 3)))
    subs = sub_clusters([c], {"a": 10, "b": 10, "c": 3})
    # a: 2 units (kept); b: 1 unit (too small); c: 3 of 3 (more than 99%); input: not a layer
    assert [(s.layer, s.size) for s in subs] == [("a", 2)]
    rs = random_sets(subs[0], 50, 0)
    assert rs.shape == (50, 2) and np.all(np.diff(rs, axis=1) > 0) and rs.max() < 10


def test_lesion_stats_by_hand():
    sub = SubCluster(3, "h", np.array([1, 2]), 10)
    totals = np.array([10, 10])
    base = np.array([10, 10])
    true = np.array([0, 10])                      # class 0 lost
    random = np.array([[10, 9], [9, 10], [10, 10]])
    t = lesion_test(sub, base, totals, true, random)
    assert t.drop == pytest.approx(0.5) and t.accuracy == pytest.approx(0.5)
    assert t.p_drop == pytest.approx(1 / 4)
    assert t.specificity == pytest.approx(1.0 / 0.5)
    # drop 0.5 over the random sets' mean drop (1/30), floored at 0.1: 5
    assert t.effect_factor == pytest.approx(5.0)
    assert specificity(np.array([0.0, 0.0]), 0.1) == 0.0


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Dropout(0.1),
              nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)]
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("consumer_bias", [True, False])
@pytest.mark.parametrize("method,exact", [("fx", True), ("fx", False), ("hook", True)])
def test_evaluator_matches_zeroing_the_weights(method, exact, consumer_bias):
    """Small lesions (delta: z minus the silenced units' part), large ones and all units
    (bias plus the kept units' part), with and without a bias in the layer that reads them."""
    model = _mlp()
    if not consumer_bias:
        model[3].bias = None
    x = torch.randn(300, 1, 6, 6, dtype=torch.float64)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some wrong answers, so accuracy moves both ways
    layer_map = discover_layers(model, (1, 6, 6))
    for layer in [layer_map.resolve("1"), layer_map.resolve("3"), layer_map.resolve("6")]:
        g = torch.Generator().manual_seed(0)
        sizes = [1, 2, 3, 4, 5, 6, 7, layer.units - 3, layer.units - 3, layer.units - 1, layer.units]
        masks = torch.ones(len(sizes), layer.units)
        for i, size in enumerate(sizes):
            masks[i, torch.randperm(layer.units, generator=g)[:size]] = 0
        ev = LesionEvaluator(model, layer, x, y, num_classes=5, batch_size=128, method=method, exact=exact)
        got = ev.correct(masks)
        for i in range(len(sizes)):
            ref = copy.deepcopy(model)
            module = ref.get_submodule(layer.module)
            with torch.no_grad():
                module.weight[masks[i] == 0] = 0
                if module.bias is not None:
                    module.bias[masks[i] == 0] = 0
                pred = ref(x).argmax(1)
            expected = torch.bincount(y[pred == y], minlength=5)
            assert torch.equal(got[i], expected), (layer.name, i)


def test_evaluator_on_conv_with_batchnorm_and_residual():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
            self.conv3 = nn.Conv2d(6, 6, 1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            a = torch.relu(self.bn1(self.conv1(x)))
            b = torch.relu(self.conv2(a)) + a   # the lesioned units also reach the sum directly
            c = torch.relu(self.conv3(b))
            return self.fc(c.mean((2, 3)))

    torch.manual_seed(1)
    model = Net().double().eval()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 1.5)
    x = torch.randn(20, 2, 5, 5, dtype=torch.float64)
    layer_map = discover_layers(model, (2, 5, 5))
    masks = torch.ones(3, 6)
    masks[0, :2] = 0
    masks[1, [1, 4]] = 0
    masks[2, 5] = 0
    for name in ("conv1", "conv2"):
        layer = layer_map.resolve(name)
        outs = {m: LesionEvaluator(model, layer, x, torch.zeros(20, dtype=torch.long), method=m[0], exact=m[1])
                .outputs(x, masks) for m in [("fx", True), ("fx", False), ("hook", True)]}
        for i in range(3):  # by hand: zero the units' post-activation outputs with a forward hook
            keep = masks[i].view(1, 6, 1, 1).double()
            if name == "conv1":
                handle = model.bn1.register_forward_hook(lambda m, a, out: out * keep - (1 - keep) * 0)
                # relu(bn * keep) == relu(bn) * keep since keep is 0/1
            else:
                handle = model.conv2.register_forward_hook(lambda m, a, out: out * keep)
            try:
                expected = model(x)
            finally:
                handle.remove()
            for key, out in outs.items():
                torch.testing.assert_close(out[i], expected, rtol=1e-10, atol=1e-12, msg=f"{name} {key}")


def test_cli_clusters_then_importance(tmp_path):
    out = tmp_path / "clusters.json"
    code = run(["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "2", "--seed", "0", "--json", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert {"k", "ncut", "shuffle", "clusters"} <= set(doc)
    assert set(doc["shuffle"]) == {"method", "n", "mean", "std", "z", "p"} and doc["shuffle"]["n"] == 2
    assert not (tmp_path / "clusters.json.tasks").exists()
    units = [u for c in doc["clusters"] for u in c["units"]]
    assert len(units) == 784 + 4 * 256 + 10 and set(units[0]) == {"layer", "index"}
    report = tmp_path / "importance.json"
    code = run(["importance", "zoo:mlp-fmnist", "--clusters", str(out), "--data", "bundled", "--random", "3",
                "--limit", "200", "--json", "--out", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["random"] == 3 and result["sub_clusters"]
    # with 3 random sets a percentile p lies on the grid k / 4, k = 1..4
    assert all(round(4 * t["p_drop"], 9) in (1.0, 2.0, 3.0, 4.0) for t in result["sub_clusters"])
    assert run(["importance", "zoo:mlp-fmnist", "--clusters", str(tmp_path / "missing.json"), "--data", "bundled"]) == 2


def test_cli_clusters_resumes_from_checkpoint(tmp_path, capsys):
    out = tmp_path / "c.json"
    args = ["clusters", "zoo:mlp-fmnist", "--k", "4", "--shuffles", "2", "--seed", "2", "--json"]
    assert run(args) == 0
    full = json.loads(capsys.readouterr().out)
    # a run that stopped after the first shuffle left its n-cut in c.json.tasks/
    from netanatomy.core.clusterability import shuffle_key, shuffle_seed, shuffled_graph
    from netanatomy.core.spectral import spectral_clustering
    from netanatomy.models import load_model
    from netanatomy.scale import TaskStore
    from netanatomy.specialization.clusters import layer_display_names
    from netanatomy.specialization.extract import weight_network

    config = {"task": "clusters shuffle", "model": "zoo:mlp-fmnist", "weights": None, "model_args": [],
              "input_shape": [1, 28, 28], "graph": "weights", "data": None, "k": 4, "method": "layer", "seed": 2,
              "n_init": 25, "examples": 5000, "layers": None}
    loaded = load_model("zoo:mlp-fmnist")
    net = weight_network(loaded.module, loaded.input_shape,
                         layer_names=layer_display_names(discover_layers(loaded.module, loaded.input_shape))).network
    first = spectral_clustering(shuffled_graph(net, "layer", shuffle_seed(2, 0)), 4, seed=2).ncut
    TaskStore(tmp_path / "c.json.tasks", config).put(shuffle_key(0), {"ncut": np.asarray(first)})
    assert run(args + ["--out", str(out)]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["shuffle"] == full["shuffle"]
    assert not (tmp_path / "c.json.tasks").exists()
    # the checkpoint is really read: a planted value shows up in the mean
    TaskStore(tmp_path / "c.json.tasks", config).put(shuffle_key(0), {"ncut": np.asarray(first + 3.0)})
    assert run(args + ["--out", str(out)]) == 0
    planted = json.loads(capsys.readouterr().out)
    assert planted["shuffle"]["mean"] == pytest.approx(full["shuffle"]["mean"] + 1.5)
    # a store made for other settings is not read
    TaskStore(tmp_path / "c.json.tasks", {**config, "k": 5}).put(shuffle_key(0), {"ncut": np.asarray(first + 3.0)})
    assert run(args + ["--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["shuffle"] == full["shuffle"]


@pytest.mark.parametrize("method,exact", [("auto", False), ("fx", True), ("hook", False)])
def test_refined_float32_counts_equal_float64_counts_with_near_ties(method, exact):
    """Two classes whose logits differ by ~1e-7: float32 alone cannot decide, refinement does
    (in every evaluation path: delta, masked suffix, hooked full model)."""
    import copy

    from netanatomy.models.layers import discover_layers
    from netanatomy.specialization.lesion import LesionEvaluator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).eval()
    with torch.no_grad():  # class 2 is class 1 scaled by 1 + 1e-7: every 1-vs-2 call is a near-tie
        model[2].weight.mul_(30)
        model[2].weight[2] = model[2].weight[1] * (1 + 1e-7)
        model[2].bias[2] = model[2].bias[1]
    x = torch.randn(500, 6)
    y = torch.randint(0, 3, (500,))
    layer = discover_layers(model, (6,)).resolve("0")
    masks = (torch.rand(12, 64) > 0.3).float()
    truth = LesionEvaluator(copy.deepcopy(model).double(), layer, x.double(), y).correct(masks)
    refined = LesionEvaluator(model, layer, x, y, refine=True, method=method, exact=exact, batch_size=128)
    assert torch.equal(refined.correct(masks), truth)
    assert refined.refined_rows > 0
    plain = LesionEvaluator(model, layer, x, y, method=method, exact=exact, batch_size=128).correct(masks)
    assert not torch.equal(plain, truth)  # the planted ties really need the refinement


def test_lesions_apply_the_models_own_input_normalization_hook():
    """torchvision/timm models normalize through a root forward pre-hook: the split prefix must run it."""
    from netanatomy.data import open_dataset
    from netanatomy.models import load_model
    from netanatomy.models.layers import discover_layers
    from netanatomy.specialization.lesion import LesionEvaluator

    loaded = load_model("zoo:mlp-fmnist", normalize=((0.5,), (0.25,)))
    x, y = open_dataset("bundled", "test", limit=500).tensors()
    with torch.no_grad():
        plain = int((loaded.module(x).argmax(1) == y).sum())
    layer = discover_layers(loaded.module, loaded.input_shape).resolve("fc2")
    evaluator = LesionEvaluator(loaded.module, layer, x, y)
    assert evaluator.method.startswith("fx")
    assert int(evaluator.correct(torch.ones(1, layer.units)).sum()) == plain


def test_linear_reading_a_channel_map_along_its_last_axis_is_lesioned_exactly():
    """A Linear that reads conv1d channels along the length axis cannot take the delta
    shortcut over units; the evaluator falls back to the plain masked product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.Linear(8, 5), nn.Flatten(),
                          nn.Linear(30, 4)).double().eval()
    x = torch.randn(200, 2, 10, dtype=torch.float64)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 4
    layer = discover_layers(model, (2, 10)).resolve("0")
    masks = torch.ones(3, 6)
    masks[0, :2] = 0
    masks[1, 1:5] = 0
    masks[2] = 0
    got = LesionEvaluator(model, layer, x, y, num_classes=4).correct(masks)
    for i in range(3):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            ref[0].weight[masks[i] == 0] = 0
            ref[0].bias[masks[i] == 0] = 0
            pred = ref(x).argmax(1)
        assert torch.equal(got[i], torch.bincount(y[pred == y], minlength=4)), i
