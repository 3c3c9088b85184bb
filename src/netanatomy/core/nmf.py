"""Non-negative matrix factorization of weights, batched, for consistent weight pictures.

A conv unit's weights W[o] ([C_in, kh, kw]) are sign-split along the input channels into
2*C_in non-negative channels and reduced to k factors over the kh*kw positions: at each
position the k loadings become the colour of one pixel (Visualizing Weights).

Why our own NMF: a layer has hundreds of units, and fitting them one after another with
scikit-learn is slow. `nmf` fits a whole batch of matrices in one tensor computation with
HALS (hierarchical alternating least squares, the same coordinate descent as scikit-learn's
'cd' solver) plus adaptive extrapolation (Ang & Gillis 2019), which reaches scikit-learn's
reconstruction error in far fewer passes over the data. `benchmarks/bench_nmf.py` shows it.

Colours must mean the same thing in every unit of a layer, so `factorize_weights` by default
fits ONE factorization on all units' positions together (shared factors). The per-unit mode
fits every unit alone (batched) and then permutes each unit's factors to best match the
shared ones by cosine similarity (Hungarian matching).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

_EPS = 1e-12
_DIRECT_BELOW = 0.05       # relative errors under this are recomputed directly (see _final_error)

__all__ = [
    "NMFFit",
    "WeightFactors",
    "align_factors",
    "factorize_weights",
    "nmf",
    "relative_error",
    "sign_split",
    "sign_split_rows",
]


@dataclass(frozen=True)
class NMFFit:
    """X[b] ~= loadings[b] @ factors[b] with both non-negative.

    loadings: [B, n, k]; factors: [B, k, m] (rows scaled to unit L2 norm, so the loadings carry
    the magnitude); error: [B] relative Frobenius error ||X - LF|| / ||X||; n_iter: passes run.
    """

    loadings: Tensor
    factors: Tensor
    error: Tensor
    n_iter: int


def sign_split(weights: Tensor) -> Tensor:
    """[U, C, ...] -> [U, 2C, ...]: positive parts, then negative parts, of every channel."""
    return torch.cat([weights.clamp_min(0), (-weights).clamp_min(0)], dim=1)


def sign_split_rows(weights: Tensor) -> Tensor:
    """[U, C, kh, kw] -> [U, kh*kw, 2C]: each unit as positions x sign-split channels, the
    matrix its NMF factors (written once, without a second full-size temporary)."""
    u, c, kh, kw = weights.shape
    spatial = weights.permute(0, 2, 3, 1)
    rows = weights.new_empty(u, kh, kw, 2 * c)
    torch.clamp_min(spatial, 0, out=rows[..., :c])
    torch.clamp_max(spatial, 0, out=rows[..., c:])
    rows[..., c:].neg_()
    return rows.reshape(u, kh * kw, 2 * c)


def relative_error(x: Tensor, loadings: Tensor, factors: Tensor, *, block_bytes: int = 4 << 20) -> Tensor:
    """||X - LF||_F / ||X||_F per batch element (0 where X is all zero).

    Computed over blocks of rows, so that no temporary as large as X is made.
    """
    b, n, m = x.shape
    rows = max(1, block_bytes // max(1, b * m * x.element_size()))
    resid2 = torch.zeros(b, dtype=torch.float64, device=x.device)
    norm2 = torch.zeros(b, dtype=torch.float64, device=x.device)
    for r in range(0, n, rows):
        part = x[:, r:r + rows]
        diff = torch.baddbmm(part, loadings[:, r:r + rows], factors, alpha=-1)
        # vector_norm reduces in one pass, without the squared temporary pow(2) would make
        resid2 += torch.linalg.vector_norm(diff.flatten(1), dim=1).double().square()
        norm2 += torch.linalg.vector_norm(part.flatten(1), dim=1).double().square()
    resid, norm = resid2.sqrt(), norm2.sqrt()
    return torch.where(norm > 0, resid / norm.clamp_min(_EPS), torch.zeros_like(norm)).to(x.dtype)


def _top_singular(x: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of every matrix in a batch [B, n, m].

    Exact through the Gram matrix of the short side when it is small (eigh); a
    seeded randomized range finder otherwise (a layer's stacked positions can be tens of
    thousands of rows). Only used to start the NMF, so the products stay in x's dtype.
    """
    b, n, m = x.shape
    short = min(n, m)
    if short <= 64:
        gram = x @ x.transpose(1, 2) if n <= m else x.transpose(1, 2) @ x
        vals, vecs = torch.linalg.eigh(gram)                            # ascending
        top = torch.arange(short - 1, max(short - 1 - k, -1), -1, device=x.device)
        s = vals.index_select(-1, top).clamp_min(0).sqrt()
        vecs = vecs.index_select(-1, top)
        if n <= m:
            u = vecs
            vt = (u.transpose(1, 2) @ x) / s.clamp_min(_EPS)[..., None]
        else:
            vt = vecs.transpose(1, 2)
            u = (x @ vecs) / s.clamp_min(_EPS)[:, None, :]
        return u, s, vt
    q = min(short, k + 10)
    omega = torch.randn(b, m, q, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
    basis, _ = torch.linalg.qr(x @ omega)
    for _ in range(2):
        basis, _ = torch.linalg.qr(x.transpose(1, 2) @ basis)
        basis, _ = torch.linalg.qr(x @ basis)
    us, s, vt = torch.linalg.svd(basis.transpose(1, 2) @ x, full_matrices=False)
    return (basis @ us)[:, :, :k], s[:, :k], vt[:, :k]


def _init_nndsvda(x: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """NNDSVD initialization with zeros filled by the mean (Boutsidis & Gallopoulos 2008), batched.

    Deterministic, and the start scikit-learn uses by default, so the comparison is fair.
    """
    u, s, vt = _top_singular(x, k, generator)
    b, n, m = x.shape
    k_avail = s.shape[1]
    w = torch.zeros(b, n, k, dtype=x.dtype, device=x.device)
    h = torch.zeros(b, k, m, dtype=x.dtype, device=x.device)
    w[:, :, 0] = s[:, :1].sqrt() * u[:, :, 0].abs()
    h[:, 0] = s[:, :1].sqrt() * vt[:, 0].abs()
    for j in range(1, min(k, k_avail)):
        xu, yv = u[:, :, j], vt[:, j]
        xp, xn, yp, yn = xu.clamp_min(0), (-xu).clamp_min(0), yv.clamp_min(0), (-yv).clamp_min(0)
        nxp, nxn, nyp, nyn = xp.norm(dim=1), xn.norm(dim=1), yp.norm(dim=1), yn.norm(dim=1)
        mp, mn = nxp * nyp, nxn * nyn
        pos = (mp > mn)[:, None]
        uu = torch.where(pos, xp / nxp.clamp_min(_EPS)[:, None], xn / nxn.clamp_min(_EPS)[:, None])
        vv = torch.where(pos, yp / nyp.clamp_min(_EPS)[:, None], yn / nyn.clamp_min(_EPS)[:, None])
        lam = (s[:, j] * torch.where(pos[:, 0], mp, mn)).sqrt()[:, None]
        w[:, :, j] = lam * uu
        h[:, j] = lam * vv
    avg = x.mean(dim=(1, 2))[:, None, None]
    w = torch.where(w == 0, avg, w)
    h = torch.where(h == 0, avg, h)
    return w, h


def _init_random(x: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    b, n, m = x.shape
    scale = (x.mean(dim=(1, 2)) / k).clamp_min(0).sqrt()[:, None, None]
    w = torch.rand(b, n, k, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
    h = torch.rand(b, k, m, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
    return w * scale, h * scale


def _hals_rows(h: Tensor, gram: Tensor, target: Tensor, sweeps: int) -> Tensor:
    """HALS: update the k rows of h [B, k, m] in turn for min ||X - W h|| (in place).

    gram = W^T W [B, k, k]; target = (W^T X) / diag(gram) [B, k, m], scaled by the caller
    (cheaply, through the small factor: see `_diag_scaled`). Row j's exact minimizer given
    the other rows is max(0, target_j - sum_{l != j} gram_jl h_l / gram_jj): one fused
    batched matmul per row.
    """
    k = h.shape[1]
    diag = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(_EPS)         # [B, k]
    coef = gram / diag[:, :, None]
    coef.diagonal(dim1=1, dim2=2).zero_()
    row = torch.empty_like(h[:, :1])
    for _ in range(sweeps):
        for j in range(k):
            torch.baddbmm(target[:, j:j + 1], coef[:, j:j + 1], h, alpha=-1, out=row)
            torch.clamp_min(row, 0, out=h[:, j:j + 1])
    return h


def _diag_scaled(factor: Tensor, gram: Tensor) -> Tensor:
    """factor [B, k, n] with row j divided by gram_jj: (factor / d) @ X equals (factor @ X) / d
    but divides k*n numbers instead of k*m (m, the long side, is thousands of channels)."""
    return factor / torch.diagonal(gram, dim1=1, dim2=2).clamp_min(_EPS)[:, :, None]


def _fit_chunk(x: Tensor, k: int, max_iter: int, tol: float, init: str, generator: torch.Generator,
               sweeps: int, extrapolate: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """Accelerated HALS on one chunk x [B, n, m].

    Returns W^T [B, k, n], H [B, k, m], the relative error [B] and the passes run.
    Extrapolation (Ang & Gillis 2019): after each HALS pass the iterates are pushed on by
    beta times their last step; a matrix whose error rose restarts from its last accepted
    iterate with a smaller beta, one whose error fell lets beta grow (up to beta_max).
    """
    w, h = (_init_nndsvda if init == "nndsvda" else _init_random)(x, k, generator)
    wt = w.transpose(1, 2).contiguous()
    xt = x.transpose(1, 2)
    norm2 = torch.linalg.vector_norm(x.flatten(1), dim=1).pow(2)

    def sq_error(wt_: Tensor, hxt: Tensor, hht: Tensor) -> Tensor:
        # ||X - WH||^2 = ||X||^2 - 2 <W^T, H X^T> + <W^T W, H H^T>, from products at hand
        return (norm2 - 2 * (wt_ * hxt).sum(dim=(1, 2))
                + ((wt_ @ wt_.transpose(1, 2)) * hht).sum(dim=(1, 2))).clamp_min(0)

    err = sq_error(wt, torch.bmm(h, xt), h @ h.transpose(1, 2))
    history = [float(err.sum())]
    beta = torch.full_like(norm2, 0.5)
    beta_max = torch.ones_like(norm2)
    wty, hy = wt, h
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        gram_w = wty @ wty.transpose(1, 2)
        h_new = _hals_rows(hy.clone(), gram_w, torch.bmm(_diag_scaled(wty, gram_w), x), sweeps)
        if extrapolate:
            h_new = torch.lerp(h, h_new, (1 + beta)[:, None, None]).clamp_min_(0)
        hxt = torch.bmm(h_new, xt)                                         # H X^T [B, k, n]
        hht = h_new @ h_new.transpose(1, 2)
        wt_new = _hals_rows(wty.clone(), hht, _diag_scaled(hxt, hht), sweeps)
        err_new = sq_error(wt_new, hxt, hht)
        if extrapolate:
            ok = err_new <= err
            wty_next = torch.lerp(wt, wt_new, (1 + beta)[:, None, None]).clamp_min_(0)
            bad = torch.nonzero(~ok).squeeze(1)
            if bad.numel():                                              # restart those from the accepted iterate
                h_new[bad] = h[bad]
                wt_new[bad] = wt[bad]
                wty_next[bad] = wt[bad]
                err_new[bad] = err[bad]
            beta_max = torch.where(ok, (beta_max * 1.01).clamp_max(1.0), beta)
            beta = torch.where(ok, torch.minimum(beta_max, beta * 1.05), beta / 1.5)
            wt, h, wty, hy, err = wt_new, h_new, wty_next, h_new, err_new
        else:
            wt, h, wty, hy, err = wt_new, h_new, wt_new, h_new, err_new
        history.append(float(err.sum()))
        if tol > 0 and len(history) > 5:
            old, new = history[-6] ** 0.5, history[-1] ** 0.5
            if old - new <= tol * max(old, _EPS):
                break
    return wt, h, _final_error(x, wt, h, err, norm2), n_iter


def _final_error(x: Tensor, wt: Tensor, h: Tensor, sq_err: Tensor, norm2: Tensor) -> Tensor:
    """Relative error of the fit, from the squared error the loop already tracks.

    That identity cancels: in float32 it resolves a relative error only down to about 1e-3,
    so matrices fitted better than `_DIRECT_BELOW` are measured directly (one more product).
    """
    rel = (sq_err.double() / norm2.double().clamp_min(_EPS)).sqrt()
    rel = torch.where(norm2 > 0, rel, torch.zeros_like(rel))
    close = torch.nonzero(rel < _DIRECT_BELOW).squeeze(1)
    if close.numel():
        rel[close] = relative_error(x[close], wt[close].transpose(1, 2), h[close]).double()
    return rel.to(x.dtype)


def nmf(x: Tensor, k: int = 3, *, max_iter: int = 200, tol: float = 1e-3,
        init: Literal["nndsvda", "random"] = "nndsvda", seed: int = 0, sweeps: int = 3,
        extrapolate: bool = True, chunk_bytes: int = 8 << 20,
        dtype: torch.dtype | None = None) -> NMFFit:
    """Factor every non-negative matrix of a batch at once: x [B, n, m] (or [n, m]) ~= L @ F.

    HALS with `sweeps` inner coordinate sweeps per pass and adaptive extrapolation; stops
    after `max_iter` passes or when the chunk's total error (the Frobenius norm over all its
    matrices) improved by less than `tol` (relative) over the last 5 passes. The batch runs
    in chunks of about `chunk_bytes` of data, so that a chunk stays in cache through all its
    passes. The same input and seed give the same factors.
    """
    if x.ndim == 2:
        fit = nmf(x[None], k, max_iter=max_iter, tol=tol, init=init, seed=seed, sweeps=sweeps,
                  extrapolate=extrapolate, chunk_bytes=chunk_bytes, dtype=dtype)
        return NMFFit(fit.loadings[0], fit.factors[0], fit.error[0], fit.n_iter)
    if x.ndim != 3:
        raise ValueError(f"nmf expects [B, n, m] or [n, m], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError("k must be >= 1")
    if init not in ("nndsvda", "random"):
        raise ValueError(f"init must be 'nndsvda' or 'random', got {init!r}")
    dtype = dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    x = x.detach().to(dtype)
    generator = torch.Generator().manual_seed(int(seed))
    b, n, m = x.shape
    per_item = max(1, n * m * x.element_size())
    step = max(1, min(b, chunk_bytes // per_item))
    # outputs written chunk by chunk and rescaled in place: no concatenated copies of
    # the (often tens of MB) factors, whose fresh pages cost more than the arithmetic
    loadings = x.new_empty(b, n, k)
    factors = x.new_empty(b, k, m)
    error = x.new_empty(b)
    n_iter = 0
    for start in range(0, b, step):
        chunk = x[start:start + step].contiguous()
        if chunk.numel() and float(chunk.amin()) < 0:                    # checked while in cache
            raise ValueError("nmf needs a non-negative input (use sign_split on weights)")
        wt, h, err, it = _fit_chunk(chunk, k, max_iter, tol, init, generator, sweeps, extrapolate)
        loadings[start:start + step] = wt.transpose(1, 2)
        factors[start:start + step] = h
        error[start:start + step] = err
        n_iter = max(n_iter, it)
    scale = torch.linalg.vector_norm(factors, dim=2)                   # [B, k]
    factors.div_(scale.clamp_min(_EPS)[:, :, None])
    loadings.mul_(scale[:, None, :])
    return NMFFit(loadings, factors, error, n_iter)


def align_factors(factors: Tensor, reference: Tensor) -> Tensor:
    """Per batch element, the permutation of its k factors that best matches `reference`.

    factors [B, k, m], reference [k, m]; returns perm [B, k] with factors[b, perm[b, j]] the
    match of reference[j] (maximum total cosine similarity, Hungarian algorithm).
    """
    f = factors / factors.norm(dim=2, keepdim=True).clamp_min(_EPS)
    r = reference / reference.norm(dim=1, keepdim=True).clamp_min(_EPS)
    sims = torch.einsum("jm,bim->bji", r.to(f.dtype), f).cpu().numpy()
    perms = np.empty(sims.shape[:2], dtype=np.int64)
    for b in range(sims.shape[0]):
        rows, cols = linear_sum_assignment(sims[b], maximize=True)
        perms[b, rows] = cols
    return torch.from_numpy(perms)


@dataclass(frozen=True)
class WeightFactors:
    """The NMF of a layer's weights, ready to be drawn.

    loadings: [U, kh, kw, k] non-negative, factor j at every position of every unit;
    factors: [k, 2*C_in] shared factors (rows unit norm): positive parts of the input channels,
    then negative parts; unit_factors: [U, k, 2*C_in] per-unit factors (per-unit mode) or None;
    error: [U] relative reconstruction error of each unit's sign-split weights;
    mode: "shared" or "per_unit"; n_iter: passes of the fit(s).
    """

    loadings: Tensor
    factors: Tensor
    unit_factors: Tensor | None
    error: Tensor
    mode: str
    n_iter: int

    @property
    def positive(self) -> Tensor:
        """[k, C_in]: how much each factor uses the positive part of each input channel."""
        return self.factors[:, : self.factors.shape[1] // 2]

    @property
    def negative(self) -> Tensor:
        """[k, C_in]: the same for the negative part (inhibition)."""
        return self.factors[:, self.factors.shape[1] // 2:]


def _order_by_energy(loadings: Tensor) -> Tensor:
    """Shared factors sorted by the weight they carry, so red is the largest, then green, blue."""
    energy = loadings.pow(2).sum(dim=tuple(range(loadings.ndim - 1)))
    return torch.argsort(energy, descending=True, stable=True)


def factorize_weights(weights: Tensor, k: int = 3, *, mode: Literal["shared", "per_unit"] = "shared",
                      max_iter: int = 200, tol: float = 1e-3, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> WeightFactors:
    """NMF of a conv layer's weights [U, C_in, kh, kw] into k colours consistent across units.

    'shared' (default): one factorization of all units' positions together, so a colour is
    the same mix of input channels in every unit. 'per_unit': every unit fitted alone (one
    batched computation) and its factors permuted to match the shared ones; each unit is
    reconstructed better, and colours still correspond.
    """
    if weights.ndim != 4:
        raise ValueError(f"weights must be [units, C_in, kh, kw], got shape {tuple(weights.shape)}")
    u, c, kh, kw = weights.shape
    rows = sign_split_rows(weights.detach().to(dtype))                 # [U, positions, 2C]
    shared = nmf(rows.reshape(1, u * kh * kw, 2 * c), k, max_iter=max_iter, tol=tol, seed=seed)
    order = _order_by_energy(shared.loadings[0])
    factors = shared.factors[0][order]
    loadings = shared.loadings[0][:, order].reshape(u, kh * kw, k)
    error = relative_error(rows, loadings, factors.expand(u, k, 2 * c))
    if mode == "shared":
        return WeightFactors(loadings.reshape(u, kh, kw, k), factors, None, error, "shared", shared.n_iter)
    if mode != "per_unit":
        raise ValueError(f"mode must be 'shared' or 'per_unit', got {mode!r}")
    fit = nmf(rows, k, max_iter=max_iter, tol=tol, seed=seed)
    perm = align_factors(fit.factors, factors).to(fit.factors.device)
    unit_factors = torch.gather(fit.factors, 1, perm[:, :, None].expand(-1, -1, 2 * c))
    unit_loadings = torch.gather(fit.loadings, 2, perm[:, None, :].expand(-1, kh * kw, -1))
    return WeightFactors(unit_loadings.reshape(u, kh, kw, k), factors, unit_factors, fit.error,
                         "per_unit", fit.n_iter)
