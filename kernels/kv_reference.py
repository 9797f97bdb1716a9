"""Plain-torch twins of the quantized paged KV-cache ops: the numerical contract of
:mod:`bitserve.kernels.kv_quant` (quantize-and-write) and
:mod:`bitserve.kernels.kv_attention` (paged attention over quantized blocks).

Storage of one layer (``NB`` blocks of ``B`` tokens, ``KVH`` heads of ``D`` channels;
byte counts and the reasons are in ``docs/kv_cache.md``):

``float``  ``k, v``: ``[NB, B, KVH, D]`` in bf16 / fp16 / fp32 (the ops of
           :mod:`bitserve.kernels.reference`).
``int8``   ``k, v``: int8 codes ``[NB, B, KVH, D]``; ``k_scale, v_scale``: fp16
           ``[NB, B, KVH]``. Symmetric per token and head: ``scale = absmax / 127``,
           ``code = clamp(floor(x / scale + 1/2), -127, 127)``, ``x^ = code * scale``.
``int4`` / ``int2`` (``bits`` b, ``P = 8 / b`` codes per byte, ``DP = D / P``)
           ``k, v``: uint8 ``[NB, B, KVH, DP]`` *planar* packing: channel ``e`` of a head
           vector sits in byte ``e % DP`` at bits ``[b * (e // DP), b * (e // DP) + b)``
           (int4: byte j = channel j in the low nibble, channel j + D/2 in the high one).
           Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = min``,
           ``code = clamp(floor((x - zero) / scale + 1/2), 0, 2^b - 1)``,
           ``x^ = code * scale + zero``.
           Values: per token and head, ``v_scale, v_zero`` fp16 ``[NB, B, KVH]``.
           Keys: per channel over the block's ``B`` tokens (KIVI / KVQuant style),
           ``k_scale, k_zero`` fp16 ``[NB, KVH, D]``, computed once when the block is
           full. Until then the block's keys live in full precision in a staging slot
           ``k_stage[S, B, KVH, D]`` (a slot per partially filled block).

Scales and zeros are rounded to fp16 first and codes are computed against the rounded
values, so ``x^`` is exactly what was stored. Rounding is half-up (``floor(y + 1/2)``),
which Triton reproduces exactly.

Which keys a query sees (int4/int2): a query at position ``p`` sees the keys of its own
block (``p // B``) in full precision and all earlier blocks quantized. This rule does not
depend on how the sequence was cut into prefill chunks or batched, so chunked prefill,
prefix-cache hits and batching give the same numbers as one-shot prefill. The full
precision keys of the current step come from ``k_new`` (this step's new keys, flat rows)
for positions ``>= start`` of the chunk and from the staging slot ``first_stage[s]`` for
the older positions of the chunk's first block.

Optional attention sinks (int4/int2): ``sink_k, sink_v [NB, S, KVH, D]`` hold the keys (as
staged) and values of positions ``< S`` in full precision, in the rows of the block that holds
them (a sequence's first block); wherever those positions would be read dequantized, these
rows are read instead.

Optional pre-RoPE keys (int4/int2): keys are stored (staged and quantized) before the
rotary embedding and rotated at attention time with the tables ``rope_cos/sin
[max_pos, D]`` (rotate-half convention, see :class:`bitserve.model.layers.RotaryEmbedding`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bitserve.kernels import reference

SCALE_MIN = 2.0**-20  # exactly representable in fp16; keeps constant rows finite
FP16_MAX = 65504.0


# -- storage of one layer -------------------------------------------------------------


@dataclass
class KVLayer:
    """The tensors of one layer of the paged KV cache (see the module docstring)."""

    kind: str  # "float" | "int8" | "intn"
    k: torch.Tensor
    v: torch.Tensor
    bits: int = 16
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    k_stage: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None  # int-n attention sinks: ``[NB, S, KVH, D]`` keys (as staged)
    sink_v: torch.Tensor | None = None  # and values, full precision, of positions < S in their block

    @property
    def sink_tokens(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (8 // self.bits if self.kind == "intn" else 1)


@dataclass
class AttnMeta:
    """Batch description shared by all layers of one step.

    Query rows ``query_start_loc[s]:query_start_loc[s+1]`` of sequence ``s`` are its last
    tokens; its ``seq_lens[s]`` tokens (new ones included) live in the blocks
    ``block_tables[s]``. ``*_host`` are the same numbers as Python lists (tiling).
    int4/int2 only: ``first_stage``, ``k_new`` and the optional RoPE tables.

    A step replayed from a CUDA graph (:mod:`bitserve.engine.cuda_graphs`) sets
    ``decode_seqs`` (``arange(S)`` on the device: every sequence decodes one token) and
    ``max_seq_len`` (a bound on ``seq_lens``): the launches then depend on those, not on this
    step's lengths, and the ``*_host`` lists are stale (the twins read the tensors instead).
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens_host: list[int]
    query_start_host: list[int]
    first_stage: torch.Tensor | None = None
    k_new: torch.Tensor | None = None
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    decode_seqs: torch.Tensor | None = None
    max_seq_len: int = 0
    plan: dict = field(default_factory=dict)  # per-step launch data cached by the Triton wrapper

    def host_lists(self) -> tuple[list[int], list[int]]:
        """``(seq_lens, query_start_loc)`` as lists: the ``*_host`` copies, or, for a graph-replayed
        step whose host lists describe the capture, read back from the device."""
        if self.decode_seqs is None:
            return self.seq_lens_host, self.query_start_host
        return self.seq_lens.tolist(), self.query_start_loc.tolist()


