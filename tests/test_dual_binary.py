"""The ``dual_binary`` format (bitserve's DB-LLM layout, docs/formats_lowbit.md): the byte-level
worked example, the plugin contract against a float64 decoder written here from the layout's
definition, whole-model logits against transformers on the decoded dense weights, int8
activations, dense-kept layers, and errors that name the file and tensor."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.dual_binary import DualBinaryFormat, DualBinaryLinearA8
from bitserve.plugins.lowbit_layers import DualBinaryLinear
from bitserve.plugins.registry import FormatRegistry
from bitserve.plugins.testing import check_format
from tiny_checkpoints import tiny_llama_config

H, I, Q, KV = 64, 112, 64, 32  # hidden, intermediate, q size, kv size of the tiny llama below
G = 16


def tiny_config(**overrides):
    return tiny_llama_config(H, I, **overrides)


def groups(layer, inter=I):
    p = f"model.layers.{layer}"
    return [
        [LinearSpec(f"{p}.self_attn.q_proj", Q, H), LinearSpec(f"{p}.self_attn.k_proj", KV, H),
         LinearSpec(f"{p}.self_attn.v_proj", KV, H)],
        [LinearSpec(f"{p}.self_attn.o_proj", H, Q)],
        [LinearSpec(f"{p}.mlp.gate_proj", inter, H), LinearSpec(f"{p}.mlp.up_proj", inter, H)],
        [LinearSpec(f"{p}.mlp.down_proj", H, inter)],
    ]


ALL_GROUPS = groups(0) + groups(1)


def decode(b1: torch.Tensor, b2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group: int) -> torch.Tensor:
    """float64 W from the stored tensors, straight from the layout's definition (numpy, bit by bit)."""
    p1, p2 = b1.numpy(), b2.numpy()
    n, k = p1.shape[0], p1.shape[1] * 8
    w = np.zeros((n, k))
    for col in range(k):
        bit1 = (p1[:, col // 8] >> (col % 8)) & 1  # LSB first: column 8j + b in bit b of byte j
        bit2 = (p2[:, col // 8] >> (col % 8)) & 1
        w[:, col] = a1[:, col // group].double().numpy() * bit1 + a2[:, col // group].double().numpy() * bit2
    return torch.from_numpy(w)


def random_projection(n, k, gen, group=G, alpha_dtype=torch.float16):
    b1 = torch.randint(0, 256, (n, k // 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    b2 = torch.randint(0, 256, (n, k // 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    a1 = (torch.rand(n, k // group, generator=gen) * 0.1 + 0.02).to(alpha_dtype)
    a2 = (-torch.rand(n, k // group, generator=gen) * 0.05 - 0.01).to(alpha_dtype)
    return {"b1": b1, "b2": b2, "alpha1": a1, "alpha2": a2}


def write_dual_binary(folder, *, seed=0, group=G, qc_extra=None, dense_prefixes=(), mutate=None, config=None):
    """A tiny llama in the dual_binary layout with random planes and scales; returns (folder, tensors)."""
    from transformers import LlamaForCausalLM

    config = config or tiny_config()
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in state.items():
        prefix = name[: -len(".weight")]
        if name.endswith("_proj.weight") and prefix not in dense_prefixes:
            for suffix, t in random_projection(w.shape[0], w.shape[1], gen, group).items():
                tensors[f"{prefix}.{suffix}"] = t
        else:
            tensors[name] = w.contiguous()
    if mutate:
        mutate(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "dual_binary", "format_version": 1, "group_size": group,
                                  **(qc_extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def expected_weights(tensors, group=G):
    out = {}
    for name in tensors:
        if name.endswith(".b1"):
            p = name[:-3]
            out[p] = decode(tensors[f"{p}.b1"], tensors[f"{p}.b2"], tensors[f"{p}.alpha1"].float(),
                            tensors[f"{p}.alpha2"].float(), group)
    return out


# -- the worked example of docs/formats_lowbit.md ----------------------------------------------------
EXAMPLE = {
    "b1": torch.tensor([[0x0F, 0x81], [0x01, 0xFF]], dtype=torch.uint8),
    "b2": torch.tensor([[0x3C, 0x00], [0x80, 0x0F]], dtype=torch.uint8),
    "alpha1": torch.tensor([[0.5, 2.0], [1.0, -1.0]], dtype=torch.float16),
    "alpha2": torch.tensor([[-0.25, -1.0], [0.5, 0.5]], dtype=torch.float16),
}
EXAMPLE_W = torch.tensor([
    [0.5, 0.5, 0.25, 0.25, -0.25, -0.25, 0, 0, 2.0, 0, 0, 0, 0, 0, 0, 2.0],
    [1.0, 0, 0, 0, 0, 0, 0, 0.5, -0.5, -0.5, -0.5, -0.5, -1.0, -1.0, -1.0, -1.0],
], dtype=torch.float64)


def test_worked_example_bytes(tmp_path):
    ex = {k: v for k, v in EXAMPLE.items()}
    assert torch.equal(decode(ex["b1"], ex["b2"], ex["alpha1"].float(), ex["alpha2"].float(), 8), EXAMPLE_W)
    folder = tmp_path / "ex"
    folder.mkdir()
    cfg = tiny_config().to_dict()
    cfg["quantization_config"] = {"quant_method": "dual_binary", "format_version": 1, "group_size": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({f"proj.{k}": v for k, v in ex.items()}, str(folder / "model.safetensors"))
    # the raw bytes of the planes are row-major uint8, exactly the listed values
    raw = (folder / "model.safetensors").read_bytes()
    assert bytes([0x0F, 0x81, 0x01, 0xFF]) in raw and bytes([0x3C, 0x00, 0x80, 0x0F]) in raw
    assert bytes.fromhex("0038004000 3C00BC".replace(" ", "")) in raw  # alpha1, little-endian fp16
    assert bytes.fromhex("00B400BC00380038") in raw  # alpha2
    plugin = DualBinaryFormat(cfg)
    layer = plugin.load_linear(CheckpointReader(folder), [LinearSpec("proj", 2, 16)], device=torch.device("cpu"),
                               dtype=torch.float32)
    assert type(layer) is DualBinaryLinear and layer.group_size == 8
    assert torch.equal(layer.dequantize().double(), EXAMPLE_W)
    x = torch.tensor([[1.0, -2, 3, 0.5, 1, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0, -1]])
    torch.testing.assert_close(layer(x).double(), x.double() @ EXAMPLE_W.t(), rtol=0, atol=1e-6)


# -- contract ------------------------------------------------------------------------------------
def test_contract(tmp_path):
    folder, tensors = write_dual_binary(tmp_path / "db")
    report = check_format("dual_binary", folder, ALL_GROUPS, expected_weights=expected_weights(tensors),
                          max_bits_per_weight=2 + 64 / G + 0.5)
    # two bits per weight + two float32 scales per group of G (+ nothing else)
    assert all(b == pytest.approx(2 + 64 / G) for b in report["bits_per_weight"])


def test_contract_int8_activations(tmp_path):
    folder, tensors = write_dual_binary(tmp_path / "db8", seed=3, qc_extra={"activation_quant": "int8_per_token"})
    check_format("dual_binary", folder, groups(0), expected_weights=expected_weights(tensors))
    layer = DualBinaryFormat(json.loads((folder / "config.json").read_text())).load_linear(
        CheckpointReader(folder), groups(0)[1], device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(layer, DualBinaryLinearA8) and layer.act_quant == "int8_per_token"


def test_whole_model_matches_transformers(tmp_path):
    """Logits of the dual_binary model == transformers' llama on the decoded dense weights."""
    from transformers import LlamaForCausalLM

    folder, tensors = write_dual_binary(tmp_path / "db", seed=5)
    loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "dual_binary"
    assert isinstance(loaded.model.model.layers[1].mlp.gate_up_proj, DualBinaryLinear)
    dense = {n: t for n, t in tensors.items() if not n.endswith((".b1", ".b2", ".alpha1", ".alpha2"))}
    dense.update({f"{p}.weight": w.float() for p, w in expected_weights(tensors).items()})
    oracle = LlamaForCausalLM(tiny_config()).eval()
    oracle.load_state_dict(dense, strict=True)
    ids = [1, 7, 30, 4, 55, 12]
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded.model, ids), ref, rtol=1e-4, atol=1e-4)


def test_layers_kept_dense(tmp_path):
    kept = ("model.layers.0.mlp.down_proj",)
    folder, tensors = write_dual_binary(tmp_path / "db", dense_prefixes=kept,
                                        qc_extra={"modules_to_not_convert": ["down_proj"]})
    loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    down = loaded.model.model.layers[0].mlp.down_proj
    assert isinstance(down, DenseLinear)
    assert torch.equal(down.weight, tensors["model.layers.0.mlp.down_proj.weight"])
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, DualBinaryLinear)


def test_detection_and_priority(tmp_path):
    folder, _ = write_dual_binary(tmp_path / "db")
    reader = CheckpointReader(folder)
    config = json.loads((folder / "config.json").read_text())
    assert FormatRegistry().detect(config, reader.names(), reader).name == "dual_binary"
    assert not DualBinaryFormat().detect({"quantization_config": {"quant_method": "bitnet"}}, reader.names(), reader)
    assert not DualBinaryFormat().detect({}, reader.names(), reader)


# -- errors ----------------------------------------------------------------------------------------
def _load_error(folder):
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", progress=False)
    return str(err.value)


@pytest.mark.parametrize("group, needle", [(None, "group_size"), (12, "group_size"), (0, "group_size"),
                                           ("16", "group_size")])
def test_bad_group_size(tmp_path, group, needle):
    folder, _ = write_dual_binary(tmp_path / "db")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = group
    (folder / "config.json").write_text(json.dumps(cfg))
    assert needle in _load_error(folder)


def test_group_size_must_divide_in_features(tmp_path):
    # down_proj has K = 112; a group of 32 divides 64 but not 112
    folder, _ = write_dual_binary(tmp_path / "db", group=32)
    msg = _load_error(folder)
    assert "down_proj" in msg and "112" in msg and "group_size 32" in msg


def test_bad_settings(tmp_path):
    folder, _ = write_dual_binary(tmp_path / "v2", qc_extra={"format_version": 2})
    assert "format_version" in _load_error(folder)
    folder, _ = write_dual_binary(tmp_path / "act", qc_extra={"activation_quant": "fp8"})
    assert "activation_quant" in _load_error(folder)


@pytest.mark.parametrize("case", ["plane_dtype", "plane_shape", "alpha_shape", "alpha_nan", "missing_b2",
                                  "missing_all", "mixed_fusion"])
def test_bad_tensors(tmp_path, case):
    p = "model.layers.0.self_attn.k_proj"

    def mutate(t):
        if case == "plane_dtype":
            t[f"{p}.b1"] = t[f"{p}.b1"].to(torch.int8)
        elif case == "plane_shape":
            t[f"{p}.b2"] = t[f"{p}.b2"][:, :-1].contiguous()
        elif case == "alpha_shape":
            t[f"{p}.alpha1"] = t[f"{p}.alpha1"][:-1].contiguous()
        elif case == "alpha_nan":
            t[f"{p}.alpha2"][0, 0] = float("nan")
        elif case == "missing_b2":
            del t[f"{p}.b2"]
        elif case == "missing_all":
            for s in ("b1", "b2", "alpha1", "alpha2"):
                del t[f"{p}.{s}"]
        elif case == "mixed_fusion":
            for s in ("b1", "b2", "alpha1", "alpha2"):
                del t[f"{p}.{s}"]
            t[f"{p}.weight"] = torch.zeros(KV, H)

    folder, _ = write_dual_binary(tmp_path / case, mutate=mutate)
    msg = _load_error(folder)
    assert "model.safetensors" in msg or str(folder) in msg
    assert p in msg
    expected = {"plane_dtype": "dtype I8", "plane_shape": "shape", "alpha_shape": "shape", "alpha_nan": "NaN",
                "missing_b2": "missing", "missing_all": "missing", "mixed_fusion": "cannot fuse"}[case]
    assert expected in msg


@pytest.mark.gpu
@pytest.mark.parametrize("act", [None, "int8_per_token"])
def test_cuda_matches_cpu(tmp_path, act):
    folder, _ = write_dual_binary(tmp_path / "db", seed=9, qc_extra={"activation_quant": act})
    ids = [1, 7, 30, 4, 55, 12]
    ref = prefill_logits(load_model(folder, device="cpu", dtype="float32", progress=False).model, ids)
    for model_dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
        gpu = load_model(folder, device="cuda", dtype=model_dtype, progress=False)
        out = prefill_logits(gpu.model, ids).cpu()
        assert (out - ref).abs().max() <= tol * ref.abs().max(), (model_dtype, (out - ref).abs().max())
