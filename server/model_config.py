"""The architecture of a LLaMA-family decoder, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from bitserve.plugins.checkpoint import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "bitnet", "mistral", "bitllama")  # bitllama: OneBit (FORMATS.md §3)
SUPPORTED_ACTIVATIONS = ("silu", "relu2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # "relu2" for BitNet b1.58
    attn_sub_norm: bool = False  # BitNet: RMSNorm on the attention output before o_proj
    ffn_sub_norm: bool = False  # BitNet: RMSNorm on the gated product before down_proj
    # OneBit: a LayerNorm without affine parameters over the outputs of every projection
    # (q, k, v, o, gate, up, down each normalised on its own; lm_head is not), eps 1e-5
    proj_out_layernorm: bool = False
    proj_out_layernorm_eps: float = 1e-5
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, config: dict, overrides: dict | None = None) -> "ModelConfig":
        """Build from a config.json dict; raise CheckpointError for what we cannot run."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: model_type '{model_type}' is not a supported LLaMA-family architecture "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            values = dict(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json: required field {e.args[0]!r} is missing") from None
        is_bitnet = model_type == "bitnet"
        is_onebit = model_type == "bitllama"
        act = config.get("hidden_act", "relu2" if is_bitnet else "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(f"config.json: hidden_act '{act}' is not supported (supported: {SUPPORTED_ACTIVATIONS})")
        # transformers >= 5 writes "rope_parameters" (theta inside); older configs
        # have top-level "rope_theta" and an optional "rope_scaling".
        rope_params = dict(config.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_scaling = config.get("rope_scaling") or rope_params or None
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if rope_scaling:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(f"config.json: rope_scaling type '{rope_type}' is not supported ({SUPPORTED_ROPE_TYPES})")
        if values["num_heads"] % values["num_kv_heads"]:
            raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        values.update(
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=act,
            attn_sub_norm=is_bitnet,
            ffn_sub_norm=is_bitnet,
            proj_out_layernorm=is_onebit,
            model_type=model_type,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if overrides:
            unknown = set(overrides) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown ModelConfig override(s): {sorted(unknown)}")
            values.update(overrides)
        return cls(**values)

    def with_eos(self, extra: tuple[int, ...]) -> "ModelConfig":
        merged = tuple(dict.fromkeys(self.eos_token_ids + tuple(extra)))
        return replace(self, eos_token_ids=merged)
