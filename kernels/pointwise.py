"""Triton kernels for the decoder's element-wise steps between the linears (twins in
:mod:`bitserve.kernels.reference`).

In eager torch each of these is several kernels -- rotate-half RoPE is a negation, a
concatenation, two products and a sum, for q and again for k; ReLU² (or SiLU) and the gating
product are three -- each reading and writing the whole tensor. A decode step of a 30-layer model
launches hundreds of them, and at small batch every launch costs more than its arithmetic (also
inside a CUDA graph, where each kernel still drains and fills the GPU). Here:

* :func:`rope_qk` rotates the queries and the keys of a flat batch in one kernel (one program per
  token, all heads), reading the strided q/k views of the fused qkv output and writing
  contiguous ``[T, H, D]`` / ``[T, KVH, D]``; float32 math, one rounding.
* :func:`act_and_mul` computes ``act(gate) * up`` from the fused gate/up output ``[T, 2I]`` in
  one kernel (``act``: ``silu`` or ``relu2``), float32 math, one rounding.
* :func:`rmsnorm` is the model's RMSNorm (torch: ~7 kernels) with the twin's roundings, for the
  norms no linear fuses (every format but BitNet W2A8, and the final norm).
* :func:`layer_norm_parts` is OneBit's non-affine LayerNorm after each projection, applied to
  every part of a fused output (q | k | v, gate | up) in one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels.tl_common import _ROUNDING, _rmsnorm_row, _sum_of_squares_rsqrt, check_residual

ACT_CODES = {"silu": 0, "relu2": 1}
ACT_BLOCK = 1024  # elements of I per program


@triton.jit
def _rotate(x_ptr, o_ptr, t, stride_t, stride_h, cos, sin, offs_d, dmask,
            HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate-half RoPE of the ``HEADS`` heads of token ``t`` (pairs ``j``, ``j + HALF``) into the
    contiguous ``o [T, HEADS, 2 * HALF]``."""
    for h0 in tl.static_range(0, HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < HEADS)[:, None] & dmask[None, :]
        src = x_ptr + t * stride_t + h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = o_ptr + (t * HEADS + h[:, None]) * (2 * HALF) + offs_d[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                    H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """q ``[T, H, D]``, k ``[T, KVH, D]`` (any token/head strides, unit stride over D); cos/sin
    ``[T, >= HALF]`` (row stride ``stride_ct``; the model's tables repeat the first half, only it
    is read); outputs contiguous, q's dtype. Grid ``(T,)``."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HALF
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr, qo_ptr, t, stride_qt, stride_qh, cos, sin, offs_d, dmask, H, HALF, BLOCK_H)
    _rotate(k_ptr, ko_ptr, t, stride_kt, stride_kh, cos, sin, offs_d, dmask, KVH, HALF, BLOCK_H)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Triton twin of :func:`bitserve.kernels.reference.rope_qk`; returns contiguous ``(q, k)``."""
    t, h, d = q.shape
    kvh = k.shape[1]
    if d % 2 or q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope_qk needs an even head_dim and unit stride over it")
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, kvh, d), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(max(h, kvh)), 4096 // block_d))
    _rope_qk_kernel[(t,)](q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          cos.stride(0), H=h, KVH=kvh, HALF=d // 2, BLOCK_D=block_d, BLOCK_H=block_h,
                          num_warps=4)
    return q_out, k_out


