"""Tiny llama checkpoints for the 1-bit formats (OneBit, FBI-LLM), saved the ways the
published projects save them.

Both projects call ``save_pretrained`` of a llama whose projections were swapped for their own
modules, so the file holds the Hugging Face llama names plus each module's extra tensors.
With ``safe_serialization=False`` (OneBit's fork default, FBI-LLM's ``save_checkpoint``) that is
``torch.save(state_dict)`` into ``pytorch_model.bin``, or into ``pytorch_model-0000i-of-0000n.bin``
shards listed in ``pytorch_model.bin.index.json``; otherwise ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SAVES = ("safetensors", "bin", "bin-sharded")


def llama_config(**overrides) -> dict:
    """config.json of a tiny llama (the field set of transformers 4.3x LlamaConfig)."""
    values = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        torch_dtype="float32", attention_bias=False, pretraining_tp=1,
    )
    values.update(overrides)
    return values


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """``{prefix: (N, K)}`` of every projection."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * (h // config["num_attention_heads"])
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    nk = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
          "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{layer}.{name}": nk[name]
            for layer in range(config["num_hidden_layers"]) for name in PROJECTIONS}


def random_dense_parts(config: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Embeddings, RMSNorm weights (not all ones, so a missed norm shows) and lm_head, float32."""
    h, v = config["hidden_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen),
               "model.norm.weight": 1 + 0.2 * torch.randn(h, generator=gen)}
    for layer in range(config["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = 0.2 * torch.randn(v, h, generator=gen)
    return tensors


def save_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor], save: str = "safetensors") -> Path:
    """Write config.json and the tensors as ``save`` (one of :data:`SAVES`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if save == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif save == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif save == "bin-sharded":
        names = sorted(tensors)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            torch.save({n: tensors[n] for n in part}, folder / fname)
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        raise ValueError(f"unknown save {save!r}")
    return folder


def assert_load_error(folder: Path, config: dict, tensors: dict[str, torch.Tensor], save: str, name: str,
                      message: str) -> None:
    """Saving ``tensors`` as ``save`` and loading must raise a CheckpointError naming the weight file,
    the tensor ``name`` and ``message``."""
    import pytest

    from bitserve.loader import load_model
    from bitserve.plugins.checkpoint import CheckpointError

    folder = save_checkpoint(folder, config, tensors, save)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", progress=False)
    file = folder / ("model.safetensors" if save == "safetensors" else "pytorch_model.bin")
    assert str(file) in str(err.value) and f"'{name}'" in str(err.value) and message in str(err.value)
