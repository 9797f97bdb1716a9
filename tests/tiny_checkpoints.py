"""Build small checkpoints in the exact published layouts, using transformers itself
(the independent oracle) to create and pack them."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bitnet_config(**overrides):
    from transformers import BitNetConfig

    values = dict(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return BitNetConfig(**values)


def random_bitnet_state(config, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised BitNetForCausalLM state dict (float32, dense latent weights)."""
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    with torch.no_grad():  # make norms non-trivial so a missed norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "rotary" not in k}


def absmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = w.float().abs().mean().clamp(min=1e-5)
    return (w.float() / gamma).round().clamp(-1, 1), gamma


def write_bitnet_checkpoint(
    folder: Path,
    config,
    state: dict[str, torch.Tensor],
    *,
    linear_class: str = "autobitlinear",
    mode: str = "offline",
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """Save ``state`` as a transformers 'bitnet' checkpoint (packed with transformers' pack_weights)."""
    from transformers.integrations.bitnet import pack_weights

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, w in state.items():
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if proj in PROJECTIONS and mode == "offline":
            t, gamma = absmean(w)
            tensors[name] = pack_weights(t.to(torch.int8).clone())
            scale = gamma if linear_class == "autobitlinear" else 1.0 / gamma
            tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(1).to(dtype)
        else:
            tensors[name] = w.to(dtype).contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    cfg = config.to_dict()
    cfg["architectures"] = ["BitNetForCausalLM"]
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tensors(folder, tensors, shards)
    return folder


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_llama_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random dense LlamaForCausalLM saved with save_pretrained (fp32 safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**values))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_oracle(folder: Path):
    """transformers' own model for a checkpoint folder, in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def write_char_tokenizer(folder: Path, vocab_size: int) -> dict[str, int]:
    """A character-level tokenizer (ids 0-4 special, then printable ASCII) with a Llama-3-style
    chat template; bos = 1, eos = 2, matching the tiny configs above. Returns the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars[: vocab_size - len(vocab) - 1]:
        vocab[ch] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    }))
    return vocab


def write_tiny_bitnet_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A complete tiny BitNet model folder (packed autobitlinear weights + char tokenizer)."""
    config = bitnet_config(**{"vocab_size": 100, "max_position_embeddings": 256, **overrides})
    state = random_bitnet_state(config, seed)
    state["model.embed_tokens.weight"] *= 0.15  # a flatter next-token distribution, so sampling varies
    write_bitnet_checkpoint(folder, config, state)
    write_char_tokenizer(folder, config.vocab_size)
    return folder


def tiny_llama_config(hidden: int, intermediate: int, **overrides):
    """A transformers LlamaConfig of a 2-layer GQA llama (4 heads, 2 KV heads, vocab 96), untied."""
    from transformers import LlamaConfig

    values = dict(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return LlamaConfig(**values)
