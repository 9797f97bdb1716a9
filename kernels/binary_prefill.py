"""The binary and dual-binary prefill GEMMs' wide step: the bit slabs of a tile in one dot.

The tiled kernels of :mod:`bitserve.kernels.binary` multiply each bit slab of a packed tile
separately: binary W1A16 eight ``tl.dot`` of depth ``BLOCK_J`` per step (sixteen when the
activations go in as bf16 hi + lo), dual-binary eight per group step (four slabs x two planes).
They ran at 0.06-0.09x of cuBLAS bf16 at M = 512 on an H100 (docs/kernels.md). With ``WIDE``, the
slabs' bits are joined into one 0/1 bf16 operand (row ``s*BLOCK_J + j`` is slab ``s`` of byte
``j``) and the activation tile gathers the matching columns, so a step is one dot per bit plane,
as many slabs deep:

- binary: ``[8*BLOCK_J, BLOCK_N]``; on sm_90 0.12 instead of 0.20 instructions per weight and
  token and 2 barriers per step instead of 16 (``benchmarks/kernel_sass.py``). Default above
  ``MIN_M`` tokens.
- dual-binary: one ``[4*BLOCK_J, BLOCK_N]`` operand per plane; 7 barriers per step instead of 18
  at the same instruction count, but at the 255-register limit on 64 x 128 tiles (128 x 128
  spilled). Opt-in (``path="wide"``) until a GPU run says which is faster.
"""

from __future__ import annotations

import triton
import triton.language as tl

# the binary GEMM takes the wide step by default above this many tokens (kernels/binary.py)
MIN_M = 32
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_J": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
# 8 bytes x 8 slabs = a 64-deep dot per step: 16-byte steps spilled registers on sm_90 (kernel_sass.py)
GPU_CONFIG = {"BLOCK_N": 128, "BLOCK_J": 8, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
DUAL_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
DUAL_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def slab_columns(j0, j_end, SLAB, SLABS: tl.constexpr, BLOCK_J: tl.constexpr):
    """``(cols, mask)`` ``[SLABS*BLOCK_J]``: the activation column ``s*SLAB + j0 + j`` for dot row
    ``s*BLOCK_J + j``, and whether byte ``j0 + j`` is below ``j_end``."""
    c = tl.arange(0, SLABS * BLOCK_J)
    return (c // BLOCK_J) * SLAB + j0 + c % BLOCK_J, j0 + c % BLOCK_J < j_end


@triton.jit
def bits8(p):
    """``[BJ, BN]`` bytes -> ``[8*BJ, BN]`` bf16 0/1, row ``s*BJ + j`` = bit ``s`` of byte ``j``."""
    low = tl.join(tl.join(p & 1, (p >> 1) & 1), tl.join((p >> 2) & 1, (p >> 3) & 1))
    high = tl.join(tl.join((p >> 4) & 1, (p >> 5) & 1), tl.join((p >> 6) & 1, p >> 7))
    bits = tl.join(low, high)  # [BJ, BN, 2, 2, 2]: bit i0 + 2*i1 + 4*i2
    rows = tl.reshape(tl.permute(bits, (4, 3, 2, 0, 1)), (8 * p.shape[0], p.shape[1]))
    return rows.to(tl.float32).to(tl.bfloat16)


@triton.jit
def plane4(p, FIRST: tl.constexpr):
    """``[BJ, BN]`` dual-binary bytes -> one plane (bits ``FIRST, FIRST+2, FIRST+4, FIRST+6``: the
    four slabs) as ``[4*BJ, BN]`` bf16 0/1, row ``s*BJ + j``."""
    bits = tl.join(tl.join((p >> FIRST) & 1, (p >> (FIRST + 2)) & 1),
                   tl.join((p >> (FIRST + 4)) & 1, (p >> (FIRST + 6)) & 1))
    rows = tl.reshape(tl.permute(bits, (3, 2, 0, 1)), (4 * p.shape[0], p.shape[1]))
    return rows.to(tl.float32).to(tl.bfloat16)
