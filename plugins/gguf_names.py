"""GGUF tensor names <-> the Hugging Face names bitserve's model asks for, and llama's q/k row order.

llama.cpp's converter reorders the rows of ``q_proj``/``k_proj`` (weights and biases) for the
``llama`` architecture: within every head of ``d`` rows, HF row ``j*d/2 + i`` (rotate-half pairs
``i`` and ``i + d/2``) is written to row ``2*i + j`` (adjacent pairs, what ggml's "normal" RoPE
rotates). bitserve's RoPE is rotate-half, so those rows are put back in HF order at load.
BitNet architectures are written without that permutation and run NEOX (rotate-half) RoPE
(FORMATS.md §2.6), so nothing is reordered for them.
"""

from __future__ import annotations

import re

import torch

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# per block: GGUF stem -> HF module path under model.layers.N
BLOCK_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_NORMS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
# GGUF suffix of a linear's tensors -> HF suffix (".scale" is llama.cpp's optional output multiplier)
LINEAR_SUFFIXES = {"weight": "weight", "bias": "bias", "scale": "output_scale"}
# tensors that are not model parameters but are understood elsewhere (RoPE factors -> config)
AUXILIARY = ("rope_freqs.weight",)

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.([a-z_]+)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when bitserve's llama/bitnet graph has no such tensor."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if not m:
        return None
    block, stem, suffix = m.groups()
    if stem in BLOCK_LINEARS and suffix in LINEAR_SUFFIXES:
        return f"model.layers.{block}.{BLOCK_LINEARS[stem]}.{LINEAR_SUFFIXES[suffix]}"
    if stem in BLOCK_NORMS and suffix == "weight":
        return f"model.layers.{block}.{BLOCK_NORMS[stem]}.weight"
    return None


def gguf_name(hf: str) -> str | None:
    """Inverse of :func:`hf_name` (used by the writer)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.([a-z_]+)$", hf)
    if not m:
        return None
    block, module, suffix = m.groups()
    for stem, path in BLOCK_LINEARS.items():
        if path == module:
            inverse = {v: k for k, v in LINEAR_SUFFIXES.items()}
            return f"blk.{block}.{stem}.{inverse[suffix]}" if suffix in inverse else None
    for stem, path in BLOCK_NORMS.items():
        if path == module and suffix == "weight":
            return f"blk.{block}.{stem}.weight"
    return None


def llama_qk_heads(hf: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads llama.cpp permuted the rows of this tensor over (None: not permuted)."""
    if re.search(r"\.q_proj\.(weight|bias)$", hf):
        return num_heads
    if re.search(r"\.k_proj\.(weight|bias)$", hf):
        return num_kv_heads
    return None


def rows_from_gguf_order(n_rows: int, heads: int) -> torch.Tensor:
    """Index ``idx`` with ``hf_rows = gguf_rows[idx]`` that undoes llama.cpp's q/k permutation."""
    if n_rows % (2 * heads):
        raise ValueError(f"{n_rows} rows do not split into {heads} heads of an even size")
    half = n_rows // heads // 2
    h = torch.arange(heads).view(heads, 1, 1)
    j = torch.arange(2).view(1, 2, 1)
    i = torch.arange(half).view(1, 1, half)
    return (h * 2 * half + 2 * i + j).reshape(-1)  # laid out in HF order [head, j, i]


def rows_to_gguf_order(n_rows: int, heads: int) -> torch.Tensor:
    """Index with ``gguf_rows = hf_rows[idx]`` (llama.cpp's permutation, for the writer)."""
    forward = rows_from_gguf_order(n_rows, heads)
    inverse = torch.empty_like(forward)
    inverse[forward] = torch.arange(n_rows)
    return inverse
