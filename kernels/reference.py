"""Plain-torch twins of the bitserve ops (the numerical contract of the kernels).

These run anywhere torch runs (CPU and CUDA) and are what the Triton kernels
are tested against. They never materialise a full dense weight: ternary
weights are unpacked tile by tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# float32 adds integers exactly while every partial sum stays below 2**24:
# |x_q| <= 128 and |t| <= 1, so an int8 x ternary dot product of length K is
# exact in float32 as long as 128 * K < 2**24.
_EXACT_FP32_MAX_K = (1 << 24) // 128

# Target size of one unpacked fp32 weight tile (elements).
_TILE_ELEMENTS = 1 << 21


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric absmax int8 quantization (FORMATS.md §1.5).

    Returns ``(x_q, s_x)`` with ``x_q`` int8 of x's shape and ``s_x`` float32
    of shape ``[..., 1]`` such that ``x ~= x_q / s_x``. Rounding is half-to-even
    like torch.round (and transformers' BitNet).
    """
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    x_q = (xf * scale).round().clamp(-128, 127)
    return x_q.to(torch.int8), scale


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))``: the normalisation in float32, rounded to x's
    dtype, then the weight product in the promoted dtype -- Hugging Face Llama's RMSNorm, and
    :class:`bitserve.model.layers.RMSNorm`'s forward."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm_parts(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """Non-affine LayerNorm (biased variance, float32) of each consecutive part of ``sizes``
    columns of ``x [..., sum(sizes)]`` on its own, in x's dtype (OneBit normalises each
    projection's output; a fused q|k|v output is three parts)."""
    parts = x.split(list(sizes), dim=-1)
    return torch.cat([F.layer_norm(p.float(), (p.shape[-1],), eps=eps).to(x.dtype) for p in parts], dim=-1)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NEOX-style) RoPE of ``x [T, heads, D]`` with ``cos/sin [T, D]`` (each half of a
    row repeats the angles of the pairs ``j``, ``j + D/2``), in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """:func:`rotate_half_rope` of the queries ``[T, H, D]`` and keys ``[T, KVH, D]`` of one layer."""
    return rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """ReLU squared (BitNet b1.58's FFN activation)."""
    return torch.relu(x).square()


