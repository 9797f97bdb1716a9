"""Attention over a KV cache. The model calls ``backend(layer, q, k, v)``; a backend
stores the new keys/values and returns the attention output.

``ContiguousKVCache`` is the simple single-sequence cache of the offline API;
the paged engine provides another backend with the same call.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bitserve.kernels.reference import causal_attention


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: ``[T, H, D]``, k/v: ``[T, KVH, D]`` (RoPE applied) -> ``[T, H*D]``."""
        ...


class ContiguousKVCache:
    """KV cache of one sequence in contiguous tensors ``[layers, capacity, KVH, D]``.

    Call :meth:`set_positions` before each forward with the positions of the new tokens.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.positions = torch.zeros(0, dtype=torch.long, device=device)

    def set_positions(self, positions: torch.Tensor) -> None:
        if int(positions.max()) >= self.capacity:
            raise ValueError(f"position {int(positions.max())} exceeds the KV cache capacity {self.capacity}")
        self.positions = positions

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k[layer, self.positions] = k
        self.v[layer, self.positions] = v
        end = int(self.positions.max()) + 1
        k_positions = torch.arange(end, device=q.device)
        return causal_attention(q, self.k[layer, :end], self.v[layer, :end], self.positions, k_positions)
