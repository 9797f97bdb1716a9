"""Paged KV cache: the spec that knows bytes, and the cache that holds blocks.

``--kv-cache-dtype`` picks one storage layout (a strategy object, chosen once):
bf16/fp16/fp32 blocks, int8 codes with per-token scales, or int4/int2 codes with
per-channel key scales (per block) and per-token value scales plus a small
full-precision staging pool for the keys of partially filled blocks. Byte layouts are
documented in :mod:`bitserve.kernels.kv_reference` and ``docs/kv_cache.md``;
:mod:`bitserve.engine.kv_layouts` implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SCALE_BYTES = 2  # fp16 scales and zeros
# int4/int2 keys carry an fp16 scale and zero per channel per block: over 64 tokens that
# is 0.5 bit per key value (2 bits over 16 tokens would cost int4 its 3.5x capacity).
DEFAULT_BLOCK_SIZE = {"int4": 64, "int2": 64}


def canonical_kv_dtype(name: str, model_dtype: torch.dtype) -> str:
    """'auto' follows the model dtype; short names map to torch names."""
    if name == "auto":
        return str(model_dtype).replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in FLOAT_DTYPES and name not in QUANT_BITS:
        raise ValueError(f"kv_cache_dtype '{name}' is not supported (choose from auto, bf16, fp16, fp32, int8, "
                         f"int4, int2)")
    return name


def default_block_size(dtype: str) -> int:
    """Tokens per block when none is configured: 16, or 64 for int4/int2 (per-block key scales)."""
    return DEFAULT_BLOCK_SIZE.get(dtype, 16)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and storage type of the KV cache; the block manager only counts blocks.

    int4/int2 only: ``num_stage_slots`` partially filled blocks keep their keys in
    ``stage_dtype`` (the model dtype) until they fill (one per running sequence, so
    ``max_num_seqs``); ``pre_rope_keys`` stores keys before RoPE; ``sink_tokens``: the first
    tokens of every sequence also keep their keys and values in ``stage_dtype`` (KVQuant's
    attention sinks), stored with the block that holds them, so every block pays for them.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"
    stage_dtype: str = "bfloat16"
    num_stage_slots: int = 0
    pre_rope_keys: bool = False
    sink_tokens: int = 0

    def __post_init__(self):
        if self.dtype not in FLOAT_DTYPES and self.dtype not in QUANT_BITS:
            raise ValueError(f"unknown KV dtype {self.dtype!r}")
        if self.kind == "intn":
            per_byte = 8 // self.bits
            if self.head_dim % per_byte:
                raise ValueError(f"{self.dtype} KV needs head_dim divisible by {per_byte}, got {self.head_dim}")
            if self.num_stage_slots < 1:
                raise ValueError(f"{self.dtype} KV needs staging slots (num_stage_slots >= 1)")
            if not 0 <= self.sink_tokens <= self.block_size:
                raise ValueError(f"sink_tokens must be in [0, block_size={self.block_size}], got {self.sink_tokens}")
        elif self.pre_rope_keys:
            raise ValueError("pre-RoPE key quantization applies to int4/int2 KV caches only")
        elif self.sink_tokens:
            raise ValueError("attention-sink tokens in full precision apply to int4/int2 KV caches only")

    @property
    def kind(self) -> str:
        """'float', 'int8' or 'intn' (int4/int2): the storage layout."""
        if self.dtype in FLOAT_DTYPES:
            return "float"
        return "int8" if self.dtype == "int8" else "intn"

    @property
    def bits(self) -> int:
        return QUANT_BITS.get(self.dtype, 8 * FLOAT_DTYPES.get(self.dtype, torch.float32).itemsize)

    @property
    def torch_dtype(self) -> torch.dtype:
        """Element type of the float layout (the dtype quantized caches dequantize to is the model's)."""
        return FLOAT_DTYPES.get(self.dtype, torch.float32)

    @property
    def layer_bytes_per_block(self) -> int:
        """K and V bytes of one block in one layer, codes and scales included."""
        bs, kvh, d = self.block_size, self.num_kv_heads, self.head_dim
        if self.kind == "float":
            return 2 * bs * kvh * d * self.torch_dtype.itemsize
        if self.kind == "int8":
            return 2 * bs * kvh * (d + SCALE_BYTES)
        codes = bs * kvh * d * self.bits // 8
        sinks = 2 * self.sink_tokens * kvh * d * FLOAT_DTYPES[self.stage_dtype].itemsize  # K and V, full precision
        return (codes + bs * kvh * 2 * SCALE_BYTES  # values: codes + per-token scale and zero
                + codes + kvh * d * 2 * SCALE_BYTES  # keys: codes + per-channel scale and zero
                + sinks)

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.layer_bytes_per_block

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers, scales amortized over the block (staging excluded)."""
        return self.bytes_per_block // self.block_size

    @property
    def stage_bytes(self) -> int:
        """Fixed bytes of the int4/int2 staging pool (0 for other dtypes)."""
        if self.kind != "intn":
            return 0
        itemsize = FLOAT_DTYPES[self.stage_dtype].itemsize
        return self.num_layers * self.num_stage_slots * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def num_blocks_for(self, memory_bytes: int) -> int:
        return max(0, (int(memory_bytes) - self.stage_bytes) // self.bytes_per_block)


class PagedKVCache:
    """All layers' KV blocks in the layout of ``spec.dtype`` (see :mod:`bitserve.engine.kv_layouts`).

    Per step: ``begin_step(batch)`` once (host bookkeeping, device metadata), then
    ``forward(layer, q, k, v, state)`` per layer writes the new K/V and attends.
    ``free_block`` is the block manager's release hook. ``rope`` (cos, sin
    ``[max_len, head_dim]`` float32) is needed for pre-RoPE keys only.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        from bitserve.engine.kv_layouts import make_layout

        self.spec = spec
        self.num_blocks = num_blocks
        self.layout = make_layout(spec, num_blocks, torch.device(device), rope)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def begin_step(self, batch):
        return self.layout.begin_step(batch)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        return self.layout.forward(layer, q, k, v, state)

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor, state) -> None:
        """Write K/V without attention (to build long contexts in benchmarks and tests)."""
        self.layout.fill(layer, k, v, state)

    def free_block(self, block_id: int) -> None:
        self.layout.free_block(block_id)

    def enable_graphs(self, max_batch: int, scratch_block: int) -> None:
        """Get ready for decode steps replayed from CUDA graphs of up to ``max_batch`` rows, whose
        padding writes into ``scratch_block`` (:mod:`bitserve.engine.cuda_graphs`)."""
        self.layout.enable_graphs(max_batch, scratch_block)

    def prepare_graph_step(self, starts: list[int], block_ids: list[list[int]], size: int) -> None:
        """Host planning of a graph-replayed decode step: sequence ``i`` adds the token at position
        ``starts[i]`` in ``block_ids[i]``; rows ``len(starts)..size`` are padding."""
        self.layout.prepare_graph_step(starts, block_ids, size)
