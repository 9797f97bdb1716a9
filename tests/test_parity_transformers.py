"""bitserve vs transformers (the independent oracle) on tiny random models."""

import pytest
import torch

from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from tiny_checkpoints import (
    bitnet_config, load_oracle, random_bitnet_state, write_bitnet_checkpoint, write_llama_checkpoint,
)

SHAPES = {
    "gqa": dict(),
    "mha-nonsquare": dict(hidden_size=48, intermediate_size=200, num_attention_heads=3, num_key_value_heads=3),
    "gqa4-untied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                        tie_word_embeddings=False, num_hidden_layers=3),
}


def _oracle_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _oracle_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _ours_greedy(loaded, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(prefill_logits(loaded.model, seq)[-1].argmax()))
    return seq[len(ids):]


def _check(folder, *, atol, seed=0):
    ours = load_model(folder, dtype="float32", device="cpu")
    oracle = load_oracle(folder)
    gen = torch.Generator().manual_seed(seed)
    vocab = ours.config.vocab_size
    for length in (1, 7, 33):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        ref = _oracle_logits(oracle, ids)
        got = prefill_logits(ours.model, ids)
        assert got.shape == ref.shape
        err = (got - ref).abs().max().item()
        assert err <= atol * ref.abs().max().item(), f"len {length}: max |logit diff| {err:.3g}"
    ids = torch.randint(3, vocab, (5,), generator=gen).tolist()
    assert _ours_greedy(ours, ids, 32) == _oracle_greedy(oracle, ids, 32)
    return ours


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_bitnet_offline_matches_transformers(tmp_path, shape, linear_class):
    config = bitnet_config(**SHAPES[shape])
    state = random_bitnet_state(config, seed=len(shape))
    folder = write_bitnet_checkpoint(tmp_path / "ckpt", config, state, linear_class=linear_class)
    ours = _check(folder, atol=1e-4)
    assert ours.plugin.name == "bitnet"


@pytest.mark.parametrize("shape", ["gqa", "mha-nonsquare"])
def test_bitnet_online_matches_transformers(tmp_path, shape):
    config = bitnet_config(**SHAPES[shape])
    state = random_bitnet_state(config, seed=3)
    folder = write_bitnet_checkpoint(tmp_path / "ckpt", config, state, linear_class="autobitlinear", mode="online")
    ours = _check(folder, atol=1e-4)
    # online weights are ternarized at load: nothing dense is kept for the projections
    packed = [m for n, m in ours.model.named_modules() if n.endswith("qkv_proj")]
    assert all(getattr(m, "packed", None) is not None and m.packed.dtype == torch.uint8 for m in packed)


def test_bitnet_offline_equals_online(tmp_path):
    """The same latent weights as packed (offline) and bf16 master (online) give the same logits."""
    config = bitnet_config()
    state = random_bitnet_state(config, seed=11)
    off = load_model(write_bitnet_checkpoint(tmp_path / "off", config, state), dtype="float32")
    on = load_model(write_bitnet_checkpoint(tmp_path / "on", config, state, mode="online"), dtype="float32")
    ids = list(range(3, 40))
    torch.testing.assert_close(prefill_logits(off.model, ids), prefill_logits(on.model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, num_key_value_heads=4),
                                       dict(rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32})])
def test_dense_llama_matches_transformers(tmp_path, overrides):
    folder = write_llama_checkpoint(tmp_path / "llama", seed=5, **overrides)
    ours = _check(folder, atol=1e-5)
    assert ours.plugin.name == "dense"


def test_sharded_checkpoint_loads_identically(tmp_path):
    config = bitnet_config()
    state = random_bitnet_state(config, seed=2)
    one = load_model(write_bitnet_checkpoint(tmp_path / "one", config, state), dtype="float32")
    three = load_model(write_bitnet_checkpoint(tmp_path / "three", config, state, shards=3), dtype="float32")
    ids = list(range(3, 20))
    torch.testing.assert_close(prefill_logits(one.model, ids), prefill_logits(three.model, ids), rtol=0, atol=0)
