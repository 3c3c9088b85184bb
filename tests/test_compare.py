"""Universality: streamed CKA and debiased CKA, unit matching with its null, module recurrence, `compare`."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from netanatomy.anatomy.compare import compare_models, reinitialized
from netanatomy.cli.main import run
from netanatomy.core.cka import CrossMoments, mutual_knn
from netanatomy.core.matching import counterpart_tests, match_units, module_recurrence
from netanatomy.models import load_model

# ---------------------------------------------------------------------------------------------
# Plain full-matrix references, written here (the kernel form the CKA papers and the Platonic
# Representation / anatome projects use)


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    return float(np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h)))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def gram_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC on the raw (uncentred) linear kernels, as the Platonic Representation code does."""
    k, l = x @ x.T, y @ y.T
    return hsic_unbiased(k, l) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))


def streamed(blocks: list[np.ndarray], batch: int) -> CrossMoments:
    acc = CrossMoments([b.shape[1] for b in blocks])
    for i in range(0, len(blocks[0]), batch):
        acc.update([b[i:i + batch] for b in blocks])
    return acc


@pytest.fixture(scope="module")
def reps():
    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 6)) * [1, 2, 3, 0.5, 1, 4] + 10.0        # a large mean: the shift must not matter
    y = np.tanh(x @ rng.normal(size=(6, 9))) + 0.3 * rng.normal(size=(n, 9))
    z = rng.exponential(size=(n, 5))
    return x, y, z


@pytest.mark.parametrize("batch", [1, 7, 64, 240])
def test_streamed_cka_equals_the_full_matrix_formulas_for_any_batching(reps, batch):
    x, y, z = reps
    sims = streamed([x, y, z], batch).similarity()
    for (b, c), s in sims.items():
        u, v = (x, y, z)[b], (x, y, z)[c]
        assert s.linear == pytest.approx(gram_cka(u, v), abs=1e-10)
        assert s.debiased == pytest.approx(gram_debiased_cka(u, v), abs=1e-10)


def test_cka_of_a_layer_with_itself_is_one_and_invariant_to_rotation_and_scale(reps):
    x, y, _ = reps
    q = ortho_group.rvs(6, random_state=1)
    rotated = 3.7 * (x @ q)
    sims = streamed([x, rotated, y], 50).similarity()
    for kind in ("linear", "debiased"):
        assert getattr(sims[(0, 0)], kind) == pytest.approx(1.0, abs=1e-12)
        assert getattr(sims[(0, 1)], kind) == pytest.approx(1.0, abs=1e-9)
        assert getattr(sims[(1, 2)], kind) == pytest.approx(getattr(sims[(0, 2)], kind), abs=1e-9)
    assert sims[(0, 2)].linear < 0.9  # not trivially 1: the test can fail


def test_memory_does_not_grow_with_the_examples(reps):
    x, y, _ = reps
    small, large = streamed([x[:20], y[:20]], 10), streamed([np.tile(x, (20, 1)), np.tile(y, (20, 1))], 100)
    sizes = [sum(v.nbytes for v in vars(acc).values() if isinstance(v, np.ndarray)) for acc in (small, large)]
    assert sizes[0] == sizes[1] and large.n == 20 * small.n * 12


def test_correlations_are_pearson(reps):
    x, y, _ = reps
    r = streamed([x, y], 33).correlation(0, 1)
    expected = np.corrcoef(x.T, y.T)[:6, 6:]
    assert np.allclose(r, expected, atol=1e-10)


