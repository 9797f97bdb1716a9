"""W2A8 decode GEMV on 4-way int8 dot-product instructions (``dp4a``), for small M.

The ternary kernel layout (``uint8[N, Q]``, ``Q = K/4``; byte ``j`` of a row holds column
``j + s*Q`` in bits ``2s..2s+1`` as the code ``t + 1``) read as 32-bit words: word ``w`` of a row
holds, for each slab ``s``, the codes of columns ``s*Q + 4w .. s*Q + 4w + 3``, one per byte, at
bit ``2s`` of the byte. So ``(W >> 2s) & 0x03030303`` is four int8 codes, and the matching four
activations are word ``s*Q/4 + w`` of the row's int8 activations, read as int32. One ``dp4a``
(``dp4a.u32.s32``: four uint8 codes times four int8 activations, summed into an int32) then does
four multiply-adds, so a word of 16 weights costs one shift, four masks and four ``dp4a`` instead
of ~60 integer instructions unpacking bytes -- the first GEMV (:mod:`bitserve.kernels.ternary`) compiled to ~3.6 instructions
and an eighth of a shared-memory barrier per weight, and ran at 8-16% of copy bandwidth on an H100.

Activations arrive quantized (``int8[M, K]`` + ``s_x``, :func:`bitserve.kernels.tl_common.quantize_int8`):
quantizing inside the GEMV would redo it in every program and, worse, move each quantized slab
through shared memory to the layout of the weight tile. The codes are ``t + 1``; the ``- sum(x_q)``
correction comes from the same activation words (``dp4a`` with ``0x01010101``). Accumulation is
exact int32, so the result does not depend on how K is split; the epilogue is
``(acc - xsum) / s_x * weight_scale + bias``.

On the CPU (``TRITON_INTERPRET=1``) ``dp4a`` is emulated with shifts and products (the interpreter
cannot run inline PTX); ``kernels/aot.py`` compiles the PTX variant for ``sm_80``/``sm_90`` in the
tests. Needs ``K % 16 == 0`` (whole words per slab); :func:`supports` says when.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import tl_common
from bitserve.kernels.tl_common import (grid_dependency_wait, interpreting, pdl_supported, pick_split_k, quantize_int8,
                                       splitk_epilogue, store_tile)

# words (4 bytes) of weights one program reads per K step, on GPUs: 16 words (four 128-bit loads)
# per thread with 4 warps
TILE_WORDS = 2048
INTERPRET_CONFIG = {"BLOCK_N": 8, "BLOCK_W": 16, "num_warps": 1, "num_stages": 1}
# W2A8 with at most this many tokens takes this kernel by default (kernels/ternary.py); above,
# the tensor-core GEMM. Not yet measured on a GPU against the GEMM at M = 2..8 (bench.py --sweep).
MAX_M = 8


@triton.jit
def dot4(a, b, acc, USE_ASM: tl.constexpr):
    """``acc + sum_i uint8(a[i]) * int8(b[i])`` over the four bytes of int32 ``a`` and ``b``
    (PTX ``dp4a.u32.s32``; emulated with shifts on the interpreter)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            acc += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _w2a8_dp4a_kernel(
    xw_ptr, sx_ptr, xsum_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, QW, stride_xm, stride_wn, stride_om,
    WS_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, USE_ASM: tl.constexpr,
    PDL: tl.constexpr, N_MAJOR: tl.constexpr = False,
):
    """``y[m] = T @ x[m]`` for BLOCK_M tokens per program, weights read once for all of them.

    xw: the int8 activations ``[M, K]`` as int32 words ``[M, K/4]`` (row stride ``stride_xm``
    words); sx: float32 ``[M]``; xsum: int32 ``[M]``, each row's sum of int8 activations; w: the
    ternary layout as int32 words ``[N, QW]``, ``QW = K/16`` (row stride ``stride_wn`` words);
    ws ``[N]`` (WS_PER_N) or ``[1]`` float32; bias ``[N]``; out ``[M, N]``. SPLIT_K > 1: raw int32
    partials to ``part[k, m, n]`` for the epilogue kernel (slice 0 carries the ``- xsum``).
    Grid: ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``.

    Per word and four slabs: one shift, four masks, four ``dp4a``. The masks leave slab 1 and 3
    codes four times too large (``p & 0x0C`` is ``4c``), so they go to a second accumulator that
    is divided by 4 (exactly) at the end.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Both operands are loaded through [BM, BN, BW] pointer tensors, so that Triton gives the two
    # loads the same register layout: activations broadcast along BN (each thread loads the words
    # of its own columns; repeats hit L1), weights along BM. Loads of different shapes get
    # different layouts and one operand is then converted through shared memory at every step.
    # Tiles are [BM, BN, BW] or, with N_MAJOR, [BN, BM, BW]: the two orders are the same work, but
    # Triton breaks the tie between the two broadcast dims the other way from 3.7 on, and only one
    # order gives each thread several tokens of the same weight words (tl_common.n_major_tiles()).
    if N_MAJOR:
        x_rows = tl.broadcast_to(xw_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm, (BLOCK_N, BLOCK_M, BLOCK_W))
        w_rows = tl.broadcast_to(w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn, (BLOCK_N, BLOCK_M, BLOCK_W))
        m_mask3 = tl.broadcast_to(m_mask[None, :, None], (BLOCK_N, BLOCK_M, BLOCK_W))
        n_mask3 = tl.broadcast_to(n_mask[:, None, None], (BLOCK_N, BLOCK_M, BLOCK_W))
        acc1 = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_W), dtype=tl.int32)  # slabs 0 and 2
        acc4 = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_W), dtype=tl.int32)  # slabs 1 and 3, times 4
    else:
        x_rows = tl.broadcast_to(xw_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm, (BLOCK_M, BLOCK_N, BLOCK_W))
        w_rows = tl.broadcast_to(w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn, (BLOCK_M, BLOCK_N, BLOCK_W))
        m_mask3 = tl.broadcast_to(m_mask[:, None, None], (BLOCK_M, BLOCK_N, BLOCK_W))
        n_mask3 = tl.broadcast_to(n_mask[None, :, None], (BLOCK_M, BLOCK_N, BLOCK_W))
        acc1 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.int32)
        acc4 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.int32)

    w_per = tl.cdiv(tl.cdiv(QW, SPLIT_K), BLOCK_W) * BLOCK_W
    w_begin = pid_k * w_per
    w_end = tl.minimum(w_begin + w_per, QW)
    # the weights of the next step are loaded before this step's arithmetic (Triton does not
    # pipeline loops without tl.dot); the first step's before waiting for the quantization kernel
    # to finish (PDL: programmatic dependent launch lets this kernel start while it runs)
    offs_w = w_begin + tl.arange(0, BLOCK_W)[None, None, :]
    words = tl.load(w_rows + offs_w, mask=n_mask3 & (offs_w < w_end), other=0)
    if PDL:
        grid_dependency_wait()
    for w0 in range(w_begin, w_end, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)[None, None, :]
        x_mask = m_mask3 & (offs_w < w_end)
        x0 = tl.load(x_rows + offs_w, mask=x_mask, other=0)
        x1 = tl.load(x_rows + (QW + offs_w), mask=x_mask, other=0)
        x2 = tl.load(x_rows + (2 * QW + offs_w), mask=x_mask, other=0)
        x3 = tl.load(x_rows + (3 * QW + offs_w), mask=x_mask, other=0)
        offs_next = offs_w + BLOCK_W
        words_next = tl.load(w_rows + offs_next, mask=n_mask3 & (offs_next < w_end), other=0)
        high = words >> 4
        acc1 = dot4(words & 0x03030303, x0, acc1, USE_ASM)
        acc4 = dot4(words & 0x0C0C0C0C, x1, acc4, USE_ASM)
        acc1 = dot4(high & 0x03030303, x2, acc1, USE_ASM)
        acc4 = dot4(high & 0x0C0C0C0C, x3, acc4, USE_ASM)
        words = words_next
    total = tl.sum(acc1, axis=2) + (tl.sum(acc4, axis=2) >> 2)  # acc4 is 4 x an integer
    if N_MAJOR:
        total = tl.trans(total)  # [BM, BN]
    if pid_k == 0:
        total -= tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)[:, None]  # the codes are t + 1

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, sx_ptr, ws_ptr, bias_ptr,
               True, WS_PER_N + 1, HAS_BIAS, DIRECT)


def supports(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether the words view works: whole words per slab (``K % 16 == 0``) and word-aligned rows."""
    q = packed.shape[1]
    return (q % 4 == 0 and packed.stride(1) == 1 and packed.stride(0) % 4 == 0
            and packed.data_ptr() % 4 == 0 and x.shape[-1] == 4 * q)


