"""Triton quantize-and-write kernels of the paged KV cache (twins: :mod:`bitserve.kernels.kv_reference`).

Layouts, rounding and scale conventions are in the docstring of ``kv_reference`` and in
``docs/kv_cache.md``. All pools are one layer's contiguous tensors; inputs ``[T, KVH, D]``
may have any row/head strides (unit stride over D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels.kv_reference import FP16_MAX, SCALE_MIN, KVLayer


# A row (int8, int-n values) or channel (int-n keys) holding a NaN gets a NaN scale (and zero) and
# codes 0, as in the twin: GPUs' min/max drop NaN, which would store a finite scale and garbage codes.
@triton.jit
def _has_nan(x, axis: tl.constexpr):
    """1 where the reduction of ``x`` along ``axis`` meets a NaN, else 0 (int32)."""
    return tl.max(tl.where(x == x, 0, 1), axis=axis)


@triton.jit
def _code(v, lo: tl.constexpr, hi: tl.constexpr):
    """``clamp(floor(v + 1/2), lo, hi)``, 0 where ``v`` is NaN."""
    r = tl.floor(v + 0.5)
    return tl.where(r == r, tl.minimum(tl.maximum(r, lo), hi), 0.0)

BLOCK_T = 16  # tokens per program of the per-token writers


@triton.jit
def _write_int8_rows(x_ptr, slot_ptr, codes_ptr, scale_ptr, T, stride_xt, stride_xh, pid, h,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                     SCALE_MIN: tl.constexpr, FP16_MAX: tl.constexpr):
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, HEAD_DIM)
    tmask = t < T
    x = tl.load(x_ptr + t[:, None] * stride_xt + h * stride_xh + d[None, :], mask=tmask[:, None], other=0.0)
    x = x.to(tl.float32)
    scale = tl.minimum(tl.maximum(tl.max(tl.abs(x), axis=1) / 127.0, SCALE_MIN), FP16_MAX)
    scale = tl.where(_has_nan(x, 1) > 0, float("nan"), scale).to(tl.float16)
    s = scale.to(tl.float32)
    code = _code(x / s[:, None], -127.0, 127.0)
    slot = tl.load(slot_ptr + t, mask=tmask, other=0).to(tl.int64)
    tl.store(codes_ptr + (slot[:, None] * NUM_KV_HEADS + h) * HEAD_DIM + d[None, :], code.to(tl.int8),
             mask=tmask[:, None])
    tl.store(scale_ptr + slot * NUM_KV_HEADS + h, scale, mask=tmask)


@triton.jit
def _write_int8_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, T, stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    SCALE_MIN: tl.constexpr, FP16_MAX: tl.constexpr,
):
    """Symmetric int8 per token and head, keys and values in one launch.

    k, v: ``[T, KVH, D]`` float; slot: int ``[T]`` flat slots; codes: int8 ``[NB*B, KVH, D]``;
    scales: fp16 ``[NB*B, KVH]``. Grid ``(cdiv(T, BLOCK_T), KVH, 2)``: axis 2 picks keys or values.
    """
    pid, h = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        _write_int8_rows(k_ptr, slot_ptr, kc_ptr, ks_ptr, T, stride_kt, stride_kh, pid, h, NUM_KV_HEADS, HEAD_DIM,
                         BLOCK_T, SCALE_MIN, FP16_MAX)
    else:
        _write_int8_rows(v_ptr, slot_ptr, vc_ptr, vs_ptr, T, stride_vt, stride_vh, pid, h, NUM_KV_HEADS, HEAD_DIM,
                         BLOCK_T, SCALE_MIN, FP16_MAX)


@triton.jit
def _copy_rows(x_ptr, slot_ptr, cache_ptr, T, stride_xt, stride_xh, pid, h,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, HEAD_DIM)
    tmask = t < T
    dmask = d < HEAD_DIM
    x = tl.load(x_ptr + t[:, None] * stride_xt + h * stride_xh + d[None, :], mask=tmask[:, None] & dmask[None, :])
    slot = tl.load(slot_ptr + t, mask=tmask, other=0).to(tl.int64)
    tl.store(cache_ptr + (slot[:, None] * NUM_KV_HEADS + h) * HEAD_DIM + d[None, :],
             x.to(cache_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


@triton.jit
def _write_float_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, T, stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Keys and values ``[T, KVH, D]`` to their slots of float blocks ``[NB*B, KVH, D]`` (cast to the
    cache's dtype), in one launch. Grid ``(cdiv(T, BLOCK_T), KVH, 2)``."""
    pid, h = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        _copy_rows(k_ptr, slot_ptr, kc_ptr, T, stride_kt, stride_kh, pid, h, NUM_KV_HEADS, HEAD_DIM, BLOCK_T)
    else:
        _copy_rows(v_ptr, slot_ptr, vc_ptr, T, stride_vt, stride_vh, pid, h, NUM_KV_HEADS, HEAD_DIM, BLOCK_T)


