"""Statistics of a stream of per-unit values, in memory that does not grow with the stream.

Moments and the unit-by-unit covariance merge batch by batch with Chan et al.'s pairwise
update in float64 (stable where the naive sum of squares loses precision); top-k keeps the k
best rows per unit; a seeded reservoir keeps a uniform sample of rows for rank statistics
(Spearman needs ranks, which no fixed-size summary gives exactly).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

REDUCTIONS = ("mean", "l1", "max", "center")


def reduce_units(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, C, *spatial] -> [B, C]: one value per unit per example. [B, C] passes through."""
    if x.dim() == 2:
        return x
    flat = x.flatten(2)
    if how == "mean":
        return flat.mean(2)
    if how == "l1":
        return flat.abs().sum(2)
    if how == "max":
        return flat.amax(2)
    if how == "center":
        index = tuple(s // 2 for s in x.shape[2:])
        return x[(slice(None), slice(None)) + index]
    raise ValueError(f"unknown reduction {how!r}; use one of {', '.join(REDUCTIONS)}")


def argmax_positions(x: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, C, len(spatial)] integer position of each map's maximum."""
    if x.dim() == 2:
        return torch.zeros((*x.shape, 0), dtype=torch.long, device=x.device)
    spatial = x.shape[2:]
    flat_index = x.flatten(2).argmax(2)
    coords = []
    for size in reversed(spatial):
        coords.append(flat_index % size)
        flat_index = flat_index // size
    return torch.stack(list(reversed(coords)), dim=-1)


class StreamingMoments:
    """Running mean, variance and (optionally) covariance of rows of width `dim`."""

    def __init__(self, dim: int, covariance: bool = True, device: torch.device | str = "cpu"):
        self.dim = dim
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)  # sum of squared deviations
        self.comoment = torch.zeros((dim, dim), dtype=torch.float64, device=device) if covariance else None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(device=self.mean.device, dtype=torch.float64)
        nb = rows.shape[0]
        if nb == 0:
            return
        mean_b = rows.mean(0)
        centered = rows - mean_b
        m2_b = (centered * centered).sum(0)
        n = self.n + nb
        delta = mean_b - self.mean
        weight = self.n * nb / n
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta * delta * weight
        if self.comoment is not None:
            self.comoment += centered.T @ centered + torch.outer(delta, delta) * weight
        self.n = n

    def variance(self, ddof: int = 1) -> torch.Tensor:
        return self.m2 / max(self.n - ddof, 1)

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        if self.comoment is None:
            raise ValueError("covariance was not accumulated")
        return self.comoment / max(self.n - ddof, 1)

    def nbytes(self) -> int:
        total = self.mean.numel() * 8 + self.m2.numel() * 8
        return total + (self.comoment.numel() * 8 if self.comoment is not None else 0)