# -- packing and quantizers -----------------------------------------------------------


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def nan_codes_to_zero(codes: torch.Tensor) -> torch.Tensor:
    """Codes of a row (or channel) holding a NaN are 0 (its scale is NaN, so it dequantizes to NaN):
    converting NaN to an integer is undefined, and GPUs' min/max would drop the NaN instead."""
    return torch.where(codes.isnan(), 0.0, codes)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., D]`` (each < 2**bits) -> uint8 ``[..., D / P]`` in planar order."""
    per_byte = 8 // bits
    parts = codes.to(torch.int32).unflatten(-1, (per_byte, codes.shape[-1] // per_byte))
    out = torch.zeros_like(parts[..., 0, :])
    for f in range(per_byte):
        out |= parts[..., f, :] << (f * bits)
    return out.to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., D / P]`` -> uint8 codes ``[..., D]``."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (f * bits)) & mask for f in range(8 // bits)], dim=-1)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric over the last dim: int8 codes of x's shape, fp16 scale ``x.shape[:-1]``."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).clamp(SCALE_MIN, FP16_MAX).half()
    codes = nan_codes_to_zero(round_half_up(xf / scale.float().unsqueeze(-1)).clamp(-127, 127))
    return codes.to(torch.int8), scale


def quantize_asym(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max over ``dim``: int32 codes of x's shape, fp16 scale and zero (dim kept)."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp(SCALE_MIN, FP16_MAX).half()
    zero = lo.clamp(-FP16_MAX, FP16_MAX).half()
    codes = nan_codes_to_zero(round_half_up((xf - zero.float()) / scale.float()).clamp(0, qmax))
    return codes.to(torch.int32), scale, zero


# -- writes ---------------------------------------------------------------------------


def write_kv_int8(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Quantize new ``k, v [T, KVH, D]`` per token and head; store at flat slots ``block * B + offset``."""
    for x, codes, scales in ((k, layer.k, layer.k_scale), (v, layer.v, layer.v_scale)):
        q, s = quantize_int8(x)
        codes.view(-1, *codes.shape[2:])[slot_mapping] = q
        scales.view(-1, scales.shape[2])[slot_mapping] = s


