import json

import numpy as np
import pytest
import scipy.stats as sps

from netanatomy.cli.main import run
from netanatomy.specialization.coherence import (
    coherence,
    full_spearman_squared,
    mean_pair_correlation,
    top_inputs_entropy,
)
from netanatomy.specialization.subclusters import Cluster
from netanatomy.errors import UsageError


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
    assert r2[4].sum() == 0.0 and got[1] == pytest.approx(r2[3, 5] / 3)


def test_visualization_coherence_is_not_claimed_yet():
    values, labels = planted_values(100)
    with pytest.raises(UsageError, match="not available yet"):
        coherence(values, labels, [Cluster(0, (("h", 0), ("h", 1)))], kinds=["visualization"])
    with pytest.raises(UsageError):
        coherence(values, None, [Cluster(0, (("h", 0), ("h", 1)))], kinds=["dataset"])


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
    assert run(["coherence", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled",
                "--kind", "visualization"]) == 2
