"""The plugin contract (bitserve.plugins.testing.check_format) on the built-in formats,
with expected weights computed independently (transformers' unpacker / WeightQuant)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers.integrations.bitnet import WeightQuant, unpack_weights

from bitserve.plugins.base import LinearSpec
from bitserve.plugins.bitnet import BitNetFormat, TernaryLinear
from bitserve.plugins.testing import check_format
from tiny_checkpoints import bitnet_config, random_bitnet_state, write_bitnet_checkpoint, write_llama_checkpoint


def _groups(layer, hidden, q, kv, inter):
    p = f"model.layers.{layer}"
    return [
        [LinearSpec(f"{p}.self_attn.q_proj", q, hidden), LinearSpec(f"{p}.self_attn.k_proj", kv, hidden),
         LinearSpec(f"{p}.self_attn.v_proj", kv, hidden)],
        [LinearSpec(f"{p}.self_attn.o_proj", hidden, q)],
        [LinearSpec(f"{p}.mlp.gate_proj", inter, hidden), LinearSpec(f"{p}.mlp.up_proj", inter, hidden)],
        [LinearSpec(f"{p}.mlp.down_proj", hidden, inter)],
    ]


# bitnet_config(): hidden 64, 4 heads / 2 kv heads (head_dim 16), intermediate 160
BITNET_GROUPS = _groups(0, 64, 64, 32, 160) + _groups(1, 64, 64, 32, 160)


def _prefixes(groups):
    return [s.prefix for g in groups for s in g]


@pytest.fixture(scope="module")
def bitnet_state():
    config = bitnet_config()
    return config, random_bitnet_state(config, seed=21)


def _offline_expected(folder, groups, divide):
    """T from transformers' unpacker, times (autobitlinear) or over (bitlinear) weight_scale."""
    tensors = load_file(str(folder / "model.safetensors"))
    out = {}
    for prefix in _prefixes(groups):
        t = unpack_weights(tensors[f"{prefix}.weight"], torch.float64)
        ws = tensors[f"{prefix}.weight_scale"].double()
        out[prefix] = t / ws if divide else t * ws
    return out


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_bitnet_offline(tmp_path, bitnet_state, linear_class):
    config, state = bitnet_state
    folder = write_bitnet_checkpoint(tmp_path / "ckpt", config, state, linear_class=linear_class)
    expected = _offline_expected(folder, BITNET_GROUPS, divide=linear_class == "bitlinear")
    report = check_format("bitnet", folder, BITNET_GROUPS, expected_weights=expected, max_bits_per_weight=2.5)
    assert len(report["bits_per_weight"]) == len(BITNET_GROUPS)
    # ternary in the kernel layout plus a float32 scale per output: 2 + 32/K bits per weight
    assert all(b <= 2.0 + 32 / 64 + 1e-9 for b in report["bits_per_weight"])


def test_bitnet_online(tmp_path, bitnet_state):
    config, state = bitnet_state
    folder = write_bitnet_checkpoint(tmp_path / "ckpt", config, state, linear_class="autobitlinear", mode="online")
    # transformers' own online weight quantizer is the oracle: T * mean|W| per tensor
    expected = {p: WeightQuant.apply(state[f"{p}.weight"].float()).double() for p in _prefixes(BITNET_GROUPS)}
    check_format("bitnet", folder, BITNET_GROUPS, expected_weights=expected, max_bits_per_weight=2.5)


def test_dense_llama(tmp_path):
    folder = write_llama_checkpoint(tmp_path / "llama")
    # LlamaConfig in tiny_checkpoints: hidden 64, 4 heads / 2 kv heads, intermediate 112
    groups = _groups(0, 64, 64, 32, 112) + _groups(1, 64, 64, 32, 112)
    tensors = load_file(str(folder / "model.safetensors"))
    expected = {p: tensors[f"{p}.weight"] for p in _prefixes(groups)}
    report = check_format("dense", folder, groups, expected_weights=expected, rtol=1e-5, atol=1e-5,
                          max_bits_per_weight=32.0)  # fp32 checkpoint
    assert all(b == 32.0 for b in report["bits_per_weight"])


# -- the contract must catch broken plugins ---------------------------------------------------
class WrongScaleBitNet(BitNetFormat):
    """Loads correctly, then reports a scale 1% too large (dequantize and forward agree)."""

    def load_linear(self, reader, specs, *, device, dtype):
        layer = super().load_linear(reader, specs, device=device, dtype=dtype)
        layer.scale.mul_(1.01)
        return layer


class _NoActQuantLinear(TernaryLinear):
    def forward(self, x):  # skips the int8 activation quantization it declares
        return (x.float() @ self.dequantize().t()).to(x.dtype)


class NoActQuantBitNet(BitNetFormat):
    def load_linear(self, reader, specs, *, device, dtype):
        layer = super().load_linear(reader, specs, device=device, dtype=dtype)
        return _NoActQuantLinear(layer.packed, layer.scale)


class SwappedFusionBitNet(BitNetFormat):
    """Fuses the parts in the wrong order."""

    def load_linear(self, reader, specs, *, device, dtype):
        return super().load_linear(reader, list(reversed(specs)), device=device, dtype=dtype)


@pytest.fixture(scope="module")
def offline_folder(tmp_path_factory, bitnet_state):
    config, state = bitnet_state
    return write_bitnet_checkpoint(tmp_path_factory.mktemp("offline") / "ckpt", config, state)


def test_broken_scale_is_caught(offline_folder):
    import json

    config = json.loads((offline_folder / "config.json").read_text())
    groups = BITNET_GROUPS[:2]
    expected = _offline_expected(offline_folder, groups, divide=False)
    check_format(BitNetFormat(config), offline_folder, groups, expected_weights=expected)  # the real one passes
    with pytest.raises(AssertionError, match="dequantized weight differs"):
        check_format(WrongScaleBitNet(config), offline_folder, groups, expected_weights=expected)


def test_broken_forward_is_caught(offline_folder):
    import json

    config = json.loads((offline_folder / "config.json").read_text())
    with pytest.raises(AssertionError, match="max error"):
        check_format(NoActQuantBitNet(config), offline_folder, BITNET_GROUPS[1:2])


def test_broken_fusion_is_caught(offline_folder):
    import json

    config = json.loads((offline_folder / "config.json").read_text())
    with pytest.raises(AssertionError, match="fused layer differs from its parts"):
        check_format(SwappedFusionBitNet(config), offline_folder, BITNET_GROUPS[2:3])


def test_wrong_format_is_caught(offline_folder):
    groups = BITNET_GROUPS[:1]
    with pytest.raises(AssertionError, match="detected as 'bitnet'"):
        check_format("dense", offline_folder, groups)
