"""Lesions are exact and never touch the model (issue 9).

- Whatever the masks (every unit, none, some; batches of one example or many; one mask per
  suffix pass or many), every evaluation path leaves the model's state bit-identical and gives
  the counts of a plain reference: a float64 copy of the model whose units' outputs are zeroed
  by a forward hook.
- The traced path and the hook path zero the same tensor (the unit's output as lesion.py's
  docstring defines it) on a zoo of architectures, to float64 rounding.
- Certified mixed precision: a planted case where float32 picks the wrong class with a gap
  above the old near-tie threshold comes out identical to float64, and the per-row error
  bounds hold on every zoo architecture.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netanatomy.models.layers import discover_layers
from netanatomy.specialization import lesion as lesion_module
from netanatomy.specialization.lesion import LesionEvaluator

# ---------------------------------------------------------------------------------------------
# Small architectures


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu0(self.stem(x))
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out = self.relu2(out + x)          # conv2's units (after bn2) are summed into the stream
        return self.fc(out.mean((2, 3)))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b2a = nn.Conv2d(4, 3, 1)
        self.b2b = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, padding=1)
        self.b3 = nn.Conv2d(4, 2, 1)
        self.head = nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.relu(self.b1(x))
        b = F.relu(self.b2b(F.relu(self.b2a(x))))
        c = F.relu(self.b3(self.pool(x)))
        y = torch.cat([a, b, c], dim=1)
        return self.fc(torch.flatten(F.relu(self.head(y)), 1))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.avg_pool2d(F.relu(self.conv2(h)), 1)
        return self.fc(h.mean((2, 3)))


def _seq(*layers):
    return lambda: nn.Sequential(*layers)


# name -> (factory, input shape, [(layer, module whose output the reference zeroes)]). For a
# functional ReLU the reference zeroes its input (relu(0) = 0, the same lesion).
ZOO = {
    "conv-bn-relu": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                                           nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)),
                     (2, 5, 5), [("0", "2"), ("3", "4")]),
    "conv-relu-bn": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(5),
                                           nn.Flatten(), nn.Linear(125, 3)),
                     (2, 5, 5), [("0", "1")]),
    "conv-relu-bn-maxpool": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(5),
                                                   nn.MaxPool2d(2), nn.Conv2d(5, 4, 1), nn.ReLU(), nn.Flatten(),
                                                   nn.Linear(16, 3)),
                             (2, 5, 5), [("0", "1"), ("4", "5")]),
    "linear-relu-dropout": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Dropout(0.5),
                                                  nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)),
                            (3, 4), [("1", "2"), ("4", "5")]),
    "conv-no-nonlinearity": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                                                   nn.Linear(20, 3)),
                             (2, 5, 5), [("0", "0")]),
    "residual": (Residual, (2, 5, 5), [("conv1", "relu1"), ("conv2", "bn2"), ("stem", "relu0")]),
    "inception": (Inception, (2, 5, 5), [("b2b", "b2b"), ("b1", "b1"), ("b2a", "b2a")]),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, groups=2), nn.ReLU(),
                                      nn.Conv2d(6, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)),
                (2, 5, 5), [("0", "1"), ("2", "3")]),
    "functional-relu": (Functional, (2, 5, 5), [("conv", "bn"), ("conv2", "conv2")]),
    "inplace-relu": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(inplace=True),
                                           nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                           nn.Flatten(), nn.Linear(36, 3)),
                     (2, 5, 5), [("0", "1"), ("2", "4")]),
}


def _build(name: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ZOO[name][0]().to(dtype)
    for m in model.modules():                   # batch norms that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _masks(units: int, seed: int = 0) -> torch.Tensor:
    """Every unit silenced, none, one, all but one, and random sets (equal sizes included)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(units), torch.ones(units)]
    one = torch.ones(units)
    one[0] = 0
    rows += [one, 1 - one]
    for size in (1, units // 2, units // 2, units - 1):
        m = torch.ones(units)
        m[torch.randperm(units, generator=g)[:size]] = 0
        rows.append(m)
    return torch.stack(rows)


def _reference(model: nn.Module, module: str, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 copy of the model with `module`'s output multiplied by keep (per channel)."""
    ref = copy.deepcopy(model).double().eval()
    target = ref.get_submodule(module)

    def hook(mod, args, out):
        return out * keep.double().view(1, -1, *([1] * (out.dim() - 2)))

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return ref(x.double())
    finally:
        handle.remove()


def _reference_counts(model, module, masks, x, y, classes) -> torch.Tensor:
    out = torch.zeros((masks.shape[0], classes), dtype=torch.long)
    for i, keep in enumerate(masks):
        pred = _reference(model, module, keep, x).argmax(1)
        out[i] = torch.bincount(y[pred == y], minlength=classes)
    return out


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(name, m.training) for name, m in model.named_modules()])