def write_v_intn(v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """int4/int2 values ``[T, KVH, D]``: asymmetric per token and head, packed at their slots."""
    codes, scale, zero = quantize_asym(v, layer.bits, dim=-1)
    layer.v.view(-1, *layer.v.shape[2:])[slot_mapping] = pack_planar(codes, layer.bits)
    layer.v_scale.view(-1, layer.v_scale.shape[2])[slot_mapping] = scale.squeeze(-1)
    layer.v_zero.view(-1, layer.v_zero.shape[2])[slot_mapping] = zero.squeeze(-1)


def finalize_k_intn(k_new: torch.Tensor, layer: KVLayer, fin_block: torch.Tensor, fin_slot: torch.Tensor,
                    fin_old: torch.Tensor, fin_src: torch.Tensor) -> None:
    """Quantize the keys of blocks that became full, per channel over their ``B`` tokens.

    Entry ``i``: block ``fin_block[i]`` holds ``fin_old[i]`` older tokens in staging slot
    ``fin_slot[i]`` (rows ``0..old-1``) and its other rows are ``k_new[fin_src[i] + r - old]``.
    """
    if fin_block.numel() == 0:
        return
    bs = layer.block_size
    r = torch.arange(bs, device=k_new.device)
    old = fin_old.unsqueeze(1)
    from_stage = r.unsqueeze(0) < old  # [F, B]
    new_rows = (fin_src.unsqueeze(1) + r.unsqueeze(0) - old).clamp(0, k_new.shape[0] - 1)
    x = k_new[new_rows].float()  # [F, B, KVH, D]
    if bool(from_stage.any()):
        stage_rows = (fin_slot.clamp(min=0).unsqueeze(1) * bs + r.unsqueeze(0))
        staged = layer.k_stage.view(-1, *layer.k_stage.shape[2:])[stage_rows].float()
        x = torch.where(from_stage[..., None, None], staged, x)
    codes, scale, zero = quantize_asym(x, layer.bits, dim=1)
    layer.k[fin_block] = pack_planar(codes, layer.bits)
    layer.k_scale[fin_block] = scale.squeeze(1)
    layer.k_zero[fin_block] = zero.squeeze(1)


def stage_k(k_new: torch.Tensor, layer: KVLayer, stage_dst: torch.Tensor, stage_src: torch.Tensor) -> None:
    """Copy full-precision keys of partially filled blocks into their staging rows ``slot * B + offset``."""
    if stage_dst.numel():
        layer.k_stage.view(-1, *layer.k_stage.shape[2:])[stage_dst] = k_new[stage_src].to(layer.k_stage.dtype)


# -- dequantization -------------------------------------------------------------------


def dequant_keys(layer: KVLayer, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keys ``[len(blocks) * B, KVH, D]`` of the given blocks in ``dtype`` (int-n: finalized blocks only)."""
    if layer.kind == "float":
        x = layer.k[blocks].to(dtype)
    elif layer.kind == "int8":
        x = layer.k[blocks].to(dtype).mul_(layer.k_scale[blocks].to(dtype).unsqueeze(-1))
    else:
        x = unpack_planar(layer.k[blocks], layer.bits).to(dtype)  # [n, B, KVH, D]
        x.mul_(layer.k_scale[blocks].to(dtype).unsqueeze(1)).add_(layer.k_zero[blocks].to(dtype).unsqueeze(1))
    return x.flatten(0, 1)


def dequant_values(layer: KVLayer, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``[len(blocks) * B, KVH, D]`` in ``dtype``."""
    if layer.kind == "float":
        x = layer.v[blocks].to(dtype)
    elif layer.kind == "int8":
        x = layer.v[blocks].to(dtype).mul_(layer.v_scale[blocks].to(dtype).unsqueeze(-1))
    else:
        x = unpack_planar(layer.v[blocks], layer.bits).to(dtype)
        x.mul_(layer.v_scale[blocks].to(dtype).unsqueeze(-1)).add_(layer.v_zero[blocks].to(dtype).unsqueeze(-1))
    return x.flatten(0, 1)


def with_sinks(x: torch.Tensor, sink: torch.Tensor | None, first_block: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, KVH, D]`` of a sequence's dequantized blocks, starting at its first block, with
    positions ``< S`` replaced by the full-precision sink rows of that block (if any)."""
    if sink is None or not x.shape[0]:
        return x
    rows = min(sink.shape[1], x.shape[0])
    x = x.clone()
    x[:rows] = sink[first_block, :rows].to(x.dtype)
    return x


def write_sinks(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor,
                positions: torch.Tensor, pad_block: int | None = None) -> None:
    """Copy the keys/values of positions ``< S`` (a sequence's first tokens, always in its first
    block) into the block's sink rows. Keys as staged (pre-RoPE when keys are quantized so).

    ``pad_block`` (a step replayed from a CUDA graph, which cannot ask the host which rows are
    sinks): every row writes, those past the sinks into sink row 0 of ``pad_block``.
    """
    s = layer.sink_tokens
    if not s:
        return
    rows = positions < s
    slots = slot_mapping.long()
    blocks, offs = slots // layer.block_size, slots % layer.block_size
    if pad_block is None:
        if not bool(rows.any()):
            return
        blocks, offs, k, v = blocks[rows], offs[rows], k[rows], v[rows]
    else:
        blocks = torch.where(rows, blocks, pad_block)
        offs = torch.where(rows, offs, 0)
    layer.sink_k[blocks, offs] = k.to(layer.sink_k.dtype)
    layer.sink_v[blocks, offs] = v.to(layer.sink_v.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [N, KVH, D]`` with rows ``cos/sin [N, D]`` (float32): the model's
    :func:`bitserve.kernels.reference.rotate_half_rope`."""
    return reference.rotate_half_rope(x, cos, sin)


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the opposite angle), float32."""
    return apply_rope(x.float(), cos, -sin)


# -- attention ------------------------------------------------------------------------


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
            k_pos: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention ``q [L, H, D]`` over ``keys/values [n, KVH, D]`` -> ``[L, H*D]``.

    The query heads of a KV head become rows of one batch entry, so K/V are never repeated.
    """
    length, heads, dim = q.shape
    kvh = keys.shape[1]
    group = heads // kvh
    qg = q.view(length, kvh, group, dim).permute(1, 2, 0, 3).reshape(kvh, group * length, dim)
    mask = None
    if length > 1 or int(q_pos[-1]) < int(k_pos[-1]):
        mask = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).repeat(group, 1)
    out = F.scaled_dot_product_attention(qg, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask)
    return out.view(kvh, group, length, dim).permute(2, 0, 1, 3).reshape(length, heads * dim)


