"""Triton ternary weight kernels: W2A8 (int8 activations) and W2A16 (float activations).

Weights are in the ternary kernel layout of :mod:`bitserve.kernels.packing` (``uint8[N, K/4]``,
byte ``P[n, j]`` holds ``T[n, j + s*K/4]`` in bits ``2s..2s+1`` as the code ``t + 1``).
The paths of :func:`ternary_linear`, chosen by M (``path=None``) or named:

- **dp4a** (W2A8 decode, M <= ``ternary_decode.MAX_M``, the default; :mod:`bitserve.kernels.ternary_decode`):
  int8 dot products of four codes at a time on the CUDA cores, from activations quantized by a
  small per-token kernel (or by the fused RMSNorm of :func:`ternary_linear_rmsnorm`).
- **decode** (W2A16 decode, M <= ``lowbit_decode.MAX_M``; :mod:`bitserve.kernels.lowbit_decode`).
- **gemv** (the first GEMV, M <= ``GEMV_MAX_M`` when the two above do not apply, e.g. K not a
  multiple of 16): one program per (BLOCK_N rows, K slice, token); W2A8 quantizes the activation
  row inside the kernel. Codes are used as ``t + 1``; the ``-1`` is folded out with the sum of the
  activations, so unpacking a code costs a shift and a mask.
- **gemm** (up to ``ternary_prefill.MIN_M`` tokens) and **wide** (above): ``tl.dot`` tiles. W2A8
  runs int8 x int8 -> int32 on the tensor cores; ``gemm`` masks the weight bytes in place (``p &
  3``, ``p >> 6`` exact; ``p & 12`` and ``(p >> 2) & 12`` carry a factor 4 that a second
  accumulator removes: four dots per byte step), ``wide`` unpacks a step's codes into one
  ``tl.dot`` (:mod:`bitserve.kernels.ternary_prefill`).
- **dequant** (opt-in prefill): codes unpacked to bytes a tile at a time, then the vendor GEMM.

Launch configs are fixed per path (``GEMV_GPU``, :func:`gemm_gpu_config`; the GEMM ones are the
autotuner's winners on an H100); ``BITSERVE_TRITON_AUTOTUNE=1`` autotunes the GEMM instead (each new
shape and M bucket then benchmarks every candidate on its first call, which made the first requests
of a freshly started server take tens of seconds). Both split K across programs when the output alone cannot fill the GPU; partial sums go to a
workspace and :func:`bitserve.kernels.tl_common.splitk_epilogue` finishes them (int32 partials for
W2A8, so the result does not depend on the split). Epilogue: ``acc / s_x * weight_scale + bias``
(W2A8) or ``acc * weight_scale + bias`` (W2A16), weight_scale per tensor ``[1]`` or per output
channel ``[N]``, output fp16/bf16/fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import lowbit_decode, reference, ternary_decode, ternary_prefill, tl_common
from bitserve.kernels.ternary_prefill import wide_operands
from bitserve.kernels.packing import unpack_ternary
from bitserve.kernels.tl_common import (bucket, int8_code, interpreting, inv_times_127, nan_if, not_finite,
                                       output_buffer, pick_split_k, quantize_int8, rows_contiguous,
                                       splitk_epilogue, store_tile)

# -- configs -----------------------------------------------------------------------------------
GEMV_BLOCK_N = 16  # output rows per GEMV program (on GPUs; small so that decode fills the SMs)
GEMV_CONFIGS = [
    triton.Config({"BLOCK_J": 64}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_J": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_J": 256}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_J": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_J": 512}, num_warps=8, num_stages=1),
]
GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, bj, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2),
                         (128, 128, 8, 3), (256, 64, 8, 3)]
]
# interpreter configs (small, fast to interpret)
GEMV_DEFAULT = {"BLOCK_N": 32, "BLOCK_J": 64, "num_warps": 4, "num_stages": 1}
GEMM_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
# GEMV for M <= GEMV_MAX_M, GEMM above: on an H100 the GEMM already won at M = 2 on 3 of the 5 2B4T
# shapes (docs/kernels.md)
GEMV_MAX_M = 1
# GPU configs used unless BITSERVE_TRITON_AUTOTUNE=1 (H100 measurements in docs/kernels.md)
GEMV_GPU = {"BLOCK_N": 16, "BLOCK_J": 256, "num_warps": 4, "num_stages": 1}
DEQUANT_TILE_ELEMENTS = 1 << 26  # path="dequant": at most 64 MB of unpacked codes at a time


def gemm_gpu_config(m: int) -> dict:
    """Fixed GEMM launch config by M (the autotuner's winners on 2B4T shapes, H100). Above 32 tokens
    (BLOCK_M 64/128) 8 warps: with 4, both accumulators of a 128 x 64 tile did not fit in registers
    and spilled (32 B/thread W2A8, 536 B W2A16 on sm_90; benchmarks/kernel_sass.py)."""
    if m <= 32:
        return {"BLOCK_N": 128, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 64, "BLOCK_J": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _prune_gemm(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    kept = [c for c in configs if bm * c.kwargs["BLOCK_N"] <= 128 * 128]
    return kept or configs[:1]


# -- GEMV ------------------------------------------------------------------------------------------
@triton.autotune(configs=GEMV_CONFIGS, key=["N", "Q", "M_BUCKET", "SPLIT_K", "ACT_INT8", "BLOCK_N"])
@triton.jit
def _ternary_gemv_kernel(
    x_ptr, p_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, sx_ptr,
    M, N, Q, stride_xm, stride_pn, stride_om, M_BUCKET,
    ACT_INT8: tl.constexpr, WS_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Ternary GEMV, ``y[m] = T @ x[m]`` on CUDA cores.

    x: ``[M, 4Q]`` fp16/bf16/fp32, unit column stride; p: ``uint8[N, Q]`` ternary kernel layout;
    ws: float32 ``[N]`` (WS_PER_N) or ``[1]``; bias: ``[N]`` any float; out: ``[M, N]``.
    ACT_INT8: x is quantized per token here (absmax over the whole row, ``BLOCK_X`` at a time),
    accumulation is exact int32 and ``y = acc / s_x * ws + bias``; else fp32 accumulation and
    ``y = acc * ws + bias``. SPLIT_K > 1: program ``(n, k, m)`` covers one K slice and writes its
    raw partial (int32 / float32) to ``part[k, m, n]`` (and W2A8 ``s_x`` to ``sx[m]``); the epilogue
    kernel finishes. Grid: ``(cdiv(N, BLOCK_N), SPLIT_K, M)``.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + m * stride_xm
    if ACT_INT8:
        offs_x = tl.arange(0, BLOCK_X)
        amax = tl.zeros([BLOCK_X], dtype=tl.float32)
        bad = tl.zeros([BLOCK_X], dtype=tl.int32)
        for k0 in range(0, 4 * Q, BLOCK_X):
            v = tl.load(x_row + k0 + offs_x, mask=k0 + offs_x < 4 * Q, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
            bad = tl.maximum(bad, not_finite(v))
        # a row with NaN/inf: NaN outputs (max drops NaN on GPUs), like the twin
        amax_row = nan_if(tl.max(bad, axis=0), tl.maximum(tl.max(amax, axis=0), 1e-5))
        s_x = inv_times_127(amax_row, BLOCK_J)
        acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.int32)
        xsum = tl.zeros([BLOCK_J], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_J], dtype=tl.float32)

    j_per = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_J) * BLOCK_J
    j_begin = pid_k * j_per
    j_end = tl.minimum(j_begin + j_per, Q)
    p_rows = p_ptr + offs_n.to(tl.int64)[:, None] * stride_pn
    for j0 in range(j_begin, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < j_end
        p = tl.load(p_rows + offs_j[None, :], mask=n_mask[:, None] & j_mask[None, :], other=0).to(tl.int32)
        for s in tl.static_range(4):
            xs = tl.load(x_row + s * Q + offs_j, mask=j_mask, other=0.0).to(tl.float32)
            c = (p >> (2 * s)) & 3  # t + 1
            if ACT_INT8:
                xq = int8_code(xs * s_x).to(tl.int32)
                acc += c * xq[None, :]
                xsum += xq
            else:
                # exact int -> float without a conversion instruction: bits of 2**23 + c, minus 2**23
                cf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                acc += cf * xs[None, :]
                xsum += xs
    total = tl.sum(acc, axis=1) - tl.sum(xsum, axis=0)

    if DIRECT:
        y = total.to(tl.float32)
        if ACT_INT8:
            s_n = inv_times_127(amax_row, BLOCK_N)
            y = tl.math.div_rn(y, s_n)
        if WS_PER_N:
            y = y * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        else:
            y = y * tl.load(ws_ptr)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + offs_n, total, mask=n_mask)
        if ACT_INT8:
            offs_j = tl.arange(0, BLOCK_J)
            tl.store(sx_ptr + m + offs_j, s_x, mask=(offs_j < 1) & (pid_n == 0) & (pid_k == 0))


# -- GEMM ------------------------------------------------------------------------------------------
@triton.jit
def fdot(x, w, acc, SPLIT_X: tl.constexpr):
    """``acc + x @ w`` for float x; SPLIT_X: x (fp32/fp16) as bf16 hi + lo (w is bf16), ~16 bits."""
    if SPLIT_X:
        xf = x.to(tl.float32)
        hi = xf.to(tl.bfloat16)
        lo = (xf - hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, w, acc)
        acc = tl.dot(lo, w, acc)
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def wcast(v, x, SPLIT_X: tl.constexpr):
    """Small non-negative integers (uint8) -> the dot operand type (bf16 when split, else x's)."""
    if SPLIT_X:
        return v.to(tl.float32).to(tl.bfloat16)
    else:
        return v.to(tl.float32).to(x.dtype)


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "Q", "M_BUCKET", "SPLIT_K", "ACT_INT8", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _ternary_gemm_kernel(
    x_ptr, p_ptr, sx_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, Q, stride_xm, stride_pn, stride_om, M_BUCKET,
    ACT_INT8: tl.constexpr, SPLIT_X: tl.constexpr, WS_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    GROUP_M: tl.constexpr, WIDE: tl.constexpr = False,
):
    """Ternary GEMM ``y = x @ T.T`` with ``tl.dot``.

    ACT_INT8: x is ``int8[M, 4Q]`` (quantized per token, ``s_x`` float32 ``[M]``), int8 x int8 ->
    int32 dots and ``y = acc / s_x * ws + bias``. Else x is fp16/bf16 (dots in x's type) or fp32
    (SPLIT_X: bf16 hi/lo), fp32 accumulation, ``y = acc * ws + bias``. p: ``uint8[N, Q]`` ternary
    kernel layout; ws ``[N]`` (WS_PER_N) or ``[1]`` float32; out ``[M, N]``. SPLIT_K > 1 writes raw
    partials to ``part[k, m, n]``. WIDE: one dot over the four slabs joined per step
    (:mod:`bitserve.kernels.ternary_prefill`) instead of four. Grid:
    ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn
    if ACT_INT8:
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        xsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    else:
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M], dtype=tl.float32)

    j_per = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_J) * BLOCK_J
    j_begin = pid_k * j_per
    j_end = tl.minimum(j_begin + j_per, Q)
    for j0 in range(j_begin, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < j_end
        p = tl.load(p_cols + offs_j[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0)  # [BJ, BN]
        if WIDE:
            x4, c4 = wide_operands(x_rows, p, j0, j_end, Q, m_mask, BLOCK_J)
            if ACT_INT8:
                acc_a = tl.dot(x4, c4.to(tl.int8, bitcast=True), acc_a, out_dtype=tl.int32)
                xsum += tl.sum(x4.to(tl.int32), axis=1)
            else:
                acc_a = fdot(x4, wcast(c4, x4, SPLIT_X), acc_a, SPLIT_X)
                xsum += tl.sum(x4.to(tl.float32), axis=1)
        else:
            xmask = m_mask[:, None] & j_mask[None, :]
            x0 = tl.load(x_rows + offs_j[None, :], mask=xmask, other=0)
            x1 = tl.load(x_rows + (Q + offs_j)[None, :], mask=xmask, other=0)
            x2 = tl.load(x_rows + (2 * Q + offs_j)[None, :], mask=xmask, other=0)
            x3 = tl.load(x_rows + (3 * Q + offs_j)[None, :], mask=xmask, other=0)
            if ACT_INT8:
                acc_a = tl.dot(x0, (p & 3).to(tl.int8, bitcast=True), acc_a, out_dtype=tl.int32)
                acc_a = tl.dot(x3, (p >> 6).to(tl.int8, bitcast=True), acc_a, out_dtype=tl.int32)
                acc_b = tl.dot(x1, (p & 12).to(tl.int8, bitcast=True), acc_b, out_dtype=tl.int32)
                acc_b = tl.dot(x2, ((p >> 2) & 12).to(tl.int8, bitcast=True), acc_b, out_dtype=tl.int32)
                xsum += tl.sum(x0.to(tl.int32) + x1.to(tl.int32) + x2.to(tl.int32) + x3.to(tl.int32), axis=1)
            else:
                acc_a = fdot(x0, wcast(p & 3, x0, SPLIT_X), acc_a, SPLIT_X)
                acc_a = fdot(x3, wcast(p >> 6, x0, SPLIT_X), acc_a, SPLIT_X)
                acc_b = fdot(x1, wcast(p & 12, x0, SPLIT_X), acc_b, SPLIT_X)
                acc_b = fdot(x2, wcast((p >> 2) & 12, x0, SPLIT_X), acc_b, SPLIT_X)
                xsum += tl.sum(x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32),
                               axis=1)
    if ACT_INT8:
        total = acc_a + (acc_b >> 2) - xsum[:, None]  # acc_b is 4 x an integer: exact
    else:
        total = acc_a + acc_b * 0.25 - xsum[:, None]

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, sx_ptr, ws_ptr, bias_ptr,
               ACT_INT8, WS_PER_N + 1, HAS_BIAS, DIRECT)


# -- wrappers --------------------------------------------------------------------------------------
def _check(x: torch.Tensor, packed: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"expected x [M, K] and uint8 packed [N, K/4], got {tuple(x.shape)} and "
                         f"{packed.dtype} {tuple(packed.shape)}")
    m, k = x.shape
    n, q = packed.shape
    if 4 * q != k:
        raise ValueError(f"packed weight has K={4 * q} but activations have K={k}")
    if ws.numel() not in (1, n) or ws.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 [1] or [{n}], got {ws.dtype} {tuple(ws.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    # the kernels read vectors at unit stride: a strided (or expanded) one would be read wrong
    if (ws.numel() > 1 and ws.stride(-1) != 1) or (bias is not None and bias.stride(0) != 1):
        raise ValueError("weight_scale and bias must be contiguous (ternary_linear makes them so)")
    return m, n, q


def ternary_gemv(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, split_k=None, config=None):
    """GEMV path of :func:`ternary_linear` (x ``[M, K]`` contiguous rows, ``out`` ``[M, N]``)."""
    m, n, q = _check(x, packed, weight_scale, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    if config is None and (interpreting() or not tl_common.autotune_enabled()):
        config = GEMV_DEFAULT if interpreting() else GEMV_GPU
    meta_cfg = None if config is None else {k: v for k, v in config.items() if k != "BLOCK_N"}
    block_n = (config or {}).get("BLOCK_N", GEMV_BLOCK_N)
    tiles = triton.cdiv(n, block_n) * m
    if split_k is None:
        split_k = pick_split_k(tiles, triton.cdiv(q, 256), x.device)
    split_k = max(1, min(split_k, q))
    if m == 0:
        return out
    part = sx = None
    if split_k > 1:
        part = tl_common.workspace((split_k, m, n), torch.int32 if act_int8 else torch.float32, x.device)
        sx = tl_common.workspace((m,), torch.float32, x.device)
    grid = (triton.cdiv(n, block_n), split_k, m)
    dummy = packed
    args = (x, packed, weight_scale, bias if bias is not None else dummy, out,
            part if part is not None else dummy, sx if sx is not None else dummy,
            m, n, q, x.stride(0), packed.stride(0), out.stride(0), bucket(m))
    meta = dict(ACT_INT8=act_int8, WS_PER_N=weight_scale.numel() != 1, HAS_BIAS=bias is not None,
                SPLIT_K=split_k, DIRECT=split_k == 1, BLOCK_N=block_n,
                BLOCK_X=min(1024, triton.next_power_of_2(4 * q)))
    tl_common.launch(_ternary_gemv_kernel, grid, meta_cfg, args, meta)
    if split_k > 1:
        splitk_epilogue(part, out, sx if act_int8 else None, weight_scale, bias)
    return out


def ternary_gemm(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, split_k=None, config=None,
                 quantized=None, wide=False):
    """GEMM path of :func:`ternary_linear` (W2A8: quantizes x with a per-token kernel first, unless
    ``quantized = (x_q, s_x)`` is given). ``wide``: the one-dot step (``path="wide"``)."""
    m, n, q = _check(x, packed, weight_scale, bias)
    if m == 0:
        return out
    if wide:
        config = {**(ternary_prefill.INTERPRET_CONFIG if interpreting() else ternary_prefill.gpu_config(m)),
                  **(config or {})}
    elif config is None and (interpreting() or not tl_common.autotune_enabled()):
        config = GEMM_DEFAULT if interpreting() else gemm_gpu_config(m)
    sx = None
    if act_int8 and quantized is not None:
        xin, sx = quantized
    elif act_int8:
        xin, sx = quantize_int8(x if x.stride(1) == 1 else x.contiguous())
    else:
        xin = x if x.stride(1) == 1 else x.contiguous()
    plan = tl_common.plan_tiled(m, n, config, split_k, triton.cdiv(q, 128), q, x.device,
                                torch.int32 if act_int8 else torch.float32)
    dummy = packed
    args = (xin, packed, sx if sx is not None else dummy, weight_scale, bias if bias is not None else dummy, out,
            plan.part if plan.part is not None else dummy, m, n, q, xin.stride(0), packed.stride(0), out.stride(0),
            bucket(m))
    meta = dict(ACT_INT8=act_int8, SPLIT_X=(not act_int8) and x.dtype == torch.float32,
                WS_PER_N=weight_scale.numel() != 1, HAS_BIAS=bias is not None, SPLIT_K=plan.split_k,
                DIRECT=plan.split_k == 1, BLOCK_M=plan.block_m, WIDE=wide)
    tl_common.launch(_ternary_gemm_kernel, plan.grid(m, n), plan.tunables, args, meta)
    if plan.split_k > 1:
        splitk_epilogue(plan.part, out, sx, weight_scale, bias)
    return out


def ternary_dequant_gemm(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, split_k=None, config=None):
    """Prefill path ``path="dequant"``: the codes are unpacked to bytes ``DEQUANT_TILE_ELEMENTS``
    weights at a time and multiplied by the vendor GEMM. W2A8: per-token int8 activations (the
    Triton quantizer) times the int8 codes through ``torch._int_mm`` (int32 accumulation, exact),
    then the same epilogue as the kernels. W2A16: the ternary values in x's dtype through
    ``F.linear``. cuBLAS int8 needs M > 16 and K, N multiples of 8. Not chosen automatically yet:
    kernels/bench.py measures it against the tiled GEMM (docs/kernels.md)."""
    m, n, q = _check(x, packed, weight_scale, bias)
    if m == 0:
        return out
    if act_int8 and x.is_cuda and (m <= 16 or n % 8 or q % 2):
        raise ValueError(f"path='dequant' (cuBLAS int8) needs M > 16 and K, N multiples of 8 on CUDA, got "
                         f"M={m}, N={n}, K={4 * q}; use path='gemm'")
    x = x if x.stride(1) == 1 else x.contiguous()
    ws = weight_scale if weight_scale.numel() == n else weight_scale.expand(n)
    if act_int8:
        xq, sx = quantize_int8(x)
        y = reference.ternary_matmul_int8_vendor(xq, packed, DEQUANT_TILE_ELEMENTS) / sx[:, None] * ws
    else:
        rows = max(1, min(n, DEQUANT_TILE_ELEMENTS // (4 * q)))
        y = torch.empty((m, n), dtype=torch.float32, device=x.device)
        for r0 in range(0, n, rows):
            t = unpack_ternary(packed[r0 : r0 + rows], x.dtype)
            y[:, r0 : r0 + rows] = torch.nn.functional.linear(x, t).float()
        y = y * ws
    if bias is not None:
        y = y + bias.float()
    out.copy_(y)
    return out


def _w2a8_wide(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, split_k=None, config=None):
    """``path="wide"``: :func:`ternary_gemm` with the one-dot step (:mod:`bitserve.kernels.ternary_prefill`)."""
    return ternary_gemm(x, packed, weight_scale, bias, out, act_int8=act_int8, split_k=split_k, config=config,
                        wide=True)


def _w2a16_decode(x, packed, weight_scale, bias=None, out=None, *, act_int8=False, split_k=None, config=None):
    """``path="decode"``: the CUDA-core GEMV of :mod:`bitserve.kernels.lowbit_decode` (W2A16 only)."""
    m, n, q = _check(x, packed, weight_scale, bias)
    if act_int8:
        raise ValueError("path='decode' is for float activations (W2A16); W2A8 decodes with path='dp4a'")
    if not lowbit_decode.supports(lowbit_decode.TERNARY, 4 * q, packed):
        raise ValueError(f"path='decode' needs K % 16 == 0 and word-aligned packed rows, got K={4 * q}")
    x = x if x.stride(1) == 1 else x.contiguous()
    return lowbit_decode.lowbit_gemv(lowbit_decode.TERNARY, x, packed, out, scale=weight_scale, bias=bias,
                                     split_k=split_k, config=config)


def ternary_linear(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, out_dtype=None,
                   path=None, split_k=None, config=None):
    """``[M, K] -> [M, N]`` ternary linear on the Triton kernels.

    act_int8: W2A8 (per-token int8 activations, :func:`bitserve.kernels.reference.ternary_linear_w2a8`)
    or W2A16 (:func:`bitserve.kernels.reference_lowbit.ternary_linear_w2a16`). path: ``"gemv"``, ``"gemm"``,
    ``"wide"`` (the GEMM with :mod:`bitserve.kernels.ternary_prefill`'s one-dot step), ``"dp4a"``
    (:mod:`bitserve.kernels.ternary_decode`, W2A8), ``"decode"`` (:mod:`bitserve.kernels.lowbit_decode`,
    W2A16), ``"dequant"`` (:func:`ternary_dequant_gemm`) or None: with ``K % 16 == 0`` dp4a (W2A8) up
    to ``ternary_decode.MAX_M`` tokens or decode (W2A16) up to ``lowbit_decode.MAX_M``; otherwise GEMV
    for ``M <= GEMV_MAX_M``, gemm up to ``ternary_prefill.MIN_M`` and wide above. out: an ``[M, N]``
    buffer to fill (else new, of ``out_dtype`` or x's dtype). split_k/config: explicit launch parameters (tests, tuning);
    None = the fixed configs below (``BITSERVE_TRITON_AUTOTUNE=1``: Triton's autotuner for GEMM).
    """
    weight_scale = weight_scale.reshape(-1).float().contiguous()
    bias = None if bias is None else bias.contiguous()
    m, n, _ = _check(x, packed, weight_scale, bias)  # every path (dp4a, decode too)
    packed = rows_contiguous(packed)
    out = output_buffer(out, m, n, out_dtype or x.dtype, x.device)
    if path is None:
        if act_int8 and m <= ternary_decode.MAX_M and ternary_decode.supports(x, packed):
            path = "dp4a"
        elif not act_int8 and m <= lowbit_decode.MAX_M and lowbit_decode.supports(lowbit_decode.TERNARY, x.shape[1],
                                                                                   packed):
            path = "decode"
        elif m <= GEMV_MAX_M:
            path = "gemv"
        else:
            path = "wide" if m > ternary_prefill.MIN_M else "gemm"
    fn = {"gemv": ternary_gemv, "gemm": ternary_gemm, "dequant": ternary_dequant_gemm, "wide": _w2a8_wide,
          "dp4a": ternary_decode.ternary_w2a8_gemv, "decode": _w2a16_decode}[path]
    return fn(x, packed, weight_scale, bias, out, act_int8=act_int8, split_k=split_k, config=config)


def ternary_linear_rmsnorm(x, norm_weight, eps, packed, weight_scale, bias=None, out=None, *, path=None,
                           split_k=None, config=None, residual=None):
    """W2A8 linear of ``rmsnorm(x)`` (:func:`bitserve.kernels.reference.ternary_linear_w2a8_rmsnorm`):
    the norm and the int8 quantization in one kernel (:func:`bitserve.kernels.tl_common.rmsnorm_quantize_int8`),
    then the dp4a GEMV (``M <= ternary_decode.MAX_M``, ``K % 16 == 0``) or a tiled GEMM on the
    quantized rows (``"gemm"`` up to ``ternary_prefill.MIN_M`` tokens, ``"wide"`` above, as in
    :func:`ternary_linear`). Output in the norm's output dtype.
    With ``residual``: of ``h = x + residual``, added in the norm's kernel; returns ``(out, h)``."""
    weight_scale = weight_scale.reshape(-1).float().contiguous()
    bias = None if bias is None else bias.contiguous()
    m, n, q = _check(x, packed, weight_scale, bias)
    packed = rows_contiguous(packed)
    out = output_buffer(out, m, n, torch.promote_types(norm_weight.dtype, x.dtype), x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
    if m == 0:
        return out if residual is None else (out, x + residual)
    quantized = tl_common.rmsnorm_quantize_int8(x, norm_weight, eps, residual)
    xq, sx, xsum = quantized[:3]
    if path is None:
        if m <= ternary_decode.MAX_M and ternary_decode.supports(x, packed):
            path = "dp4a"
        else:  # the same thresholds as ternary_linear's, so that tuning them moves the model's path too
            path = "wide" if m > ternary_prefill.MIN_M else "gemm"
    if path == "dp4a":
        y = ternary_decode.ternary_w2a8_gemv_prequantized(xq, sx, xsum, packed, weight_scale, bias, out,
                                                         split_k=split_k, config=config)
    elif path in ("wide", "gemm"):
        y = ternary_gemm(xq, packed, weight_scale, bias, out, act_int8=True, split_k=split_k, config=config,
                         quantized=(xq, sx), wide=path == "wide")
    else:
        raise ValueError(f"ternary_linear_rmsnorm: path must be 'dp4a', 'wide', 'gemm' or None, got {path!r}")
    return y if residual is None else (y, quantized[3])