def _assert_untouched(model: nn.Module, snapshot) -> None:
    state, modes = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), f"{key} changed"
    assert [(name, m.training) for name, m in model.named_modules()] == modes, "training flags changed"


# ---------------------------------------------------------------------------------------------
# 1. never touches the model


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(45, 4))


CONFIGS = {  # name -> (method, exact, refine, the method that must run, precision)
    "fx": ("fx", True, False, "fx", "auto"),
    "fx-delta": ("fx", False, False, "fx-delta", "auto"),
    "hook": ("hook", True, False, "hook", "auto"),
    "refine": ("auto", False, True, "fx-delta", "auto"),
    "refine-certified": ("auto", False, True, "fx-delta", "certified"),
    "refine-sampled": ("auto", False, True, "fx-delta", "sampled"),
    "refine-exact": ("fx", True, True, "fx", "certified"),
    "refine-hook": ("hook", False, True, "hook", "auto"),
}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch_size,chunk", [(1, 1 << 20), (1, 1), (7, 1 << 20), (7, 1)])
def test_lesions_never_touch_the_model(arch, config, batch_size, chunk):
    method, exact, refine, runs, precision = CONFIGS[config]
    torch.manual_seed(3)
    model = _mlp() if arch == "mlp" else _cnn()
    shape = (6,) if arch == "mlp" else (2, 5, 5)
    model = model.float() if refine else model.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.5, 0.5)
    layer_map = discover_layers(model.eval(), shape)
    model.train()                     # a model left in training mode stays in training mode
    x = torch.randn(7, *shape, dtype=next(model.parameters()).dtype)
    y = torch.randint(0, 4, (7,))
    snapshot = _snapshot(model)
    methods = set()
    for layer_name, post in ([("0", "1"), ("2", "3")] if arch == "mlp" else [("0", "2"), ("3", "4")]):
        layer = layer_map.resolve(layer_name)
        masks = _masks(layer.units)
        ev = LesionEvaluator(model, layer, x, y, num_classes=4, batch_size=batch_size, chunk_elements=chunk,
                             method=method, exact=exact, refine=refine, precision=precision)
        methods.add(ev.method)
        if refine and precision != "auto":
            assert ev.precision["mode"] == (precision if method != "hook" else "sampled"), ev.precision
        got = ev.correct(masks)
        _assert_untouched(model, snapshot)
        assert torch.equal(got, _reference_counts(model, post, masks, x, y, 4)), (layer_name, config)
        ev.outputs(x[:1], masks)
        _assert_untouched(model, snapshot)
    assert runs in methods and all(m.split("-")[0] == runs.split("-")[0] for m in methods), methods


