"""Statistics that say whether a pattern could be chance.

- Branch statistics: hypergeometric upper tail (SciPy's survival function where it is accurate,
  a log-space sum of the tail terms below 1e-300, so a far tail never underflows to 0 in log
  space), Fisher's exact test per branch x category, Benjamini-Hochberg across pairs.
- Null-distribution tests: percentile p-values with the +1 rule ((#{null as extreme} + 1) /
  (n + 1), never 0, valid for a finite null sample), z-scores, Fisher's method.
- Label entropy of a set of examples (dataset-based coherence).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from ..errors import UsageError

# SciPy's `hypergeom.sf` (Boost) agrees with exact rational sums to ~1e-12 relative wherever its
# value is a normal float; below this it loses digits (subnormals) or underflows to 0, and the
# tail is summed here in log space instead.
_SCIPY_SF_FLOOR = 1e-300
# Up to this population the leading term of our own tail sum is exact (`math.comb`, a few ms);
# above it, `math.lgamma` (absolute error ~1e-16 * N log N in log p).
_EXACT_COMB_MAX = 10000


# ---------------------------------------------------------------------------------------------
# Hypergeometric tail


def _check_hypergeom(x: int, population: int, category: int, branch: int) -> None:
    if min(population, category, branch) < 0 or category > population or branch > population:
        raise UsageError(
            f"hypergeometric sizes must satisfy 0 <= category, branch <= population; got "
            f"population={population}, category={category}, branch={branch}"
        )
    if x < 0:
        raise UsageError(f"observed count must be >= 0, got {x}")


def _log_comb(n: int, k: int) -> float:
    if n <= _EXACT_COMB_MAX:
        return math.log(math.comb(n, k))
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_tail_sum(lo: int, hi: int, population: int, category: int, branch: int) -> float:
    """log sum_{i=lo..hi} P(X = i): the first term in closed form, the rest by the pmf ratio
    P(i+1)/P(i) = (K-i)(n-i) / ((i+1)(N-K-n+i+1)), summed relative to the first term (rescaled
    so it never overflows) until the terms no longer change the sum. O(terms), all floats."""
    bad = population - category
    log_scale = _log_comb(category, lo) + _log_comb(bad, branch - lo) - _log_comb(population, branch)
    total = term = 1.0
    for i in range(lo, hi):
        term *= (category - i) * (branch - i) / ((i + 1) * (bad - branch + i + 1))
        total += term
        if total > 1e250:
            log_scale += math.log(total)
            term /= total
            total = 1.0
        elif term < 1e-17 * total:
            break
    return log_scale + math.log(total)


def hypergeom_log_tail(x: int, population: int, category: int, branch: int) -> float:
    """log P(X >= x) for X ~ Hypergeometric: `branch` units drawn from `population`, of which
    `category` belong to the category.

    The chance that a branch of `branch` units out of `population` holds `x` or more of the
    `category` units of a category, in log space so that it never underflows. SciPy's
    `hypergeom.sf` where it is a normal float above 1e-300 (relative error ~1e-12); below that,
    our own log-space sum of the tail terms, which stays accurate to any depth.
    """
    x, population, category, branch = int(x), int(population), int(category), int(branch)
    _check_hypergeom(x, population, category, branch)
    lo = max(x, 0, branch - (population - category))
    hi = min(category, branch)
    if lo > hi:
        return -math.inf
    if x <= max(0, branch - (population - category)):
        return 0.0
    sf = float(sps.hypergeom.sf(x - 1, population, category, branch))
    if sf >= _SCIPY_SF_FLOOR:
        return math.log(min(sf, 1.0))
    return _log_tail_sum(lo, hi, population, category, branch)


def hypergeom_tail(x: int, population: int, category: int, branch: int) -> float:
    """P(X >= x) (see `hypergeom_log_tail`); 9 of 9 in a 32-of-256 branch gives 2.48e-9."""
    return math.exp(hypergeom_log_tail(x, population, category, branch))


# ---------------------------------------------------------------------------------------------
# Multiple tests


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape as the input.

    A test is significant at false discovery rate alpha when its q <= alpha. NaNs stay NaN and
    do not count as tests.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    if ok.size == 0:
        return out
    if np.any((flat[ok] < 0) | (flat[ok] > 1)):
        raise UsageError("p-values must lie in [0, 1]")
    m = ok.size
    order = np.argsort(flat[ok], kind="stable")
    ranked = flat[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(ranked, 1.0)
    out_flat = out.ravel()
    out_flat[ok] = q
    return out_flat.reshape(p.shape)


def fisher_combine(pvalues: Sequence[float] | np.ndarray) -> float:
    """Fisher's method: one p-value for "at least one of these independent tests is real".

    X = -2 sum log p ~ chi^2 with 2m degrees of freedom under the joint null. NaNs are ignored;
    an empty input gives NaN.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    p = p[np.isfinite(p)]
    if p.size == 0:
        return math.nan
    if np.any((p < 0) | (p > 1)):
        raise UsageError("p-values must lie in [0, 1]")
    statistic = -2.0 * np.sum(np.log(np.maximum(p, np.finfo(np.float64).tiny)))
    return float(sps.chi2.sf(statistic, 2 * p.size))


