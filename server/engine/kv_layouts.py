"""KV storage strategies, one per layout: float blocks, int8, int4/int2 with staging.

Each layout owns its tensors (``[num_layers, ...]``, see
:mod:`bitserve.kernels.kv_reference` for the per-layer layout), turns a step's
:class:`StepBatch` into per-step state once (``begin_step``), and per layer writes the new
K/V and attends (``forward``) through :mod:`bitserve.kernels.kv_dispatch`.

int4/int2 step, per layer (the order matters, slots are recycled within a step):
1. keys of blocks that fill in this step are quantized per channel (older rows from the
   block's staging slot, the rest from this step's keys); values are quantized per token;
2. attention: each query sees its own block's keys in full precision (staging + this
   step's keys), earlier blocks dequantized;
3. the keys of each sequence's new partial tail block are copied to its staging slot.
A staging slot belongs to one partially filled block; it is freed when the block fills
(``begin_step``) or is released (``free_block``, the block manager's hook). Each running
sequence has at most one partial block, so ``max_num_seqs`` slots suffice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bitserve.engine.kv_cache import FLOAT_DTYPES, KVCacheSpec
from bitserve.kernels import kv_dispatch
from bitserve.kernels.kv_reference import AttnMeta, KVLayer, unrope, write_sinks


@dataclass
class StepBatch:
    """The flat batch of one step as the KV cache needs it (built by the model runner).

    Sequence ``s`` computes tokens ``starts[s]:seq_lens_host[s]`` (query rows
    ``query_start_host[s]:query_start_host[s+1]``) in blocks ``block_ids[s]``. A decode batch
    captured in a CUDA graph also sets ``decode_seqs``/``max_seq_len`` (see ``AttnMeta``); its
    host lists then describe the capture, not the replayed steps.
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    starts: list[int]
    seq_lens_host: list[int]
    query_start_host: list[int]
    block_ids: list[list[int]]
    decode_seqs: torch.Tensor | None = None
    max_seq_len: int = 0


@dataclass
class StepState:
    meta: AttnMeta
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    fin: tuple[torch.Tensor, ...] = ()  # int-n: block, slot, old rows, first new row
    stage_dst: torch.Tensor | None = None
    stage_src: torch.Tensor | None = None
    pad_block: int | None = None  # int-n, graph-replayed step: where rows outside the sinks write theirs


def _attn_meta(batch: StepBatch) -> AttnMeta:
    return AttnMeta(batch.block_tables, batch.seq_lens, batch.query_start_loc,
                    batch.seq_lens_host, batch.query_start_host, decode_seqs=batch.decode_seqs,
                    max_seq_len=batch.max_seq_len)


class FloatKV:
    """bf16 / fp16 / fp32 blocks ``[L, NB, B, KVH, D]`` (the unquantized reference layout)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.torch_dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def layer(self, i: int) -> KVLayer:
        return KVLayer("float", self.k[i], self.v[i])

    def begin_step(self, batch: StepBatch) -> StepState:
        return StepState(_attn_meta(batch), batch.slot_mapping, batch.positions)

    def forward(self, i: int, q, k, v, state: StepState) -> torch.Tensor:
        """Write this step's ``k, v [T, KVH, D]`` of layer ``i`` and return attention ``[T, H*D]``."""
        layer = self.layer(i)
        kv_dispatch.write_kv(k, v, layer, state.slot_mapping)
        return kv_dispatch.paged_attention(q, layer, state.meta)

    def fill(self, i: int, k, v, state: StepState) -> None:
        """Write without attending (benchmarks fill long contexts this way)."""
        kv_dispatch.write_kv(k, v, self.layer(i), state.slot_mapping)

    def free_block(self, block_id: int) -> None:
        pass

    # -- CUDA-graph decode steps (server/engine/cuda_graphs.py) -----------------------------
    def enable_graphs(self, max_batch: int, scratch_block: int) -> None:
        """Prepare for decode steps replayed from graphs (nothing per step to plan here)."""

    def prepare_graph_step(self, starts: list[int], block_ids: list[list[int]], size: int) -> None:
        """Host planning of a graph-replayed decode step (rows ``len(starts)..size`` are padding)."""