def test_silencing_every_unit_before_a_linear_reads_the_bias_without_writing_it():
    """The issue's case: every unit silenced, one example, the next layer's bias fed to a ReLU in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        model[2].bias[:2] = -1.0          # negative entries: a ReLU in place would zero them
    bias = model[2].bias.detach().clone()
    layer = discover_layers(model, (4,)).resolve("0")
    for n in (1, 5):
        x = torch.randn(n, 4, dtype=torch.float64)
        y = torch.zeros(n, dtype=torch.long)
        ev = LesionEvaluator(model, layer, x, y, num_classes=3, method="fx")
        assert ev.method == "fx-delta"
        ev.correct(torch.zeros(2, 6))
        assert torch.equal(model[2].bias, bias)


# ---------------------------------------------------------------------------------------------
# 2. the traced path and the hook path give the same lesion


@pytest.mark.parametrize("name", list(ZOO))
def test_traced_and_hooked_lesions_are_the_same_on_every_architecture(name):
    model = _build(name)
    shape = ZOO[name][1]
    layer_map = discover_layers(model, shape)
    x = torch.randn(6, *shape, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    for layer_name, module in ZOO[name][2]:
        layer = layer_map.resolve(layer_name)
        masks = _masks(layer.units, seed=1)
        traced = LesionEvaluator(model, layer, x, y, num_classes=3, method="fx", exact=True)
        hooked = LesionEvaluator(model, layer, x, y, num_classes=3, method="hook", exact=True)
        delta = LesionEvaluator(model, layer, x, y, num_classes=3, method="fx")
        assert (traced.method, hooked.method) == ("fx", "hook")
        a, b, c = traced.outputs(x, masks), hooked.outputs(x, masks), delta.outputs(x, masks)
        scale = float(a.abs().max()) + 1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * scale, msg=f"{name} {layer_name}: fx vs hook")
        torch.testing.assert_close(c, b, rtol=0, atol=1e-11 * scale, msg=f"{name} {layer_name}: {delta.method}")
        for i, keep in enumerate(masks):
            expected = _reference(model, module, keep, x)
            torch.testing.assert_close(a[i], expected, rtol=0, atol=1e-12 * scale, msg=f"{name} {layer_name} {i}")


def test_the_layer_map_names_the_nonlinearity_as_the_units_output():
    """conv -> ReLU -> BN: the unit's output is the ReLU's, not the batch norm's (both paths)."""
    model = _build("conv-relu-bn")
    layer = discover_layers(model, (2, 5, 5)).resolve("0")
    assert [(t.module, t.where, t.transform) for t in layer.post] == [("1", "output", None)]
    split = lesion_module._split_at(model, "0", allow_delta=False)
    post = list(split.prefix.graph.nodes)[-1].args[0][0]
    assert post.op == "call_module" and post.target == "1"


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:                    # fx cannot trace this
            h = h * 1.0
        return self.fc2(h)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x)))))