class StreamingTopK:
    """The k largest scores per unit, with the example index and position of each."""

    def __init__(self, dim: int, k: int, ndim_pos: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((dim, 0), float("-inf"), device=device)
        self.index = torch.zeros((dim, 0), dtype=torch.long, device=device)
        self.pos = torch.zeros((dim, 0, ndim_pos), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, index: torch.Tensor, pos: torch.Tensor) -> None:
        """scores [B, U], index [B] (data set indices), pos [B, U, d]."""
        if self.k <= 0:
            return
        scores = scores.detach().float().to(self.values.device)
        values = torch.cat([self.values, scores.T], dim=1)
        idx = torch.cat([self.index, index.to(self.index.device).unsqueeze(0).expand(scores.shape[1], -1)], dim=1)
        positions = torch.cat([self.pos, pos.to(self.pos.device).transpose(0, 1)], dim=1)
        k = min(self.k, values.shape[1])
        # ties broken towards the earlier example, so results do not depend on batch size
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
        self.values = torch.gather(values, 1, order)
        self.index = torch.gather(idx, 1, order)
        self.pos = torch.gather(positions, 1, order.unsqueeze(-1).expand(-1, -1, positions.shape[-1]))

    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.index.numel() * 8 + self.pos.numel() * 8


class Reservoir:
    """A uniform random sample of at most `capacity` rows of a stream (Algorithm R, seeded).

    While the stream is no longer than `capacity` it holds every row, in order.
    """

    def __init__(self, dim: int, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self.rows = np.zeros((self.capacity, dim), dtype=np.float32)
        self.index = np.full(self.capacity, -1, dtype=np.int64)
        self.labels = np.full(self.capacity, -1, dtype=np.int64)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, rows: np.ndarray, index: np.ndarray, labels: np.ndarray) -> None:
        nb = rows.shape[0]
        if self.capacity <= 0 or nb == 0:
            return
        t = self.seen + np.arange(nb)
        slot = np.where(t < self.capacity, t, -1)
        late = t >= self.capacity
        if late.any():
            draws = (self._rng.random(int(late.sum())) * (t[late] + 1)).astype(np.int64)
            slot[late] = np.where(draws < self.capacity, draws, -1)
        keep = slot >= 0
        slot, rows, index, labels = slot[keep], rows[keep], index[keep], labels[keep]
        # when two rows of a batch draw the same slot, the later one wins (as in the sequential algorithm)
        _, last = np.unique(slot[::-1], return_index=True)
        chosen = len(slot) - 1 - last
        self.rows[slot[chosen]] = rows[chosen]
        self.index[slot[chosen]] = index[chosen]
        self.labels[slot[chosen]] = labels[chosen]
        self.seen += nb

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, index, labels) sorted by data set index."""
        m = min(self.seen, self.capacity)
        order = np.argsort(self.index[:m], kind="stable")
        return self.rows[:m][order], self.index[:m][order], self.labels[:m][order]

    def nbytes(self) -> int:
        return self.rows.nbytes + self.index.nbytes + self.labels.nbytes


def correlation_from_covariance(cov: np.ndarray) -> np.ndarray:
    """Pearson correlation; units with zero variance get NaN rows and columns."""
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(std, std)
    corr[std == 0, :] = np.nan
    corr[:, std == 0] = np.nan
    np.fill_diagonal(corr, np.where(std > 0, 1.0, np.nan))
    return np.clip(corr, -1.0, 1.0, out=corr, where=~np.isnan(corr))


def spearman(values: np.ndarray) -> np.ndarray:
    """Spearman correlation between the columns of `values` [n, U] (average ranks for ties)."""
    from scipy.stats import rankdata

    if values.shape[0] < 2:
        return np.full((values.shape[1], values.shape[1]), np.nan)
    ranks = rankdata(values, axis=0).astype(np.float64)
    return correlation_from_covariance(np.cov(ranks, rowvar=False).reshape(values.shape[1], values.shape[1]))


@dataclass
class UnitStats:
    """Per-unit statistics of one layer over a data set (see `netanatomy.capture`)."""

    layer: str
    stage: str
    reduce: str
    n: int
    mean: np.ndarray
    var: np.ndarray
    cov: np.ndarray | None
    values: np.ndarray | None
    value_index: np.ndarray | None
    labels: np.ndarray | None
    topk_value: np.ndarray | None
    topk_index: np.ndarray | None
    topk_pos: np.ndarray | None
    spatial: tuple[int, ...] = ()

    @property
    def units(self) -> int:
        return int(self.mean.shape[0])

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def pearson(self) -> np.ndarray:
        if self.cov is None:
            raise ValueError("covariance was not captured (capture with covariance=True)")
        return correlation_from_covariance(self.cov)

    def spearman(self) -> np.ndarray:
        """Spearman correlation on the kept values: exact when every example was kept."""
        if self.values is None:
            raise ValueError("no per-example values were kept (capture with keep_values > 0)")
        return spearman(self.values)
