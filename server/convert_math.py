"""The quantizers behind ``bitserve convert``: float weight ``[N, K]`` -> the values a format stores.

Pure tensor math, no files: each function follows the FORMATS.md section it names.

| function | target | math |
|---|---|---|
| :func:`absmean_ternary` | ``bitnet`` (§1.4) | ``T = clamp(round(W / g), -1, 1)``, ``g = mean|W|`` per tensor |
| :func:`svid_rank1` | ``onebit`` (§3.4) | ``W ~ sign(W) * h g^T``, ``h g^T`` = best rank-1 approximation of ``|W|`` |
| :func:`fbi_column_binarize` | ``fbi`` (§4.2) | ``W ~ alpha_k sign(W - beta_k) + beta_k``, ``beta_k = mean_n W``, ``alpha_k = mean_n |W - beta_k|`` |
| :func:`flexible_dual_binarize` | ``dual_binary`` (§5.3) | ``W ~ a1 B1 + a2 B2`` per row and group, B in {0, 1} |
| :func:`ternary_to_dual_binary` | ``dual_binary`` from ``bitnet`` | exact: ``t*s = s*[t=1] - s*[t=-1]`` |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitserve.plugins.bitnet import absmean_ternarize

_CHUNK_ELEMENTS = 1 << 20  # weights handled at once by the group-wise searches


def absmean_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(T int8 [N, K], g)`` with ``W_hat = T * g`` (transformers' online AutoBitLinear rule)."""
    return absmean_ternarize(weight)


# -- OneBit: sign-value-independent decomposition ---------------------------------------------------
@dataclass
class Rank1:
    h: torch.Tensor  # [N] float64, >= 0 (OneBit weight_scale)
    g: torch.Tensor  # [K] float64, >= 0 (OneBit input_factor)
    sigma: float
    iterations: int


