"""The ``fbi`` format (FORMATS.md §4): a plain llama config, latent float weights, per-input-column
``wscale`` (alpha) / ``wbias`` (beta), signs packed at load, ``lm_head`` dense.

Checkpoints are built here as FBI-LLM saves them: the state dict of a llama whose projections
hold ``weight``, ``wscale [1, K]`` and ``wbias [1, K]`` (``lm_head`` untouched), written by
``save_pretrained(safe_serialization=False)`` (torch.save'd ``pytorch_model.bin``, here also with
the ``rotary_emb.inv_freq`` buffers older transformers saved) or as safetensors. The oracle is
the float64 llama of ``llama_reference.py`` on ``W_hat = alpha_k * sign(W) + beta_k``.
"""

import json
import logging

import pytest
import torch

from binary_checkpoints import (SAVES, assert_load_error, llama_config, projection_shapes, random_dense_parts,
                                save_checkpoint)
from bitserve import LLM, SamplingParams
from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader
from bitserve.plugins.fbi import load_fbi_linear
from bitserve.plugins.registry import FormatRegistry
from bitserve.plugins.testing import check_format
from llama_reference import reference_greedy, reference_logits
from tiny_checkpoints import write_char_tokenizer, write_llama_checkpoint

IDS = [1, 7, 33, 2, 60, 17, 5, 88, 41]
LOGIT_RTOL = 1e-5  # float32 (bitserve) vs float64 (reference), relative to max |logit|
CPU = torch.device("cpu")


def fbi_config(**overrides) -> dict:
    """FBI-LLM_configs/*.json style: a plain llama config (fp16 as the released configs say)."""
    return llama_config(torch_dtype="float16", **overrides)


def random_fbi(config: dict, seed: int, latent_dtype=torch.float32):
    """(tensors as FBI-LLM stores them, dense float64 weights of the reference)."""
    gen = torch.Generator().manual_seed(seed)
    stored = random_dense_parts(config, gen)
    dense = {name: t.double() for name, t in stored.items()}
    for prefix, (n, k) in projection_shapes(config).items():
        latent = torch.randn(n, k, generator=gen).to(latent_dtype)
        alpha = 0.02 + 0.04 * torch.rand(1, k, generator=gen)
        beta = 0.01 * torch.randn(1, k, generator=gen)
        stored.update({f"{prefix}.weight": latent, f"{prefix}.wscale": alpha, f"{prefix}.wbias": beta})
        dense[f"{prefix}.weight"] = alpha.double() * torch.sign(latent.double()) + beta.double()
    return stored, dense


def as_saved(config: dict, tensors: dict, save: str) -> dict:
    """In ``.bin`` saves, add the ``rotary_emb.inv_freq`` buffers older transformers wrote into
    ``pytorch_model.bin`` (FBI-LLM's eval.py skips them); they share one storage, as in a real save."""
    if save == "safetensors":
        return tensors
    d = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d)
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(config["num_hidden_layers"])}
    return {**tensors, **extra}


@pytest.fixture(scope="module")
def tiny():
    config = fbi_config()
    stored, dense = random_fbi(config, seed=8)
    return config, stored, dense


def single_projection(tmp_path, tensors):
    return CheckpointReader(save_checkpoint(tmp_path, fbi_config(), tensors))


