"""Binary W1A16 prefill GEMM with one wide tensor-core dot per K step (OneBit, FBI-LLM).

:func:`bitserve.kernels.binary.binary_linear`'s tiled kernel multiplies each of a packed tile's
eight bit slabs separately -- eight ``tl.dot`` of depth ``BLOCK_J`` per step, sixteen when the
activations go in as bf16 hi + lo -- and ran at 0.06-0.09x of cuBLAS bf16 at M = 512 on an H100
(docs/kernels.md). Here the eight slabs' bits are joined into one ``[8*BLOCK_J, BLOCK_N]`` bf16
operand of 0/1 (row ``s*BLOCK_J + j`` is bit ``s`` of byte ``j``) and the activation tile gathers
the matching ``[BLOCK_M, 8*BLOCK_J]`` columns (``s*Q8 + j``), so a step is one dot eight times as
deep (two with hi + lo). Same contract and arguments as the tiled kernel:
``y = h * (sum(x*g) - 2 * (x*g) @ Bits.T) + x . beta + bias``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitserve.kernels.tl_common import dot_f32x, store_tile, tile_ids

# the binary GEMM takes this kernel by default above this many tokens (kernels/binary.py): on sm_90
# it needs 0.12 instructions per weight and token and 2 barriers per step, against 0.20 and 16
MIN_M = 32
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_J": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
# 8 bytes x 8 slabs = a 64-deep dot per step: 16-byte steps spilled registers on sm_90 (kernel_sass.py)
GPU_CONFIG = {"BLOCK_N": 128, "BLOCK_J": 8, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def _bits8(p):
    """``[BJ, BN]`` bytes -> ``[8*BJ, BN]`` bf16 0/1, row ``s*BJ + j`` = bit ``s`` of byte ``j``."""
    low = tl.join(tl.join(p & 1, (p >> 1) & 1), tl.join((p >> 2) & 1, (p >> 3) & 1))
    high = tl.join(tl.join((p >> 4) & 1, (p >> 5) & 1), tl.join((p >> 6) & 1, p >> 7))
    bits = tl.join(low, high)  # [BJ, BN, 2, 2, 2]: bit i0 + 2*i1 + 4*i2
    rows = tl.reshape(tl.permute(bits, (4, 3, 2, 0, 1)), (8 * p.shape[0], p.shape[1]))
    return rows.to(tl.float32).to(tl.bfloat16)


@triton.jit
def _binary_wide_kernel(
    x_ptr, p_ptr, g_ptr, h_ptr, beta_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, Q8, stride_xm, stride_pn, stride_om, M_BUCKET,
    HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_X: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Arguments as :func:`bitserve.kernels.binary._binary_kernel` (``M_BUCKET`` unused)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c = tl.arange(0, 8 * BLOCK_J)
    x_cols = (c // BLOCK_J) * Q8 + c % BLOCK_J
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
        p = tl.load(p_cols + offs_j[:, None], mask=(offs_j < j_end)[:, None] & n_mask[None, :], other=0)
        c_mask = j0 + c % BLOCK_J < j_end
        cols = j0 + x_cols
        xs = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        if HAS_BETA:
            xb += tl.sum(xs * tl.load(beta_ptr + cols, mask=c_mask, other=0.0)[None, :], axis=1)
        if HAS_G:
            xs = xs * tl.load(g_ptr + cols, mask=c_mask, other=0.0)[None, :]
        xgsum += tl.sum(xs, axis=1)
        acc = dot_f32x(xs, _bits8(p), acc, SPLIT_X)
    total = xgsum[:, None] - 2.0 * acc
    if HAS_H:
        total = total * tl.load(h_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BETA:
        total = total + xb[:, None]

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)


# -- dual-binary -------------------------------------------------------------------------------------
DUAL_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
# 64 x 128 tiles: 128 x 128 spilled (three fp32 accumulators and a 128-deep fp32 activation tile).
# Opt-in (path="wide"): on sm_90 it has 7 barriers per step against the tiled kernel's 18, with the
# same instructions, but sits at the 255-register limit -- only a GPU run can tell which is faster.
DUAL_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def _plane4(p, FIRST: tl.constexpr):
    """``[BJ, BN]`` dual-binary bytes -> one plane (bits ``FIRST, FIRST+2, FIRST+4, FIRST+6``: the
    four slabs) as ``[4*BJ, BN]`` bf16 0/1, row ``s*BJ + j``."""
    bits = tl.join(tl.join((p >> FIRST) & 1, (p >> (FIRST + 2)) & 1), tl.join((p >> (FIRST + 4)) & 1, (p >> (FIRST + 6)) & 1))
    rows = tl.reshape(tl.permute(bits, (3, 2, 0, 1)), (4 * p.shape[0], p.shape[1]))
    return rows.to(tl.float32).to(tl.bfloat16)


@triton.jit
def _dual_binary_wide_kernel(
    x_ptr, p_ptr, a1_ptr, a2_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, NG, GB, stride_xm, stride_pn, stride_an, stride_om, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT_X: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Arguments as :func:`bitserve.kernels.binary._dual_binary_kernel`: per group and step, one dot
    per bit plane over the four slabs joined (two dots, or four with bf16 hi + lo activations,
    instead of eight or sixteen)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c = tl.arange(0, 4 * BLOCK_J)
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
            p = tl.load(p_cols + (g * GB + offs_j)[:, None], mask=(offs_j < GB)[:, None] & n_mask[None, :], other=0)
            c_mask = j0 + c % BLOCK_J < GB
            cols = 4 * g * GB + (c // BLOCK_J) * GB + j0 + c % BLOCK_J
            xs = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            d1 = dot_f32x(xs, _plane4(p, 0), d1, SPLIT_X)
            d2 = dot_f32x(xs, _plane4(p, 1), d2, SPLIT_X)
        a1 = tl.load(a1_ptr + a_rows + g, mask=n_mask, other=0.0)
        a2 = tl.load(a2_ptr + a_rows + g, mask=n_mask, other=0.0)
        acc += d1 * a1[None, :] + d2 * a2[None, :]

    store_tile(acc, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)
