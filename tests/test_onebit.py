"""The ``onebit`` format (FORMATS.md §3): packed signs, input_factor g, weight_scale h, and the
non-affine LayerNorm after every projection.

Checkpoints are built here in OneBit's published layout (``BitLlamaForCausalLMInf`` state dict,
``model_type: bitllama``), packed with OneBit's rule restated from FORMATS.md §3.2, saved as
safetensors and as torch.save'd ``pytorch_model.bin`` (single and sharded). The oracle is the
float64 llama of ``llama_reference.py`` on ``W_hat = S * h g^T`` with a LayerNorm after each
projection.
"""

import json

import pytest
import torch

from binary_checkpoints import (SAVES, assert_load_error, llama_config, projection_shapes, random_dense_parts,
                                save_checkpoint)
from bitserve import LLM, SamplingParams
from bitserve.loader import load_model
from bitserve.model.layers import OutputLayerNorm
from bitserve.model.prefill import prefill_logits
from bitserve.model_config import ModelConfig
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader
from bitserve.plugins.onebit import load_onebit_linear
from bitserve.plugins.registry import FormatRegistry
from bitserve.plugins.testing import check_format
from llama_reference import reference_greedy, reference_logits
from tiny_checkpoints import write_char_tokenizer, write_llama_checkpoint

IDS = [1, 7, 33, 2, 60, 17, 5, 88, 41]
# float32 (bitserve) vs float64 (reference): the largest logit difference allowed, relative to max |logit|
LOGIT_RTOL = 1e-5  # measured: ~6e-7