def svid_rank1(weight: torch.Tensor, *, max_iters: int = 500, tol: float = 1e-13) -> Rank1:
    """Best rank-1 approximation ``h g^T`` of ``|W|`` (Frobenius norm), in float64.

    ``|W|`` is non-negative, so its leading singular vectors can be taken non-negative
    (Perron-Frobenius); power iteration on ``|W|^T |W|`` from the positive column means stays
    non-negative and converges to them. ``h = sqrt(sigma) u``, ``g = sqrt(sigma) v``. Since
    ``sign(W) * sign(W) = 1``, ``|| W - sign(W) * h g^T || = || |W| - h g^T ||``, so this is also
    the best sign-masked rank-1 fit (the paper's SVID; OneBit's released script uses a rank-1 NMF,
    which targets the same optimum).
    """
    a = weight.double().abs()
    if a.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(a.shape)}")
    v = a.mean(0)
    norm = v.norm()
    if norm == 0:
        n, k = a.shape
        return Rank1(torch.zeros(n, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0.0, 0)
    v = v / norm
    it = 0
    for it in range(1, max_iters + 1):
        u = a @ v
        v_new = a.t() @ u
        v_new = v_new / v_new.norm()
        delta = float((v_new - v).abs().max())
        v = v_new
        if delta < tol:
            break
    u = a @ v
    sigma = float(u.norm())
    u = u / sigma
    root = sigma ** 0.5
    return Rank1(h=u * root, g=v * root, sigma=sigma, iterations=it)


# -- FBI-LLM: per-input-column alpha and beta ------------------------------------------------------
def fbi_column_binarize(weight: torch.Tensor, latent_dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latent [N, K] in latent_dtype, alpha [1, K], beta [1, K] float32)`` for FBI-LLM's column
    pattern (FORMATS.md §4.2).

    ``beta_k = mean_n W[n, k]``, ``alpha_k = mean_n |W[n, k] - beta_k|`` (FBI-LLM's "xnor" rule).
    The stored latent weight is ``W - beta`` so that ``sign(latent)`` is the sign of the centred
    weight (FBI-LLM uses only the latent's sign); entries that are zero after the cast to
    ``latent_dtype`` become its smallest positive normal number, so no reader has to guess ``sign(0)``.
    """
    w = weight.float()
    beta = w.mean(0, keepdim=True)
    centred = w - beta
    alpha = centred.abs().mean(0, keepdim=True)
    latent = centred.to(latent_dtype)
    latent = torch.where(latent == 0, torch.full_like(latent, torch.finfo(latent_dtype).tiny), latent)
    return latent, alpha, beta


# -- DB-LLM flexible dual binarization ------------------------------------------------------------
@dataclass
class DualBinary:
    b1: torch.Tensor  # uint8 [N, K] of 0/1
    b2: torch.Tensor  # uint8 [N, K] of 0/1
    alpha1: torch.Tensor  # float32 [N, K/G]
    alpha2: torch.Tensor  # float32 [N, K/G]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        return (self.alpha1.repeat_interleave(g, 1) * self.b1.float()
                + self.alpha2.repeat_interleave(g, 1) * self.b2.float())


def _assign(x: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest of the levels ``{0, a1, a2, a1 + a2}`` per entry; x ``[R, Gs, G]``, a ``[R, Gs]``.

    Returns ``(b1, b2, squared error per group [R, Gs])``; ties go to the lower code.
    """
    levels = torch.stack([torch.zeros_like(a1), a1, a2, a1 + a2], dim=-1)  # codes 0..3 = b1 + 2*b2
    err = (x.unsqueeze(-1) - levels.unsqueeze(-2)) ** 2  # [R, Gs, G, 4]
    best, code = err.min(-1)
    return code & 1, code >> 1, best.sum(-1)


def _least_squares(x, b1, b2, a1, a2):
    """Optimal (a1, a2) per group for fixed planes; groups with singular normal equations keep theirs."""
    f1, f2 = b1.to(x.dtype), b2.to(x.dtype)
    n1, n2, n12 = f1.sum(-1), f2.sum(-1), (f1 * f2).sum(-1)
    r1, r2 = (x * f1).sum(-1), (x * f2).sum(-1)
    det = n1 * n2 - n12 * n12
    ok = det > 0.5  # counts are integers: det >= 1 when non-singular
    safe = torch.where(ok, det, torch.ones_like(det))
    new1 = (r1 * n2 - r2 * n12) / safe
    new2 = (r2 * n1 - r1 * n12) / safe
    return torch.where(ok, new1, a1), torch.where(ok, new2, a2)


# step candidates of the initial 2-bit grid, as fractions of max|w| of the group
_STEP_FRACTIONS = torch.tensor([0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7])


def _dual_binarize_rows(x: torch.Tensor, iters: int, round_to: torch.dtype) -> tuple:
    """x: float32 ``[R, Gs, G]`` -> (b1, b2, a1, a2, sq_err) for these rows."""
    amax = x.abs().amax(-1).clamp(min=1e-12)  # [R, Gs]
    best_err = best_a1 = best_a2 = None
    # FDB initialisation (FORMATS.md §5.3): the 2-bit grid {-s, 0, s, 2s} is a1 = 2s, a2 = -s; its
    # mirror {-2s, -s, 0, s} is a1 = -2s, a2 = s. Search the step s per group, keep the best start.
    for frac in _STEP_FRACTIONS.tolist():
        s = amax * frac
        for a1, a2 in ((2 * s, -s), (-2 * s, s)):
            _, _, err = _assign(x, a1, a2)
            if best_err is None:
                best_err, best_a1, best_a2 = err, a1, a2
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_a1 = torch.where(better, a1, best_a1)
                best_a2 = torch.where(better, a2, best_a2)
    a1, a2 = best_a1, best_a2
    # alternate: planes for fixed scales (nearest level), scales for fixed planes (least squares);
    # neither step can increase the squared error
    b1, b2, err = _assign(x, a1, a2)
    for _ in range(iters):
        a1, a2 = _least_squares(x, b1, b2, a1, a2)
        b1, b2, err = _assign(x, a1, a2)
    # store the scales at their on-disk precision and re-pick the planes for the rounded scales
    a1, a2 = a1.to(round_to).float(), a2.to(round_to).float()
    b1, b2, err = _assign(x, a1, a2)
    return b1, b2, a1, a2, err


def flexible_dual_binarize(weight: torch.Tensor, group_size: int, *, iters: int = 8,
                           alpha_dtype: torch.dtype = torch.float32) -> DualBinary:
    """DB-LLM's flexible dual binarization of ``W [N, K]`` with scales per row and group of G columns.

    Start from the 2-bit grid of §5.3 (``a1 = 2s, a2 = -s`` or its mirror, step s searched per
    group), then alternate exact least squares for ``(a1, a2)`` and nearest-level assignment of
    ``(B1, B2)`` (levels ``{0, a1, a2, a1 + a2}``) for ``iters`` rounds. The scales are finally
    rounded to ``alpha_dtype`` and the planes re-assigned for the rounded scales.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide K={k}")
    gs = k // group_size
    rows = max(1, _CHUNK_ELEMENTS // k)
    parts = []
    for start in range(0, n, rows):
        x = weight[start:start + rows].float().reshape(-1, gs, group_size)
        parts.append(_dual_binarize_rows(x, iters, alpha_dtype))
    b1 = torch.cat([p[0] for p in parts]).reshape(n, k).to(torch.uint8)
    b2 = torch.cat([p[1] for p in parts]).reshape(n, k).to(torch.uint8)
    return DualBinary(b1, b2, torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]), group_size)


def ternary_to_dual_binary(t: torch.Tensor, scale: torch.Tensor, group_size: int) -> DualBinary:
    """Exact dual-binary form of ``t * scale[:, None]`` (t in {-1, 0, 1}, scale per row):
    ``B1 = [t = +1]``, ``B2 = [t = -1]``, ``a1 = s``, ``a2 = -s`` in every group."""
    n, k = t.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} must divide K={k}")
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        s = s.expand(n)
    a1 = s.unsqueeze(1).expand(n, k // group_size).contiguous()
    return DualBinary((t == 1).to(torch.uint8), (t == -1).to(torch.uint8), a1, -a1, group_size)
