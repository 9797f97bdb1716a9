"""Triton paged attention over float, int8 and int4/int2 KV blocks (twin:
:func:`bitserve.kernels.kv_reference.paged_attention`).

Two kernels share one tile loader that dequantizes a page (one KV block) in registers:

* ``_decode_kernel``: sequences with one query token. Grid ``(seqs, KVH, splits)``; each
  program walks a contiguous range of the sequence's blocks for all ``H / KVH`` query
  heads of one KV head (GQA: the query heads are the rows of the ``tl.dot``, padded to
  16), keeps an online softmax, and writes a partial (max, sum, acc) that
  ``_reduce_kernel`` combines (flash-decoding). One split writes the output directly.
* ``_prefill_kernel``: query chunks (prefill, chunked prefill over a cached prefix).
  Grid ``(query tiles, KVH)``; a tile is ``BLOCK_Q`` tokens x ``BLOCK_G`` heads of one
  sequence flattened into ``BLOCK_M`` rows; it walks the blocks up to its last query
  position with a causal mask on the blocks that hold its queries.

int4/int2 keys: a query sees the keys of its own block in full precision (staging slot
``first_stage[s]`` for positions before the chunk, ``k_new`` rows for the chunk's own
tokens) and earlier blocks dequantized; optional RoPE of the keys after dequantization.
``BLOCK_SIZE`` (tokens per block) and ``HEAD_DIM`` must be powers of two; on GPU keep
them >= 16 (``tl.dot`` minimum), as :func:`supported` checks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from bitserve.kernels.kv_reference import AttnMeta, KVLayer
from bitserve.kernels.tl_common import triton_version

LAYOUTS = {"float": 0, "int8": 1, "intn": 2}
PREFILL_ROWS = 64  # BLOCK_M of the prefill kernel
TILE_TOKENS = 64  # keys per tile when walking whole blocks (several blocks per tile when B < 64)
# pre-RoPE int-n keys (rotated in the kernel) need more registers per prefill row: with 4 warps the
# 2B4T tile spills 160 B per thread on sm_90 (benchmarks/kernel_sass.py); 8 warps fit in 254 registers
PREFILL_WARPS_ROPE = 8
MAX_SPLITS = 16


def decode_launch_options(intn: bool) -> dict:
    """Launch options of the decode kernel. Triton 3.6 (the GPU machines') spills 8 B per thread in
    the int-n key/value loop with its default 3 pipeline stages (sm_90, one register past 168; 3.7.1
    fits); 2 stages fit under both, so 3.6 gets 2 for int-n and the rest keep the backend's default."""
    return {"num_stages": 2} if intn and triton_version() < (3, 7) else {}


@triton.jit
def _load_tile(codes_ptr, scale_ptr, zero_ptr, blk, kvh, offs_b, offs_d, nmask,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               LAYOUT: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """float32 ``[N, len(offs_d)]``: row ``i`` is token ``offs_b[i]`` of block ``blk[i]`` (int64), head ``kvh``.

    LAYOUT 0 float, 1 int8 (per-token scale), 2 int-n planar codes with per-channel
    (keys, PER_CHANNEL: per block) or per-token (values) scale/zero. Masked rows read as 0.
    """
    row = (blk * BLOCK_SIZE + offs_b) * NUM_KV_HEADS + kvh  # int64 [N]
    if LAYOUT == 0:
        x = tl.load(codes_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=nmask[:, None], other=0.0)
        x = x.to(tl.float32)
    elif LAYOUT == 1:
        c = tl.load(codes_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=nmask[:, None], other=0)
        s = tl.load(scale_ptr + row, mask=nmask, other=0.0).to(tl.float32)
        x = c.to(tl.float32) * s[:, None]
    else:
        DP: tl.constexpr = HEAD_DIM // (8 // BITS)
        byte = tl.load(codes_ptr + row[:, None] * DP + (offs_d % DP)[None, :], mask=nmask[:, None], other=0)
        code = ((byte.to(tl.int32) >> ((offs_d // DP) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if PER_CHANNEL:
            meta = (blk[:, None] * NUM_KV_HEADS + kvh) * HEAD_DIM + offs_d[None, :]
            s = tl.load(scale_ptr + meta, mask=nmask[:, None], other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + meta, mask=nmask[:, None], other=0.0).to(tl.float32)
            x = code * s + z
        else:
            s = tl.load(scale_ptr + row, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + row, mask=nmask, other=0.0).to(tl.float32)
            x = code * s[:, None] + z[:, None]
    return x


@triton.jit
def _sink_rows(x, sink_ptr, blk, pos, offs_d, nmask, kvh, SINK: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """``x`` with rows at positions ``< SINK`` (a sequence's first tokens, in its first block
    ``blk``) replaced by the block's full-precision sink rows ``sink [NB, SINK, KVH, D]``."""
    if SINK > 0:
        is_sink = (pos < SINK) & nmask
        row = (blk * SINK + pos) * NUM_KV_HEADS + kvh
        xs = tl.load(sink_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=is_sink[:, None], other=0.0)
        x = tl.where(is_sink[:, None], xs.to(tl.float32), x)
    return x


@triton.jit
def _load_fp_keys(stage_ptr, knew_ptr, slot, qs, start, n, pos, kvh, offs_d, stride_nt, stride_nh,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Full-precision keys at positions ``pos`` of an int-n own block: staging slot rows before
    the chunk ``start``, this step's ``knew`` rows from it on."""
    staged = pos < start
    fresh = (pos >= start) & (pos < n)
    xs = tl.load(stage_ptr + ((slot * BLOCK_SIZE + pos[:, None] % BLOCK_SIZE) * NUM_KV_HEADS + kvh) * HEAD_DIM
                 + offs_d[None, :], mask=staged[:, None], other=0.0)
    xn = tl.load(knew_ptr + (qs + pos[:, None] - start) * stride_nt + kvh * stride_nh + offs_d[None, :],
                 mask=fresh[:, None], other=0.0)
    return tl.where(staged[:, None], xs.to(tl.float32), xn.to(tl.float32))


@triton.jit
def _keys(k_ptr, ks_ptr, kz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_ptr, slot, qs, start, n, pos, blk,
          kvh, nmask, stride_nt, stride_nh, FULL_PRECISION: tl.constexpr,
          NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
          LAYOUT: tl.constexpr, BITS: tl.constexpr, ROPE: tl.constexpr, SINK: tl.constexpr):
    """float32 keys ``[N, HEAD_DIM]`` at positions ``pos`` (in blocks ``blk``): dequantized (sink
    rows in full precision), or full precision (int-n own block); rotated by RoPE after
    dequantization if ROPE."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = pos % BLOCK_SIZE
    if FULL_PRECISION:
        x = _load_fp_keys(stage_ptr, knew_ptr, slot, qs, start, n, pos, kvh, offs_d, stride_nt, stride_nh,
                          NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE)
    else:
        x = _load_tile(k_ptr, ks_ptr, kz_ptr, blk, kvh, offs_b, offs_d, nmask, NUM_KV_HEADS, HEAD_DIM,
                       BLOCK_SIZE, LAYOUT, BITS, True)
        x = _sink_rows(x, sink_ptr, blk, pos, offs_d, nmask, kvh, SINK, NUM_KV_HEADS, HEAD_DIM)
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = (offs_d + HALF) % HEAD_DIM  # rotate-half pairs channel j with j + D/2
        if FULL_PRECISION:
            xp = _load_fp_keys(stage_ptr, knew_ptr, slot, qs, start, n, pos, kvh, partner, stride_nt, stride_nh,
                               NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE)
        else:
            xp = _load_tile(k_ptr, ks_ptr, kz_ptr, blk, kvh, offs_b, partner, nmask, NUM_KV_HEADS, HEAD_DIM,
                            BLOCK_SIZE, LAYOUT, BITS, True)
            xp = _sink_rows(xp, sink_ptr, blk, pos, partner, nmask, kvh, SINK, NUM_KV_HEADS, HEAD_DIM)
        trig = pos[:, None] * HEAD_DIM + offs_d[None, :]
        cos = tl.load(cos_ptr + trig, mask=nmask[:, None], other=0.0)
        sin = tl.load(sin_ptr + trig, mask=nmask[:, None], other=0.0)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        x = x * cos + (sign[None, :] * xp) * sin
    return x


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """float32 IEEE dot when IEEE (inputs fp32), else the default (bf16/fp16 tensor cores)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _softmax_step(scores, v, m_i, l_i, acc, IEEE: tl.constexpr, v_scale):
    """One online-softmax update with scores already in log2 units (masked = -inf); v in the dot
    dtype; ``v_scale`` (None, or float32 per row of v): the values are ``v * v_scale[:, None]``."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if v_scale is None:
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    else:
        acc = acc * alpha[:, None] + _dot((p * v_scale[None, :]).to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _attend_pages(q, m_i, l_i, acc, page_lo, page_hi, tables_ptr, s, stride_bt, n, kvh,
                  k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, cos_ptr, sin_ptr, sink_k_ptr, sink_v_ptr,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  PAGES: tl.constexpr, LAYOUT: tl.constexpr, BITS: tl.constexpr, ROPE: tl.constexpr,
                  IEEE: tl.constexpr, SINK: tl.constexpr):
    """Online softmax over the dequantized blocks ``page_lo .. page_hi - 1`` (no causal mask),
    ``PAGES`` blocks per tile (block ids gathered per row)."""
    TILE: tl.constexpr = PAGES * BLOCK_SIZE
    offs = tl.arange(0, TILE)
    d = tl.arange(0, HEAD_DIM)
    for page0 in range(page_lo, page_hi, PAGES):
        page = page0 + offs // BLOCK_SIZE
        pos = page * BLOCK_SIZE + offs % BLOCK_SIZE
        nmask = (page < page_hi) & (pos < n)
        blk = tl.load(tables_ptr + s * stride_bt + page, mask=page < page_hi, other=0).to(tl.int64)
        if LAYOUT == 1:
            # int8: a key's scale multiplies its score and a value's scale its probability -- [rows,
            # TILE] products -- instead of every element of the [TILE, HEAD_DIM] tiles; the codes
            # themselves are exact in the dot's dtype
            row = (blk * BLOCK_SIZE + pos % BLOCK_SIZE) * NUM_KV_HEADS + kvh
            kc = tl.load(k_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=nmask[:, None], other=0)
            ks = tl.load(ks_ptr + row, mask=nmask, other=0.0).to(tl.float32)
            scores = _dot(q, tl.trans(kc.to(q.dtype)), IEEE) * ks[None, :]
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            vc = tl.load(v_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=nmask[:, None], other=0)
            vs = tl.load(vs_ptr + row, mask=nmask, other=0.0).to(tl.float32)
            m_i, l_i, acc = _softmax_step(scores, vc.to(q.dtype), m_i, l_i, acc, IEEE, vs)
        else:
            k = _keys(k_ptr, ks_ptr, kz_ptr, k_ptr, k_ptr, cos_ptr, sin_ptr, sink_k_ptr, 0, 0, 0, n, pos, blk, kvh,
                      nmask, 0, 0, False, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYOUT, BITS, ROPE, SINK)
            scores = _dot(q, tl.trans(k.to(q.dtype)), IEEE)
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            v = _load_tile(v_ptr, vs_ptr, vz_ptr, blk, kvh, pos % BLOCK_SIZE, d, nmask, NUM_KV_HEADS, HEAD_DIM,
                           BLOCK_SIZE, LAYOUT, BITS, False)
            v = _sink_rows(v, sink_v_ptr, blk, pos, d, nmask, kvh, SINK, NUM_KV_HEADS, HEAD_DIM)
            m_i, l_i, acc = _softmax_step(scores, v.to(q.dtype), m_i, l_i, acc, IEEE, None)
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr,
    k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, sink_v_ptr,
    tables_ptr, seq_lens_ptr, qsl_ptr, first_stage_ptr, seqs_ptr,
    stride_bt, stride_qt, stride_qh, stride_nt, stride_nh, qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, LAYOUT: tl.constexpr, BITS: tl.constexpr,
    ROPE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, SINK: tl.constexpr,
):
    """Decode attention (one query token per sequence), split over blocks.

    q: ``[T, H, D]``; out: ``[T, H, D]`` (NUM_SPLITS == 1) else partials
    ``pm, pl [Sd, KVH, NUM_SPLITS, BLOCK_G]`` and ``pacc [..., BLOCK_G, D]`` float32.
    ``seqs [Sd]`` are the sequence indices handled; ``qk_scale = D**-0.5 * log2(e)``.
    Grid ``(Sd, KVH, NUM_SPLITS)``; the query heads of one KV head are the rows (GQA).
    """
    i, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(seqs_ptr + i)
    n = tl.load(seq_lens_ptr + s)
    qs = tl.load(qsl_ptr + s).to(tl.int64)
    start = n - 1
    num_pages = tl.cdiv(n, BLOCK_SIZE)
    per_split = tl.cdiv(num_pages, NUM_SPLITS)
    p0 = split * per_split
    p1 = tl.minimum(p0 + per_split, num_pages)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    gmask = g < GROUP
    head = kvh * GROUP + g
    q = tl.load(q_ptr + qs * stride_qt + head[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale
    if not IEEE:
        q = q.to(q_ptr.dtype.element_ty)  # bf16/fp16 tensor-core dots, fp32 accumulation

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    own = num_pages  # int-n: the block holding the query is read in full precision
    if LAYOUT == 2:
        own = start // BLOCK_SIZE
    m_i, l_i, acc = _attend_pages(q, m_i, l_i, acc, p0, tl.minimum(p1, own), tables_ptr, s, stride_bt, n, kvh,
                                  k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, cos_ptr, sin_ptr, sink_k_ptr,
                                  sink_v_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, PAGES, LAYOUT, BITS, ROPE, IEEE,
                                  SINK)
    if LAYOUT == 2:
        if (own >= p0) & (own < p1):
            slot = tl.maximum(tl.load(first_stage_ptr + s), 0).to(tl.int64)
            offs_n = tl.arange(0, BLOCK_SIZE)
            pos = own * BLOCK_SIZE + offs_n
            nmask = pos < n
            blk = tl.zeros([BLOCK_SIZE], tl.int64) + tl.load(tables_ptr + s * stride_bt + own).to(tl.int64)
            k = _keys(k_ptr, ks_ptr, kz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, slot, qs, start, n,
                      pos, blk, kvh, nmask, stride_nt, stride_nh, True, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYOUT,
                      BITS, ROPE, SINK)
            scores = _dot(q, tl.trans(k.to(q.dtype)), IEEE)
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            v = _load_tile(v_ptr, vs_ptr, vz_ptr, blk, kvh, offs_n, d, nmask, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                           LAYOUT, BITS, False)
            v = _sink_rows(v, sink_v_ptr, blk, pos, d, nmask, kvh, SINK, NUM_KV_HEADS, HEAD_DIM)
            m_i, l_i, acc = _softmax_step(scores, v.to(q.dtype), m_i, l_i, acc, IEEE, None)

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + (qs * (NUM_KV_HEADS * GROUP) + head[:, None]) * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        part = ((i * NUM_KV_HEADS + kvh) * NUM_SPLITS + split) * BLOCK_G + g
        tl.store(pm_ptr + part, m_i)
        tl.store(pl_ptr + part, l_i)
        tl.store(pacc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def _reduce_kernel(out_ptr, pm_ptr, pl_ptr, pacc_ptr, seqs_ptr, qsl_ptr,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Combine the split partials of ``_decode_kernel`` into ``out [T, H, D]``. Grid ``(Sd, KVH)``."""
    i, kvh = tl.program_id(0), tl.program_id(1)
    s = tl.load(seqs_ptr + i)
    qs = tl.load(qsl_ptr + s).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    base = (i * NUM_KV_HEADS + kvh) * NUM_SPLITS * BLOCK_G + g
    m = tl.load(pm_ptr + base)  # split 0 always holds block 0, so m is finite
    l_sum = tl.load(pl_ptr + base)
    acc = tl.load(pacc_ptr + base[:, None] * HEAD_DIM + d[None, :])
    for sp in range(1, NUM_SPLITS):
        part = base + sp * BLOCK_G
        m_s = tl.load(pm_ptr + part)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)  # 0 for an empty split (m_s = -inf)
        l_sum = l_sum * alpha + tl.load(pl_ptr + part) * beta
        acc = acc * alpha[:, None] + tl.load(pacc_ptr + part[:, None] * HEAD_DIM + d[None, :]) * beta[:, None]
        m = m_new
    head = kvh * GROUP + g
    tl.store(out_ptr + (qs * (NUM_KV_HEADS * GROUP) + head[:, None]) * HEAD_DIM + d[None, :],
             (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


@triton.jit
def _prefill_kernel(
    q_ptr, out_ptr,
    k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, sink_v_ptr,
    tables_ptr, seq_lens_ptr, qsl_ptr, first_stage_ptr, tile_seq_ptr, tile_q0_ptr,
    stride_bt, stride_qt, stride_qh, stride_nt, stride_nh, qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, LAYOUT: tl.constexpr,
    BITS: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr, SINK: tl.constexpr,
):
    """Causal attention of a query tile (``BLOCK_Q`` tokens x ``BLOCK_G`` heads of one KV head) over paged K/V.

    Tile ``i`` covers chunk tokens ``tile_q0[i] .. +BLOCK_Q`` of sequence ``tile_seq[i]``;
    token ``t`` of a chunk of length ``L`` sits at position ``seq_len - L + t``.
    Grid ``(num_tiles, KVH)``; q, out: ``[T, H, D]``.
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    i, kvh = tl.program_id(0), tl.program_id(1)
    s = tl.load(tile_seq_ptr + i)
    t0 = tl.load(tile_q0_ptr + i)
    n = tl.load(seq_lens_ptr + s)
    qs = tl.load(qsl_ptr + s).to(tl.int64)
    length = (tl.load(qsl_ptr + s + 1) - qs).to(tl.int32)
    start = n - length

    r = tl.arange(0, BLOCK_M)
    t = t0 + r // BLOCK_G
    g = r % BLOCK_G
    rmask = (t < length) & (g < GROUP)
    q_pos = start + t
    head = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (qs + t[:, None]) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale
    if not IEEE:
        q = q.to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    own_lo = (start + t0) // BLOCK_SIZE  # block of the tile's first query
    own_hi = (start + tl.minimum(t0 + BLOCK_Q, length) - 1) // BLOCK_SIZE  # block of its last query
    # blocks strictly before every query of the tile: no mask, always dequantized
    m_i, l_i, acc = _attend_pages(q, m_i, l_i, acc, 0, own_lo, tables_ptr, s, stride_bt, n, kvh,
                                  k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, cos_ptr, sin_ptr, sink_k_ptr,
                                  sink_v_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, PAGES, LAYOUT, BITS, ROPE, IEEE,
                                  SINK)
    # blocks holding the tile's queries: causal mask; int-n rows of a block see it in full precision
    slot = 0
    if LAYOUT == 2:
        slot = tl.maximum(tl.load(first_stage_ptr + s), 0).to(tl.int64)
    n_full = n // BLOCK_SIZE
    q_block = q_pos // BLOCK_SIZE
    offs_n = tl.arange(0, BLOCK_SIZE)
    for page in range(own_lo, own_hi + 1):
        blk = tl.zeros([BLOCK_SIZE], tl.int64) + tl.load(tables_ptr + s * stride_bt + page).to(tl.int64)
        k_pos = page * BLOCK_SIZE + offs_n
        nmask = k_pos < n
        if LAYOUT == 2:
            k = _keys(k_ptr, ks_ptr, kz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, slot, qs, start, n,
                      k_pos, blk, kvh, nmask, stride_nt, stride_nh, True, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                      LAYOUT, BITS, ROPE, SINK)
            scores = _dot(q, tl.trans(k.to(q.dtype)), IEEE)
            if page < n_full:  # rows of later blocks see this (full) block dequantized
                kq = _keys(k_ptr, ks_ptr, kz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, slot, qs,
                           start, n, k_pos, blk, kvh, nmask, stride_nt, stride_nh, False, NUM_KV_HEADS, HEAD_DIM,
                           BLOCK_SIZE, LAYOUT, BITS, ROPE, SINK)
                scores_q = _dot(q, tl.trans(kq.to(q.dtype)), IEEE)
                scores = tl.where((q_block == page)[:, None], scores, scores_q)
        else:
            k = _keys(k_ptr, ks_ptr, kz_ptr, stage_ptr, knew_ptr, cos_ptr, sin_ptr, sink_k_ptr, slot, qs, start, n,
                      k_pos, blk, kvh, nmask, stride_nt, stride_nh, False, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                      LAYOUT, BITS, ROPE, SINK)
            scores = _dot(q, tl.trans(k.to(q.dtype)), IEEE)
        visible = nmask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        v = _load_tile(v_ptr, vs_ptr, vz_ptr, blk, kvh, offs_n, d, nmask, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                       LAYOUT, BITS, False)
        v = _sink_rows(v, sink_v_ptr, blk, k_pos, d, nmask, kvh, SINK, NUM_KV_HEADS, HEAD_DIM)
        m_i, l_i, acc = _softmax_step(scores, v.to(q.dtype), m_i, l_i, acc, IEEE, None)

    o = acc / l_i[:, None]
    tl.store(out_ptr + ((qs + t[:, None]) * (NUM_KV_HEADS * GROUP) + head[:, None]) * HEAD_DIM + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


# -- wrapper ----------------------------------------------------------------------------

_DOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supported(layer: KVLayer, q: torch.Tensor) -> bool:
    """Whether these shapes compile for a GPU (the interpreter accepts smaller ones)."""
    return (_pow2(layer.block_size) and _pow2(layer.head_dim) and layer.block_size >= 16 and layer.head_dim >= 16
            and q.dtype in _DOT_DTYPES)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice, at most MAX_SPLITS and one block per split."""
    if device.type != "cuda":
        return min(2, max_pages)
    want = triton.cdiv(2 * _num_sms(device.index or 0), max(1, num_seqs * num_kv_heads))
    return max(1, min(MAX_SPLITS, max_pages, triton.next_power_of_2(want)))


def _plan(meta: AttnMeta, block_q: int, device: torch.device):
    """Decode sequences and prefill tiles of the step, built once and shared by all layers."""
    key = ("plan", block_q)
    if key not in meta.plan and meta.decode_seqs is not None:  # a CUDA-graph step: all decode, fixed launch
        meta.plan[key] = (range(meta.decode_seqs.numel()), meta.decode_seqs, None, meta.max_seq_len)
    if key not in meta.plan:
        starts, lens = meta.query_start_host, meta.seq_lens_host
        decode = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
        tiles = [(s, q0) for s in range(len(lens)) if starts[s + 1] - starts[s] > 1
                 for q0 in range(0, starts[s + 1] - starts[s], block_q)]
        seqs = torch.tensor(decode, dtype=torch.int32, device=device) if decode else None
        tile_t = torch.tensor(tiles, dtype=torch.int32, device=device).t().contiguous() if tiles else None
        max_tokens = max((lens[s] for s in decode), default=0)
        meta.plan[key] = (decode, seqs, tile_t, max_tokens)
    return meta.plan[key]


def paged_attention(q: torch.Tensor, layer: KVLayer, meta: AttnMeta, splits: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`bitserve.kernels.kv_reference.paged_attention`; returns ``[T, H*D]``.

    ``splits`` fixes the number of decode splits (default: by occupancy); ``out``, if
    given, is a contiguous ``[T, H*D]`` tensor of q's dtype to write into.
    """
    t, heads, dim = q.shape
    kvh, bs = layer.num_kv_heads, layer.block_size
    group = heads // kvh
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty((t, heads, dim), dtype=q.dtype, device=q.device) if out is None else out.view(t, heads, dim)
    layout = LAYOUTS[layer.kind]
    dummy = layer.k  # stands in for pointers a layout does not use (never dereferenced)
    ks = layer.k_scale if layer.k_scale is not None else dummy
    kz = layer.k_zero if layer.k_zero is not None else dummy
    vs = layer.v_scale if layer.v_scale is not None else dummy
    vz = layer.v_zero if layer.v_zero is not None else dummy
    intn = layout == 2
    stage = layer.k_stage if intn else dummy
    sink = layer.sink_tokens if intn else 0
    sink_k = layer.sink_k if sink else dummy
    sink_v = layer.sink_v if sink else dummy
    knew = meta.k_new if intn else q
    first_stage = meta.first_stage if intn else meta.seq_lens
    rope = intn and meta.rope_cos is not None
    cos = meta.rope_cos if rope else q
    sin = meta.rope_sin if rope else q
    tables = meta.block_tables
    # fp32 dots in IEEE precision for fp32 queries, and under the interpreter (its bf16 dot is wrong)
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    pages = max(1, TILE_TOKENS // bs)
    common = dict(NUM_KV_HEADS=kvh, GROUP=group, HEAD_DIM=dim, BLOCK_SIZE=bs, PAGES=pages, LAYOUT=layout,
                  BITS=layer.bits if intn else 8, ROPE=rope, IEEE=ieee, SINK=sink)
    qk_scale = dim**-0.5 * 1.4426950408889634
    block_g = triton.next_power_of_2(group)
    block_q = max(1, PREFILL_ROWS // block_g)
    decode, seqs, tiles, max_tokens = _plan(meta, block_q, q.device)

    if decode:
        dec_g = max(16, block_g)  # rows of the decode dot: query heads of one KV head, padded to 16
        nsplit = splits or num_splits(len(decode), kvh, -(-max_tokens // bs), q.device)
        if nsplit > 1:
            pm = torch.empty((len(decode), kvh, nsplit, dec_g), dtype=torch.float32, device=q.device)
            pl = torch.empty_like(pm)
            pacc = torch.empty((*pm.shape, dim), dtype=torch.float32, device=q.device)
        else:
            pm = pl = pacc = out
        _decode_kernel[(len(decode), kvh, nsplit)](
            q, out, pm, pl, pacc, layer.k, layer.v, ks, kz, vs, vz, stage, knew, cos, sin, sink_k, sink_v,
            tables, meta.seq_lens, meta.query_start_loc, first_stage, seqs,
            tables.stride(0), q.stride(0), q.stride(1), knew.stride(0), knew.stride(1), qk_scale,
            BLOCK_G=dec_g, NUM_SPLITS=nsplit, **decode_launch_options(intn), **common)
        if nsplit > 1:
            _reduce_kernel[(len(decode), kvh)](out, pm, pl, pacc, seqs, meta.query_start_loc, NUM_KV_HEADS=kvh,
                                               GROUP=group, BLOCK_G=dec_g, HEAD_DIM=dim, NUM_SPLITS=nsplit)
    if tiles is not None:
        _prefill_kernel[(tiles.shape[1], kvh)](
            q, out, layer.k, layer.v, ks, kz, vs, vz, stage, knew, cos, sin, sink_k, sink_v,
            tables, meta.seq_lens, meta.query_start_loc, first_stage, tiles[0], tiles[1],
            tables.stride(0), q.stride(0), q.stride(1), knew.stride(0), knew.stride(1), qk_scale,
            BLOCK_G=block_g, BLOCK_Q=block_q, num_warps=PREFILL_WARPS_ROPE if rope else 4, **common)
    return out.view(t, heads * dim)
