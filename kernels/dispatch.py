"""Choose the implementation of each op for the tensors at hand.

Today every op runs its plain-torch twin (correct on CPU and CUDA); the Triton
kernels plug in here, selected for CUDA tensors, without changing callers.
"""

from __future__ import annotations

import torch

from bitserve.kernels import reference


def ternary_linear_w2a8(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference.ternary_linear_w2a8` for the contract."""
    return reference.ternary_linear_w2a8(x, packed, weight_scale, bias)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """See :func:`bitserve.kernels.reference.write_kv_cache`."""
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference.paged_attention`."""
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
