"""LLaMA-family decoder over flat (varlen) token batches.

Linear layers are built by a callback (``build_linear(specs)``) so that format
plugins decide their storage and kernels; q/k/v and gate/up are fused. With
``proj_out_layernorm`` (OneBit) every projection's own output goes through a
non-affine LayerNorm, so fused outputs are normalised per part. Norms
and embeddings are created on the meta device and filled by the loader, so
building a model never allocates a throw-away copy of the weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from bitserve.kernels import dispatch
from bitserve.model.attention import AttentionBackend
from bitserve.model.layers import OutputLayerNorm, RMSNorm, RotaryEmbedding
from bitserve.model_config import ModelConfig
from bitserve.plugins.base import LinearSpec

BuildLinear = Callable[[Sequence[LinearSpec]], nn.Module]


def norm_linear(norm: RMSNorm | None, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(norm(x))``; through the layer's ``forward_rmsnorm`` when it has one, so that a
    format can fuse the norm into its activation quantization (BitNet W2A8 on GPUs)."""
    if norm is None:
        return linear(x)
    fused = getattr(linear, "forward_rmsnorm", None)
    return fused(x, norm.weight, norm.eps) if fused is not None else linear(norm(x))


def add_norm_linear(norm: RMSNorm, linear: nn.Module, x: torch.Tensor,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(norm(h)), h)`` with ``h = x + residual`` (``x`` when there is no residual yet):
    the residual add of a decoder layer, fused with the norm (and its quantization) through the
    layer's ``forward_add_rmsnorm`` when it has one."""
    if residual is None:
        return norm_linear(norm, linear, x), x
    fused = getattr(linear, "forward_add_rmsnorm", None)
    if fused is not None:
        return fused(x, residual, norm.weight, norm.eps)
    h = x + residual
    return norm_linear(norm, linear, h), h


def output_norm(cfg: ModelConfig) -> OutputLayerNorm | None:
    """The norm applied to each projection's output, or None (every format but OneBit)."""
    return OutputLayerNorm(cfg.proj_out_layernorm_eps) if cfg.proj_out_layernorm else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, build_linear: BuildLinear, rope: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = build_linear([
            LinearSpec(f"{prefix}.q_proj", cfg.q_size, h),
            LinearSpec(f"{prefix}.k_proj", cfg.kv_size, h),
            LinearSpec(f"{prefix}.v_proj", cfg.kv_size, h),
        ])
        self.attn_sub_norm = RMSNorm(cfg.q_size, cfg.rms_norm_eps) if cfg.attn_sub_norm else None
        self.o_proj = build_linear([LinearSpec(f"{prefix}.o_proj", h, cfg.q_size)])
        self.out_norm = output_norm(cfg)
        self.rope = rope
        self.head_dim = d

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                layer: int, attn: AttentionBackend, input_norm: RMSNorm):
        """Self-attention of ``input_norm(x + residual)``; returns ``(output, x + residual)`` (the add
        and the norm are applied here so that they can fuse into q/k/v)."""
        cfg = self.cfg
        qkv, residual = add_norm_linear(input_norm, self.qkv_proj, x, residual)
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        if self.out_norm is not None:
            qkv = self.out_norm(qkv, sizes)
        q, k, v = qkv.split(sizes, dim=-1)
        t = x.shape[0]
        q, k = self.rope.apply_qk(q.reshape(t, cfg.num_heads, self.head_dim),
                                  k.reshape(t, cfg.num_kv_heads, self.head_dim), cos, sin)
        out = attn(layer, q, k, v.reshape(t, cfg.num_kv_heads, self.head_dim))
        out = norm_linear(self.attn_sub_norm, self.o_proj, out)
        return (out if self.out_norm is None else self.out_norm(out)), residual


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, build_linear: BuildLinear):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = build_linear([
            LinearSpec(f"{prefix}.gate_proj", i, h),
            LinearSpec(f"{prefix}.up_proj", i, h),
        ])
        self.ffn_sub_norm = RMSNorm(i, cfg.rms_norm_eps) if cfg.ffn_sub_norm else None
        self.down_proj = build_linear([LinearSpec(f"{prefix}.down_proj", h, i)])
        self.out_norm = output_norm(cfg)
        self.act_name = cfg.hidden_act
        self.intermediate = i

    def forward(self, x: torch.Tensor, residual: torch.Tensor, input_norm: RMSNorm):
        """The MLP of ``input_norm(x + residual)``; returns ``(output, x + residual)``."""
        gate_up, residual = add_norm_linear(input_norm, self.gate_up_proj, x, residual)
        if self.out_norm is not None:  # OneBit: each projection's output is normalised first
            gate_up = self.out_norm(gate_up, [self.intermediate, self.intermediate])
        hidden = dispatch.act_and_mul(gate_up, self.act_name)  # one kernel on CUDA
        y = norm_linear(self.ffn_sub_norm, self.down_proj, hidden)
        return (y if self.out_norm is None else self.out_norm(y)), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, build_linear: BuildLinear, rope: RotaryEmbedding):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", build_linear, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, f"{prefix}.mlp", build_linear)

    def forward(self, x, residual, cos, sin, attn):
        """One layer on the residual stream kept as ``(x, residual)``, whose sum is the hidden state
        (``residual`` None in the first layer): each sub-block adds its input pair in its norm's
        kernel and returns its output with the new stream."""
        x, residual = self.self_attn(x, residual, cos, sin, self.index, attn, self.input_layernorm)
        return self.mlp(x, residual, self.post_attention_layernorm)


class Backbone(nn.Module):
    """``model.*`` of the Hugging Face layout: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, build_linear: BuildLinear):
        super().__init__()
        # passing the meta weight skips nn.Embedding's normal_() init, which on the meta
        # device imports torch._dynamo (and triton): ~1-2 s and ~0.1 GB of RSS per process
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta"))
        self.embed_tokens.weight.requires_grad_(False)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, build_linear, rope) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = rope


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, build_linear: BuildLinear):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, build_linear)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            self.lm_head.weight.requires_grad_(False)
        self.int8_lm_head = None  # an Int8LMHead after quantize_lm_head()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: ``[T]`` (a flat batch); returns hidden states ``[T, hidden]``."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rope.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        return self.model.norm(x, residual)

    def lm_head_weight(self) -> torch.Tensor:
        """The float head weight ``[vocab, hidden]`` (the int8 head's dequantized one once quantized)."""
        if self.int8_lm_head is not None and not self.config.tie_word_embeddings:
            return self.int8_lm_head.dequantize().to(self.dtype)
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def quantize_lm_head(self) -> None:
        """Compute logits with an int8 head (absmax per row, W8A16 kernels): half the bytes of a
        bf16 head, which is most of a ternary model's decode traffic. An untied float head is
        dropped; a tied one stays as the embedding table (lookups read a few rows)."""
        from bitserve.plugins.lowbit_layers import Int8LMHead

        self.int8_lm_head = Int8LMHead.from_dense(self.lm_head_weight())
        if not self.config.tie_word_embeddings:
            del self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[T, vocab]`` for the given hidden states."""
        if self.int8_lm_head is not None:
            return self.int8_lm_head(hidden, out_dtype=torch.float32)
        return nn.functional.linear(hidden, self.lm_head_weight()).float()
