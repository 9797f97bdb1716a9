"""``bitserve convert`` / ``bitserve.converters`` and ``bitserve.inspect_model``.

A dense tiny llama goes to every target; each output is decoded here from FORMATS.md's byte rules
(or by transformers' own unpacker) and compared with a float64 reference of the target's math;
bitnet and dual_binary outputs load through ``load_model`` with the right plugin (onebit / fbi too
when their plugins are installed); bitnet -> dual_binary is exact.
"""

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitserve.convert_math import (
    _assign,
    fbi_column_binarize,
    flexible_dual_binarize,
    svid_rank1,
)
from bitserve.converters import add_convert_arguments, convert_checkpoint, run_convert
from bitserve.inspect_model import inspect_checkpoint, render_inspection
from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.base import QuantLinear
from bitserve.plugins.checkpoint import CheckpointError
from bitserve.plugins.dual_binary import DualBinaryLinearA8
from bitserve.plugins.lowbit_layers import DualBinaryLinear
from bitserve.plugins.testing import check_format
from test_dual_binary import decode, groups
from tiny_checkpoints import (
    bitnet_config,
    random_bitnet_state,
    write_bitnet_checkpoint,
    write_char_tokenizer,
    write_llama_checkpoint,
)

IDS = [1, 8, 33, 2, 60, 17, 5]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense fp32 llama (hidden 64, intermediate 128, 2 layers) with a tokenizer."""
    folder = write_llama_checkpoint(tmp_path_factory.mktemp("src") / "llama", seed=3, intermediate_size=128)
    write_char_tokenizer(folder, 96)
    return folder


@pytest.fixture(scope="module")
def dense_tensors(dense):
    return load_file(str(dense / "model.safetensors"))


def projections(tensors):
    return sorted(n[: -len(".weight")] for n in tensors if n.endswith("_proj.weight"))


def linears(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def has_plugin(name):
    return importlib.util.find_spec(f"bitserve.plugins.{name}") is not None


# -- bitnet ------------------------------------------------------------------------------------------
def test_to_bitnet(tmp_path, dense, dense_tensors):
    from transformers.integrations.bitnet import WeightQuant, unpack_weights

    report = convert_checkpoint(dense, tmp_path / "bn", "bitnet", progress=False)
    out = load_file(str(tmp_path / "bn" / "model.safetensors"))
    cfg = json.loads((tmp_path / "bn" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "offline"}
    assert report.source_format == "dense" and report.num_linears == 14
    for p in projections(dense_tensors):
        w = dense_tensors[f"{p}.weight"]
        n, k = w.shape
        assert out[f"{p}.weight"].dtype == torch.uint8 and out[f"{p}.weight"].shape == (n // 4, k)
        scale = out[f"{p}.weight_scale"]
        assert scale.dtype == torch.bfloat16 and scale.shape == (1,)
        gamma = w.abs().mean()
        assert scale.float().item() == gamma.to(torch.bfloat16).float().item()
        # transformers' unpacker and online quantizer are the oracle
        t = unpack_weights(out[f"{p}.weight"], torch.float32)
        assert torch.equal(t, (WeightQuant.apply(w) / gamma).round())
    loaded = load_model(tmp_path / "bn", device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "bitnet"
    # side files (tokenizer, generation config) travel with the weights
    assert (tmp_path / "bn" / "tokenizer.json").exists() and (tmp_path / "bn" / "generation_config.json").exists()


# -- dual_binary ---------------------------------------------------------------------------------
def test_to_dual_binary(tmp_path, dense, dense_tensors):
    report = convert_checkpoint(dense, tmp_path / "db", "dual_binary", progress=False, group_size=32)
    ternary = convert_checkpoint(dense, tmp_path / "bn", "bitnet", progress=False)
    out = load_file(str(tmp_path / "db" / "model.safetensors"))
    cfg = json.loads((tmp_path / "db" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "dual_binary", "format_version": 1, "group_size": 32}
    loaded = load_model(tmp_path / "db", device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "dual_binary"
    assert all(type(m) is DualBinaryLinear for m in linears(loaded.model))
    expected = {p: decode(out[f"{p}.b1"], out[f"{p}.b2"], out[f"{p}.alpha1"].float(), out[f"{p}.alpha2"].float(), 32)
                for p in projections(dense_tensors)}
    check_format("dual_binary", tmp_path / "db", groups(0, inter=128) + groups(1, inter=128),
                 expected_weights=expected, max_bits_per_weight=4.0)
    for p in projections(dense_tensors):
        w = dense_tensors[f"{p}.weight"].double()
        a1, a2 = out[f"{p}.alpha1"], out[f"{p}.alpha2"]
        assert a1.dtype == torch.float16 and a1.shape == (w.shape[0], w.shape[1] // 32)
        w_hat = decode(out[f"{p}.b1"], out[f"{p}.b2"], a1.float(), a2.float(), 32)
        err = float((w - w_hat).norm() / w.norm())
        assert err == pytest.approx(report.errors[p], rel=1e-6)
        # flexible dual binarization beats absmean ternary clearly (4 levels, group scales)
        gamma = w.abs().mean()
        tern = float((w - (w / gamma).round().clamp(-1, 1) * gamma).norm() / w.norm())
        assert err < 0.75 * tern and err < 0.75 * ternary.errors[p]
        # every weight sits on the level of its group nearest to it: {0, a1, a2, a1 + a2}
        g = w.reshape(w.shape[0], -1, 32)
        lv = torch.stack([torch.zeros_like(a1.double()), a1.double(), a2.double(), (a1.float() + a2.float()).double()],
                         -1)
        best = (g.unsqueeze(-1) - lv.unsqueeze(2)).abs().amin(-1)
        chosen = (g - w_hat.reshape_as(g)).abs()
        assert (chosen <= best + 1e-6).all()


def test_fdb_iterations_only_help():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    errs = []
    for iters in (0, 2, 8):
        db = flexible_dual_binarize(w, 32, iters=iters)
        errs.append(float((w - db.dequantize()).norm()))
    assert errs[0] >= errs[1] >= errs[2]


def test_fdb_worked_thresholds():
    # FORMATS.md §5.3, s = 1 (a1 = 2s, a2 = -s): w <= -0.5 -> -1, |w| < 0.5 -> 0, 0.5..1.5 -> 1, > 1.5 -> 2
    x = torch.tensor([[[-1.7, -0.6, -0.2, 0.3, 0.7, 1.4, 1.6, 3.0]]])
    b1, b2, _ = _assign(x, torch.tensor([[2.0]]), torch.tensor([[-1.0]]))
    levels = 2.0 * b1 - 1.0 * b2
    assert levels.tolist() == [[[-1, -1, 0, 0, 1, 1, 2, 2]]]


# -- onebit --------------------------------------------------------------------------------------------
def test_svid_worked_examples():
    # |W| = [[3, 1], [1, 3]]: sigma1 = 4, u = v = [1, 1]/sqrt(2) -> h g^T = [[2, 2], [2, 2]]
    r = svid_rank1(torch.tensor([[3.0, -1.0], [1.0, -3.0]]))
    assert r.sigma == pytest.approx(4.0, rel=1e-12)
    torch.testing.assert_close(torch.outer(r.h, r.g), torch.full((2, 2), 2.0, dtype=torch.float64))
    # an exactly rank-1 |W| is recovered exactly, so sign(W) * h g^T == W
    w = torch.outer(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0, 0.25]))
    r = svid_rank1(w)
    torch.testing.assert_close(torch.sign(w).double() * torch.outer(r.h, r.g), w.double())
    assert (r.h >= 0).all() and (r.g >= 0).all()


def test_svid_matches_float64_svd():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    r = svid_rank1(w)
    u, s, vh = torch.linalg.svd(w.double().abs())
    torch.testing.assert_close(torch.outer(r.h, r.g), s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-9, atol=1e-12)


def _onebit_signs(packed: torch.Tensor) -> np.ndarray:
    """FORMATS.md §3.2 straight: column 8j + b in bit b of byte j, bit 1 <=> -1 (bytes read as uint8)."""
    raw = packed.numpy().view(np.uint8)
    n, q = raw.shape
    out = np.empty((n, 8 * q))
    for col in range(8 * q):
        out[:, col] = 1 - 2 * ((raw[:, col // 8].astype(np.int64) >> (col % 8)) & 1)
    return out


def test_to_onebit(tmp_path, dense, dense_tensors):
    report = convert_checkpoint(dense, tmp_path / "ob", "onebit", progress=False)
    out = load_file(str(tmp_path / "ob" / "model.safetensors"))
    cfg = json.loads((tmp_path / "ob" / "config.json").read_text())
    assert cfg["model_type"] == "bitllama" and cfg["architectures"] == ["BitLlamaForCausalLMInf"]
    assert "quantization_config" not in cfg
    for p in projections(dense_tensors):
        w = dense_tensors[f"{p}.weight"].double()
        n, k = w.shape
        packed, g, h = out[f"{p}.weight"], out[f"{p}.input_factor"], out[f"{p}.weight_scale"]
        assert packed.dtype == torch.int8 and packed.shape == (n, k // 8)
        assert g.dtype == h.dtype == torch.float32 and g.shape == (k,) and h.shape == (n,)
        signs = torch.from_numpy(_onebit_signs(packed))
        assert torch.equal(signs, torch.where(w < 0, -1.0, 1.0).double())
        u, s, vh = torch.linalg.svd(w.abs())
        torch.testing.assert_close(torch.outer(h.double(), g.double()), s[0] * torch.outer(u[:, 0], vh[0]).abs(),
                                   rtol=1e-5, atol=1e-7)
        approx = signs * torch.outer(h.double(), g.double())
        assert report.errors[p] == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-5)
    assert out["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" in out
    if has_plugin("onebit"):
        loaded = load_model(tmp_path / "ob", device="cpu", dtype="float32", progress=False)
        assert loaded.plugin.name == "onebit"


# -- fbi ------------------------------------------------------------------------------------------------
def test_fbi_column_math():
    w = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    latent, alpha, beta = fbi_column_binarize(w)
    assert beta.tolist() == [[2.0, 0.0]] and alpha.tolist() == [[1.0, 2.0]]
    torch.testing.assert_close(alpha * torch.sign(latent) + beta, w)  # two rows: binarization is exact
    # an exactly-zero centred weight is stored as a positive tiny number, never 0
    latent, _, _ = fbi_column_binarize(torch.tensor([[1.0, 5.0], [1.0, 7.0]]), torch.bfloat16)
    assert (latent != 0).all() and latent[0, 0] > 0


def test_to_fbi(tmp_path, dense, dense_tensors):
    report = convert_checkpoint(dense, tmp_path / "fbi", "fbi", progress=False)
    out = load_file(str(tmp_path / "fbi" / "model.safetensors"))
    cfg = json.loads((tmp_path / "fbi" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    for p in projections(dense_tensors):
        w = dense_tensors[f"{p}.weight"].double()
        k = w.shape[1]
        alpha, beta, latent = out[f"{p}.wscale"], out[f"{p}.wbias"], out[f"{p}.weight"]
        assert alpha.shape == beta.shape == (1, k) and latent.shape == w.shape
        ref_beta = w.mean(0, keepdim=True)
        ref_alpha = (w - ref_beta).abs().mean(0, keepdim=True)
        torch.testing.assert_close(beta.double(), ref_beta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(alpha.double(), ref_alpha, rtol=1e-5, atol=1e-7)
        assert (latent != 0).all()
        assert torch.equal(torch.sign(latent.double()), torch.sign(w - ref_beta))
        w_hat = ref_alpha * torch.sign(w - ref_beta) + ref_beta
        assert report.errors[p] == pytest.approx(float((w - w_hat).norm() / w.norm()), rel=1e-4)
    if has_plugin("fbi"):
        loaded = load_model(tmp_path / "fbi", device="cpu", dtype="float32", progress=False)
        assert loaded.plugin.name == "fbi"


# -- bitnet -> dual_binary is exact -------------------------------------------------------------------------
@pytest.mark.parametrize("linear_class, mode", [("autobitlinear", "offline"), ("bitlinear", "offline"),
                                                ("autobitlinear", "online")])
def test_bitnet_to_dual_binary_is_lossless(tmp_path, linear_class, mode):
    config = bitnet_config()  # model_type bitnet: ReLU^2, sub-norms; hidden 64, intermediate 160
    src = write_bitnet_checkpoint(tmp_path / "bn", config, random_bitnet_state(config, 4), linear_class=linear_class,
                                  mode=mode)
    report = convert_checkpoint(src, tmp_path / "db", "dual_binary", progress=False, group_size=32)
    assert report.source_format == "bitnet" and report.max_error == 0.0
    qc = json.loads((tmp_path / "db" / "config.json").read_text())["quantization_config"]
    assert qc["activation_quant"] == "int8_per_token"
    a = load_model(src, device="cpu", dtype="float32", progress=False)
    b = load_model(tmp_path / "db", device="cpu", dtype="float32", progress=False)
    assert b.plugin.name == "dual_binary" and b.config.hidden_act == "relu2"
    for x, y in zip(linears(a.model), linears(b.model)):
        assert isinstance(y, DualBinaryLinearA8)
        assert torch.equal(x.dequantize(), y.dequantize())
    la, lb = prefill_logits(a.model, IDS), prefill_logits(b.model, IDS)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)


# -- output files, CLI, errors ------------------------------------------------------------------------------
def test_sharded_output(tmp_path, dense):
    one = convert_checkpoint(dense, tmp_path / "one", "dual_binary", progress=False, group_size=32)
    many = convert_checkpoint(dense, tmp_path / "many", "dual_binary", progress=False, group_size=32,
                              max_shard_size="40KB")
    assert one.files == ["model.safetensors"] and len(many.files) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(many.files)
    a = load_model(tmp_path / "one", device="cpu", dtype="float32", progress=False)
    b = load_model(tmp_path / "many", device="cpu", dtype="float32", progress=False)
    for x, y in zip(linears(a.model), linears(b.model)):
        assert torch.equal(x.dequantize(), y.dequantize())


def test_cli_helpers(tmp_path, dense, capsys):
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = parser.parse_args([str(dense), str(tmp_path / "out"), "--to", "dual_binary", "--group-size", "64",
                              "--fdb-iters", "2", "--no-progress"])
    assert run_convert(args) == 0
    assert "dual_binary" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["group_size"] == 64
    args = parser.parse_args([str(dense), str(tmp_path / "out"), "--to", "bitnet", "--no-progress"])
    assert run_convert(args) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(dense), str(tmp_path / "x"), "--to", "gptq"])


def test_overwrite(tmp_path, dense):
    convert_checkpoint(dense, tmp_path / "o", "bitnet", progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(dense, tmp_path / "o", "dual_binary", progress=False, group_size=32)
    convert_checkpoint(dense, tmp_path / "o", "dual_binary", progress=False, group_size=32, overwrite=True)
    assert load_model(tmp_path / "o", device="cpu", dtype="float32", progress=False).plugin.name == "dual_binary"


def test_overwrite_never_deletes_the_source(tmp_path, dense, monkeypatch):
    """--overwrite replaces the destination folder: one that holds the source (its parent, or '.'
    run from there) or the folder the user is in is refused before anything is touched."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(dense, parent / "src")
    (parent / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in (parent / "src").iterdir())
    with pytest.raises(ValueError, match="must not contain the source"):
        convert_checkpoint(parent / "src", parent, "bitnet", progress=False, overwrite=True)
    monkeypatch.chdir(parent)
    with pytest.raises(ValueError, match="must not contain the source"):
        convert_checkpoint("src", ".", "bitnet", progress=False, overwrite=True)
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with pytest.raises(ValueError, match="current folder"):
        convert_checkpoint(parent / "src", ".", "bitnet", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="must not contain the source"):  # (.. holds both)
        convert_checkpoint(parent / "src", "..", "bitnet", progress=False, overwrite=True)
    deeper = other / "a"
    deeper.mkdir()
    monkeypatch.chdir(deeper)
    with pytest.raises(ValueError, match="current folder or one above it"):
        convert_checkpoint(parent / "src", "..", "bitnet", progress=False, overwrite=True)
    assert sorted(p.name for p in (parent / "src").iterdir()) == before
    assert (parent / "notes.txt").read_text() == "keep me" and other.exists()
    # a relative destination beside the source works, from anywhere
    monkeypatch.chdir(parent)
    convert_checkpoint("src", "out", "bitnet", progress=False)
    assert load_model(parent / "out", device="cpu", dtype="float32", progress=False).plugin.name == "bitnet"


