"""A float64 LLaMA forward pass written from the architecture's math: the oracle of the
low-bit format tests. Dense (dequantized) projection weights in, logits out.

``proj_layernorm=True`` adds OneBit's LayerNorm without affine parameters (eps 1e-5) after
every projection, each normalised over its own outputs (FORMATS.md §3.3).
"""

from __future__ import annotations

import math

import torch

ONEBIT_LAYERNORM_EPS = 1e-5


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: torch.Tensor, eps: float = ONEBIT_LAYERNORM_EPS) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps)


def rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x ``[T, heads, D]`` at positions 0..T-1; dims j and j + D/2 form a rotating pair."""
    t, _, d = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference_logits(config: dict, weights: dict[str, torch.Tensor], ids: list[int], *,
                     proj_layernorm: bool = False) -> torch.Tensor:
    """float64 logits ``[len(ids), vocab]``; ``weights`` maps Hugging Face llama names to dense tensors."""
    w = {name: t.double() for name, t in weights.items()}
    eps = float(config["rms_norm_eps"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    theta = float(config.get("rope_theta", 10000.0))

    def proj(x, name):
        y = x @ w[f"{name}.weight"].t()
        return layer_norm(y) if proj_layernorm else y

    t = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
        q = rotate_half_rope(proj(h, f"{p}.self_attn.q_proj").reshape(t, heads, head_dim), theta)
        k = rotate_half_rope(proj(h, f"{p}.self_attn.k_proj").reshape(t, kv_heads, head_dim), theta)
        v = proj(h, f"{p}.self_attn.v_proj").reshape(t, kv_heads, head_dim)
        outs = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kv].t() / math.sqrt(head_dim)
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            outs.append(probs @ v[:, kv])
        x = x + proj(torch.cat(outs, dim=-1), f"{p}.self_attn.o_proj")
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        gate, up = proj(h, f"{p}.mlp.gate_proj"), proj(h, f"{p}.mlp.up_proj")
        x = x + proj(torch.nn.functional.silu(gate) * up, f"{p}.mlp.down_proj")
    x = rms_norm(x, w["model.norm.weight"], eps)
    head_weight = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head_weight.t()


def reference_greedy(config: dict, weights: dict[str, torch.Tensor], ids: list[int], n: int, **kw) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(reference_logits(config, weights, seq, **kw)[-1].argmax()))
    return seq[len(ids):]
