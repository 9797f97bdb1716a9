"""Small building blocks of the decoder: RMSNorm, rotary embedding, activations."""

from __future__ import annotations

import math

import torch
from torch import nn

from bitserve.kernels import dispatch


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in float32 like Hugging Face's Llama."""

    def __init__(self, dim: int, eps: float, device: torch.device | str = "meta"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x`` (of ``x + residual`` when given: one kernel on CUDA)."""
        if residual is None:
            return dispatch.rmsnorm(x, self.weight, self.eps)
        return dispatch.add_rmsnorm(x, residual, self.weight, self.eps)[0]


class OutputLayerNorm(nn.Module):
    """LayerNorm over the last axis without affine parameters (OneBit's norm after each projection).

    ``(x - mean) / sqrt(var + eps)`` with the biased variance, in float32; no weights to load.
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """Normalise ``x``, or each consecutive part of ``sizes`` columns of it on its own (the
        projections of a fused output; one kernel on CUDA)."""
        return dispatch.layer_norm_parts(x, sizes or [x.shape[-1]], self.eps)



def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, with optional linear / llama3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half (NEOX-style) RoPE: dims ``j`` and ``j + d/2`` form a pair."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device).unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries and keys of one layer (one Triton kernel on CUDA)."""
        return dispatch.rope_qk(q, k, cos, sin)
