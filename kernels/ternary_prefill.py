"""W2A8 prefill GEMM with one wide tensor-core dot per K step.

The first W2A8 GEMM (:func:`bitserve.kernels.ternary.ternary_gemm`) multiplies each of a packed
tile's four K-slabs separately: four ``tl.dot`` of depth ``BLOCK_J`` per step into two int32
accumulators (the masked-but-unshifted codes of slabs 1 and 2 are 4x too large and need their own).
On an H100 that compiled to 9 barriers and 255 registers per thread in the main loop, and ran at
0.3-0.45x of cuBLAS bf16 at M = 512 (docs/kernels.md). Here the four slabs' codes are joined into
one ``[4*BLOCK_J, BLOCK_N]`` int8 operand (row ``s*BLOCK_J + j`` is slab ``s`` of byte ``j``) and
the activation tile gathers the matching ``[BLOCK_M, 4*BLOCK_J]`` columns (``s*Q + j``), so each
step is a single int8 x int8 -> int32 dot four times as deep, with one accumulator: 3 barriers and
~120 registers (``benchmarks/kernel_sass.py``). Codes are ``t + 1``; ``- sum(x_q)`` per token fixes
that, exactly. Activations are quantized per token first (or passed in quantized, e.g. by the fused
RMSNorm kernel). Split-K writes int32 partials for :func:`bitserve.kernels.tl_common.splitk_epilogue`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import tl_common
from bitserve.kernels.tl_common import interpreting, quantize_int8, splitk_epilogue, store_tile, tile_ids

# W2A8 with more tokens than this takes this GEMM by default: at M <= 32 the joined operand's layout
# shuffles cost more instructions than the four-dot GEMM spends (kernel_sass.py: 547 vs 358 per step)
MIN_M = 32
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_J": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def gpu_config(m: int) -> dict:
    """Launch config on GPUs by M (BLOCK_M follows M): 128-wide N tiles, a 4 x 32 = 128-deep dot."""
    if m <= 32:
        return {"BLOCK_N": 128, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 128, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def _ternary_gemm_wide_kernel(
    x_ptr, p_ptr, sx_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, Q, stride_xm, stride_pn, stride_om,
    WS_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y = (x_q @ T.T) / s_x * ws + bias``. x: int8 ``[M, 4Q]``; sx: float32 ``[M]``; p:
    ``uint8[N, Q]`` ternary kernel layout; ws ``[N]`` or ``[1]``; out ``[M, N]``. Grid:
    ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c = tl.arange(0, 4 * BLOCK_J)
    x_cols = (c // BLOCK_J) * Q + c % BLOCK_J  # column s*Q + j of dot row s*BLOCK_J + j
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.int32)

    j_per = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_J) * BLOCK_J
    j_begin = pid_k * j_per
    j_end = tl.minimum(j_begin + j_per, Q)
    for j0 in range(j_begin, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        p = tl.load(p_cols + offs_j[:, None], mask=(offs_j < j_end)[:, None] & n_mask[None, :], other=0)
        x4 = tl.load(x_rows + (j0 + x_cols)[None, :], mask=m_mask[:, None] & (j0 + c % BLOCK_J < j_end)[None, :],
                     other=0)
        codes = tl.join(tl.join(p & 3, (p >> 2) & 3), tl.join((p >> 4) & 3, p >> 6))  # [BJ, BN, 2, 2]
        w4 = tl.reshape(tl.permute(codes, (3, 2, 0, 1)), (4 * BLOCK_J, BLOCK_N))  # row (2o + i) * BJ + j
        acc = tl.dot(x4, w4.to(tl.int8, bitcast=True), acc, out_dtype=tl.int32)
        xsum += tl.sum(x4.to(tl.int32), axis=1)
    total = acc - xsum[:, None]

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, sx_ptr, ws_ptr, bias_ptr,
               True, WS_PER_N + 1, HAS_BIAS, DIRECT)


def ternary_gemm_wide(x, packed, weight_scale, bias, out, *, split_k=None, config=None, quantized=None):
    """``path="wide"`` of :func:`bitserve.kernels.ternary.ternary_linear` (W2A8). Arguments are
    checked by the caller; ``quantized = (x_q, s_x)`` skips the quantization kernel."""
    m, n, q = x.shape[0], packed.shape[0], packed.shape[1]
    if m == 0:
        return out
    cfg = {**(INTERPRET_CONFIG if interpreting() else gpu_config(m)), **(config or {})}
    xq, sx = quantized if quantized is not None else quantize_int8(x if x.stride(1) == 1 else x.contiguous())
    plan = tl_common.plan_tiled(m, n, cfg, split_k, triton.cdiv(q, 128), q, x.device, torch.int32)
    d = packed
    args = (xq, packed, sx, weight_scale, bias if bias is not None else d, out,
            plan.part if plan.part is not None else d, m, n, q, xq.stride(0), packed.stride(0), out.stride(0))
    meta = dict(WS_PER_N=weight_scale.numel() != 1, HAS_BIAS=bias is not None, SPLIT_K=plan.split_k,
                DIRECT=plan.split_k == 1, BLOCK_M=plan.block_m)
    tl_common.launch(_ternary_gemm_wide_kernel, plan.grid(m, n), plan.tunables, args, meta)
    if plan.split_k > 1:
        splitk_epilogue(plan.part, out, sx, weight_scale, bias)
    return out
