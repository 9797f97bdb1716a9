"""The example plugin, installed as its own distribution, works through bitserve's public API."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bitserve.loader import load_model  # noqa: E402
from bitserve.model.prefill import prefill_logits  # noqa: E402
from bitserve.plugins.base import LinearSpec  # noqa: E402
from bitserve.plugins.checkpoint import CheckpointError  # noqa: E402
from bitserve.plugins.registry import FormatRegistry  # noqa: E402
from bitserve.plugins.testing import check_format  # noqa: E402
from bitserve_ternary_int8 import TernaryInt8Format, write_checkpoint  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 64, 96, 4, 2, 80


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config()
    model = LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "rotary" not in k}
    folder = write_checkpoint(tmp_path_factory.mktemp("ti8"), config.to_dict(), state)
    return folder, config


def dequantized_state(folder):
    stored = load_file(str(folder / "model.safetensors"))
    dense = {}
    for name, t in stored.items():
        if name.endswith(".weight_scale"):
            continue
        if name.endswith("_proj.weight"):
            scale = stored[name[: -len("weight")] + "weight_scale"]
            dense[name] = t.double() * scale.double()[:, None]
        else:
            dense[name] = t.double()
    return dense


def test_installed_plugin_is_found_through_its_entry_point():
    assert "ternary_int8" in FormatRegistry().names()


def test_loads_by_detection_and_matches_float64_transformers(checkpoint):
    from transformers import LlamaForCausalLM

    folder, config = checkpoint
    loaded = load_model(folder, dtype="float32", device="cpu", progress=False)
    assert loaded.plugin.name == "ternary_int8"
    bits = [m.bits_per_weight for m in loaded.model.modules() if type(m).__name__ == "TernaryLinearA16"]
    # 2 bits per weight + a float32 scale per row (K = 64 or 96 here): not the int8 bytes
    assert len(bits) == 2 * 4 and max(bits) <= 2 + 32 / HIDDEN
    oracle = LlamaForCausalLM(config).double().eval()
    oracle.load_state_dict(dequantized_state(folder), strict=False)
    ids = [1, 17, 5, 60, 33, 2, 9, 41, 8]
    with torch.no_grad():
        want = oracle(torch.tensor([ids])).logits[0]
    got = prefill_logits(loaded.model, ids).double()
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-4, f"relative logit error {err:.2e}"


def test_contract(checkpoint):
    folder, _ = checkpoint
    attn = "model.layers.0.self_attn"
    head_dim = HIDDEN // HEADS
    check_format(TernaryInt8Format(), folder, [
        [LinearSpec(f"{attn}.q_proj", HIDDEN, HIDDEN), LinearSpec(f"{attn}.k_proj", KV_HEADS * head_dim, HIDDEN),
         LinearSpec(f"{attn}.v_proj", KV_HEADS * head_dim, HIDDEN)],
        [LinearSpec("model.layers.1.mlp.down_proj", HIDDEN, INTER)],
    ], max_bits_per_weight=2 + 32 / HIDDEN)


def test_value_outside_ternary_names_file_and_tensor(checkpoint, tmp_path):
    folder, _ = checkpoint
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = 2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*up_proj\.weight.*outside"):
        load_model(tmp_path, dtype="float32", device="cpu", progress=False)