def block_m_for(m: int) -> int:
    """Tokens per program: all of them up to 8 (the weights are then read once per token group)."""
    return min(8, triton.next_power_of_2(max(1, m)))


def plan(m: int, n: int, qw: int, device: torch.device) -> dict:
    """Launch config for the GPU: rows per program so that the N tiles alone fill the SMs
    (:func:`bitserve.kernels.tl_common.rows_per_program`), a K step of ``TILE_WORDS`` words per program
    spread over 4 warps, and split-K only when N is too small for even that."""
    bm = block_m_for(m)
    groups = triton.cdiv(m, bm)
    block_n = tl_common.rows_per_program(n, groups, device)
    block_w = max(16, min(triton.next_power_of_2(qw), TILE_WORDS // (block_n * bm)))
    return {"BLOCK_N": block_n, "BLOCK_W": block_w, "num_warps": 4, "num_stages": 1}


def ternary_w2a8_gemv_prequantized(xq, sx, xsum, packed, weight_scale, bias, out, *, split_k=None, config=None):
    """The GEMV on already-quantized activations: xq ``int8[M, K]`` (unit column stride), sx
    float32 ``[M]``, xsum int32 ``[M]`` (row sums of xq). Fills and returns ``out [M, N]``."""
    m, k = xq.shape
    n, q = packed.shape
    qw = q // 4
    if m == 0:
        return out
    # config: a full launch config, or some keys (e.g. {"PDL": True}) over the default plan
    cfg = {**(INTERPRET_CONFIG if interpreting() else plan(m, n, qw, xq.device)), **(config or {})}
    pdl = bool(cfg.pop("PDL", False)) and pdl_supported(xq.device)
    if pdl:
        cfg["launch_pdl"] = True
    block_n = cfg.pop("BLOCK_N")
    block_m = cfg.pop("BLOCK_M", block_m_for(m))
    n_major = cfg.pop("N_MAJOR", tl_common.n_major_tiles())
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k is None:
        split_k = pick_split_k(tiles, triton.cdiv(qw, cfg["BLOCK_W"]), xq.device)
    split_k = max(1, min(split_k, qw))
    xw = xq.view(torch.int32)
    words = packed.view(torch.int32)
    part = tl_common.workspace((split_k, m, n), torch.int32, xq.device) if split_k > 1 else None
    dummy = words
    args = (xw, sx, xsum, words, weight_scale, bias if bias is not None else dummy, out, part if part is not None else dummy,
            m, n, qw, xw.stride(0), words.stride(0), out.stride(0))
    meta = dict(WS_PER_N=weight_scale.numel() != 1, HAS_BIAS=bias is not None, SPLIT_K=split_k,
                DIRECT=split_k == 1, BLOCK_M=block_m, BLOCK_N=block_n, USE_ASM=not interpreting(), PDL=pdl,
                N_MAJOR=n_major)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    tl_common.launch(_w2a8_dp4a_kernel, grid, cfg, args, meta)
    if split_k > 1:
        splitk_epilogue(part, out, sx, weight_scale, bias)
    return out


def ternary_w2a8_gemv(x, packed, weight_scale, bias=None, out=None, *, act_int8=True, split_k=None, config=None):
    """``path="dp4a"`` of :func:`bitserve.kernels.ternary.ternary_linear`: per-token int8
    quantization (one small kernel), then the dp4a GEMV. W2A8 only (``act_int8``). ``config`` may
    hold ``"PDL": True``: launch the GEMV as a programmatic dependent launch (sm_90+, where Triton
    supports it), so that it starts loading weights while the quantization kernel runs."""
    if not act_int8:
        raise ValueError("path='dp4a' is for int8 activations (W2A8); use path='gemv' for W2A16")
    if not supports(x, packed):
        raise ValueError(f"path='dp4a' needs K % 16 == 0 and word-aligned packed rows, got K={x.shape[-1]}")
    pdl = bool((config or {}).get("PDL")) and pdl_supported(x.device)
    xq, sx, xsum = quantize_int8(x if x.stride(1) == 1 else x.contiguous(), with_sum=True, launch_dependents=pdl)
    return ternary_w2a8_gemv_prequantized(xq, sx, xsum, packed, weight_scale, bias, out, split_k=split_k, config=config)