@triton.jit
def _write_v_intn_kernel(
    x_ptr, slot_ptr, codes_ptr, scale_ptr, zero_ptr, T, stride_xt, stride_xh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
    SCALE_MIN: tl.constexpr, FP16_MAX: tl.constexpr,
):
    """Asymmetric int4/int2 per token and head, planar packing.

    x: ``[T, KVH, D]`` float; codes: uint8 ``[NB*B, KVH, D/P]``; scale, zero: fp16
    ``[NB*B, KVH]``. Grid ``(cdiv(T, BLOCK_T), KVH)``.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    DP: tl.constexpr = HEAD_DIM // PER_BYTE
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid, h = tl.program_id(0), tl.program_id(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, DP)
    tmask = t < T
    base = x_ptr + t[:, None] * stride_xt + h * stride_xh + j[None, :]
    lo = tl.full([BLOCK_T], float("inf"), tl.float32)
    hi = tl.full([BLOCK_T], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK_T], dtype=tl.int32)
    for f in tl.static_range(PER_BYTE):
        x = tl.load(base + f * DP, mask=tmask[:, None], other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))
        nan = tl.maximum(nan, _has_nan(x, 1))
    scale = tl.minimum(tl.maximum((hi - lo) / QMAX, SCALE_MIN), FP16_MAX)
    zero = tl.minimum(tl.maximum(lo, -FP16_MAX), FP16_MAX)
    scale = tl.where(nan > 0, float("nan"), scale).to(tl.float16)
    zero = tl.where(nan > 0, float("nan"), zero).to(tl.float16)
    s, z = scale.to(tl.float32), zero.to(tl.float32)
    packed = tl.zeros([BLOCK_T, DP], dtype=tl.int32)
    for f in tl.static_range(PER_BYTE):
        x = tl.load(base + f * DP, mask=tmask[:, None], other=0.0).to(tl.float32)
        code = _code((x - z[:, None]) / s[:, None], 0.0, QMAX)
        packed = packed | (code.to(tl.int32) << (f * BITS))
    slot = tl.load(slot_ptr + t, mask=tmask, other=0).to(tl.int64)
    tl.store(codes_ptr + (slot[:, None] * NUM_KV_HEADS + h) * DP + j[None, :], packed.to(tl.uint8),
             mask=tmask[:, None])
    tl.store(scale_ptr + slot * NUM_KV_HEADS + h, scale, mask=tmask)
    tl.store(zero_ptr + slot * NUM_KV_HEADS + h, zero, mask=tmask)


@triton.jit
def _finalize_k_intn_kernel(
    knew_ptr, stage_ptr, codes_ptr, scale_ptr, zero_ptr,
    fin_block_ptr, fin_slot_ptr, fin_old_ptr, fin_src_ptr, stride_nt, stride_nh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr,
    SCALE_MIN: tl.constexpr, FP16_MAX: tl.constexpr,
):
    """Per-channel asymmetric int4/int2 keys of one full block and head.

    Rows ``r < old`` come from staging slot ``slot`` (``stage [S, B, KVH, D]``), the others
    from ``knew [T, KVH, D]`` row ``src + r - old``. Writes codes uint8 ``[NB, B, KVH, D/P]``
    and scale/zero fp16 ``[NB, KVH, D]``. Grid ``(num_entries, KVH)``.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    DP: tl.constexpr = HEAD_DIM // PER_BYTE
    QMAX: tl.constexpr = (1 << BITS) - 1
    i, h = tl.program_id(0), tl.program_id(1)
    blk = tl.load(fin_block_ptr + i).to(tl.int64)
    slot = tl.maximum(tl.load(fin_slot_ptr + i), 0).to(tl.int64)
    old = tl.load(fin_old_ptr + i)
    src = tl.load(fin_src_ptr + i).to(tl.int64)
    r = tl.arange(0, BLOCK_SIZE)
    j = tl.arange(0, DP)
    staged = r < old
    stage_base = stage_ptr + ((slot * BLOCK_SIZE + r[:, None]) * NUM_KV_HEADS + h) * HEAD_DIM + j[None, :]
    new_base = knew_ptr + (src + r[:, None] - old) * stride_nt + h * stride_nh + j[None, :]
    packed = tl.zeros([BLOCK_SIZE, DP], dtype=tl.int32)
    for f in tl.static_range(PER_BYTE):
        xs = tl.load(stage_base + f * DP, mask=staged[:, None], other=0.0).to(tl.float32)
        xn = tl.load(new_base + f * DP, mask=(r >= old)[:, None], other=0.0).to(tl.float32)
        x = tl.where(staged[:, None], xs, xn)
        lo = tl.min(x, axis=0)
        nan = _has_nan(x, 0)
        scale = tl.minimum(tl.maximum((tl.max(x, axis=0) - lo) / QMAX, SCALE_MIN), FP16_MAX)
        zero = tl.minimum(tl.maximum(lo, -FP16_MAX), FP16_MAX)
        scale = tl.where(nan > 0, float("nan"), scale).to(tl.float16)
        zero = tl.where(nan > 0, float("nan"), zero).to(tl.float16)
        s, z = scale.to(tl.float32), zero.to(tl.float32)
        code = _code((x - z[None, :]) / s[None, :], 0.0, QMAX)
        packed = packed | (code.to(tl.int32) << (f * BITS))
        meta = (blk * NUM_KV_HEADS + h) * HEAD_DIM + f * DP + j
        tl.store(scale_ptr + meta, scale)
        tl.store(zero_ptr + meta, zero)
    tl.store(codes_ptr + ((blk * BLOCK_SIZE + r[:, None]) * NUM_KV_HEADS + h) * DP + j[None, :], packed.to(tl.uint8))


