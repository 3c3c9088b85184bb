"""Linear CKA, debiased CKA and unit correlations from statistics streamed over mini-batches.

Representations are blocks of features (a layer's units, one value per example). For every
mini-batch of n_b examples the accumulator adds, in float64:
- the sums of the features and the Gram matrix Z^T Z of all blocks' features side by side
  (Z = [X_1 | X_2 | ...]), which holds every X_a^T X_b at once;
- for the debiased estimator, each example's squared norm within each block, k_{b,i} =
  ||x_{b,i}||^2, through sum_i k_{b,i} z_i, sum_i k_{b,i} k_{c,i} and sum_i k_{b,i}.
Memory is O(P^2 + blocks * P) for P features in all, whatever the number of examples; the data
are shifted by the first batch's mean first, which changes no result (everything is computed
about the final mean) but keeps the raw moments small.

From these, with X_c the centred features of block b and Y_c those of block c:
- linear CKA = ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) (Kornblith et al. 2019);
- debiased CKA replaces each ||.||_F^2 by the unbiased HSIC estimator of Song et al. (2012),
  as in Nguyen et al. (2021): with K = X_c X_c^T and L = Y_c Y_c^T, diagonals zeroed (K~, L~),
      HSIC_u = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
  Because the features are centred, 1'K~1 = -sum_i k_i, 1'K~L~1 = sum_i k_i l_i and
  tr(K~ L~) = ||X_c^T Y_c||_F^2 - sum_i k_i l_i (k_i, l_i the centred squared norms), so
  every term comes from the streamed moments (expanded about the final mean in `_centred`);
- Pearson correlations between the units of any two blocks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CrossMoments", "PairSimilarity", "debiased_cka_from", "linear_cka_from", "mutual_knn"]


@dataclass(frozen=True)
class PairSimilarity:
    linear: float
    debiased: float


class CrossMoments:
    """Streamed moments of feature blocks `dims` (features per block) for CKA and correlations."""

    def __init__(self, dims: Sequence[int]):
        self.dims = [int(d) for d in dims]
        if not self.dims or min(self.dims) < 1:
            raise ValueError("every block needs at least one feature")
        self.edges = np.concatenate([[0], np.cumsum(self.dims)])
        p, b = int(self.edges[-1]), len(self.dims)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(p)                 # sum z
        self.gram = np.zeros((p, p))             # sum z z^T
        self.norm_total = np.zeros(b)            # sum_i k_{b,i}
        self.norm_weighted = np.zeros((b, p))    # sum_i k_{b,i} z_i
        self.norm_gram = np.zeros((b, b))        # sum_i k_{b,i} k_{c,i}

    @property
    def features(self) -> int:
        return int(self.edges[-1])

    def block(self, b: int) -> slice:
        return slice(int(self.edges[b]), int(self.edges[b + 1]))

    def update(self, blocks: Sequence[np.ndarray]) -> None:
        """Add one mini-batch: `blocks[b]` is [n_b, dims[b]] (the same examples in every block)."""
        if len(blocks) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} blocks, got {len(blocks)}")
        z = np.concatenate([np.asarray(x, dtype=np.float64).reshape(len(x), -1) for x in blocks], axis=1)
        if z.shape[1] != self.features:
            raise ValueError(f"blocks have {z.shape[1]} features in all, expected {self.features}")
        if z.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = z.mean(axis=0)
        z = z - self.shift
        norms = np.stack([np.einsum("ij,ij->i", z[:, self.block(b)], z[:, self.block(b)])
                          for b in range(len(self.dims))], axis=1)     # [n_b, blocks]
        self.n += z.shape[0]
        self.total += z.sum(axis=0)
        self.gram += z.T @ z
        self.norm_total += norms.sum(axis=0)
        self.norm_weighted += norms.T @ z
        self.norm_gram += norms.T @ norms

    # -- saving and restoring (a long pass resumes from its last checkpoint) ---------------
    _ARRAYS = ("total", "gram", "norm_total", "norm_weighted", "norm_gram")

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """Plain arrays (no objects: they load with allow_pickle=False) keyed `prefix.NAME`."""
        out = {f"{prefix}.{k}": getattr(self, k) for k in self._ARRAYS}
        out[f"{prefix}.n"] = np.array(self.n)
        out[f"{prefix}.dims"] = np.array(self.dims)
        if self.shift is not None:
            out[f"{prefix}.shift"] = self.shift
        return out

    def restore(self, arrays: Any, prefix: str) -> None:
        """Load what `state(prefix)` saved; refused (ValueError) if the blocks differ."""
        if [int(d) for d in arrays[f"{prefix}.dims"]] != self.dims:
            raise ValueError("the saved statistics are of other blocks")
        for k in self._ARRAYS:
            setattr(self, k, np.array(arrays[f"{prefix}.{k}"], dtype=np.float64))
        self.n = int(arrays[f"{prefix}.n"])
        self.shift = np.array(arrays[f"{prefix}.shift"]) if f"{prefix}.shift" in arrays else None

    # -- derived quantities ----------------------------------------------------------------
    def mean(self) -> np.ndarray:
        return self.total / self.n

    def centred_gram(self) -> np.ndarray:
        """sum (z - m)(z - m)^T."""
        m = self.mean()
        return self.gram - self.n * np.outer(m, m)

    def _centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Gc, T, S): centred Gram, T_b = sum_i k^c_{b,i}, S_bc = sum_i k^c_{b,i} k^c_{c,i}.

        k^c_{b,i} = k_{b,i} - 2 a_{b,i} + mu_b with a_{b,i} = z_{b,i}.m_b and mu_b = ||m_b||^2;
        S expands into the streamed moments: sum k_b a_c = (sum_i k_{b,i} z_{c,i}).m_c,
        sum a_b a_c = m_b^T (sum z_b z_c^T) m_c and sum_i a_{b,i} = n mu_b.
        """
        n, m = self.n, self.mean()
        blocks = range(len(self.dims))
        mu = np.array([m[self.block(b)] @ m[self.block(b)] for b in blocks])
        gc = self.centred_gram()
        t = self.norm_total - n * mu
        # ka[b, c] = sum_i k_{b,i} a_{c,i};  aa[b, c] = sum_i a_{b,i} a_{c,i}
        ka = np.array([[self.norm_weighted[b, self.block(c)] @ m[self.block(c)] for c in blocks] for b in blocks])
        aa = np.array([[m[self.block(b)] @ self.gram[self.block(b), self.block(c)] @ m[self.block(c)]
                        for c in blocks] for b in blocks])
        k = self.norm_total
        s = (self.norm_gram - 2 * ka - 2 * ka.T + 4 * aa
             + mu[None, :] * k[:, None] + mu[:, None] * k[None, :]
             - 2 * n * mu[:, None] * mu[None, :] - 2 * n * mu[None, :] * mu[:, None]
             + n * mu[:, None] * mu[None, :])
        return gc, t, s

    def similarity(self, pairs: Sequence[tuple[int, int]] | None = None) -> dict[tuple[int, int], PairSimilarity]:
        """Linear and debiased CKA of block pairs (all pairs b <= c by default)."""
        if self.n < 4:
            raise ValueError(f"debiased CKA needs at least 4 examples, got {self.n}")
        gc, t, s = self._centred()
        blocks = range(len(self.dims))
        pairs = list(pairs) if pairs is not None else [(b, c) for b in blocks for c in blocks if b <= c]
        cross = {}
        for b, c in {(b, c) for pair in pairs for b, c in (pair, (pair[0], pair[0]), (pair[1], pair[1]))}:
            cross[(b, c)] = float(np.sum(gc[self.block(b), self.block(c)] ** 2))
        n = self.n
        hsic = {key: _hsic_unbiased(value, t[key[0]], t[key[1]], s[key], n) for key, value in cross.items()}
        out = {}
        for b, c in pairs:
            out[(b, c)] = PairSimilarity(linear=linear_cka_from(cross[(b, c)], cross[(b, b)], cross[(c, c)]),
                                         debiased=debiased_cka_from(hsic[(b, c)], hsic[(b, b)], hsic[(c, c)]))
        return out

    def correlation(self, b: int, c: int) -> np.ndarray:
        """Pearson r between every unit of block b (rows) and of block c (columns); 0 for a
        constant unit."""
        m, rows, cols = self.mean(), self.block(b), self.block(c)
        num = self.gram[rows, cols] - self.n * np.outer(m[rows], m[cols])   # only the block, not all P x P
        d = np.sqrt(np.clip(np.diag(self.gram) - self.n * (m * m), 0.0, None))
        den = np.outer(d[rows], d[cols])
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        return np.clip(r, -1.0, 1.0)


