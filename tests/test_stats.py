import math
import time

import numpy as np
import pytest
from scipy import stats as sps

from netanatomy.core.stats import (
    benjamini_hochberg,
    branch_category_tests,
    fisher_combine,
    fisher_exact_2x2,
    hypergeom_log_tail,
    hypergeom_tail,
    label_entropy,
    null_test,
    percentile_pvalue,
    zscore,
)
from netanatomy.errors import UsageError


def test_branch_specialization_anchors():
    # Branch Specialization (Distill): all 9 of 9 in a 32-of-256 branch, all 30 of 30 in 96-of-480.
    p1 = hypergeom_tail(9, population=256, category=9, branch=32)
    p2 = hypergeom_tail(30, population=480, category=30, branch=96)
    assert p1 == pytest.approx(2.5e-9, rel=0.01)
    assert p2 == pytest.approx(1.7e-23, rel=0.02)
    # ... and exactly C(32, 9) / C(256, 9), C(96, 30) / C(480, 30).
    assert p1 == pytest.approx(math.comb(32, 9) / math.comb(256, 9), rel=1e-12)
    assert p2 == pytest.approx(math.comb(96, 30) / math.comb(480, 30), rel=1e-12)


def test_far_tail_stays_finite_in_log_space():
    log_p = hypergeom_log_tail(200, population=5000, category=200, branch=200)
    assert math.isfinite(log_p)
    assert log_p == pytest.approx(-math.log(math.comb(5000, 200)), rel=1e-12)
    assert hypergeom_tail(200, 5000, 200, 200) == 0.0  # underflows as a float, not in log space


def _exact_log_tails(population, category, branch):
    """Independent reference: log P(X >= x) for every x >= 1, as exact ratios of integer sums
    (Python's big ints), accumulated from the top of the support."""
    lo, hi = max(0, branch - (population - category)), min(category, branch)
    denominator = math.log(math.comb(population, branch))
    tails, numerator = {}, 0
    for i in range(hi, lo - 1, -1):
        numerator += math.comb(category, i) * math.comb(population - category, branch - i)
        tails[i] = math.log(numerator) - denominator
    return {x: tails[max(x, lo)] for x in range(1, hi + 1)}


def test_tail_matches_exact_reference_at_every_depth():
    # Every x of a few distributions, from the bulk down through 1e-300 (SciPy's survival
    # function above, our own log-space sum below) to 1e-1000, against exact integer arithmetic.
    depths = []
    for population, category, branch in [(50, 10, 12), (480, 30, 96), (700, 500, 300), (1000, 400, 500),
                                         (2400, 1300, 1200), (3000, 900, 1500), (4000, 2000, 2000)]:
        for x, exact in _exact_log_tails(population, category, branch).items():
            ours = hypergeom_log_tail(x, population, category, branch)
            assert ours == pytest.approx(exact, rel=1e-11, abs=1e-11), (x, population, category, branch)
            depths.append(exact / math.log(10))
    depths = np.array(depths)
    assert depths.min() < -1000                      # the far tail is covered ...
    assert np.sum((depths > -300) & (depths < -280)) >= 5  # ... and both sides of the 1e-300 switch
    assert np.sum((depths < -300) & (depths > -320)) >= 5


def test_large_population_is_fast_and_exact():
    # N = 20 000 took 10 s per call with exact integer sums; now a few ms (generous bound: shared CPU).
    cases = [(5100, 20000, 10000, 10000), (6000, 20000, 10000, 10000), (7000, 20000, 10000, 10000),
             (100, 20000, 200, 10000)]
    start = time.perf_counter()
    ours = [hypergeom_log_tail(*c) for c in cases]
    assert time.perf_counter() - start < 1.0
    # exact values (integer sums, computed once): bulk, 1e-177 (SciPy), 1e-716 (our own sum)
    expected = [-6.014251677048378, -406.56688787703024, -1649.7648264120544, -0.6380603628585959]
    np.testing.assert_allclose(ours, expected, rtol=1e-11)