# -- FORMATS.md §4.2 worked example ------------------------------------------------------------------------
def test_worked_example(tmp_path):
    # W = [[0.3,-0.2,0.5],[-0.1,0.4,-0.6]], alpha = [0.2,0.3,0.5], beta = [0.01,-0.02,0], x = [1,2,-1]
    # -> W_hat = [[0.21,-0.32,0.5],[-0.19,0.28,-0.5]], y = [-0.93, 0.87]; K padded to 8 with alpha = beta = 0
    p = "model.layers.0.mlp.gate_proj"
    latent = torch.tensor([[0.3, -0.2, 0.5, 1, 1, 1, 1, 1], [-0.1, 0.4, -0.6, 1, 1, 1, 1, 1]])
    reader = single_projection(tmp_path, {
        f"{p}.weight": latent, f"{p}.wscale": torch.tensor([[0.2, 0.3, 0.5, 0, 0, 0, 0, 0]]),
        f"{p}.wbias": torch.tensor([[0.01, -0.02, 0, 0, 0, 0, 0, 0]])})
    layer = load_fbi_linear(reader, LinearSpec(p, 2, 8), CPU, torch.float32)
    torch.testing.assert_close(layer.dequantize()[:, :3], torch.tensor([[0.21, -0.32, 0.5], [-0.19, 0.28, -0.5]]))
    y = layer(torch.tensor([[1.0, 2, -1, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(y, torch.tensor([[-0.93, 0.87]]), rtol=0, atol=1e-6)


def test_zero_latent_weight_is_plus_one_with_warning(tmp_path, caplog):
    p = "model.layers.0.mlp.up_proj"
    latent = torch.tensor([[0.0, -1, 1, 1, 1, 1, 1, 0.0]])
    reader = single_projection(tmp_path, {f"{p}.weight": latent, f"{p}.wscale": torch.ones(1, 8),
                                          f"{p}.wbias": torch.zeros(1, 8)})
    with caplog.at_level(logging.WARNING, logger="bitserve.plugins.fbi"):
        layer = load_fbi_linear(reader, LinearSpec(p, 1, 8), CPU, torch.float32)
    assert layer.dequantize().tolist() == [[1.0, -1, 1, 1, 1, 1, 1, 1]]
    assert f"'{p}.weight' has 2 exactly-zero latent weight(s)" in caplog.text


def test_single_scaling_pattern(tmp_path):
    p = "model.layers.0.mlp.up_proj"
    latent = torch.tensor([[0.5, -1, 1, -2, 1, 1, 1, -3]])
    reader = single_projection(tmp_path, {f"{p}.weight": latent, f"{p}.wscale": torch.tensor([0.25]),
                                          f"{p}.wbias": torch.tensor([0.5])})
    layer = load_fbi_linear(reader, LinearSpec(p, 1, 8), CPU, torch.float32)
    assert layer.dequantize().tolist() == [[0.75, 0.25, 0.75, 0.25, 0.75, 0.75, 0.75, 0.25]]


def test_in_features_not_multiple_of_8(tmp_path):
    p = "model.layers.0.mlp.up_proj"
    reader = single_projection(tmp_path, {f"{p}.weight": torch.ones(2, 12), f"{p}.wscale": torch.ones(1, 12),
                                          f"{p}.wbias": torch.zeros(1, 12)})
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{p}.weight': in_features=12 is not a "
                                              "multiple of 8"):
        load_fbi_linear(reader, LinearSpec(p, 2, 12), CPU, torch.float32)


# -- the plugin contract -----------------------------------------------------------------------------------
@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.bfloat16])
def test_check_format(tmp_path, save, latent_dtype):
    config = fbi_config()
    stored, dense = random_fbi(config, seed=2, latent_dtype=latent_dtype)
    folder = save_checkpoint(tmp_path / save, config, as_saved(config, stored, save), save)
    shapes = projection_shapes(config)

    def spec(name):
        return LinearSpec(name, *shapes[name])

    p0, p1 = "model.layers.1.self_attn", "model.layers.0.mlp"
    groups = [[spec(f"{p0}.q_proj"), spec(f"{p0}.k_proj"), spec(f"{p0}.v_proj")], [spec(f"{p0}.o_proj")],
              [spec(f"{p1}.gate_proj"), spec(f"{p1}.up_proj")], [spec(f"{p1}.down_proj")]]
    expected = {name[: -len(".weight")]: w for name, w in dense.items() if name.endswith("_proj.weight")}
    report = check_format("fbi", folder, groups, expected_weights=expected, max_bits_per_weight=3.0)
    # 1 bit per weight + float32 alpha and beta per input column: 1 + 64/N
    assert report["bits_per_weight"][1] == pytest.approx(1 + 64 / 64)


# -- detection -----------------------------------------------------------------------------------------------
def _detected(folder):
    reader = CheckpointReader(folder)
    config = json.loads((folder / "config.json").read_text())
    return FormatRegistry().detect(config, reader.names(), reader).name


@pytest.mark.parametrize("save", ["safetensors", "bin"])
def test_detection(tmp_path, tiny, save):
    config, stored, _ = tiny
    assert _detected(save_checkpoint(tmp_path / "fbi", config, stored, save)) == "fbi"
    assert _detected(write_llama_checkpoint(tmp_path / "dense", seed=1)) not in ("fbi", "onebit")


def test_override_by_name(tmp_path, tiny):
    config, stored, _ = tiny
    folder = save_checkpoint(tmp_path / "ckpt", config, stored)
    loaded = load_model(folder, format="fbi", device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "fbi"


# -- errors name the file and the tensor ---------------------------------------------------------------------
P = "model.layers.1.mlp.down_proj"  # N = 64, K = 96


@pytest.mark.parametrize("name, value, message", [
    (f"{P}.weight", torch.zeros(64, 96, dtype=torch.int8), "has dtype I8, expected one of ['BF16', 'F16', 'F32'"),
    (f"{P}.weight", torch.ones(96, 64), "has shape [96, 64], expected [64, 96]"),
    (f"{P}.weight", torch.full((64, 96), float("nan")), "contains NaN"),
    (f"{P}.wscale", torch.ones(64, 1), "'row' scaling pattern is not supported"),
    (f"{P}.wscale", torch.ones(1, 64), "has shape [1, 64], expected [1, 96]"),
    (f"{P}.wbias", torch.zeros(1, 96, dtype=torch.int32), "has dtype I32"),
    (f"{P}.wscale", torch.full((1, 96), float("inf")), "contains NaN or Inf"),
    (f"{P}.bias", torch.zeros(32), "has shape [32], expected [64]"),
])
@pytest.mark.parametrize("save", ["safetensors", "bin"])
def test_bad_tensors(tmp_path, tiny, name, value, message, save):
    config, stored, _ = tiny
    assert_load_error(tmp_path / "bad", config, {**stored, name: value}, save, name, message)


def test_missing_wbias(tmp_path, tiny):
    config, stored, _ = tiny
    folder = save_checkpoint(tmp_path / "bad", config, {n: t for n, t in stored.items() if n != f"{P}.wbias"})
    with pytest.raises(CheckpointError, match=f"'{P}.wbias' is missing"):
        load_model(folder, format="fbi", device="cpu", dtype="float32", progress=False)


# -- end to end: logits against the float64 reference --------------------------------------------------------
@pytest.mark.parametrize("save", SAVES)
def test_logits_match_reference(tmp_path, tiny, save):
    config, stored, dense = tiny
    folder = save_checkpoint(tmp_path / save, config, as_saved(config, stored, save), save)
    loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "fbi" and not loaded.config.proj_out_layernorm
    # lm_head stays dense: the stored float weight, untouched
    assert torch.equal(loaded.model.lm_head.weight, stored["lm_head.weight"])
    ref = reference_logits(config, dense, IDS)
    got = prefill_logits(loaded.model, IDS).double()
    assert (got - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()


def test_llm_api(tmp_path, tiny):
    config, stored, dense = tiny
    folder = save_checkpoint(tmp_path / "ckpt", config, stored, "bin")
    write_char_tokenizer(folder, config["vocab_size"])
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=64)
    assert llm.loaded.plugin.name == "fbi"
    ref = reference_logits(config, dense, IDS)
    assert (llm.logits(IDS).double() - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()
    out = llm.generate([IDS], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(config, dense, IDS, 6)
