"""GGUF metadata of a llama / bitnet architecture -> a Hugging Face style ``config.json`` dict.

The dict is what :class:`bitserve.model_config.ModelConfig` reads, plus a ``"gguf"`` entry
describing the file. Architecture facts (FORMATS.md §2.3, §2.6):

- ``llama``: SiLU, tied embeddings only when ``output.weight`` is absent, q/k rows permuted by the
  converter (undone at load, see :mod:`bitserve.plugins.gguf_names`).
- ``bitnet`` (upstream llama.cpp), ``bitnet-b1.58`` / ``bitnet-25`` (bitnet.cpp): sub-norms after
  attention and in the FFN, NEOX (rotate-half) RoPE with unpermuted q/k, lm_head = ``token_embd``.
  The FFN activation is ``<arch>.hidden_activation`` when present; otherwise ReLU² for bitnet.cpp's
  ``bitnet-b1.58``/``bitnet-25`` graphs and SiLU for upstream ``bitnet`` (llama.cpp's default for
  files written before the key existed, i.e. the 1bitLLM models).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from bitserve.plugins.checkpoint import CheckpointError

BITNET_ARCHITECTURES = ("bitnet", "bitnet-b1.58", "bitnet-25")
SUPPORTED_ARCHITECTURES = ("llama",) + BITNET_ARCHITECTURES
_ACTIVATIONS = {"silu": "silu", "swiglu": "silu", "relu2": "relu2", "relu_sqr": "relu2",
                "relu_squared": "relu2", "squared_relu": "relu2"}
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}  # block types: bf16
# Llama 3.x RoPE scaling presets recognisable from a rope_freqs tensor (factor, low, high, original ctx)
LLAMA3_PRESETS = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores in ``rope_freqs.weight`` for Llama 3 scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


def f32(value) -> float:
    """A float stored as GGUF float32, as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


class MetadataConfig:
    """Reads one file's ``<arch>.*`` keys with errors that name the file and the key."""

    def __init__(self, path, meta: dict[str, Any]):
        self.path = path
        self.meta = meta
        self.arch = str(meta.get("general.architecture", ""))
        if not self.arch:
            raise CheckpointError(f"{path}: GGUF metadata has no 'general.architecture'")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture '{self.arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

    def get(self, suffix: str, cast: Callable = int, default: Any = ...) -> Any:
        key = f"{self.arch}.{suffix}"
        if key not in self.meta:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' is missing")
            return default
        try:
            return cast(self.meta[key])
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: GGUF metadata key '{key}' has the invalid value {self.meta[key]!r}"
            ) from None


def _activation(md: MetadataConfig) -> str:
    raw = md.get("hidden_activation", str, None)
    if raw is None:
        return "relu2" if md.arch in ("bitnet-b1.58", "bitnet-25") else "silu"
    if raw.lower() not in _ACTIVATIONS:
        raise CheckpointError(f"{md.path}: '{md.arch}.hidden_activation' = '{raw}' is not supported "
                              f"(supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[raw.lower()]


def _rope_scaling(md: MetadataConfig, head_dim: int, theta: float, rope_freqs: np.ndarray | None) -> dict | None:
    kind = md.get("rope.scaling.type", str, "none")
    factor = md.get("rope.scaling.factor", f32, 1.0)
    if kind not in ("none", "linear"):
        raise CheckpointError(f"{md.path}: RoPE scaling type '{kind}' is not supported (none, linear, llama3 rope_freqs)")
    if rope_freqs is not None:
        if kind == "linear" and factor != 1.0:
            raise CheckpointError(f"{md.path}: both linear RoPE scaling and rope_freqs.weight are set")
        for f, low, high, ctx in LLAMA3_PRESETS:
            expected = llama3_rope_factors(head_dim, theta, f, low, high, ctx)
            if expected.shape == rope_freqs.shape and np.allclose(rope_freqs, expected, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": f, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": ctx}
        if np.allclose(rope_freqs, 1.0):
            return None
        raise CheckpointError(f"{md.path}: tensor 'rope_freqs.weight' holds RoPE factors that match no Llama 3 "
                              "scaling preset bitserve knows")
    if kind == "linear" and factor not in (0.0, 1.0):
        return {"rope_type": "linear", "factor": factor}
    return None


def _token_id(md: MetadataConfig, key: str, vocab: int) -> int | None:
    value = md.meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < vocab:
        raise CheckpointError(f"{md.path}: 'tokenizer.ggml.{key}' = {value} is outside the vocabulary of {vocab}")
    return value


def hf_config_from_gguf(path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                        types: dict[str, str], rope_freqs: np.ndarray | None = None) -> dict:
    """Build the config dict. ``shapes``/``types`` map GGUF tensor names to (N, K) shapes and type names."""
    md = MetadataConfig(path, meta)
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing from the GGUF file")
    vocab, hidden_from_embd = shapes["token_embd.weight"]
    hidden = md.get("embedding_length")
    if hidden != hidden_from_embd:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' has shape {list(shapes['token_embd.weight'])} "
                              f"but '{md.arch}.embedding_length' is {hidden}")
    heads = md.get("attention.head_count")
    kv_heads = md.get("attention.head_count_kv", int, heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(f"{path}: head counts {heads}/{kv_heads} are invalid (heads must be a multiple of kv heads)")
    head_dim = md.get("attention.key_length", int, hidden // heads)
    value_dim = md.get("attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dim = md.get("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial RoPE (rope.dimension_count {rope_dim} < head size {head_dim}) "
                              "is not supported")
    theta = md.get("rope.freq_base", f32, 10000.0)
    is_bitnet = md.arch in BITNET_ARCHITECTURES
    bos = _token_id(md, "bos_token_id", vocab)
    eos_ids = [i for i in (_token_id(md, k, vocab) for k in ("eos_token_id", "eot_token_id", "eom_token_id"))
               if i is not None]
    config = {
        "architectures": ["BitNetForCausalLM" if is_bitnet else "LlamaForCausalLM"],
        "model_type": "bitnet" if is_bitnet else "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": md.get("feed_forward_length"),
        "num_hidden_layers": md.get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": md.get("attention.layer_norm_rms_epsilon", f32),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(md, head_dim, theta, rope_freqs),
        "max_position_embeddings": md.get("context_length", int, 2048),
        # BitNet graphs multiply by token_embd even when output.weight exists (FORMATS.md §2.6)
        "tie_word_embeddings": is_bitnet or "output.weight" not in shapes,
        "hidden_act": _activation(md),
        "bos_token_id": bos,
        "eos_token_id": list(dict.fromkeys(eos_ids)),
        "pad_token_id": _token_id(md, "padding_token_id", vocab),
        "torch_dtype": _TORCH_DTYPES.get(types["token_embd.weight"], "bfloat16"),
        "gguf": {
            "file": str(path),
            "architecture": md.arch,
            "file_type": meta.get("general.file_type"),
            "linear_types": sorted({t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight")
                                    and len(shapes[n]) == 2}),
        },
    }
    if config["rope_scaling"] is None:
        del config["rope_scaling"]
    return config