def paged_attention(q: torch.Tensor, layer: KVLayer, meta: AttnMeta) -> torch.Tensor:
    """Causal attention of the flat batch ``q [T, H, D]`` over the paged cache; ``[T, H*D]``.

    float: exactly :func:`bitserve.kernels.reference.paged_attention`. int8/int-n:
    dequantize to q's dtype (float32 RoPE math for pre-RoPE keys), then softmax attention
    in that dtype (scale ``D**-0.5``, GQA when ``H`` is a multiple of ``KVH``). int-n: the
    queries of each block attend over the dequantized earlier blocks and their own block
    in full precision (see the module docstring).
    """
    if layer.kind == "float":
        return reference.paged_attention(q, layer.k, layer.v, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc)
    bs = layer.block_size
    cdt = q.dtype
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    lens, starts = meta.host_lists()
    rope = meta.rope_cos is not None
    kdt = torch.float32 if rope else cdt
    for s, n in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        start = n - (q1 - q0)
        table = meta.block_tables[s, : -(-n // bs)]
        values = with_sinks(dequant_values(layer, table, cdt)[:n], layer.sink_v, table[0])
        k_pos = torch.arange(n, device=q.device)
        if layer.kind == "int8":
            out[q0:q1] = _attend(q[q0:q1], dequant_keys(layer, table, cdt)[:n], values, k_pos[start:], k_pos)
            continue
        first, last = start // bs, (n - 1) // bs
        lo = first * bs
        # blocks before the chunk's first one
        keys = with_sinks(dequant_keys(layer, table[:first], kdt), layer.sink_k, table[0])
        fp = meta.k_new[q0:q1].to(kdt)  # full-precision keys of positions lo..n-1
        if start > lo:
            fp = torch.cat((layer.k_stage[int(meta.first_stage[s]), : start - lo].to(kdt), fp))
        if rope:
            keys = apply_rope(keys, meta.rope_cos[:lo], meta.rope_sin[:lo]).to(cdt)
            fp = apply_rope(fp, meta.rope_cos[lo:n], meta.rope_sin[lo:n]).to(cdt)
        for b in range(first, last + 1):  # queries of block b: own block in full precision
            end = min(n, (b + 1) * bs)
            if b > first:
                prev = dequant_keys(layer, table[b - 1 : b], kdt)
                if b - 1 == 0:
                    prev = with_sinks(prev, layer.sink_k, table[0])
                if rope:
                    rows = slice((b - 1) * bs, b * bs)
                    prev = apply_rope(prev, meta.rope_cos[rows], meta.rope_sin[rows]).to(cdt)
                keys = torch.cat((keys, prev))
            r0, r1 = max(start, b * bs) - start, end - start
            kk = torch.cat((keys, fp[b * bs - lo : end - lo]))
            out[q0 + r0 : q0 + r1] = _attend(q[q0 + r0 : q0 + r1], kk, values[:end], k_pos[start + r0 : start + r1],
                                             k_pos[:end])
    return out