def test_falls_back_to_hooks_only_on_known_tracing_failures(monkeypatch):
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    model = _DataDependent().double().eval()
    layer = discover_layers(model, (4,)).resolve("fc1")
    ev = LesionEvaluator(model, layer, x, y, num_classes=3)
    assert ev.method == "hook" and "TraceError" in ev.fallback_reason
    with pytest.raises(Exception):
        LesionEvaluator(model, layer, x, y, num_classes=3, method="fx")
    twice = _Twice().double().eval()
    layer = discover_layers(twice, (4,)).resolve("fc1")
    ev = LesionEvaluator(twice, layer, x, y, num_classes=3)
    assert ev.method == "hook" and "called 2 times" in ev.fallback_reason

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    model = _mlp().double().eval()
    layer = discover_layers(model, (6,)).resolve("0")
    monkeypatch.setattr(lesion_module, "_split_at", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        LesionEvaluator(model, layer, torch.randn(5, 6, dtype=torch.float64), torch.zeros(5, dtype=torch.long))


def test_importance_json_records_the_lesion_path_and_precision():
    from netanatomy.specialization.importance import importance
    from netanatomy.specialization.subclusters import Cluster

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    layer_map = discover_layers(model, (6,))
    result = importance(model, layer_map, [Cluster(0, (("0", 1), ("0", 2), ("0", 5)))], x, y, n_random=4)
    doc = result.to_json()
    assert doc["lesion_method"] == {"0": "fx-delta"}
    precision = doc["lesion_precision"]["0"]
    assert precision["mode"] == "certified" and precision["checked_rows"] > 0 and precision["disagreements"] == 0


# ---------------------------------------------------------------------------------------------
# 3. mixed precision: counts of a float64 evaluation


PAIRS = 64


def _cancelling_model() -> nn.Module:
    """x -> 3 "pre" units -> 2*PAIRS hidden units of 2e4 to 4e4 -> 2 logits.

    Logit 0 sums the hidden units with alternating signs: in exact arithmetic each pair cancels
    to d_j - e_j (plus 1e-4 * (1 + x1) from the first of the pair), and the bias of logit 1 is
    set so that class 0 wins by 0.5e-4 to 1.5e-4; in float32 the rounding of the large values
    (an ulp of 2e-3) moves logit 0 by several 1e-3, above the old near-tie threshold
    1e-3 * (1 + max |logit|) on many rows."""
    pre = nn.Linear(2, 3)
    hidden = nn.Linear(3, 2 * PAIRS)
    out = nn.Linear(2 * PAIRS, 2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        pre.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        pre.bias.copy_(torch.tensor([0.0, 1.0, 1.0]))                  # u0 = x0, u1 = 1 + x1, u2 = 1
        w = torch.zeros(2 * PAIRS, 3)
        w[:, 0] = (2e4 * (1 + torch.rand(PAIRS, generator=g))).repeat_interleave(2)
        w[0::2, 1] = 1e-4 / PAIRS
        w[:, 2] = torch.rand(2 * PAIRS, generator=g)                    # d_j, e_j
        hidden.weight.copy_(w)
        hidden.bias.zero_()
        sign = torch.tensor([1.0, -1.0]).repeat(PAIRS)
        d = float((w[:, 2].double() * sign.double()).sum())
        out.weight.copy_(torch.stack([sign, torch.zeros(2 * PAIRS)]))
        out.bias.copy_(torch.tensor([0.0, d + 0.5e-4]))
    return nn.Sequential(pre, nn.ReLU(), hidden, nn.ReLU(), out).eval()


def _cancelling_data(n: int = 400):
    g = torch.Generator().manual_seed(0)
    x = torch.stack([0.5 + torch.rand(n, generator=g), torch.rand(n, generator=g)], dim=1)
    return x


@pytest.mark.parametrize("method,mode", [("auto", "certified"), ("fx", "certified"), ("hook", "sampled")])
def test_cancelling_activations_come_out_as_in_float64(method, mode):
    model = _cancelling_model()
    x = _cancelling_data()
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        logits64 = twin(x.double())
        logits32 = model(x)
    y = logits64.argmax(1)
    assert bool((logits64[:, 0] - logits64[:, 1] > 0).all())       # tiny but positive true gaps
    # the planted case is real: float32 is wrong, with gaps above the old threshold
    gap32 = (logits32[:, 1] - logits32[:, 0])
    wrong = (logits32.argmax(1) != y) & (gap32 > 1e-3 * (1 + logits32.abs().amax(1)))
    assert int(wrong.sum()) > 20
    layer = discover_layers(model, (2,)).resolve("0")
    masks = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    truth = LesionEvaluator(twin, layer, x.double(), y, num_classes=2).correct(masks)
    # sampled mode: a near-tie tolerance that flags nothing, so the random check must catch the misses
    tol = 1e-7 if mode == "sampled" else 1e-3
    ev = LesionEvaluator(model, layer, x, y, num_classes=2, method=method, refine=True, batch_size=128,
                         refine_tol=tol)
    assert torch.equal(ev.correct(masks), truth)
    assert ev.precision["mode"] == mode, ev.precision
    if mode == "sampled":   # the sampled check caught float32's misses and recomputed the batches
        assert ev.precision["disagreements"] > 0 and ev.precision["recomputed_batches"] > 0
    else:
        assert ev.precision["disagreements"] == 0
    plain = LesionEvaluator(model, layer, x, y, num_classes=2, method=method).correct(masks)
    assert not torch.equal(plain, truth)


@pytest.mark.parametrize("name", list(ZOO))
def test_certified_error_bounds_hold_on_every_architecture(name, monkeypatch):
    """The bound of every row covers how far float32 moves each gap between the top logit and
    another from float64's (checked where the suffix can be bounded), and the refined counts
    are float64's."""
    model = _build(name, torch.float32, seed=2)
    shape = ZOO[name][1]
    layer_map = discover_layers(model, shape)
    x = torch.randn(40, *shape)
    y = torch.randint(0, 3, (40,))
    thresholds = []
    run = lesion_module._Bounds.run

    def spy(self, inputs, errs):
        logits, top, close = run(self, inputs, errs)
        thresholds.append((logits, self.last_threshold))
        return logits, top, close

    monkeypatch.setattr(lesion_module._Bounds, "run", spy)
    for layer_name, module in ZOO[name][2]:
        layer = layer_map.resolve(layer_name)
        masks = _masks(layer.units, seed=3)
        ev = LesionEvaluator(model, layer, x, y, num_classes=3, refine=True, method="fx", exact=False,
                             precision="certified")
        assert ev.precision["mode"] == "certified", ev.precision
        truth = _reference_counts(model, module, masks, x, y, 3)
        thresholds.clear()
        assert torch.equal(ev.correct(masks), truth), (name, layer_name, ev.precision)
        logits32 = torch.cat([t[0] for t in thresholds]).double()
        thr = torch.cat([t[1] for t in thresholds])
        expected = torch.stack([_reference(model, module, keep, x) for keep in masks]).reshape(-1, 3)
        top = logits32.argmax(1, keepdim=True)
        actual = ((logits32.gather(1, top) - logits32) - (expected.gather(1, top) - expected)).abs().amax(1)
        assert bool((actual <= thr).all()), (name, layer_name, float((actual - thr).max()))


def test_certified_mode_covers_plain_chains_and_says_why_not_elsewhere():
    torch.manual_seed(0)
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    chain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    layer = discover_layers(chain, (6,)).resolve("0")
    assert LesionEvaluator(chain, layer, x, y, refine=True).precision["mode"] == "certified"
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3)).eval()
    layer = discover_layers(other, (6,)).resolve("0")
    ev = LesionEvaluator(other, layer, x, y, refine=True)
    assert ev.precision["mode"] == "sampled" and "Sigmoid" in ev.precision["reason"]
    masks = (torch.rand(5, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    counts = ev.correct(masks)
    assert ev.precision["checked_rows"] >= min(64, 5 * 30)
    assert torch.equal(counts, _reference_counts(other, "1", masks, x, y, 3))


def test_auto_precision_samples_models_with_convolutions_and_says_why():
    model = _build("conv-bn-relu", torch.float32)
    layer = discover_layers(model, (2, 5, 5)).resolve("0")
    x, y = torch.randn(20, 2, 5, 5), torch.randint(0, 3, (20,))
    ev = LesionEvaluator(model, layer, x, y, num_classes=3, refine=True)
    assert ev.precision["mode"] == "sampled" and "convolutions" in ev.precision["reason"]
    assert LesionEvaluator(model, layer, x, y, num_classes=3, refine=True,
                           precision="certified").precision["mode"] == "certified"


def _tf32_settings():
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without the fp32_precision settings")
def test_ieee_float32_turns_tf32_off_on_cuda_only_and_gives_the_settings_back():
    from netanatomy.util.devices import ieee_float32

    before = _tf32_settings()
    assert before[0] == "tf32"   # PyTorch's default for cuDNN convolutions: the reason for the switch
    with ieee_float32("cpu"):
        assert _tf32_settings() == before
    with pytest.raises(KeyError), ieee_float32("cuda"):   # the flags can be set without a GPU
        assert _tf32_settings() == ("ieee", "ieee")
        raise KeyError
    assert _tf32_settings() == before


def test_lesion_counts_run_without_tf32(monkeypatch):
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def recording(device):
        seen.append(str(device))
        yield

    monkeypatch.setattr(lesion_module, "ieee_float32", recording)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    layer = discover_layers(model, (6,)).resolve("2")
    ev = LesionEvaluator(model, layer, torch.randn(8, 6), torch.randint(0, 3, (8,)), num_classes=3)
    ev.correct(torch.ones(2, 5))
    assert seen == ["cpu"]
