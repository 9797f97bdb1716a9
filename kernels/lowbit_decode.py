"""Decode GEMVs (small M) on CUDA cores for weights with float activations: binary W1A16 (OneBit,
FBI-LLM), dual-binary (DB-LLM) and ternary W2A16.

The tiled kernels of :mod:`bitserve.kernels.binary` and :mod:`bitserve.kernels.ternary` feed
``tl.dot`` with at least 16 rows of activations, so at M = 1 they unpack every weight into a bf16
operand, stage it through shared memory and multiply 15 rows of zeros: ~10 instructions and two
barriers per weight in their main loop (``benchmarks/kernel_sass.py``). Here every weight costs a
bit test and a select-add instead (or, ternary, a shift-and-convert and a multiply-add), with no shared
memory in the loop:

1. A small kernel lays each token's activations out to match the weight words (scaled by the
   OneBit/FBI ``in_scale`` on the way): ``xp[m, s, b, w]`` (float32) is the activation that bit
   plane ``s`` of byte ``b`` of 32-bit weight word ``w`` multiplies, for the K-slab layouts of
   :mod:`bitserve.kernels.packing` (binary: 8 slabs of K/8; ternary: 4 of K/4; dual-binary: 4
   slabs of G/4 inside each group of G). It also writes ``sum(x*g)`` and ``x . beta`` per token.
2. The GEMV reads weights as int32 words and ``xp`` through pointer tensors of one shape
   ``[BLOCK_M, BLOCK_N, BLOCK_W]`` (so both loads get the same register layout: a tensor of
   another shape would be converted through shared memory at every step), and per bit plane adds
   the activation where the bit is set:

   - binary: ``y = h * (sum(x*g) - 2 * sum_{bit} x*g) + x . beta``
   - ternary (code ``c = t + 1``, made a float exactly by bit tricks): ``y = ws * (sum(c * x) - sum(x))``
   - dual-binary: ``y = sum_groups a1 * sum_{B1} x + a2 * sum_{B2} x`` (a word never straddles two
     groups since ``G % 16 == 0``; when a K step holds whole groups, each group's words are summed
     and then scaled by one load of ``[BLOCK_N, groups]`` scales, when it lies inside one group by
     one scale per row, otherwise a scale is gathered per word: ``GROUPS``)

   plus bias; float32 accumulation (like the twins). A bit test, a select and an add per weight
   (binary, dual-binary), or a shift, a mask, a subtraction and a fused multiply-add (ternary). Split-K writes raw partials (the first
   slice carries the per-token terms) for :func:`bitserve.kernels.tl_common.splitk_epilogue`.

Needs whole words per slab: ``K % 32 == 0`` (binary), ``K % 16 == 0`` (ternary), ``G % 16 == 0``
(dual); :func:`supports` says when.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitserve.kernels import tl_common
from bitserve.kernels.tl_common import interpreting, pick_split_k, splitk_epilogue, store_tile

BINARY, DUAL, TERNARY = 0, 1, 2
SLABS = {BINARY: 8, DUAL: 4, TERNARY: 4}
# words one program reads per K step on GPUs: 4 per thread with 4 warps (each word is 16-32
# weights and 16-32 activation loads, from L1)
TILE_WORDS = 512
INTERPRET_CONFIG = {"BLOCK_N": 8, "BLOCK_W": 4, "num_warps": 1, "num_stages": 1}
PREP_BLOCK = 1024
# float-activation ops take these kernels for M <= MAX_M (kernels/binary.py, kernels/ternary.py)
MAX_M = 4


@triton.jit
def _slab_layout_kernel(x_ptr, g_ptr, beta_ptr, xp_ptr, sums_ptr, K, QW, GB, stride_xm,
                        SLABS: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK: tl.constexpr):
    """``xp[m, (s*4 + b)*QW + w] = x[m, c] * g[c]`` with ``c`` the column of slab ``s`` of byte
    ``4w + b``: ``c = (j // GB) * SLABS*GB + s*GB + j % GB`` (GB bytes per group; one group = the
    plain K-slab layout); ``sums[m] = (sum(x*g), x . beta)``. Grid: ``(M,)``."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    xbeta = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, K, BLOCK):
        i = i0 + offs
        mask = i < K
        w = i % QW
        sb = i // QW
        j = 4 * w + sb % 4
        col = (j // GB) * (SLABS * GB) + (sb // 4) * GB + j % GB
        x = tl.load(x_ptr + m * stride_xm + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_BETA:
            xbeta += x * tl.load(beta_ptr + col, mask=mask, other=0.0)
        if HAS_G:
            x = x * tl.load(g_ptr + col, mask=mask, other=0.0)
        tl.store(xp_ptr + m * K + i, x, mask=mask)
        total += x
    two = tl.arange(0, 2)
    tl.store(sums_ptr + 2 * m + two, tl.where(two == 0, tl.sum(total, axis=0), tl.sum(xbeta, axis=0)))


@triton.jit
def _select(words, bit: tl.constexpr, x):
    """``x`` where bit ``bit`` of ``words`` is set, else 0."""
    if bit == 31:  # the sign bit (1 << 31 is not an int32 constant)
        return tl.where(words < 0, x, 0.0)
    else:
        return tl.where((words & (1 << bit)) != 0, x, 0.0)


@triton.jit
def _lowbit_gemv_kernel(
    xp_ptr, sums_ptr, w_ptr, scale_ptr, a1_ptr, a2_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, QW, GW, stride_wn, stride_an, stride_om,
    KIND: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    GROUPS: tl.constexpr = 0, GROUP_W: tl.constexpr = 1,
):
    """See the module docstring. xp: float32 ``[M, K]`` in slab layout (``K = 4 * SLABS * QW``);
    sums: float32 ``[M, 2]``; w: the packed weights as int32 words ``[N, QW]``; scale: binary
    ``h`` / ternary ``ws`` (``[N]`` or, ternary, ``[1]``); a1/a2: dual ``[N, K/G]`` (row stride
    ``stride_an``; ``GW`` words per group); out ``[M, N]``. Grid:
    ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``."""
    SLABS: tl.constexpr = 8 if KIND == 0 else 4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_row = 4 * SLABS * QW
    x_rows = tl.broadcast_to(xp_ptr + offs_m.to(tl.int64)[:, None, None] * k_row, (BLOCK_M, BLOCK_N, BLOCK_W))
    w_rows = tl.broadcast_to(w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn, (BLOCK_M, BLOCK_N, BLOCK_W))
    m_mask3 = tl.broadcast_to(m_mask[:, None, None], (BLOCK_M, BLOCK_N, BLOCK_W))
    n_mask3 = tl.broadcast_to(n_mask[None, :, None], (BLOCK_M, BLOCK_N, BLOCK_W))
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
    if KIND == 1:
        a_rows = tl.broadcast_to(offs_n.to(tl.int64)[None, :, None] * stride_an, (BLOCK_M, BLOCK_N, BLOCK_W))
        a_row = offs_n.to(tl.int64) * stride_an
        if GROUPS == 1:
            acc_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W // GROUP_W), dtype=tl.float32)

    w_per = tl.cdiv(tl.cdiv(QW, SPLIT_K), BLOCK_W) * BLOCK_W
    w_begin = pid_k * w_per
    w_end = tl.minimum(w_begin + w_per, QW)
    offs_w = w_begin + tl.arange(0, BLOCK_W)[None, None, :]
    words = tl.load(w_rows + offs_w, mask=n_mask3 & (offs_w < w_end), other=0)
    for w0 in range(w_begin, w_end, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)[None, None, :]
        x_mask = m_mask3 & (offs_w < w_end)
        offs_next = offs_w + BLOCK_W
        words_next = tl.load(w_rows + offs_next, mask=n_mask3 & (offs_next < w_end), other=0)
        if KIND == 1:
            d1 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
            d2 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
        for b in tl.static_range(4):
            for s in tl.static_range(SLABS):
                xv = tl.load(x_rows + ((s * 4 + b) * QW + offs_w), mask=x_mask, other=0.0)
                if KIND == 0:
                    acc += _select(words, 8 * b + s, xv)
                elif KIND == 1:
                    d1 += _select(words, 8 * b + 2 * s, xv)
                    d2 += _select(words, 8 * b + 2 * s + 1, xv)
                else:  # the code c = t + 1 as a float without a conversion: bits of 2**23 + c, minus 2**23
                    c = (words >> (8 * b + 2 * s)) & 3
                    acc += ((c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * xv
        if KIND == 1:
            if GROUPS == 1:  # whole groups of GROUP_W words per step: sum each group, then scale it
                NG: tl.constexpr = BLOCK_W // GROUP_W
                offs_g = w0 // GROUP_W + tl.arange(0, NG)
                g_ptrs = a_row[None, :, None] + offs_g[None, None, :]
                g_mask = n_mask[None, :, None] & (offs_g[None, None, :] * GROUP_W < w_end)
                s1 = tl.sum(tl.reshape(d1, (BLOCK_M, BLOCK_N, NG, GROUP_W)), axis=3)
                s2 = tl.sum(tl.reshape(d2, (BLOCK_M, BLOCK_N, NG, GROUP_W)), axis=3)
                acc_g += tl.load(a1_ptr + g_ptrs, mask=g_mask, other=0.0) * s1 \
                    + tl.load(a2_ptr + g_ptrs, mask=g_mask, other=0.0) * s2
            elif GROUPS == 2:  # the step lies inside one group: one scale per row
                a1 = tl.load(a1_ptr + a_row + w0 // GW, mask=n_mask, other=0.0)[None, :, None]
                a2 = tl.load(a2_ptr + a_row + w0 // GW, mask=n_mask, other=0.0)[None, :, None]
                acc += a1 * d1 + a2 * d2
            else:  # steps straddle groups: a scale per word
                a_mask = n_mask3 & (offs_w < w_end)
                a1 = tl.load(a1_ptr + a_rows + offs_w // GW, mask=a_mask, other=0.0)
                a2 = tl.load(a2_ptr + a_rows + offs_w // GW, mask=a_mask, other=0.0)
                acc += a1 * d1 + a2 * d2
        words = words_next
    sel = tl.sum(acc, axis=2)  # [BM, BN]
    if KIND == 1 and GROUPS == 1:
        sel += tl.sum(acc_g, axis=2)

    first = (pid_k == 0).to(tl.float32)
    if KIND == 0:
        s_xg = tl.load(sums_ptr + 2 * offs_m, mask=m_mask, other=0.0)
        total = first * s_xg[:, None] - 2.0 * sel
        if HAS_SCALE:
            total = total * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        total = total + first * tl.load(sums_ptr + 2 * offs_m + 1, mask=m_mask, other=0.0)[:, None]
    elif KIND == 1:
        total = sel
    else:
        total = sel - first * tl.load(sums_ptr + 2 * offs_m, mask=m_mask, other=0.0)[:, None]
        if SCALE_PER_N:
            total = total * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        else:
            total = total * tl.load(scale_ptr)

    store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, bias_ptr, bias_ptr, bias_ptr,
               False, 0, HAS_BIAS, DIRECT)


def _group_steps(kind: int, group_words: int, block_w: int) -> dict:
    """How the dual-binary GEMV applies its group scales: ``GROUPS=1`` when a K step holds whole
    groups (a power of two words each; each group's words are summed, then scaled), 2 when a step
    lies inside one group (one scale per row), else 0 (a scale gathered per word: with Triton 3.6 that
    load takes another register layout, two shared-memory conversions per step)."""
    if kind != DUAL:
        return {}
    if group_words & (group_words - 1) == 0 and block_w % group_words == 0:
        return {"GROUPS": 1, "GROUP_W": group_words}
    return {"GROUPS": 2 if group_words % block_w == 0 else 0}


def supports(kind: int, k: int, packed: torch.Tensor, group_size: int | None = None) -> bool:
    """Whether the word view works for this op: whole 32-bit words per slab (per group for dual)."""
    words_ok = packed.shape[1] % 4 == 0 and packed.stride(1) == 1 and packed.stride(0) % 4 == 0 \
        and packed.data_ptr() % 4 == 0
    if kind == DUAL:
        return words_ok and group_size is not None and group_size % 16 == 0
    return words_ok and k % (4 * SLABS[kind]) == 0


def plan(m: int, n: int, qw: int, device: torch.device) -> dict:
    """GPU launch config: rows per program so that the N tiles fill the SMs
    (:func:`bitserve.kernels.tl_common.rows_per_program`), ``TILE_WORDS`` words per K step over 4 warps."""
    bm = min(MAX_M, triton.next_power_of_2(max(1, m)))
    groups = triton.cdiv(m, bm)
    block_n = tl_common.rows_per_program(n, groups, device)
    block_w = max(8, min(triton.next_power_of_2(qw), TILE_WORDS // (block_n * bm)))
    return {"BLOCK_M": bm, "BLOCK_N": block_n, "BLOCK_W": block_w, "num_warps": 4, "num_stages": 1}


def slab_layout(x: torch.Tensor, kind: int, group_bytes: int, in_scale=None, in_bias=None):
    """The prep kernel: ``(xp float32 [M, K], sums float32 [M, 2])`` (see the module docstring)."""
    m, k = x.shape
    xp = tl_common.workspace((m, k), torch.float32, x.device)
    sums = tl_common.workspace((m, 2), torch.float32, x.device)
    if m:
        d = x
        _slab_layout_kernel[(m,)](x, in_scale if in_scale is not None else d, in_bias if in_bias is not None else d,
                                  xp, sums, k, k // (4 * SLABS[kind]), group_bytes, x.stride(0),
                                  SLABS=SLABS[kind], HAS_G=in_scale is not None, HAS_BETA=in_bias is not None,
                                  BLOCK=min(PREP_BLOCK, triton.next_power_of_2(k)), num_warps=4)
    return xp, sums


def lowbit_gemv(kind: int, x, packed, out, *, scale=None, alpha1=None, alpha2=None, group_size=None,
                in_scale=None, in_bias=None, bias=None, split_k=None, config=None):
    """Run the decode GEMV of ``kind`` (``BINARY``, ``DUAL``, ``TERNARY``) into ``out [M, N]``.

    Arguments are already validated by the callers' wrappers (:func:`bitserve.kernels.binary.binary_linear`,
    :func:`bitserve.kernels.binary.dual_binary_linear`, :func:`bitserve.kernels.ternary.ternary_linear`):
    float32 vectors, contiguous ``x`` rows. ``config`` keys override the default plan.
    """
    m, k = x.shape
    n = packed.shape[0]
    qw = packed.shape[1] // 4
    if m == 0:
        return out
    cfg = {**(INTERPRET_CONFIG if interpreting() else plan(m, n, qw, x.device)), **(config or {})}
    block_n = cfg.pop("BLOCK_N")
    block_m = cfg.pop("BLOCK_M", min(MAX_M, triton.next_power_of_2(max(1, m))))
    if split_k is None:
        split_k = pick_split_k(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), triton.cdiv(qw, cfg["BLOCK_W"]),
                               x.device)
    split_k = max(1, min(split_k, qw))
    group_bytes = group_size // 4 if kind == DUAL else packed.shape[1]
    xp, sums = slab_layout(x, kind, group_bytes, in_scale, in_bias)
    words = packed.view(torch.int32)
    part = tl_common.workspace((split_k, m, n), torch.float32, x.device) if split_k > 1 else None
    d = sums
    args = (xp, sums, words, scale if scale is not None else d, alpha1 if alpha1 is not None else d,
            alpha2 if alpha2 is not None else d, bias if bias is not None else d, out, part if part is not None else d,
            m, n, qw, group_bytes // 4, words.stride(0), alpha1.stride(0) if alpha1 is not None else 0, out.stride(0))
    meta = dict(KIND=kind, HAS_SCALE=scale is not None, SCALE_PER_N=scale is not None and scale.numel() == n,
                HAS_BIAS=bias is not None, SPLIT_K=split_k, DIRECT=split_k == 1, BLOCK_M=block_m, BLOCK_N=block_n,
                **_group_steps(kind, group_bytes // 4, cfg["BLOCK_W"]))
    tl_common.launch(_lowbit_gemv_kernel, (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m)), cfg, args, meta)
    if split_k > 1:
        splitk_epilogue(part, out, None, None, bias)
    return out
