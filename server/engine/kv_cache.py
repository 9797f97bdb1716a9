"""Paged KV cache: the spec that knows bytes, and the tensors that hold blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def canonical_kv_dtype(name: str, model_dtype: torch.dtype) -> str:
    """'auto' follows the model dtype; short names map to torch names."""
    if name == "auto":
        return str(model_dtype).replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype '{name}' is not supported (choose from auto, bf16, fp16, fp32)")
    return name


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and storage type of the KV cache; the block manager only counts blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, memory_bytes: int) -> int:
        return max(0, int(memory_bytes) // self.bytes_per_block)


class PagedKVCache:
    """Per-layer K and V block pools: ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.torch_dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
