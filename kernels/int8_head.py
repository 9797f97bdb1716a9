"""Triton W8A16 kernels for the opt-in int8 LM head (per-output-row scales).

Weight ``int8[N, K]`` row-major (``N`` = vocabulary), scale float32 ``[N]``:
``y = (x @ Wq.T) * scale (+ bias)``. The BF16 head is 56% of BitNet 2B4T's decode bytes; int8
halves them. Two kernels, chosen by M:

- GEMV (decode): CUDA cores, ``BLOCK_N`` rows x ``BLOCK_K`` per step; int8 -> float through the
  bits of ``2**23 + 128 + w`` (an add and a subtract, no conversion instruction).
- GEMM: ``tl.dot`` on bf16 (int8 values are exact in bf16; activations split hi/lo unless bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import tl_common
from bitserve.kernels.tl_common import (bucket, dot_f32x, interpreting, pick_split_k, splitk_epilogue, store_tile,
                                       tile_ids)

# -- configs -----------------------------------------------------------------------------------
HEAD_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 256, 4, 2), (32, 256, 4, 2), (16, 512, 8, 2), (64, 128, 4, 3), (32, 512, 8, 1)]
]
HEAD_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
]
HEAD_GEMV_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
HEAD_GEMM_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
# GPU configs unless BITSERVE_TRITON_AUTOTUNE=1
HEAD_GEMV_GPU = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}
HEAD_GEMM_GPU = {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
GEMV_MAX_M = 2  # GEMV up to this many tokens, GEMM above (retune with bench.py)


def _prune(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", 64)
    kept = [c for c in configs if bm * c.kwargs["BLOCK_N"] <= 128 * 128]
    return kept or configs[:1]


# -- GEMV ------------------------------------------------------------------------------------------
@triton.autotune(configs=HEAD_GEMV_CONFIGS, key=["N", "K", "M_BUCKET", "SPLIT_K"])
@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, M_BUCKET,
    SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[m] = (Wq @ x[m]) * scale + bias`` on CUDA cores, fp32 accumulation.

    x ``[M, K]`` float (unit column stride); w ``int8[N, K]``; scale float32 ``[N]`` or ``[1]``;
    bias ``[N]``; out ``[M, N]``. SPLIT_K > 1: float32 partials (scale applied, bias not) to
    ``part[k, m, n]``. Grid: ``(cdiv(N, BLOCK_N), SPLIT_K, M)``.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per
    k_end = tl.minimum(k_begin + k_per, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0).to(tl.int32)
        wf = (w + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128 + w, minus 2**23 + 128
        xs = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += wf * xs[None, :]
    y = tl.sum(acc, axis=1)
    if SCALE_PER_N:
        y = y * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        y = y * tl.load(scale_ptr)
    if DIRECT:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + offs_n, y, mask=n_mask)


# -- GEMM ------------------------------------------------------------------------------------------
@triton.autotune(configs=HEAD_GEMM_CONFIGS, key=["N", "K", "M_BUCKET", "SPLIT_K", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, M_BUCKET,
    SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_X: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y = (x @ Wq.T) * scale + bias`` with ``tl.dot`` (bf16 operands, fp32 accumulation).

    Same tensors as the GEMV. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per
    k_end = tl.minimum(k_begin + k_per, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BK, BN]
        xs = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc = dot_f32x(xs, w.to(tl.float32).to(tl.bfloat16), acc, SPLIT_X)
    if SCALE_PER_N:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    else:
        acc = acc * tl.load(scale_ptr)
    store_tile(acc, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)


# -- wrapper ---------------------------------------------------------------------------------------
def int8_linear(x, weight, scale, bias=None, out=None, *, out_dtype=None, path=None, split_k=None, config=None):
    """``[M, K] -> [M, N]`` W8A16 (contract: :func:`bitserve.kernels.reference_lowbit.int8_linear`).

    path: ``"gemv"``, ``"gemm"`` or None (GEMV for ``M <= GEMV_MAX_M``).
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] != k:
        raise ValueError(f"weight must be int8 [N, {k}], got {weight.dtype} {tuple(weight.shape)}")
    scale = scale.reshape(-1).float().contiguous()
    if scale.numel() not in (1, n):
        raise ValueError(f"scale must have 1 or {n} elements, got {scale.numel()}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    out = tl_common.output_buffer(out, m, n, out_dtype or x.dtype, x.device)
    if m == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    path = path or ("gemv" if m <= GEMV_MAX_M else "gemm")
    d = weight
    common = (scale, bias if bias is not None else d, out)
    if path == "gemv":
        if config is None and (interpreting() or not tl_common.autotune_enabled()):
            config = HEAD_GEMV_DEFAULT if interpreting() else HEAD_GEMV_GPU
        if split_k is None:
            split_k = pick_split_k(triton.cdiv(n, (config or {}).get("BLOCK_N", 32)) * m, triton.cdiv(k, 512), x.device)
        split_k = max(1, min(split_k, k))
        part = tl_common.workspace((split_k, m, n), torch.float32, x.device) if split_k > 1 else None

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), split_k, m)

        kernel = _int8_gemv_kernel
        args = (x, weight, *common, part if part is not None else d, m, n, k, x.stride(0), weight.stride(0),
                out.stride(0), bucket(m))
        meta = dict(SCALE_PER_N=scale.numel() != 1, HAS_BIAS=bias is not None, SPLIT_K=split_k,
                    DIRECT=split_k == 1)
    else:
        if config is None and (interpreting() or not tl_common.autotune_enabled()):
            config = HEAD_GEMM_DEFAULT if interpreting() else HEAD_GEMM_GPU
        plan = tl_common.plan_tiled(m, n, config, split_k, triton.cdiv(k, 256), k, x.device)
        config, split_k, part, grid = plan.tunables, plan.split_k, plan.part, plan.grid(m, n)
        kernel = _int8_gemm_kernel
        args = (x, weight, *common, part if part is not None else d, m, n, k, x.stride(0), weight.stride(0),
                out.stride(0), bucket(m))
        meta = dict(SCALE_PER_N=scale.numel() != 1, HAS_BIAS=bias is not None,
                    SPLIT_X=x.dtype != torch.bfloat16, SPLIT_K=split_k, DIRECT=split_k == 1, BLOCK_M=plan.block_m)
    tl_common.launch(kernel, grid, config, args, meta)
    if split_k > 1:
        splitk_epilogue(part, out, None, None, bias)
    return out