class Int8KV(FloatKV):
    """int8 codes ``[L, NB, B, KVH, D]`` + fp16 scales ``[L, NB, B, KVH]``, symmetric per token and head."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float16, device=device)
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float16, device=device)

    def layer(self, i: int) -> KVLayer:
        return KVLayer("int8", self.k[i], self.v[i], 8, k_scale=self.k_scale[i], v_scale=self.v_scale[i])


class IntNKV(FloatKV):
    """int4/int2: planar codes; keys per channel per block, values per token; staging pool for partial blocks.

    Graph-replayed decode steps: the host still assigns staging slots and decides which blocks
    fill (:meth:`prepare_graph_step`), into fixed-size tensors -- one key-finalizing entry and one
    staging copy per row, the unused ones pointed at a scratch block and a scratch staging slot
    that no sequence owns -- so the captured kernels launch the same way every step.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        nl, bs, kvh, d = spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim
        self.bits = spec.bits
        self.block_size = bs
        packed = (nl, num_blocks, bs, kvh, d * spec.bits // 8)
        self.k = torch.zeros(packed, dtype=torch.uint8, device=device)
        self.v = torch.zeros(packed, dtype=torch.uint8, device=device)
        self.k_scale = torch.zeros((nl, num_blocks, kvh, d), dtype=torch.float16, device=device)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros((nl, num_blocks, bs, kvh), dtype=torch.float16, device=device)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_stage = torch.zeros((nl, spec.num_stage_slots, bs, kvh, d), dtype=FLOAT_DTYPES[spec.stage_dtype],
                                   device=device)
        self.sink_k = self.sink_v = None
        if spec.sink_tokens:
            sink = (nl, num_blocks, spec.sink_tokens, kvh, d)
            self.sink_k = torch.zeros(sink, dtype=FLOAT_DTYPES[spec.stage_dtype], device=device)
            self.sink_v = torch.zeros_like(self.sink_k)
        if spec.pre_rope_keys and rope is None:
            raise ValueError("pre-RoPE keys need the model's RoPE tables")
        self.rope = rope if spec.pre_rope_keys else None
        self.device = device
        self._free_slots = list(range(spec.num_stage_slots - 1, -1, -1))
        self._slot_of: dict[int, int] = {}  # partially filled block -> staging slot
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (device, pinned host) [7, S] plans
        self._scratch = (0, 0)  # graph mode: (block, staging slot) of the padding entries

    def layer(self, i: int) -> KVLayer:
        sinks = (None, None) if self.sink_k is None else (self.sink_k[i], self.sink_v[i])
        return KVLayer("intn", self.k[i], self.v[i], self.bits, self.k_scale[i], self.k_zero[i], self.v_scale[i],
                       self.v_zero[i], self.k_stage[i], *sinks)

    # -- staging slots ------------------------------------------------------------------
    @property
    def num_staged_blocks(self) -> int:
        return len(self._slot_of)

    def _take_slot(self, block_id: int) -> int:
        if not self._free_slots:
            raise RuntimeError("the KV staging pool is exhausted (more partially filled blocks than "
                               "num_stage_slots; it must be at least max_num_seqs)")
        slot = self._free_slots.pop()
        self._slot_of[block_id] = slot
        return slot

    def free_block(self, block_id: int) -> None:
        slot = self._slot_of.pop(block_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    # -- one step -------------------------------------------------------------------------
    def _plan(self, starts, seq_lens, block_ids, query_starts):
        """Host bookkeeping of a step: ``(first_stage, fin columns, stage dst, stage src)`` as lists."""
        bs = self.block_size
        fin: list[list[int]] = [[], [], [], []]
        first_stage, tails = [], []
        for s, (start, n, blocks) in enumerate(zip(starts, seq_lens, block_ids)):
            q0 = query_starts[s]
            fb, lb = start // bs, (n - 1) // bs
            slot = -1
            if start % bs:
                slot = self._slot_of.get(blocks[fb], -1)
                if slot < 0:
                    raise RuntimeError(f"block {blocks[fb]} is partially filled but has no staging slot")
            first_stage.append(slot)
            for b in range(fb, lb + 1):
                if (b + 1) * bs <= n:  # fills in this step: quantize its keys
                    old = start - fb * bs if b == fb else 0
                    for col, x in zip(fin, (blocks[b], slot if b == fb else -1, old, q0 + b * bs + old - start)):
                        col.append(x)
            if slot >= 0 and (fb + 1) * bs <= n:
                self.free_block(blocks[fb])  # read by this step's layers before anyone rewrites it
            if n % bs:
                p0 = max(lb * bs, start)
                tails.append((blocks[lb], p0, n, q0 + p0 - start))
        dst, src = [], []
        for block, p0, p1, r0 in tails:
            slot = self._slot_of.get(block)
            if slot is None:
                slot = self._take_slot(block)
            dst.extend(slot * bs + p % bs for p in range(p0, p1))
            src.extend(range(r0, r0 + p1 - p0))
        return first_stage, fin, dst, src

    def begin_step(self, batch: StepBatch) -> StepState:
        meta = _attn_meta(batch)
        if self.rope is not None:
            meta.rope_cos, meta.rope_sin = self.rope
        if batch.decode_seqs is not None:  # graph-replayed: the plan is in the static tensors
            if self._graph is None:
                raise RuntimeError("a graph-replayed step on an int4/int2 cache needs enable_graphs()")
            plan = self._graph[0][:, : len(batch.seq_lens_host)]
            meta.first_stage = plan[0]
            return StepState(meta, batch.slot_mapping, batch.positions, tuple(plan[1:5]), plan[5], plan[6],
                             pad_block=self._scratch[0])
        first_stage, fin, dst, src = self._plan(batch.starts, batch.seq_lens_host, batch.block_ids,
                                                batch.query_start_host)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=self.device)  # noqa: E731
        meta.first_stage = torch.tensor(first_stage, dtype=torch.int32, device=self.device)
        return StepState(meta, batch.slot_mapping, batch.positions, tuple(as_tensor(c) for c in fin),
                         as_tensor(dst), as_tensor(src))

    def enable_graphs(self, max_batch: int, scratch_block: int) -> None:
        """Keep a staging slot and the plan tensors for graph-replayed decode steps (the scratch block
        is the graphs' own; padding entries finalize it from the scratch slot and stage into it)."""
        if self._graph is None:
            if not self._free_slots:
                raise RuntimeError("graph-replayed int4/int2 decode needs one more staging slot than max_num_seqs")
            self._scratch = (scratch_block, self._free_slots.pop())
            dev = torch.zeros((7, max_batch), dtype=torch.int64, device=self.device)
            self._graph = (dev, torch.zeros_like(dev, device="cpu", pin_memory=self.device.type == "cuda"))
        self.prepare_graph_step([], [], max_batch)

    def prepare_graph_step(self, starts: list[int], block_ids: list[list[int]], size: int) -> None:
        """Plan a decode step of ``len(starts)`` sequences (the new token of sequence ``i`` is at
        position ``starts[i]``) for a graph of ``size`` rows: the same bookkeeping as
        :meth:`begin_step`, padded to ``size`` entries per column, copied to the device."""
        n = len(starts)
        first_stage, fin, dst, src = self._plan(starts, [p + 1 for p in starts], block_ids, range(n + 1))
        dev, host = self._graph
        block, slot = self._scratch
        h = host.numpy()
        h[:, :size] = 0
        h[0, :size] = -1
        h[0, :n] = first_stage
        h[1, :size], h[2, :size], h[3, :size] = block, slot, self.block_size  # finalize the scratch block
        for row, col in zip(h[1:5], fin):
            row[:len(col)] = col
        h[5, :size] = slot * self.block_size  # stage into the scratch slot
        h[5, :len(dst)] = dst
        h[6, :len(src)] = src
        dev[:, :size].copy_(host[:, :size], non_blocking=True)

    def _write(self, layer: KVLayer, k, v, state: StepState) -> torch.Tensor:
        k_new = k
        if self.rope is not None:
            cos, sin = self.rope
            k_new = unrope(k, cos[state.positions], sin[state.positions]).to(k.dtype)
        if k_new.dtype != layer.k_stage.dtype:
            raise ValueError(f"keys are {k_new.dtype} but the staging pool is {layer.k_stage.dtype}")
        kv_dispatch.finalize_k_intn(k_new, layer, *state.fin)
        kv_dispatch.write_v_intn(v, layer, state.slot_mapping)
        write_sinks(k_new, v, layer, state.slot_mapping, state.positions, state.pad_block)
        return k_new

    def forward(self, i: int, q, k, v, state: StepState) -> torch.Tensor:
        layer = self.layer(i)
        k_new = self._write(layer, k, v, state)
        out = kv_dispatch.paged_attention(q, layer, dataclasses.replace(state.meta, k_new=k_new))
        kv_dispatch.stage_k(k_new, layer, state.stage_dst, state.stage_src)  # after attention: slots recycle
        return out

    def fill(self, i: int, k, v, state: StepState) -> None:
        layer = self.layer(i)
        kv_dispatch.stage_k(self._write(layer, k, v, state), layer, state.stage_dst, state.stage_src)


def make_layout(spec: KVCacheSpec, num_blocks: int, device: torch.device, rope=None):
    if spec.kind == "float":
        return FloatKV(spec, num_blocks, device)
    if spec.kind == "int8":
        return Int8KV(spec, num_blocks, device)
    return IntNKV(spec, num_blocks, device, rope)
