"""Branch tests on activations: planted class-preferring branches and correlated branches."""
import numpy as np
import pytest

from netanatomy.core.branches import branch_class_tests, branch_correlation_test, preferred_class
from netanatomy.errors import UsageError


def _planted(seed=0, n=600):
    """40 units in branches a [0,8) and b [8,40); branch a's units all fire for class 3."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    values = rng.normal(size=(n, 40))
    values[:, :8] += 3.0 * (labels == 3)[:, None]
    return values, labels


def test_preferred_class_recovers_planted_preference():
    values, labels = _planted()
    prefer = preferred_class(values, labels)
    assert np.all(prefer[:8] == 3)
    assert np.mean(prefer[8:] == 3) < 0.5


def test_branch_holding_a_class_is_significant_and_others_are_not():
    values, labels = _planted()
    tests = branch_class_tests(values, labels, {"a": (0, 8), "b": (8, 40)}, ["c0", "c1", "c2", "c3", "c4"])
    hit = next(t for t in tests if t.branch == "a" and t.category == "prefers c3")
    assert hit.in_both == 8 and hit.q < 1e-3
    assert all(t.q > 0.05 for t in tests if t is not hit and t.branch == "a")


def test_correlation_within_branches_against_relabelling():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(500, 3))
    branch = np.repeat([0, 1, 2], 10)  # small branches can be redrawn by a relabelling: keep them many
    values = shared[:, branch] + 0.8 * rng.normal(size=(500, 30))
    result = branch_correlation_test(np.corrcoef(values, rowvar=False), branch, n_permutations=199, seed=0)
    assert result.within > result.between and result.p == pytest.approx(1 / 200)
    iid = rng.normal(size=(500, 30))
    null = branch_correlation_test(np.corrcoef(iid, rowvar=False), branch, n_permutations=199, seed=0)
    assert null.p > 0.05
    again = branch_correlation_test(np.corrcoef(iid, rowvar=False), branch, n_permutations=199, seed=0)
    assert again == null
    with pytest.raises(UsageError):
        branch_correlation_test(np.eye(3), np.zeros(3), n_permutations=9)