def pack_onebit(signs: torch.Tensor) -> torch.Tensor:
    """+-1 ``[N, K]`` -> int8 ``[N, K/8]`` as OneBit's converter packs: bit = (1 - s) / 2,
    byte j = sum_b bit[8j + b] * 2^b, stored as signed int8 (bytes >= 128 wrap negative)."""
    n, k = signs.shape
    bits = ((1 - signs.to(torch.int64)) // 2).reshape(n, k // 8, 8)
    return (bits * (2 ** torch.arange(8))).sum(-1).to(torch.uint8).view(torch.int8)


def onebit_config(**overrides) -> dict:
    return llama_config(model_type="bitllama", architectures=["BitLlamaForCausalLMInf"], **overrides)


def random_onebit(config: dict, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors as OneBit stores them, dense float64 weights of the reference: W_hat = S * h g^T)."""
    gen = torch.Generator().manual_seed(seed)
    stored = random_dense_parts(config, gen)
    dense = {name: t.double() for name, t in stored.items()}
    for prefix, (n, k) in projection_shapes(config).items():
        signs = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1, 1)
        g = torch.rand(k, generator=gen) + 0.5  # the rank-1 factors of |W| are positive
        h = 0.1 * (torch.rand(n, generator=gen) + 0.5)
        stored[f"{prefix}.weight"] = pack_onebit(signs)
        stored[f"{prefix}.input_factor"] = g
        stored[f"{prefix}.weight_scale"] = h
        dense[f"{prefix}.weight"] = signs.double() * torch.outer(h.double(), g.double())
    return stored, dense


@pytest.fixture(scope="module")
def tiny():
    config = onebit_config()
    stored, dense = random_onebit(config, seed=5)
    return config, stored, dense


def write_single_projection(folder, tensors):
    """A folder holding only the tensors of one projection (for layer-level tests)."""
    return save_checkpoint(folder, onebit_config(), tensors)


# -- FORMATS.md §3.4 worked examples ---------------------------------------------------------------------
def test_worked_example_byte(tmp_path):
    row = torch.tensor([[1, -1, -1, 1, 1, 1, -1, 1]])
    stored = pack_onebit(row)
    assert stored.tolist() == [[0x46]]  # bits 0,1,1,0,0,0,1,0 -> 70
    p = "model.layers.0.mlp.up_proj"
    folder = write_single_projection(tmp_path, {f"{p}.weight": stored, f"{p}.input_factor": torch.ones(8),
                                                f"{p}.weight_scale": torch.ones(1)})
    layer = load_onebit_linear(CheckpointReader(folder), LinearSpec(p, 1, 8), torch.device("cpu"))
    assert layer.dequantize().tolist() == row.float().tolist()


def test_byte_with_high_bit_is_read_as_unsigned(tmp_path):
    # column 7 negative -> bit 7 set -> byte 0x80, which int8 storage holds as -128
    row = torch.tensor([[1, 1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1, 1, 1, -1]])
    stored = pack_onebit(row)
    assert stored.tolist() == [[-128, -127]]
    p = "model.layers.0.mlp.up_proj"
    folder = write_single_projection(tmp_path, {f"{p}.weight": stored, f"{p}.input_factor": torch.ones(16),
                                                f"{p}.weight_scale": torch.ones(1)})
    layer = load_onebit_linear(CheckpointReader(folder), LinearSpec(p, 1, 16), torch.device("cpu"))
    assert layer.dequantize().tolist() == row.float().tolist()


def test_worked_example_forward_then_layernorm(tmp_path):
    # S = [[1, -1], [-1, -1]], g = [0.5, 2], h = [1, 3], x = [1, 1] -> pre-norm [-1.5, -7.5], then LayerNorm.
    # K is padded to 8 with g = 0, so the extra columns contribute nothing.
    signs = torch.tensor([[1, -1, 1, 1, 1, 1, 1, 1], [-1, -1, 1, 1, 1, 1, 1, 1]])
    p = "model.layers.0.self_attn.o_proj"
    folder = write_single_projection(tmp_path, {
        f"{p}.weight": pack_onebit(signs), f"{p}.input_factor": torch.tensor([0.5, 2, 0, 0, 0, 0, 0, 0]),
        f"{p}.weight_scale": torch.tensor([1.0, 3.0])})
    layer = load_onebit_linear(CheckpointReader(folder), LinearSpec(p, 2, 8), torch.device("cpu"))
    pre = layer(torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]]))
    assert pre.tolist() == [[-1.5, -7.5]]
    # LayerNorm over the two outputs: mean -4.5, biased variance 9, eps 1e-5 (computed in float32)
    expected = torch.tensor([[3.0, -3.0]], dtype=torch.float64) / (9.0 + 1e-5) ** 0.5
    torch.testing.assert_close(OutputLayerNorm(1e-5)(pre).double(), expected, rtol=0, atol=1e-6)


# -- the plugin contract -----------------------------------------------------------------------------------
@pytest.mark.parametrize("save", SAVES)
def test_check_format(tmp_path, tiny, save):
    config, stored, dense = tiny
    folder = save_checkpoint(tmp_path / save, config, stored, save)
    shapes = projection_shapes(config)

    def spec(name):
        return LinearSpec(name, *shapes[name])

    p0, p1 = "model.layers.0.self_attn", "model.layers.1.mlp"
    groups = [[spec(f"{p0}.q_proj"), spec(f"{p0}.k_proj"), spec(f"{p0}.v_proj")], [spec(f"{p0}.o_proj")],
              [spec(f"{p1}.gate_proj"), spec(f"{p1}.up_proj")], [spec(f"{p1}.down_proj")]]
    expected = {name[: -len(".weight")]: w for name, w in dense.items() if name.endswith("_proj.weight")}
    report = check_format("onebit", folder, groups, expected_weights=expected, max_bits_per_weight=2.5)
    # 1 bit per weight + float32 g and h: 1 + 32/N + 32/K
    assert report["bits_per_weight"][1] == pytest.approx(1 + 32 / 64 + 32 / 64)


def test_training_checkpoint_latent_weights(tmp_path):
    # BitLlamaForCausalLM (training) stores the latent float weight; only its sign counts, 0 -> +1
    latent = torch.tensor([[0.3, -0.01, 0.0, 2.0, -5.0, 0.1, -0.2, 0.4]])
    p = "model.layers.0.mlp.down_proj"
    folder = write_single_projection(tmp_path, {f"{p}.weight": latent, f"{p}.input_factor": torch.full((8,), 2.0),
                                                f"{p}.weight_scale": torch.tensor([0.5])})
    layer = load_onebit_linear(CheckpointReader(folder), LinearSpec(p, 1, 8), torch.device("cpu"))
    assert layer.dequantize().tolist() == [[1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0]]


def test_in_features_not_multiple_of_8(tmp_path):
    p = "model.layers.0.mlp.up_proj"
    folder = write_single_projection(tmp_path, {f"{p}.weight": torch.ones(2, 12), f"{p}.input_factor": torch.ones(12),
                                                f"{p}.weight_scale": torch.ones(2)})
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{p}.weight': in_features=12 is not a "
                                              "multiple of 8"):
        load_onebit_linear(CheckpointReader(folder), LinearSpec(p, 2, 12), torch.device("cpu"))


# -- detection -----------------------------------------------------------------------------------------------
def _detected(folder):
    reader = CheckpointReader(folder)
    config = json.loads((folder / "config.json").read_text())
    return FormatRegistry().detect(config, reader.names(), reader).name


def test_detection(tmp_path, tiny):
    config, stored, _ = tiny
    assert _detected(save_checkpoint(tmp_path / "bitllama", config, stored)) == "onebit"
    # a llama-typed config with OneBit's tensors is still OneBit (by input_factor + weight_scale)
    as_llama = llama_config()
    assert _detected(save_checkpoint(tmp_path / "llama", as_llama, stored, "bin")) == "onebit"
    assert ModelConfig.from_hf(as_llama).proj_out_layernorm is False
    loaded = load_model(tmp_path / "llama", device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "onebit" and loaded.config.proj_out_layernorm  # forced by the plugin
    # a dense llama is not OneBit
    assert _detected(write_llama_checkpoint(tmp_path / "dense", seed=1)) != "onebit"


def test_override_by_name(tmp_path, tiny):
    config, stored, _ = tiny
    folder = save_checkpoint(tmp_path / "ckpt", config, stored)
    loaded = load_model(folder, format="onebit", device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "onebit"
    assert "onebit" in FormatRegistry().names()


def test_layernorm_flag_defaults_off():
    assert ModelConfig.from_hf(llama_config()).proj_out_layernorm is False
    cfg = ModelConfig.from_hf(onebit_config())
    assert cfg.proj_out_layernorm is True and cfg.proj_out_layernorm_eps == 1e-5


# -- errors name the file and the tensor ---------------------------------------------------------------------
P = "model.layers.1.self_attn.k_proj"  # N = 32, K = 64


@pytest.mark.parametrize("name, value, message", [
    (f"{P}.weight", torch.zeros(32, 8, dtype=torch.int32), "has dtype I32 and shape [32, 8], expected packed signs"
                                                           " (I8 [32, 8]) or a latent float weight ([32, 64])"),
    (f"{P}.weight", torch.zeros(32, 16, dtype=torch.int8), "has dtype I8 and shape [32, 16], expected packed"),
    (f"{P}.weight", torch.zeros(32, 8, dtype=torch.float16), "has dtype F16 and shape [32, 8], expected packed"),
    (f"{P}.input_factor", torch.ones(32), "has shape [32], expected [64]"),
    (f"{P}.weight_scale", torch.ones(32, dtype=torch.int8), "has dtype I8"),
    (f"{P}.weight_scale", torch.tensor([float("nan")] + [1.0] * 31), "contains NaN or Inf"),
    (f"{P}.bias", torch.zeros(32), "after its LayerNorm"),
])
@pytest.mark.parametrize("save", ["safetensors", "bin"])
def test_bad_tensors(tmp_path, tiny, name, value, message, save):
    config, stored, _ = tiny
    assert_load_error(tmp_path / "bad", config, {**stored, name: value}, save, name, message)


def test_missing_tensor(tmp_path, tiny):
    config, stored, _ = tiny
    folder = save_checkpoint(tmp_path / "bad", config, {n: t for n, t in stored.items()
                                                         if n != f"{P}.input_factor"})
    with pytest.raises(CheckpointError, match=f"'{P}.input_factor' is missing"):
        load_model(folder, device="cpu", dtype="float32", progress=False)


# -- end to end: logits against the float64 reference --------------------------------------------------------
@pytest.mark.parametrize("save", SAVES)
def test_logits_match_reference(tmp_path, tiny, save):
    config, stored, dense = tiny
    folder = save_checkpoint(tmp_path / save, config, stored, save)
    loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "onebit" and loaded.config.proj_out_layernorm
    ref = reference_logits(config, dense, IDS, proj_layernorm=True)
    got = prefill_logits(loaded.model, IDS).double()
    assert (got - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()
    # the LayerNorm matters: without it the same weights give other logits
    plain = reference_logits(config, dense, IDS, proj_layernorm=False)
    assert (got - plain).abs().max() > 100 * LOGIT_RTOL * ref.abs().max()


def test_llm_api(tmp_path, tiny):
    config, stored, dense = tiny
    folder = save_checkpoint(tmp_path / "ckpt", config, stored, "bin")
    write_char_tokenizer(folder, config["vocab_size"])
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=64)
    assert llm.loaded.plugin.name == "onebit"
    ref = reference_logits(config, dense, IDS, proj_layernorm=True)
    assert (llm.logits(IDS).double() - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()
    out = llm.generate([IDS], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(config, dense, IDS, 6, proj_layernorm=True)