ACTIVATIONS = {"silu": F.silu, "relu2": relu2}


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """The gated FFN input: ``act(gate) * up`` of the fused ``x = [gate | up]`` (``[..., 2I] -> [..., I]``)."""
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def ternary_linear_w2a8_rmsnorm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, packed: torch.Tensor,
                                weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ternary_linear_w2a8` of :func:`rmsnorm` ``(x)``: a BitNet linear with the RMSNorm
    before it, as one op (the Triton version quantizes in the norm's kernel). Output in the
    norm's output dtype."""
    return ternary_linear_w2a8(rmsnorm(x, norm_weight, eps), packed, weight_scale, bias)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rmsnorm(h), h)`` with ``h = x + residual`` in x's dtype: a decoder layer's residual add and
    the norm after it (one kernel on GPUs)."""
    h = x + residual
    return rmsnorm(h, weight, eps), h


def ternary_linear_w2a8_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                    packed: torch.Tensor, weight_scale: torch.Tensor,
                                    bias: torch.Tensor | None = None):
    """``(ternary_linear_w2a8_rmsnorm(h, ...), h)`` with ``h = x + residual``: the residual add, the
    RMSNorm and the int8 quantization in one kernel on GPUs, then the linear."""
    h = x + residual
    return ternary_linear_w2a8_rmsnorm(h, norm_weight, eps, packed, weight_scale, bias), h


def _ternary_lut(device: torch.device) -> torch.Tensor:
    """``[256, 4]`` float32: the four ternary values (slabs 0..3) held by each byte."""
    codes = torch.arange(256, device=device, dtype=torch.int32)
    return torch.stack([((codes >> (2 * s)) & 3) - 1 for s in range(4)], dim=1).float()


# int32 accumulators of int8 x codes (0..2) stay exact while 256 * K < 2**31.
_INT8_PATH_MAX_K = (1 << 31) // 256


def _unpack_codes(packed: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Codes ``t + 1`` (uint8 0/1/2) of kernel-layout rows ``packed [r, Q]`` as ``[r, K]`` in
    natural K order (slab ``s`` -> columns ``[s*Q, (s+1)*Q)``), written into ``buf [>= r, 4, Q]``."""
    r = packed.shape[0]
    u = buf[:r]
    for s in range(4):
        torch.bitwise_right_shift(packed, 2 * s, out=u[:, s])
    u.bitwise_and_(3)
    return u.view(r, -1)


def ternary_matmul_int8_vendor(x_q: torch.Tensor, packed: torch.Tensor,
                               tile_elements: int | None = None) -> torch.Tensor:
    """``x_q @ T.T = x_q @ C.T - rowsum(x_q)`` for int8 ``x_q``, with the codes ``C = T + 1``
    unpacked by shifts (no gather) ``tile_elements`` weights at a time and the vendor int8 GEMM
    with int32 accumulation (``torch._int_mm``: VNNI/AMX on CPUs, cuBLAS on CUDA, which needs
    M > 16 and K, N multiples of 8), exact for any K it accepts. float32 ``[M, N]`` accumulators."""
    m, k = x_q.shape
    n, q = packed.shape
    rows = min(n, max(1, (tile_elements or _TILE_ELEMENTS) // k))
    buf = torch.empty((rows, 4, q), dtype=torch.uint8, device=packed.device)
    if rows == n:  # one tile
        out = torch._int_mm(x_q, _unpack_codes(packed, buf).view(torch.int8).t())
    else:
        out = torch.empty((m, n), dtype=torch.int32, device=x_q.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            codes = _unpack_codes(packed[start:stop], buf).view(torch.int8)
            out[:, start:stop] = torch._int_mm(x_q, codes.t())
    out -= x_q.sum(dim=1, keepdim=True, dtype=torch.int32)
    return out.float()


def ternary_matmul_int(x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact ``x_q @ T.T`` for int-valued ``x_q [M, K]`` and kernel-layout ``packed [N, K/4]``.

    Returns float32 ``[M, N]`` holding the integer accumulators. Unpacks at most
    ``_TILE_ELEMENTS`` weights at a time.
    """
    m, k = x_q.shape
    n, q = packed.shape
    if 4 * q != k:
        raise ValueError(f"packed weight has K={4 * q} but activations have K={k}")
    if (x_q.dtype == torch.int8 and x_q.device.type == "cpu" and packed.device.type == "cpu"
            and k <= _INT8_PATH_MAX_K and m > 0 and n > 0 and hasattr(torch, "_int_mm")):
        return ternary_matmul_int8_vendor(x_q.contiguous(), packed.contiguous())
    acc_dtype = torch.float32 if k <= _EXACT_FP32_MAX_K else torch.float64
    # Activations in (j, s) order so that a LUT-expanded packed row [Q, 4] is a
    # contiguous length-K row matching them.
    xs = x_q.to(acc_dtype).view(m, 4, q).transpose(1, 2).reshape(m, k)
    lut = _ternary_lut(packed.device).to(acc_dtype)
    out = torch.empty((m, n), dtype=acc_dtype, device=x_q.device)
    rows = max(1, _TILE_ELEMENTS // k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = F.embedding(packed[start:stop].int(), lut).view(stop - start, k)
        torch.matmul(xs, w.t(), out=out[:, start:stop])
    return out.float()


def ternary_linear_w2a8(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W1.58A8 linear: ``y = (x_q @ T.T) / s_x * weight_scale (+ bias)``.

    x: ``[..., K]`` float; packed: ``uint8[N, K/4]`` kernel layout
    (:mod:`bitserve.kernels.packing`); weight_scale: float ``[1]`` (per tensor)
    or ``[N]`` (per output channel), always a multiplier; bias: ``[N]`` or None.
    Activations are quantized per token to int8 (absmax), the dot products are
    accumulated exactly, and the result is returned in ``x.dtype``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_q, s_x = quantize_activations_int8(x2)
    acc = ternary_matmul_int(x_q, packed)  # a fresh tensor: the epilogue runs in place
    y = acc.div_(s_x).mul_(weight_scale.float())
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*lead, packed.shape[0])


# -- attention ---------------------------------------------------------------------


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor
) -> torch.Tensor:
    """Softmax attention where a query at position p sees keys at positions <= p.

    q: ``[T, H, D]``; keys/values: ``[S, KVH, D]`` (GQA: H a multiple of KVH);
    positions: ``[T]`` and ``[S]``. Returns ``[T, H*D]``; scale ``D**-0.5``.
    """
    heads, kv_heads = q.shape[1], keys.shape[1]
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    mask = k_positions.unsqueeze(0) <= q_positions.unsqueeze(1)  # [T, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.to(q.dtype).transpose(0, 1), values.to(q.dtype).transpose(0, 1), attn_mask=mask
    )
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values ``[T, KVH, D]`` at flat slots ``block * block_size + offset``.

    k_cache/v_cache: ``[num_blocks, block_size, KVH, D]`` of one layer.
    """
    nb, bs = k_cache.shape[:2]
    k_cache.view(nb * bs, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(nb * bs, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of a flat batch of query chunks over paged K/V.

    q: ``[T, H, D]``, the queries of sequence ``s`` at rows
    ``query_start_loc[s]:query_start_loc[s+1]``; they are that sequence's last
    tokens, so query ``i`` of a chunk of length ``L`` sits at position
    ``seq_lens[s] - L + i``. K/V of all ``seq_lens[s]`` tokens (new ones
    included) are in the blocks ``block_tables[s, :ceil(seq_lens[s] / block_size)]``.
    Covers prefill, chunked prefill over a cached prefix, and decode (L = 1).
    Returns ``[T, H*D]``.
    """
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape[0], heads * dim, dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    active = [s for s in range(len(lens)) if starts[s + 1] > starts[s]]
    if not active:
        return out
    # The blocks of a group of sequences are gathered in one indexing op; each sequence then
    # attends over a contiguous slice of its own keys: the same tensor (shape, strides, values)
    # whatever else is in the batch, so results stay batch invariant.
    per_seq = -(-max(lens[s] for s in active) // bs) * bs * kv_heads * dim
    step = max(1, _GATHER_ELEMENTS // max(1, per_seq))
    # single-query (decode) rows: GQA without repeating K/V -- the G = H / KVH query heads served
    # by one KV head (heads j*G .. j*G+G-1 share KV head j, like Hugging Face's repeat_kv) are
    # that head's G query rows; the one query is the last token and sees every key, no mask.
    q_rows = q.reshape(q.shape[0], kv_heads, heads // kv_heads, dim)
    for g in range(0, len(active), step):
        group = active[g:g + step]
        width = -(-max(lens[s] for s in group) // bs)
        rows = torch.tensor(group, dtype=torch.long, device=block_tables.device)
        tables = block_tables.index_select(0, rows)[:, :width]
        k_all = k_cache[tables].reshape(len(group), width * bs, *k_cache.shape[2:]).to(q.dtype)
        v_all = v_cache[tables].reshape(len(group), width * bs, *v_cache.shape[2:]).to(q.dtype)
        k_t, v_t = k_all.transpose(1, 2), v_all.transpose(1, 2)  # [B, KVH, S, D] views
        for i, s in enumerate(group):
            q0, q1, n = starts[s], starts[s + 1], lens[s]
            if q1 - q0 == 1:
                out[q0] = F.scaled_dot_product_attention(q_rows[q0], k_t[i, :, :n], v_t[i, :, :n]).reshape(-1)
            else:
                k_pos = torch.arange(n, device=q.device)
                out[q0:q1] = causal_attention(q[q0:q1], k_all[i, :n], v_all[i, :n],
                                              k_pos[n - (q1 - q0):], k_pos)
    return out


# paged_attention gathers at most this many K (and as many V) elements at a time.
_GATHER_ELEMENTS = 1 << 24