def test_bad_requests(tmp_path, dense):
    with pytest.raises(ValueError, match="unknown conversion target 'gptq'"):
        convert_checkpoint(dense, tmp_path / "x", "gptq")
    with pytest.raises(TypeError, match="unknown conversion option"):
        convert_checkpoint(dense, tmp_path / "x", "bitnet", groupsize=3)
    with pytest.raises(ValueError, match="alpha_dtype"):
        convert_checkpoint(dense, tmp_path / "x", "dual_binary", alpha_dtype="int4")
    with pytest.raises(ValueError, match="group_size"):
        convert_checkpoint(dense, tmp_path / "x", "dual_binary", group_size=12)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "x", "bitnet")
    with pytest.raises(ValueError, match="must not be the source"):
        convert_checkpoint(dense, dense / "sub", "bitnet")
    assert not (tmp_path / "x").exists()


def test_unsupported_shapes_and_sources(tmp_path, dense):
    # group 128 does not divide hidden 64
    with pytest.raises(CheckpointError, match=r"group_size 128 does not divide in_features \[64\]"):
        convert_checkpoint(dense, tmp_path / "x", "dual_binary", group_size=128)
    # head_dim 18 -> k_proj has 18 rows (not a multiple of 4); hidden 36 is not a multiple of 8
    odd = write_llama_checkpoint(tmp_path / "odd", hidden_size=36, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=64, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' \(18x36\): out_features must be a multiple of 4"):
        convert_checkpoint(odd, tmp_path / "x", "bitnet", progress=False)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight' \(36x36\): in_features must be a multiple of 8"):
        convert_checkpoint(odd, tmp_path / "x", "onebit", progress=False)
    # a failed conversion leaves neither the destination nor its staging folder behind
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()
    bitnet = convert_checkpoint(dense, tmp_path / "bn", "bitnet", progress=False).destination
    with pytest.raises(CheckpointError, match="converting a bitnet checkpoint to 'onebit' is not supported"):
        convert_checkpoint(bitnet, tmp_path / "x", "onebit")
    db = convert_checkpoint(dense, tmp_path / "db", "dual_binary", progress=False, group_size=32).destination
    with pytest.raises(CheckpointError, match="is a 'dual_binary' checkpoint"):
        convert_checkpoint(db, tmp_path / "x", "bitnet")


# -- inspect ------------------------------------------------------------------------------------------------
def test_inspect(tmp_path, dense, dense_tensors):
    info = inspect_checkpoint(dense)
    assert info["format"] == "dense"
    body = sum(dense_tensors[f"{p}.weight"].numel() for p in projections(dense_tensors))
    assert info["parameters"]["body"] == body
    assert info["parameters"]["embedding"] == info["parameters"]["head"] == 96 * 64
    assert info["parameters"]["norms"] == (2 * 2 + 1) * 64
    assert info["bits_per_weight"] == {"body": 32.0, "head": 32.0}
    assert info["weight_bytes"]["total"] == sum(t.numel() * 4 for t in dense_tensors.values())
    # K and V, 2 layers x 2 kv heads x head_dim 16, per token
    kv = info["kv_bytes_per_token"]
    assert kv["bfloat16"] == 2 * 2 * 2 * 16 * 2 and kv["float32"] == 2 * 2 * 2 * 16 * 4
    assert kv["int8"] == 2 * 2 * 2 * (16 + 2)  # int8 codes + an fp16 scale per token and head
    assert kv["int2"] < kv["int4"] < kv["int8"]

    convert_checkpoint(dense, tmp_path / "bn", "bitnet", progress=False)
    info = inspect_checkpoint(tmp_path / "bn", load=True)
    assert info["format"] == "bitnet"
    assert info["bits_per_weight"]["body"] == pytest.approx(8 * (body / 4 + 14 * 2) / body)
    assert info["loaded"]["layer_types"] == {"TernaryLinear": 8}
    text = render_inspection(info)
    for needle in ("format        bitnet", "bits/weight   body 2.0", "KV per token", "int8 144 B", "in memory"):
        assert needle in text, text
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nothing")


def test_bitnet_to_dense_dequantizes_exactly(tmp_path):
    from bitserve.demo import DEMO_MODEL_PATH

    demo = load_model(DEMO_MODEL_PATH, dtype="float32", device="cpu", progress=False)
    report = convert_checkpoint(DEMO_MODEL_PATH, tmp_path / "dense", "dense", progress=False, dense_dtype="float32")
    assert report.max_error == 0.0
    dense = load_model(tmp_path / "dense", format="dense", dtype="float32", device="cpu", progress=False)
    want = {n: m.dequantize() for n, m in demo.model.named_modules() if isinstance(m, QuantLinear)}
    got = {n: m.dequantize() for n, m in dense.model.named_modules() if isinstance(m, QuantLinear)}
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert json.loads((tmp_path / "dense" / "config.json").read_text()).get("quantization_config") is None


def test_cli_gguf_target(tmp_path, capsys):
    from bitserve.demo import DEMO_MODEL_PATH

    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    out = tmp_path / "demo.gguf"
    args = parser.parse_args([str(DEMO_MODEL_PATH), str(out), "--to", "gguf-tq2_0", "--no-progress"])
    assert run_convert(args) == 0 and out.stat().st_size > 0
    assert load_model(out, dtype="float32", device="cpu", progress=False).plugin.name == "gguf"
    assert run_convert(args) == 2 and "already exists" in capsys.readouterr().err


def test_target_names_match_implementations():
    from bitserve.convert_options import TARGET_NAMES
    from bitserve.convert_targets import TARGETS

    assert set(TARGET_NAMES) == set(TARGETS)


def test_cli_convert_and_inspect(tmp_path, capsys):
    from bitserve.cli import main
    from bitserve.demo import DEMO_MODEL_PATH

    assert main(["convert", str(DEMO_MODEL_PATH), str(tmp_path / "db"), "--to", "dual_binary", "--group-size", "64",
                 "--no-progress"]) == 0
    assert main(["inspect", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert "dual_binary" in out and "KV per token" in out
    assert main(["convert", str(DEMO_MODEL_PATH), str(tmp_path / "demo.gguf"), "--to", "gguf-i2_s",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "demo.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "gguf" in json.dumps(info["format"])
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_names_the_demo_model(tmp_path, capsys, monkeypatch):
    """An installed package's users do not know where pip put the demo model: `inspect` with no path
    and `convert demo ...` take it, unless the current folder holds something called `demo`."""
    from bitserve.cli import main
    from bitserve.demo import DEMO_MODEL_PATH

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(DEMO_MODEL_PATH)
    assert main(["convert", "demo", str(tmp_path / "demo.gguf"), "--to", "gguf-tq2_0", "--no-progress"]) == 0
    assert str(DEMO_MODEL_PATH) in capsys.readouterr().out
    (tmp_path / "demo").mkdir()  # a folder of that name is what the user means
    assert main(["inspect", "demo"]) == 2
    assert "demo/config.json: file is missing" in capsys.readouterr().err


def test_cli_version_and_closed_pipe(capsys, monkeypatch):
    """`bitserve --version`; a reader that leaves early (`| head -1`) is not an error."""
    import sys

    from bitserve import __version__
    from bitserve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"bitserve {__version__}"

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise ValueError("no descriptor")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", "--json"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tq1_0", "i2_s"])
def test_gguf_to_bitnet_round_trip_is_exact(tmp_path, kind):
    """bitnet -> GGUF -> bitnet: the same packed weights, logits and answers as the shipped demo."""
    from bitserve import LLM, SamplingParams
    from bitserve.convert_gguf import write_gguf
    from bitserve.demo import DEMO_MODEL_PATH

    gguf = write_gguf(DEMO_MODEL_PATH, tmp_path / f"demo.{kind}.gguf", linear_type=kind, progress=False)
    report = convert_checkpoint(gguf, tmp_path / "back", "bitnet", progress=False)
    assert report.max_error == 0.0
    assert load_model(tmp_path / "back", device="cpu", progress=False).plugin.name == "bitnet"
    original, back = LLM(dtype="float32", device="cpu"), LLM(str(tmp_path / "back"), dtype="float32", device="cpu")
    assert torch.equal(original.logits(IDS), back.logits(IDS))
    messages = [[{"role": "user", "content": q}] for q in ("What is 47+89?", "Reverse the word 'stone'.")]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    assert [o.text for o in back.chat(messages, params)] == [o.text for o in original.chat(messages, params)]


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_ternary_with_a_negative_or_zero_scale_repacks_to_a_loadable_bitnet_layer(scale):
    """A ternary source (a GGUF whose blocks all carry d = -0.5, or an all-zero matrix) becomes the
    same weights with a positive scale: the bitnet loader refuses scales <= 0, and the conversion
    once wrote them as they were ("max error 0.0", then a checkpoint that does not load)."""
    from bitserve.convert_options import ConvertOptions
    from bitserve.convert_source import Ternary
    from bitserve.convert_targets import BitNetTarget
    from bitserve.kernels.packing import hf_unpack_ternary
    from bitserve.plugins.base import LinearSpec

    g = torch.Generator().manual_seed(7)
    t = torch.randint(-1, 2, (8, 16), generator=g, dtype=torch.int8)
    weight = Ternary(t, torch.full((8,), scale))
    spec = LinearSpec("model.layers.0.mlp.down_proj", 8, 16)
    tensors, err = BitNetTarget(ConvertOptions()).linear(spec, weight, source=None)
    stored = tensors[f"{spec.prefix}.weight_scale"].float()
    assert err == 0.0 and stored.item() > 0
    codes = hf_unpack_ternary(tensors[f"{spec.prefix}.weight"]).reshape(8, 16)
    assert torch.equal(codes.float() * stored, weight.dequantize())


def test_gguf_destination_inside_the_source_folder_is_refused(tmp_path, capsys):
    import shutil

    from bitserve.cli import main
    from bitserve.demo import DEMO_MODEL_PATH

    src = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_PATH, src)
    assert main(["convert", str(src), str(src / "out.gguf"), "--to", "gguf-tq1_0", "--no-progress"]) == 2
    assert "inside the source folder" in capsys.readouterr().err and not (src / "out.gguf").exists()
    (tmp_path / "a_folder").mkdir()
    assert main(["convert", str(src), str(tmp_path / "a_folder"), "--to", "gguf-tq1_0", "--overwrite",
                 "--no-progress"]) == 2
    assert "is a folder; the GGUF destination is a file path" in capsys.readouterr().err


def _damaged(tmp_path, dense, name, change_tensors=None, change_config=None):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / name
    shutil.copytree(dense, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    if change_tensors:
        change_tensors(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
    if change_config:
        config = json.loads((folder / "config.json").read_text())
        change_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _nan_at(key):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    return change


@pytest.mark.parametrize("name, change_tensors, change_config, message", [
    ("nan_weight", _nan_at("model.layers.1.mlp.down_proj.weight"), None,
     r"model\.layers\.1\.mlp\.down_proj\.weight' contains NaN"),
    ("nan_embedding", _nan_at("model.embed_tokens.weight"), None, r"model\.embed_tokens\.weight' contains NaN"),
    ("no_final_norm", lambda t: t.pop("model.norm.weight"), None, r"model\.norm\.weight"),
    ("vocab_mismatch", None, lambda c: c.update(vocab_size=c["vocab_size"] + 1), r"embed_tokens\.weight.*shape"),
    ("fewer_layers", None, lambda c: c.update(num_hidden_layers=1), r"tensors of layer 1 .*declares 1 layer"),
])
def test_convert_refuses_what_the_loader_would(tmp_path, dense, name, change_tensors, change_config, message):
    """A source the loader would refuse after conversion is refused before: convert never publishes
    a folder that cannot be served (it wrote NaN scales, or copied a truncated stack, with rc 0)."""
    src = _damaged(tmp_path, dense, name, change_tensors, change_config)
    with pytest.raises(CheckpointError, match=message):
        load_model(src, device="cpu", dtype="float32", progress=False)
    for to, opts in (("bitnet", {}), ("dual_binary", {"group_size": 32})):
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(src, tmp_path / f"{name}-{to}", to, progress=False, **opts)
        assert not (tmp_path / f"{name}-{to}").exists()
        assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