def test_tail_edges():
    assert hypergeom_tail(0, 10, 3, 4) == 1.0
    assert hypergeom_tail(4, 10, 3, 4) == 0.0  # only 3 category units exist
    with pytest.raises(UsageError):
        hypergeom_tail(1, 10, 11, 4)


def test_fisher_greater_equals_hypergeometric_tail():
    odds, p = fisher_exact_2x2(6, branch_size=10, category_size=8, population=40, alternative="greater")
    assert p == pytest.approx(hypergeom_tail(6, 40, 8, 10), rel=1e-9)
    assert odds > 1


def test_branch_category_tests_planted():
    units = 64
    branches = {"a": np.arange(units) < 32, "b": np.arange(units) >= 32}
    colour = np.zeros(units, dtype=bool)
    colour[:10] = True  # every colour unit in branch a
    mixed = np.zeros(units, dtype=bool)
    mixed[::8] = True   # spread evenly
    results = branch_category_tests(branches, {"colour": colour, "mixed": mixed})
    by = {(r.branch, r.category): r for r in results}
    assert by["a", "colour"].in_both == 10
    assert by["a", "colour"].p_tail == pytest.approx(math.comb(32, 10) / math.comb(64, 10), rel=1e-12)
    assert by["a", "colour"].q == pytest.approx(by["a", "colour"].p_tail * 4)  # smallest of 4 tests
    assert by["a", "colour"].q < 0.01
    assert by["a", "mixed"].p_tail > 0.3 and by["b", "colour"].p_tail == 1.0
    assert all(r.q >= r.p_tail - 1e-15 for r in results)


def test_benjamini_hochberg_known_values_and_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), sps.false_discovery_control(p), rtol=1e-12)
    q = benjamini_hochberg([0.01, np.nan, 0.02])
    assert np.isnan(q[1]) and q[0] == pytest.approx(0.02)


def test_fisher_combine_matches_scipy():
    p = [0.01, 0.2, 0.5, 0.03]
    assert fisher_combine(p) == pytest.approx(sps.combine_pvalues(p, method="fisher").pvalue, rel=1e-12)
    assert math.isnan(fisher_combine([]))
    assert fisher_combine([0.0, 0.5]) < 1e-100  # p = 0 does not blow up


def test_percentile_pvalue_plus_one_rule():
    null = np.arange(1.0, 20.0)  # 19 samples: 1..19
    assert percentile_pvalue(0.5, null, "left") == pytest.approx(1 / 20)  # never 0
    assert percentile_pvalue(1.0, null, "left") == pytest.approx(2 / 20)  # ties count as extreme
    assert percentile_pvalue(19.5, null, "right") == pytest.approx(1 / 20)
    assert percentile_pvalue(10.0, null, "right") == pytest.approx(11 / 20)
    batched = percentile_pvalue(np.array([0.5, 25.0]), np.stack([null, null]), "left")
    np.testing.assert_allclose(batched, [1 / 20, 1.0])
    with pytest.raises(UsageError):
        percentile_pvalue(1.0, null, "both")


def test_zscore_and_null_test():
    null = np.array([1.0, 2.0, 3.0, 4.0])
    assert zscore(0.0, null) == pytest.approx(-math.sqrt(5))  # mean 2.5, population std sqrt(1.25)
    assert math.isnan(zscore(1.0, np.ones(5)))
    t = null_test(0.0, null, "left")
    assert t.p == pytest.approx(1 / 5) and t.n == 4 and t.mean == 2.5


def test_label_entropy():
    assert label_entropy(np.array([0, 1, 2, 3])) == pytest.approx(2.0)
    assert label_entropy(np.array([3, 3, 3])) == 0.0
    assert label_entropy(np.array([0, 0, 1, 1, -1]), num_classes=2) == pytest.approx(1.0)
    rows = label_entropy(np.array([[0, 0, 0, 0], [0, 1, 0, 1]]), num_classes=2)
    np.testing.assert_allclose(rows, [0.0, 1.0])
    assert label_entropy(np.array([0, 1]), base=math.e) == pytest.approx(math.log(2))
    assert math.isnan(label_entropy(np.array([-1, -1])))