# -- wrappers ---------------------------------------------------------------------------


def _check_rows(x: torch.Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError("KV inputs need unit stride over head_dim")


def write_kv_int8(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Triton twin of :func:`bitserve.kernels.kv_reference.write_kv_int8` (keys and values in one launch)."""
    t, kvh, d = k.shape
    if t == 0:
        return
    _check_rows(k)
    _check_rows(v)
    _write_int8_kernel[(triton.cdiv(t, BLOCK_T), kvh, 2)](
        k, v, slot_mapping, layer.k, layer.v, layer.k_scale, layer.v_scale, t, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), NUM_KV_HEADS=kvh, HEAD_DIM=d, BLOCK_T=BLOCK_T, SCALE_MIN=SCALE_MIN, FP16_MAX=FP16_MAX)


def write_kv_float(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Triton twin of :func:`bitserve.kernels.reference.write_kv_cache` for float blocks (one launch)."""
    t, kvh, d = k.shape
    if t == 0:
        return
    _check_rows(k)
    _check_rows(v)
    if d & (d - 1):
        raise ValueError(f"the Triton KV write needs a power-of-two head_dim, got {d}")
    _write_float_kernel[(triton.cdiv(t, BLOCK_T), kvh, 2)](
        k, v, slot_mapping, layer.k, layer.v, t, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=kvh, HEAD_DIM=d, BLOCK_T=BLOCK_T)


def write_v_intn(v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Triton twin of :func:`bitserve.kernels.kv_reference.write_v_intn`."""
    t, kvh, d = v.shape
    if t == 0:
        return
    _check_rows(v)
    _write_v_intn_kernel[(triton.cdiv(t, BLOCK_T), kvh)](
        v, slot_mapping, layer.v, layer.v_scale, layer.v_zero, t, v.stride(0), v.stride(1),
        NUM_KV_HEADS=kvh, HEAD_DIM=d, BITS=layer.bits, BLOCK_T=BLOCK_T, SCALE_MIN=SCALE_MIN, FP16_MAX=FP16_MAX)


def finalize_k_intn(k_new: torch.Tensor, layer: KVLayer, fin_block: torch.Tensor, fin_slot: torch.Tensor,
                    fin_old: torch.Tensor, fin_src: torch.Tensor) -> None:
    """Triton twin of :func:`bitserve.kernels.kv_reference.finalize_k_intn`."""
    n = fin_block.numel()
    if n == 0:
        return
    _check_rows(k_new)
    _finalize_k_intn_kernel[(n, layer.num_kv_heads)](
        k_new, layer.k_stage, layer.k, layer.k_scale, layer.k_zero, fin_block, fin_slot, fin_old, fin_src,
        k_new.stride(0), k_new.stride(1), NUM_KV_HEADS=layer.num_kv_heads, HEAD_DIM=layer.head_dim,
        BLOCK_SIZE=layer.block_size, BITS=layer.bits, SCALE_MIN=SCALE_MIN, FP16_MAX=FP16_MAX)