# ---------------------------------------------------------------------------------------------
# Tests against a sampled null


def percentile_pvalue(observed: float | np.ndarray, null: np.ndarray, tail: str = "left") -> np.ndarray | float:
    """p = (#{null values at least as extreme as observed} + 1) / (n + 1).

    `null` has the samples on its last axis; `observed` broadcasts against the other axes.
    tail="left": extreme = null <= observed (e.g. n-cut below shuffles, accuracy drop deeper);
    tail="right": extreme = null >= observed. The +1 counts the observation itself, so p is
    never 0 and is exact for exchangeable samples.
    """
    null = np.asarray(null, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    if null.ndim == 0 or null.shape[-1] == 0:
        raise UsageError("a null distribution needs at least one sample")
    if tail == "left":
        count = np.sum(null <= observed[..., None], axis=-1)
    elif tail == "right":
        count = np.sum(null >= observed[..., None], axis=-1)
    else:
        raise UsageError(f"tail must be 'left' or 'right', not {tail!r}")
    p = (count + 1.0) / (null.shape[-1] + 1.0)
    return float(p) if p.ndim == 0 else p


def zscore(observed: float | np.ndarray, null: np.ndarray, ddof: int = 0) -> np.ndarray | float:
    """(observed - mean(null)) / std(null) along the last axis; NaN when the null has no spread.

    ddof=0 (population std) by default, as in Filan et al.'s clusterability z-scores.
    """
    null = np.asarray(null, dtype=np.float64)
    mean = null.mean(axis=-1)
    std = null.std(axis=-1, ddof=ddof) if null.shape[-1] > ddof else np.full(mean.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, (np.asarray(observed, dtype=np.float64) - mean) / np.where(std > 0, std, 1.0), np.nan)
    return float(z) if np.ndim(z) == 0 else z


@dataclass(frozen=True)
class NullTest:
    """An observation against a sampled null: the numbers a paper table needs."""

    observed: float
    mean: float
    std: float
    z: float
    p: float
    n: int
    tail: str

    def to_json(self) -> dict:
        return {"observed": self.observed, "mean": self.mean, "std": self.std, "z": self.z, "p": self.p,
                "n": self.n, "tail": self.tail}


def null_test(observed: float, null: Sequence[float] | np.ndarray, tail: str = "left") -> NullTest:
    """Percentile p-value (+1 rule), mean, std (ddof=0) and z of one observation vs its null."""
    null = np.asarray(null, dtype=np.float64).ravel()
    return NullTest(
        observed=float(observed),
        mean=float(null.mean()) if null.size else math.nan,
        std=float(null.std()) if null.size else math.nan,
        z=float(zscore(observed, null)) if null.size else math.nan,
        p=float(percentile_pvalue(observed, null, tail)),
        n=int(null.size),
        tail=tail,
    )


# ---------------------------------------------------------------------------------------------
# Branch x category tests


@dataclass(frozen=True)
class BranchCategoryTest:
    branch: str
    category: str
    in_both: int        # units of the category inside the branch
    branch_size: int
    category_size: int
    population: int
    p_tail: float       # P(X >= in_both): hypergeometric upper tail = one-sided Fisher exact
    log_p_tail: float
    p_fisher: float     # two-sided Fisher exact test
    odds_ratio: float
    q: float = math.nan  # Benjamini-Hochberg over p_tail of all tested pairs

    def to_json(self) -> dict:
        return dict(self.__dict__)


def fisher_exact_2x2(in_both: int, branch_size: int, category_size: int, population: int,
                     alternative: str = "two-sided") -> tuple[float, float]:
    """Fisher's exact test on the branch x category 2x2 table: (odds ratio, p)."""
    _check_hypergeom(in_both, population, category_size, branch_size)
    a = int(in_both)
    b = branch_size - a
    c = category_size - a
    d = population - branch_size - c
    if min(b, c, d) < 0:
        raise UsageError("inconsistent counts: more category units in the branch than fit")
    res = sps.fisher_exact([[a, b], [c, d]], alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def branch_category_tests(branches: dict[str, np.ndarray], categories: dict[str, np.ndarray]) -> list[BranchCategoryTest]:
    """Test every branch x category pair for enrichment, with BH q-values across all pairs.

    `branches` and `categories` map names to boolean masks over the same units of one layer
    (a unit may belong to several categories; branches should partition the layer).
    """
    if not branches or not categories:
        raise UsageError("need at least one branch and one category")
    masks = [np.asarray(m, dtype=bool) for m in (*branches.values(), *categories.values())]
    population = masks[0].size
    if any(m.ndim != 1 or m.size != population for m in masks):
        raise UsageError("branch and category masks must be 1-D and cover the same units")
    results = []
    for bname, bmask in branches.items():
        bmask = np.asarray(bmask, dtype=bool)
        for cname, cmask in categories.items():
            cmask = np.asarray(cmask, dtype=bool)
            x, n, k = int(np.sum(bmask & cmask)), int(bmask.sum()), int(cmask.sum())
            log_p = hypergeom_log_tail(x, population, k, n)
            odds, p2 = fisher_exact_2x2(x, n, k, population)
            results.append(BranchCategoryTest(bname, cname, x, n, k, population, math.exp(log_p), log_p, p2, odds))
    q = benjamini_hochberg([r.p_tail for r in results])
    return [BranchCategoryTest(**{**r.__dict__, "q": float(qi)}) for r, qi in zip(results, q)]


# ---------------------------------------------------------------------------------------------
# Entropy


def label_entropy(labels: np.ndarray, num_classes: int | None = None, base: float = 2.0) -> np.ndarray | float:
    """Entropy (bits by default) of the label histogram along the last axis.

    Low entropy = the examples share a class (dataset-based coherence). Labels < 0
    (unlabelled) are ignored; a row with no labels gives NaN.
    """
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise UsageError("labels must be an array")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    flat = labels.reshape(-1, labels.shape[-1]).astype(np.int64)
    valid = (flat >= 0) & (flat < num_classes)
    rows = np.repeat(np.arange(flat.shape[0]), flat.shape[1])
    counts = np.zeros((flat.shape[0], num_classes))
    np.add.at(counts, (rows[valid.ravel()], flat.ravel()[valid.ravel()]), 1.0)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        prob = counts / total
        terms = np.where(prob > 0, prob * np.log(np.where(prob > 0, prob, 1.0)), 0.0)
    h = -terms.sum(axis=1) / math.log(base)
    h = np.where(total[:, 0] > 0, h, np.nan) + 0.0  # + 0.0 turns -0.0 into 0.0
    out = h.reshape(labels.shape[:-1])
    return float(out) if out.ndim == 0 else out
