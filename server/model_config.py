"""The architecture of a LLaMA-family decoder, read from a Hugging Face config.json."""

from __future__ import annotations

import math
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
    def from_hf(cls, config: dict, overrides: dict | None = None, source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict; raise CheckpointError for what we cannot run (messages
        start with ``source``: the file, or a GGUF's metadata)."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type '{model_type}' is not a supported LLaMA-family architecture "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        hidden = config_int(config, "hidden_size", source=source)
        heads = config_int(config, "num_attention_heads", source=source)
        if config.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                  "(and no head_dim is given)")
        values = dict(
            vocab_size=config_int(config, "vocab_size", source=source),
            hidden_size=hidden,
            intermediate_size=config_int(config, "intermediate_size", source=source),
            num_layers=config_int(config, "num_hidden_layers", source=source),
            num_heads=heads,
            num_kv_heads=config_int(config, "num_key_value_heads", heads, source=source),
            head_dim=config_int(config, "head_dim", hidden // heads, source=source),
        )
        is_bitnet = model_type == "bitnet"
        is_onebit = model_type == "bitllama"
        act = config.get("hidden_act", "relu2" if is_bitnet else "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act '{act}' is not supported (supported: {SUPPORTED_ACTIVATIONS})")
        # transformers >= 5 writes "rope_parameters" (theta inside); older configs
        # have top-level "rope_theta" and an optional "rope_scaling".
        rope_params = dict(_config_dict(config, "rope_parameters", source))
        rope_theta = config_float(rope_params, "rope_theta",
                                  config_float(config, "rope_theta", 10000.0, source=source), source=source)
        rope_params.pop("rope_theta", None)
        rope_scaling = _config_dict(config, "rope_scaling", source) or rope_params or None
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if rope_scaling:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(f"{source}: rope_scaling type '{rope_type}' is not supported ({SUPPORTED_ROPE_TYPES})")
            _check_rope_scaling(rope_scaling, rope_type, f"{source}: rope_scaling")
        if values["num_heads"] % values["num_kv_heads"]:
            raise CheckpointError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        values.update(
            rms_norm_eps=config_float(config, "rms_norm_eps", 1e-6, source=source),
            rope_theta=rope_theta,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=config_int(config, "max_position_embeddings", 2048, source=source),
            tie_word_embeddings=_config_bool(config, "tie_word_embeddings", False, source),
            hidden_act=act,
            attn_sub_norm=is_bitnet,
            ffn_sub_norm=is_bitnet,
            proj_out_layernorm=is_onebit,
            model_type=model_type,
            bos_token_id=config_int(config, "bos_token_id", None, minimum=0, source=source),
            eos_token_ids=token_ids(config.get("eos_token_id"), f"{source}: eos_token_id"),
        )
        if overrides:
            check_overrides(overrides)
            values.update(overrides)
        return cls(**values)

    def with_eos(self, extra: tuple[int, ...]) -> "ModelConfig":
        merged = tuple(dict.fromkeys(self.eos_token_ids + tuple(extra)))
        return replace(self, eos_token_ids=merged)


_REQUIRED = object()


def check_overrides(overrides: dict) -> None:
    """ValueError naming the keys of a plugin's ``model_overrides`` that are not ModelConfig fields."""
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig override(s): {sorted(unknown)}")


def _number(config: dict, key: str, default, kind: type, minimum, source: str):
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            what = "is missing" if key not in config else "must not be null"
            raise CheckpointError(f"{source}: required field {key!r} {what}")
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int) and not (math.isfinite(value) and value == int(value)))):
        raise CheckpointError(f"{source}: {key} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {value!r}")
    number = kind(value)
    if kind is float and not number > 0:  # NaN too
        raise CheckpointError(f"{source}: {key} must be positive, not {value!r}")
    if kind is int and minimum is not None and number < minimum:
        raise CheckpointError(f"{source}: {key} must be >= {minimum}, not {value!r}")
    return number


def config_int(config: dict, key: str, default=_REQUIRED, *, minimum: int | None = 1, source: str = "config.json"):
    """An integer field of config.json (>= ``minimum``); absent or null gives ``default``
    (required when none is given). CheckpointError naming the field otherwise."""
    return _number(config, key, default, int, minimum, source)


def config_float(config: dict, key: str, default=_REQUIRED, *, source: str = "config.json"):
    """A positive number field of config.json; absent or null gives ``default``."""
    return _number(config, key, default, float, None, source)


def _config_bool(config: dict, key: str, default: bool, source: str) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):  # bool("false") is True
        raise CheckpointError(f"{source}: {key} must be true or false, not {value!r}")
    return value


def _check_rope_scaling(scaling: dict, rope_type: str, where: str) -> None:
    """The fields each scaling type reads, present and positive (a missing factor was a KeyError at
    load, a factor of 0 NaN logits)."""
    if rope_type in ("linear", "llama3"):
        config_float(scaling, "factor", source=where)
    if rope_type == "llama3":
        low = config_float(scaling, "low_freq_factor", source=where)
        high = config_float(scaling, "high_freq_factor", source=where)
        config_float(scaling, "original_max_position_embeddings", source=where)
        if not high > low:
            raise CheckpointError(f"{where}: high_freq_factor ({high}) must be larger than low_freq_factor ({low})")


def _config_dict(config: dict, key: str, source: str) -> dict:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {key} must be an object, not {value!r}")
    return value


def token_ids(value, where: str) -> tuple[int, ...]:
    """An ``eos_token_id``-style value (an id, a list of ids or null) as a tuple of ids."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise CheckpointError(f"{where} must be a token id or a list of token ids, not {value!r}")
    return tuple(items)