def test_mutual_knn_against_a_plain_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 4)) + 0.8 * rng.normal(size=(60, 4))
    k = 6

    def nn_sets(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        out = []
        for i in range(len(f)):
            sims = [(f[i] @ f[j], j) for j in range(len(f)) if j != i]
            out.append({j for _, j in sorted(sims, reverse=True)[:k]})
        return out

    expected = np.mean([len(a & b) / k for a, b in zip(nn_sets(x), nn_sets(y))])
    assert mutual_knn(x, y, k=k) == pytest.approx(expected)
    assert mutual_knn(x, x, k=k) == 1.0


# ---------------------------------------------------------------------------------------------
# Matching and recurrence


def test_hungarian_recovers_a_permutation_and_the_null_tells_counterparts():
    rng = np.random.default_rng(3)
    perm = rng.permutation(20)
    r = rng.uniform(-0.2, 0.3, size=(20, 20))
    r[np.arange(20), perm] = rng.uniform(0.6, 0.9, size=20)
    m = match_units(r)
    assert [b for _, b, _ in m.pairs] == perm.tolist()
    null = [rng.uniform(-0.2, 0.3, size=20).max(keepdims=True).repeat(20) for _ in range(5)]
    tests = counterpart_tests(r.max(axis=1), [rng.uniform(-0.2, 0.35, size=20) for _ in range(10)] + null)
    assert tests["counterparts"] == 20 and max(tests["p"]) < 0.01


def test_module_recurrence_finds_a_recurring_module_and_not_a_shuffled_one():
    rng = np.random.default_rng(4)
    labels_a = [np.repeat(np.arange(4), 8), np.repeat(np.arange(4), 8)]       # 4 clusters over 2 layers
    perms = [rng.permutation(32) for _ in labels_a]
    matchings = [[(a, int(p[a]), 0.9) for a in range(32)] for p in perms]
    labels_b = []
    for lab, p in zip(labels_a, perms):                                          # B's cluster of a's match = a's
        b = np.empty(32, dtype=int)
        b[p] = (lab + 1) % 4
        labels_b.append(b)
    same = module_recurrence(labels_a, labels_b, matchings, permutations=199, seed=0)
    assert same["mean_recurrence"] == 1.0 and same["p"] == pytest.approx(1 / 200)
    assert all(c["recurrence"] == 1.0 and c["best_match"] == (c["cluster"] + 1) % 4 for c in same["clusters"])
    shuffled = module_recurrence(labels_a, [rng.permutation(b) for b in labels_b], matchings, permutations=199, seed=0)
    assert shuffled["p"] > 0.05 and shuffled["mean_recurrence"] < 0.6


# ---------------------------------------------------------------------------------------------
# Models


def permuted_mlp(module: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """The same function with fc2's units reordered by `perm` (fc3 reads them in the new order)."""
    other = load_model("zoo:mlp").module
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        other.fc2.weight.copy_(module.fc2.weight[perm])
        other.fc2.bias.copy_(module.fc2.bias[perm])
        other.fc3.weight.copy_(module.fc3.weight[:, perm])
    return other


@pytest.fixture(scope="module")
def data():
    from netanatomy.data import open_dataset

    return open_dataset("bundled", "test").subset(np.arange(400))


def test_a_model_whose_layer_permutes_the_units_is_matched_exactly(data):
    a = load_model("zoo:mlp", seed=0).module.eval()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    b = permuted_mlp(a, perm).eval()
    doc = compare_models(a, b, ["fc2", "fc3"], ["fc2", "fc3"], data, null_models=2, stage="pre", show_progress=False)
    fc2 = next(m for m in doc["matching"] if m["layer_a"] == "fc2")
    assert [p[1] for p in fc2["pairs"]] == torch.argsort(perm).tolist()
    assert min(p[2] for p in fc2["pairs"]) == pytest.approx(1.0, abs=1e-9)
    assert fc2["counterparts"] == 256
    same = {(c["layer_a"], c["layer_b"]): c for c in doc["cka"]}
    assert same[("fc2", "fc2")]["linear"] == pytest.approx(1.0, abs=1e-9)
    assert same[("fc3", "fc3")]["debiased"] == pytest.approx(1.0, abs=1e-9)
    assert same[("fc2", "fc3")]["linear"] < 0.99


def test_unrelated_random_models_have_few_counterparts(data):
    a = load_model("zoo:mlp", seed=1).module.eval()
    b = load_model("zoo:mlp", seed=2).module.eval()
    doc = compare_models(a, b, ["fc1"], ["fc1"], data, null_models=4, stage="pre", show_progress=False)
    assert doc["matching"][0]["counterpart_share"] < 0.1


def test_reinitialized_keeps_the_architecture_and_changes_every_weight():
    a = load_model("zoo:minception", seed=0).module
    b = reinitialized(a, seed=9)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, q), name
    assert torch.equal(next(reinitialized(a, seed=9).parameters()), next(b.parameters()))


def test_compare_cli_writes_the_json_and_the_figures(tmp_path, capsys, data):
    a = load_model("zoo:mlp", seed=0).module
    weights = tmp_path / "b.pt"
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(6))
    torch.save(permuted_mlp(a, perm).state_dict(), weights)
    out = tmp_path / "cmp"
    assert run(["compare", "zoo:mlp", "zoo:mlp", "--weights-b", str(weights), "--data", "bundled", "--examples", "300",
                "--layers-a", "fc1,fc2", "--layers-b", "fc1,fc2", "--null-models", "2", "--out", str(out),
                "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"layer_a", "layer_b", "linear", "debiased"} <= set(doc["cka"][0])
    assert {"layer_a", "layer_b", "pairs", "p"} <= set(doc["matching"][0])
    assert len(doc["cka"]) == 4 and doc["examples"] == 300
    fc2 = doc["matching"][1]
    assert fc2["layer_a"] == "fc2" and [p[1] for p in fc2["pairs"]] == torch.argsort(perm).tolist()
    for name in ("cka.png", "match_fc1__fc1.png", "pairs_fc2__fc2.jpg", "compare.json"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("args,needle", [
    (["zoo:mlp", "zoo:minception", "--data", "bundled", "--layers-a", "nosuch"], "nosuch"),
    (["zoo:mlp", "zoo:mlp", "--data", "bundled", "--clusters-a", "x.json"], "--clusters-b"),
    (["zoo:mlp", "zoo:mlp", "--data", "bundled", "--match", "fc1"], "--match"),
    (["zoo:mlp", "zoo:mlp", "--data", "nosuchdata"], "nosuchdata"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert run(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netanatomy: error:") and "\n" not in err and needle in err


def test_default_layers_are_all_of_a_small_model_and_8_evenly_spaced_of_a_deep_one():
    from netanatomy.cli.commands.compare import default_layers
    from netanatomy.models.layers import discover_layers

    small = load_model("zoo:mlp")
    assert default_layers(discover_layers(small.module, small.input_shape)) == ["fc1", "fc2", "fc3", "fc4", "fc5"]
    deep = load_model("zoo:minception")
    names = [l.name for l in discover_layers(deep.module, deep.input_shape).values()]
    picked = default_layers(discover_layers(deep.module, deep.input_shape))
    assert len(picked) == 8 and picked[0] == names[0] and picked[-1] == names[-1]
    gaps = np.diff([names.index(n) for n in picked])
    assert gaps.max() - gaps.min() <= 1


def test_an_interrupted_compare_resumes_from_its_checkpoint(tmp_path, data, monkeypatch):
    import netanatomy.anatomy.compare as compare

    a = load_model("zoo:mlp", seed=0).module.eval()
    b = load_model("zoo:mlp", seed=3).module.eval()
    kwargs = dict(null_models=2, stage="pre", show_progress=False, batch_size=50, max_examples=300, knn_examples=120)
    fresh = compare_models(a, b, ["fc1", "fc2"], ["fc1", "fc2"], data, **kwargs)
    state = tmp_path / "state.npz"
    real, calls = compare._values, []

    def dies_in_the_fourth_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4 * 4:                   # A, B and two null copies per batch
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(compare, "_values", dies_in_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        compare_models(a, b, ["fc1", "fc2"], ["fc1", "fc2"], data, checkpoint=state, checkpoint_key="k",
                       checkpoint_every=1, **kwargs)
    assert state.is_file()
    monkeypatch.setattr(compare, "_values", real)
    with np.load(state) as saved:
        assert int(saved["seen"]) == 150
    resumed = compare_models(a, b, ["fc1", "fc2"], ["fc1", "fc2"], data, checkpoint=state, checkpoint_key="k",
                             checkpoint_every=1, **kwargs)
    assert not state.exists()
    for key in ("cka", "matching", "examples"):
        assert json.dumps(resumed[key]) == json.dumps(fresh[key])
    assert np.array_equal(resumed["_kept"]["index"], fresh["_kept"]["index"])
