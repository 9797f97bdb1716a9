"""Triton kernels for 1-bit weights: binary W1A16 (OneBit, FBI-LLM) and dual-binary (DB-LLM).

Layouts (:mod:`bitserve.kernels.packing`):

- binary: ``uint8[N, K/8]``, bit ``s`` of byte ``P[n, j]`` is the sign bit of column ``j + s*K/8``
  (1 <=> -1). ``y = h * ((x*g) @ S.T) + x @ beta (+ bias)`` is computed as
  ``h * (sum(x*g) - 2 * (x*g) @ Bits.T) + x . beta``: one mask per bit (``p & (1 << s)`` = ``2**s``
  times the bit; the activations of slab s are scaled by ``2**-s``, exactly, instead).
- dual-binary: ``uint8[N, K/4]``, per group of G columns four slabs of ``G/4`` columns, B1 in bit
  2s and B2 in bit 2s+1. Per group, two dot products (one per plane) over the same activation
  tiles, then ``acc += a1[n, g] * d1 + a2[n, g] * d2``: one pass over x for both planes.

Both use ``tl.dot`` on bf16 operands with fp32 accumulation (weights 0/2**s are exact in bf16;
activations are split into bf16 hi + lo unless they are bf16 already and unscaled), for every M
(BLOCK_M >= 16), splitting K over programs when the output tiles alone cannot fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import binary_prefill, lowbit_decode, tl_common
from bitserve.kernels.binary_prefill import bits8, plane4, slab_columns
from bitserve.kernels.tl_common import (bucket, dot_f32x, interpreting, splitk_epilogue, store_tile, tile_ids,
                                       to_bf16)

# -- configs -----------------------------------------------------------------------------------
BINARY_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, bj, w, s in [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (256, 32, 8, 3)]
]
DUAL_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)]
]
BINARY_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
DUAL_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
# GPU configs unless BITSERVE_TRITON_AUTOTUNE=1 (BLOCK_M follows M)
BINARY_GPU = {"BLOCK_N": 64, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
DUAL_GPU = {"BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
# above 32 tokens (BLOCK_M 64/128) 8 warps: with 4 the tiles spilled registers (kernel_sass.py)
WIDE_M_WARPS = 8


def gpu_config(base: dict, m: int) -> dict:
    """``base`` with 8 warps when M > 32."""
    return {**base, "num_warps": WIDE_M_WARPS} if m > 32 else base


def _prune(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", 64)
    kept = [c for c in configs if bm * c.kwargs["BLOCK_N"] <= 128 * 128]
    return kept or configs[:1]


# -- binary W1A16 ------------------------------------------------------------------------------------
@triton.autotune(configs=BINARY_CONFIGS, key=["N", "Q8", "M_BUCKET", "SPLIT_K", "BLOCK_M", "HAS_G", "HAS_BETA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _binary_kernel(
    x_ptr, p_ptr, g_ptr, h_ptr, beta_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, Q8, stride_xm, stride_pn, stride_om, M_BUCKET,
    HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_X: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr = False,
):
    """Binary W1A16: ``y = h * ((x*g) @ S.T) + x @ beta + bias``, S = 1 - 2*bit.

    x: ``[M, 8*Q8]`` fp16/bf16/fp32 (unit column stride); p: ``uint8[N, Q8]`` binary kernel layout;
    g, beta: float32 ``[K]``; h, bias: ``[N]`` (each optional); out ``[M, N]``. SPLIT_K > 1 writes
    float32 partials (h and the beta term included, bias not) to ``part[k, m, n]``.
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xgsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    xb = tl.zeros([BLOCK_M], dtype=tl.float32)

    j_per = tl.cdiv(tl.cdiv(Q8, SPLIT_K), BLOCK_J) * BLOCK_J
    j_begin = pid_k * j_per
    j_end = tl.minimum(j_begin + j_per, Q8)
    for j0 in range(j_begin, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < j_end
        p = tl.load(p_cols + offs_j[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0)  # [BJ, BN]
        if WIDE:  # the eight slabs in one dot (kernels/binary_prefill.py)
            cols, c_mask = slab_columns(j0, j_end, Q8, 8, BLOCK_J)
            xs = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            if HAS_BETA:
                xb += tl.sum(xs * tl.load(beta_ptr + cols, mask=c_mask, other=0.0)[None, :], axis=1)
            if HAS_G:
                xs = xs * tl.load(g_ptr + cols, mask=c_mask, other=0.0)[None, :]
            xgsum += tl.sum(xs, axis=1)
            acc = dot_f32x(xs, bits8(p), acc, SPLIT_X)
        else:
            for s in tl.static_range(8):
                cols = s * Q8 + offs_j
                xs = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float32)
                if HAS_BETA:
                    beta = tl.load(beta_ptr + cols, mask=j_mask, other=0.0)
                    xb += tl.sum(xs * beta[None, :], axis=1)
                if HAS_G:
                    xs = xs * tl.load(g_ptr + cols, mask=j_mask, other=0.0)[None, :]
                xgsum += tl.sum(xs, axis=1)
                acc = dot_f32x(xs * (1.0 / (1 << s)), to_bf16(p & (1 << s)), acc, SPLIT_X)
    total = xgsum[:, None] - 2.0 * acc
    if HAS_H:
        total = total * tl.load(h_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BETA:
        total = total + xb[:, None]

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)


# -- dual-binary ------------------------------------------------------------------------------------
@triton.autotune(configs=DUAL_CONFIGS, key=["N", "NG", "GB", "M_BUCKET", "SPLIT_K", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dual_binary_kernel(
    x_ptr, p_ptr, a1_ptr, a2_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, NG, GB, stride_xm, stride_pn, stride_an, stride_om, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT_X: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr = False,
):
    """Dual-binary: ``y = sum_g a1[n,g] * x_g @ B1_g.T + a2[n,g] * x_g @ B2_g.T + bias``.

    x: ``[M, 4*NG*GB]`` fp16/bf16/fp32; p: ``uint8[N, NG*GB]`` dual-binary kernel layout with
    ``GB = group_size / 4`` bytes per group; a1/a2: float32 ``[N, NG]`` (row stride
    ``stride_an``); bias ``[N]``; out ``[M, N]``. Groups are split over SPLIT_K programs (float32
    partials to ``part[k, m, n]``). BLOCK_J >= GB rounded up to a power of two (>= 16) covers a
    group's bytes in one or more tiles. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn
    a_rows = offs_n.to(tl.int64) * stride_an
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    g_per = tl.cdiv(NG, SPLIT_K)
    g_begin = pid_k * g_per
    g_end = tl.minimum(g_begin + g_per, NG)
    for g in range(g_begin, g_end):
        d1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        d2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j0 in range(0, GB, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_mask = offs_j < GB
            p = tl.load(p_cols + (g * GB + offs_j)[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0)
            if WIDE:  # per plane, the four slabs in one dot (kernels/binary_prefill.py)
                cols, c_mask = slab_columns(j0, GB, GB, 4, BLOCK_J)
                xs = tl.load(x_rows + (4 * g * GB + cols)[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
                xs = xs.to(tl.float32)
                d1 = dot_f32x(xs, plane4(p, 0), d1, SPLIT_X)
                d2 = dot_f32x(xs, plane4(p, 1), d2, SPLIT_X)
            else:
                for s in tl.static_range(4):
                    cols = (4 * g + s) * GB + offs_j
                    xs = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
                    xs = xs.to(tl.float32) * (1.0 / (1 << (2 * s)))
                    d1 = dot_f32x(xs, to_bf16(p & (1 << (2 * s))), d1, SPLIT_X)
                    d2 = dot_f32x(xs * 0.5, to_bf16(p & (2 << (2 * s))), d2, SPLIT_X)
        a1 = tl.load(a1_ptr + a_rows + g, mask=n_mask, other=0.0)
        a2 = tl.load(a2_ptr + a_rows + g, mask=n_mask, other=0.0)
        acc += d1 * a1[None, :] + d2 * a2[None, :]

    store_tile(acc, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)


# -- wrappers --------------------------------------------------------------------------------------
def _vec(t: torch.Tensor | None, size: int, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1)
    if t.numel() != size:
        raise ValueError(f"{name} must have {size} elements, got {tuple(t.shape)}")
    return t.float().contiguous()


def binary_linear(x, packed, in_scale=None, out_scale=None, in_bias=None, bias=None, out=None, *,
                  out_dtype=None, split_k=None, config=None, path=None):
    """``[M, K] -> [M, N]`` binary W1A16 (contract: :func:`bitserve.kernels.reference_lowbit.binary_linear_w1a16`).

    path: ``"gemm"`` (the tiled ``tl.dot`` kernel here), ``"wide"`` (one deep dot per step,
    :mod:`bitserve.kernels.binary_prefill`), ``"decode"`` (the CUDA-core GEMV of
    :mod:`bitserve.kernels.lowbit_decode`) or None: decode for ``M <= lowbit_decode.MAX_M`` when
    ``K % 32 == 0``, wide above ``binary_prefill.MIN_M`` tokens, else gemm."""
    m, k = x.shape
    n, q8 = packed.shape
    if packed.dtype != torch.uint8 or 8 * q8 != k:
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not match K={k}")
    g, h, beta = _vec(in_scale, k, "in_scale"), _vec(out_scale, n, "out_scale"), _vec(in_bias, k, "in_bias")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    out = tl_common.output_buffer(out, m, n, out_dtype or x.dtype, x.device)
    if m == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    packed = tl_common.rows_contiguous(packed)
    if path is None:
        if m <= lowbit_decode.MAX_M and lowbit_decode.supports(lowbit_decode.BINARY, k, packed):
            path = "decode"
        else:
            path = "wide" if m > binary_prefill.MIN_M else "gemm"
    if path == "decode":
        if not lowbit_decode.supports(lowbit_decode.BINARY, k, packed):
            raise ValueError(f"path='decode' needs K % 32 == 0 and word-aligned packed rows, got K={k}")
        return lowbit_decode.lowbit_gemv(lowbit_decode.BINARY, x, packed, out, scale=h, in_scale=g, in_bias=beta,
                                         bias=bias, split_k=split_k, config=config)
    if path == "wide":
        config = {**(binary_prefill.INTERPRET_CONFIG if interpreting() else binary_prefill.GPU_CONFIG), **(config or {})}
    elif path != "gemm":
        raise ValueError(f"binary_linear: path must be 'decode', 'gemm', 'wide' or None, got {path!r}")
    elif config is None and (interpreting() or not tl_common.autotune_enabled()):
        config = BINARY_DEFAULT if interpreting() else gpu_config(BINARY_GPU, m)
    plan = tl_common.plan_tiled(m, n, config, split_k, triton.cdiv(q8, 64), q8, x.device)
    d = packed
    args = (x, packed, g if g is not None else d, h if h is not None else d, beta if beta is not None else d,
            bias if bias is not None else d, out, plan.part if plan.part is not None else d,
            m, n, q8, x.stride(0), packed.stride(0), out.stride(0), bucket(m))
    meta = dict(HAS_G=g is not None, HAS_H=h is not None, HAS_BETA=beta is not None, HAS_BIAS=bias is not None,
                SPLIT_X=not (x.dtype == torch.bfloat16 and g is None), SPLIT_K=plan.split_k,
                DIRECT=plan.split_k == 1, BLOCK_M=plan.block_m, WIDE=path == "wide")
    tl_common.launch(_binary_kernel, plan.grid(m, n), plan.tunables, args, meta)
    if plan.split_k > 1:
        splitk_epilogue(plan.part, out, None, None, bias)
    return out


def dual_binary_linear(x, packed, alpha1, alpha2, group_size, bias=None, out=None, *,
                       out_dtype=None, split_k=None, config=None, path=None):
    """``[M, K] -> [M, N]`` dual-binary (contract: :func:`bitserve.kernels.reference_lowbit.dual_binary_linear`).

    path: ``"gemm"``, ``"wide"`` (:mod:`bitserve.kernels.binary_prefill`), ``"decode"``
    (:mod:`bitserve.kernels.lowbit_decode`) or None: decode for ``M <= lowbit_decode.MAX_M`` when
    ``group_size % 16 == 0``, else gemm (wide is opt-in until timed)."""
    m, k = x.shape
    n, q = packed.shape
    if packed.dtype != torch.uint8 or 4 * q != k or group_size % 4 or k % group_size:
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} / group_size {group_size} "
                         f"do not match K={k}")
    ng, gb = k // group_size, group_size // 4
    a1, a2 = alpha1.float().contiguous(), alpha2.float().contiguous()
    if a1.shape != (n, ng) or a2.shape != (n, ng):
        raise ValueError(f"alpha1/alpha2 must be [{n}, {ng}], got {tuple(alpha1.shape)}, {tuple(alpha2.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    out = tl_common.output_buffer(out, m, n, out_dtype or x.dtype, x.device)
    if m == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    packed = tl_common.rows_contiguous(packed)
    dual_ok = lowbit_decode.supports(lowbit_decode.DUAL, k, packed, group_size)
    if path is None:
        path = "decode" if m <= lowbit_decode.MAX_M and dual_ok else "gemm"  # wide: opt-in, see binary_prefill
    if path == "decode":
        if not dual_ok:
            raise ValueError(f"path='decode' needs group_size % 16 == 0 and word-aligned packed rows, "
                             f"got group_size={group_size}")
        return lowbit_decode.lowbit_gemv(lowbit_decode.DUAL, x, packed, out, alpha1=a1, alpha2=a2,
                                         group_size=group_size, bias=bias, split_k=split_k, config=config)
    block_j = max(16, min(128, triton.next_power_of_2(gb)))
    if path == "wide":
        block_j = max(4, min(32, triton.next_power_of_2(gb)))
        base = binary_prefill.DUAL_INTERPRET_CONFIG if interpreting() else binary_prefill.DUAL_GPU_CONFIG
        config = {**base, **(config or {})}
    elif path != "gemm":
        raise ValueError(f"dual_binary_linear: path must be 'decode', 'gemm', 'wide' or None, got {path!r}")
    elif config is None and (interpreting() or not tl_common.autotune_enabled()):
        config = DUAL_DEFAULT if interpreting() else gpu_config(DUAL_GPU, m)
    plan = tl_common.plan_tiled(m, n, config, split_k, ng, ng, x.device)
    d = packed
    args = (x, packed, a1, a2, bias if bias is not None else d, out, plan.part if plan.part is not None else d,
            m, n, ng, gb, x.stride(0), packed.stride(0), a1.stride(0), out.stride(0), bucket(m))
    meta = dict(HAS_BIAS=bias is not None, SPLIT_X=x.dtype != torch.bfloat16, SPLIT_K=plan.split_k,
                DIRECT=plan.split_k == 1, BLOCK_M=plan.block_m, BLOCK_J=block_j, WIDE=path == "wide")
    tl_common.launch(_dual_binary_kernel, plan.grid(m, n), plan.tunables, args, meta)
    if plan.split_k > 1:
        splitk_epilogue(plan.part, out, None, None, bias)
    return out
