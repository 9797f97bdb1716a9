"""Pick the implementation of each KV-cache op: Triton on CUDA, the plain-torch twin on CPU.

``BITSERVE_KV_TRITON=1`` (with ``TRITON_INTERPRET=1`` on a CPU) forces the Triton path,
``BITSERVE_KV_TRITON=0`` forces the twins everywhere. Triton modules are imported only
when first used, so nothing touches a GPU (or needs triton) at import time.
"""

from __future__ import annotations

import os

import torch

from bitserve.kernels import kv_reference, reference
from bitserve.kernels.kv_reference import AttnMeta, KVLayer


def use_triton(x: torch.Tensor) -> bool:
    forced = os.environ.get("BITSERVE_KV_TRITON")
    if forced is not None:
        return forced == "1"
    return x.is_cuda


def _quant():
    from bitserve.kernels import kv_quant

    return kv_quant


def _triton_writes(x: torch.Tensor) -> bool:
    """The Triton KV writes tile a head with ``tl.arange(0, D)``: head dims that are powers of two."""
    d = x.shape[-1]
    return use_triton(x) and d > 0 and d & (d - 1) == 0


def write_kv(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Store new ``k, v [T, KVH, D]`` at their slots (float and int8 layouts)."""
    if layer.kind == "float":
        if _triton_writes(k):
            _quant().write_kv_float(k, v, layer, slot_mapping)
        else:
            reference.write_kv_cache(k, v, layer.k, layer.v, slot_mapping)
    elif _triton_writes(k):
        _quant().write_kv_int8(k, v, layer, slot_mapping)
    else:
        kv_reference.write_kv_int8(k, v, layer, slot_mapping)


def write_v_intn(v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    (_quant() if _triton_writes(v) else kv_reference).write_v_intn(v, layer, slot_mapping)


def finalize_k_intn(k_new, layer: KVLayer, fin_block, fin_slot, fin_old, fin_src) -> None:
    (_quant() if _triton_writes(k_new) else kv_reference).finalize_k_intn(k_new, layer, fin_block, fin_slot, fin_old,
                                                                          fin_src)


def stage_k(k_new, layer: KVLayer, stage_dst, stage_src) -> None:
    kv_reference.stage_k(k_new, layer, stage_dst, stage_src)  # a plain copy on every device


def attention_graph_safe(q: torch.Tensor, layer: KVLayer) -> bool:
    """Whether :func:`paged_attention` of queries like ``q`` launches from device tensors only (the
    Triton kernels), so a CUDA graph can replay it; the twins read lengths back to the host."""
    if not (q.is_cuda and use_triton(q)):
        return False
    from bitserve.kernels import kv_attention

    return kv_attention.supported(layer, q)


def paged_attention(q: torch.Tensor, layer: KVLayer, meta: AttnMeta) -> torch.Tensor:
    if use_triton(q):
        from bitserve.kernels import kv_attention

        if kv_attention.supported(layer, q) or not q.is_cuda:
            return kv_attention.paged_attention(q, layer, meta)
    return kv_reference.paged_attention(q, layer, meta)
