"""The W2A8 prefill GEMM's wide step: one tensor-core dot per K step instead of four.

The four-slab step of :func:`bitserve.kernels.ternary._ternary_gemm_kernel` multiplies each of a
packed tile's four K-slabs separately: four ``tl.dot`` of depth ``BLOCK_J`` per step into two int32
accumulators (the masked-but-unshifted codes of slabs 1 and 2 are 4x too large and need their own).
On an H100 that compiled to 9 barriers and 255 registers per thread in the main loop (plus spills
with 4 warps) and ran at 0.3-0.45x of cuBLAS bf16 at M = 512 (docs/kernels.md). With ``WIDE``, the
four slabs' codes are joined into one ``[4*BLOCK_J, BLOCK_N]`` int8 operand (row ``s*BLOCK_J + j``
is slab ``s`` of byte ``j``) and the activation tile gathers the matching ``[BLOCK_M, 4*BLOCK_J]``
columns (``s*Q + j``), so each step is a single int8 x int8 -> int32 dot four times as deep, into
one accumulator: 3 barriers and ~150 registers on sm_90 (``benchmarks/kernel_sass.py``). Codes are
``t + 1``; the kernel's ``- sum(x_q)`` per token fixes that, exactly. W2A16 takes the same step with
the codes in the activations' float type.
"""

from __future__ import annotations

import triton
import triton.language as tl

# W2A8 with more tokens than this takes the wide step by default: at M <= 32 the joined operand's
# layout shuffles cost more instructions than the four-dot step (kernel_sass.py: 547 vs 358 per step)
MIN_M = 32
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_J": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def gpu_config(m: int) -> dict:
    """Launch config on GPUs by M (BLOCK_M follows M): 128-wide N tiles, a 4 x 32 = 128-deep dot."""
    if m <= 32:
        return {"BLOCK_N": 128, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 128, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def wide_operands(x_rows, p, j0, j_end, Q, m_mask, BLOCK_J: tl.constexpr):
    """``(x4 [BM, 4*BJ], c4 uint8 [4*BJ, BN])`` for the step at byte ``j0``: the activations (x's
    type) of slab ``s`` byte ``j`` in column ``s*BJ + j``, and the codes ``t + 1`` of the packed
    tile ``p`` ``[BJ, BN]`` in the matching rows."""
    c = tl.arange(0, 4 * BLOCK_J)
    x_cols = j0 + (c // BLOCK_J) * Q + c % BLOCK_J
    x4 = tl.load(x_rows + x_cols[None, :], mask=m_mask[:, None] & (j0 + c % BLOCK_J < j_end)[None, :], other=0)
    codes = tl.join(tl.join(p & 3, (p >> 2) & 3), tl.join((p >> 4) & 3, p >> 6))  # [BJ, BN, 2, 2]: slab i + 2o
    w4 = tl.reshape(tl.permute(codes, (3, 2, 0, 1)), (4 * BLOCK_J, p.shape[1]))
    return x4, w4