@triton.jit
def _act_and_mul_kernel(x_ptr, o_ptr, I, stride_xt, stride_ot, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """x ``[T, 2I]`` (gate then up, unit column stride) -> o ``[T, I]`` = ``act(gate) * up``.
    ACT 0: SiLU, 1: ReLU². Grid ``(T, cdiv(I, BLOCK))``."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    row = x_ptr + t * stride_xt
    g = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + I + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    else:
        r = tl.maximum(g, 0.0)
        a = r * r
    tl.store(o_ptr + t * stride_ot + offs, (a * u).to(o_ptr.dtype.element_ty), mask=mask)


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """Triton twin of :func:`bitserve.kernels.reference.act_and_mul`: ``[T, 2I] -> [T, I]``."""
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACT_CODES)})")
    t, two_i = x.shape
    if two_i % 2 or x.stride(1) != 1:
        raise ValueError("act_and_mul needs [T, 2I] with unit column stride")
    i = two_i // 2
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t == 0 or i == 0:
        return out
    block = min(ACT_BLOCK, triton.next_power_of_2(i))
    _act_and_mul_kernel[(t, triton.cdiv(i, block))](x, out, i, x.stride(0), out.stride(0), ACT=ACT_CODES[act],
                                                     BLOCK=block, num_warps=4)
    return out


NORM_BLOCK = 2048  # row elements per loop step of the norm kernels


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, h_ptr, w_ptr, o_ptr, K, stride_xm, stride_rm, stride_hm, stride_om, eps,
                    HAS_RES: tl.constexpr, X_ROUND: tl.constexpr, Y_ROUND: tl.constexpr, BLOCK_K: tl.constexpr):
    """``o = round_Y(w * round_X(x * r))``, ``r = 1 / sqrt(sum(x^2) / K + eps)`` (correctly
    rounded): :func:`bitserve.kernels.reference.rmsnorm` row by row. HAS_RES: of ``h = x + res``
    (in x's dtype), also stored to ``h``. Grid ``(M,)``."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m * stride_xm
    res_row = res_ptr + m * stride_rm
    r = _sum_of_squares_rsqrt(x_row, res_row, h_ptr + m * stride_hm, K, eps, BLOCK_K, HAS_RES, X_ROUND)
    for k0 in range(0, K, BLOCK_K):
        y, mask = _rmsnorm_row(x_row, res_row, w_ptr, k0, offs, K, r, HAS_RES, X_ROUND, Y_ROUND)
        tl.store(o_ptr + m * stride_om + k0 + offs, y.to(o_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton twin of :func:`bitserve.kernels.reference.rmsnorm` for ``x [M, K]`` (unit column
    stride); output in the promoted dtype of ``weight`` and ``x``. With ``residual`` (x's shape and
    dtype): the norm of ``h = x + residual`` and ``h``, as :func:`bitserve.kernels.reference.add_rmsnorm`."""
    m, k = x.shape
    if weight.shape != (k,) or x.stride(1) != 1:
        raise ValueError(f"rmsnorm needs x [M, {k}] with unit column stride and a weight of [{k}]")
    weight = weight.contiguous()  # read at unit stride
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if x.dtype not in _ROUNDING or out_dtype not in _ROUNDING:
        raise ValueError(f"rmsnorm takes float16/bfloat16/float32, got {x.dtype} and {weight.dtype}")
    check_residual(x, residual)
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    h = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    if m:
        res, hh = (residual, h) if residual is not None else (x, x)
        _rmsnorm_kernel[(m,)](x, res, hh, weight, out, k, x.stride(0), res.stride(0), hh.stride(0), out.stride(0),
                              float(eps), HAS_RES=residual is not None, X_ROUND=_ROUNDING[x.dtype],
                              Y_ROUND=_ROUNDING[out_dtype], BLOCK_K=min(NORM_BLOCK, triton.next_power_of_2(k)),
                              num_warps=4)
    return out if residual is None else (out, h)


@triton.jit
def _layer_norm_parts_kernel(x_ptr, o_ptr, S0, S1, S2, stride_xm, stride_om, eps, BLOCK: tl.constexpr):
    """Non-affine LayerNorm of part ``p`` (columns of sizes ``S0 | S1 | S2``) of row ``m``:
    ``(x - mean) / sqrt(var + eps)`` (biased variance, float32, two passes). Grid ``(M, parts)``."""
    m = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    lo = tl.where(p == 0, 0, tl.where(p == 1, S0, S0 + S1))
    hi = lo + tl.where(p == 0, S0, tl.where(p == 1, S1, S2))
    n = (hi - lo).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK):
        acc += tl.load(x_row + c0 + offs, mask=c0 + offs < hi, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK):
        d = tl.load(x_row + c0 + offs, mask=c0 + offs < hi, other=0.0).to(tl.float32) - mean
        acc += tl.where(c0 + offs < hi, d * d, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)
    for c0 in range(lo, hi, BLOCK):
        mask = c0 + offs < hi
        v = tl.load(x_row + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + m * stride_om + c0 + offs, ((v - mean) * rstd).to(o_ptr.dtype.element_ty), mask=mask)


def layer_norm_parts(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """Triton twin of :func:`bitserve.kernels.reference.layer_norm_parts`: ``x [M, sum(sizes)]``
    (unit column stride) with each consecutive part of ``sizes`` columns normalised on its own
    (one launch per three parts)."""
    m, n = x.shape
    if sum(sizes) != n or x.stride(1) != 1 or not sizes or min(sizes) < 1:
        raise ValueError(f"layer_norm_parts needs x [M, {sum(sizes)}] with unit column stride, got {tuple(x.shape)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        col = 0
        for i in range(0, len(sizes), 3):
            group = list(sizes[i:i + 3])
            _layer_norm_parts_kernel[(m, len(group))](x[:, col:], out[:, col:], *(group + [0, 0])[:3], x.stride(0),
                                                      out.stride(0), float(eps),
                                                      BLOCK=min(NORM_BLOCK, triton.next_power_of_2(max(group))),
                                                      num_warps=4)
            col += sum(group)
    return out