def _hsic_unbiased(cross_sq: float, t_b: float, t_c: float, s_bc: float, n: int) -> float:
    trace = cross_sq - s_bc
    return (trace + t_b * t_c / ((n - 1) * (n - 2)) - 2.0 * s_bc / (n - 2)) / (n * (n - 3))


def linear_cka_from(cross_sq: float, self_b: float, self_c: float) -> float:
    """||X^T Y||^2 / (||X^T X|| ||Y^T Y||) from the three squared Frobenius norms; nan for a
    constant block."""
    den = np.sqrt(self_b * self_c)
    return float(cross_sq / den) if den > 0 else float("nan")


def debiased_cka_from(hsic_bc: float, hsic_b: float, hsic_c: float) -> float:
    den = hsic_b * hsic_c
    return float(hsic_bc / np.sqrt(den)) if den > 0 else float("nan")


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10, normalize: bool = True) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024): the mean share of each example's
    k nearest neighbours (inner product, self excluded) that the two representations share.

    Needs every example's features at once, so callers pass a bounded subsample. With
    `normalize` the features are scaled to unit length first, as the Platonic Representation
    project does.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError("x and y must hold the same examples")
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and {n - 1}, got {k}")

    def neighbours(f: np.ndarray) -> np.ndarray:
        if normalize:
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k - 1, axis=1)[:, :k]

    a, b = neighbours(x), neighbours(y)
    mask_a = np.zeros((n, n), dtype=bool)
    np.put_along_axis(mask_a, a, True, axis=1)
    shared = np.take_along_axis(mask_a, b, axis=1).sum(axis=1)
    return float(shared.mean() / k)
