"""Whole-sequence logits through the contiguous KV cache (the engine-independent path
used by ``LLM.logits``, parity tests and perplexity)."""

from __future__ import annotations

from typing import Sequence

import torch

from bitserve.model.attention import ContiguousKVCache
from bitserve.model.llama import LlamaForCausalLM


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, token_ids: Sequence[int]) -> torch.Tensor:
    """float32 logits ``[len, vocab]`` for every position of one sequence."""
    cfg = model.config
    device = model.model.norm.weight.device
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(token_ids), model.dtype, device)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)
    cache.set_positions(positions)
    return model.compute_logits(model(ids, positions, cache))
