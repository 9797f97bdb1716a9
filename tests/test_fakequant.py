"""``fakequant``: dense checkpoints holding quantized values (FORMATS.md §5, ParetoQ).

Checkpoints are fake-quantized here with each method's published formula (float64), saved dense
in bf16/fp16, and then must (a) be detected as fakequant, (b) load into low-bit layers whose
dequantized weights equal the stored ones, and (c) give the same logits as loading the very same
folder with the ``dense`` plugin. Plain dense models must still go to ``dense``; weights without
exact structure are served dense with a warning that says why.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.base import LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import CheckpointReader
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.fakequant import FakeQuantFormat, sample_projection_names
from bitserve.plugins.fakequant_grid import EPS, Misfit, Plan, analyze
from bitserve.plugins.fakequant_layers import build_layer
from bitserve.plugins.registry import FormatRegistry
from bitserve.plugins.testing import check_format
from tiny_checkpoints import tiny_llama_config

H, I = 64, 128
IDS = [1, 9, 22, 5, 71, 40, 3]


def tiny_config(**overrides):
    return tiny_llama_config(H, I, **overrides)


# -- the methods' quantizers, float64, from FORMATS.md ----------------------------------------------
def _binarize_mean(w, dim=-1):
    """Order-1 binarization with mean (BiLLM §5.1 step 3): mu + alpha * sign(w - mu)."""
    mu = w.mean(dim, keepdim=True)
    alpha = (w - mu).abs().mean(dim, keepdim=True)
    return alpha * torch.where(w - mu >= 0, 1.0, -1.0) + mu


def ternary_rows(w, gen):  # ParetoQ ternary: {-a, 0, a} per output row
    a = w.abs().mean(1, keepdim=True)
    return (w / a).round().clamp(-1, 1) * a


def binary_rows(w, gen):  # sign * mean|w| per row (1-bit)
    return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)


def seq_2bit(w, gen):  # ParetoQ 2-bit SEQ: {-1.5, -0.5, 0.5, 1.5} * a per row
    a = w.abs().mean(1, keepdim=True)
    return (torch.floor(w / a).clamp(-2, 1) + 0.5) * a


def billm_blocks(w, gen, block=32):  # order-1 with mean per row and 32-column block
    n, k = w.shape
    return _binarize_mean(w.reshape(n, k // block, block)).reshape(n, k)


def residual_order2(w, gen):  # BiLLM's order-2 residual binarization over the whole row
    first = _binarize_mean(w)
    return first + _binarize_mean(w - first)


def ptq161(w, gen, frac=0.2):  # §5.4 before training (r1 = r2 = 1)
    n, k = w.shape
    # salient = input channels with the largest activation scales: shared by projections of one input
    act = torch.rand(k, generator=torch.Generator().manual_seed(k))
    salient = torch.zeros(k, dtype=torch.bool)
    salient[act.argsort(descending=True)[: int(frac * k)]] = True
    out = torch.empty_like(w)
    out[:, ~salient] = _binarize_mean(w[:, ~salient])
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    zero = (-lo / scale).round()
    q4 = ((w / scale).round() + zero).clamp(0, 15)
    out[:, salient] = ((q4 - zero) * scale)[:, salient]
    return out


def billm_salient(w, gen, block=32, count=3):  # order-1 per block + order-2 on structured salient columns
    out = billm_blocks(w, gen, block)
    cols = w.abs().sum(0).argsort(descending=True)[:count]
    ws = w[:, cols]
    first = _binarize_mean(ws)
    out[:, cols] = first + _binarize_mean(ws - first)
    return out


def pbllm(w, gen, low_frac=0.7):  # §5.2 RTN: unstructured salient weights in 8 bits
    n, k = w.shape
    thresh = w.abs().flatten().kthvalue(int(low_frac * w.numel())).values
    mask = w.abs() <= thresh  # binarized
    wm = w * mask
    mu = wm.mean(1, keepdim=True)
    alpha = (wm - mu).abs().mean(1, keepdim=True)
    binar = alpha * torch.where(w - mu >= 0, 1.0, -1.0) + mu
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 255
    zero = (-lo / scale).round()
    q8 = (((w / scale).round() + zero).clamp(0, 255) - zero) * scale
    return torch.where(mask, binar, q8)


def write_fakequant(folder, quantize, *, dtype=torch.bfloat16, seed=0, skip=(), config=None):
    """A tiny llama whose projections hold ``quantize(W)`` (float64 math), saved dense in ``dtype``."""
    from transformers import LlamaForCausalLM

    config = config or tiny_config()
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in state.items():
        if name.endswith("_proj.weight") and not any(s in name for s in skip):
            tensors[name] = quantize(w.double(), gen).to(dtype)
        else:
            tensors[name] = w.to(dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def detect(folder):
    reader = CheckpointReader(folder)
    config = json.loads((folder / "config.json").read_text())
    return FormatRegistry().detect(config, reader.names(), reader).name


def groups(layer, inter=I):
    p = f"model.layers.{layer}"
    return [
        [LinearSpec(f"{p}.self_attn.q_proj", H, H), LinearSpec(f"{p}.self_attn.k_proj", 32, H),
         LinearSpec(f"{p}.self_attn.v_proj", 32, H)],
        [LinearSpec(f"{p}.self_attn.o_proj", H, H)],
        [LinearSpec(f"{p}.mlp.gate_proj", inter, H), LinearSpec(f"{p}.mlp.up_proj", inter, H)],
        [LinearSpec(f"{p}.mlp.down_proj", H, inter)],
    ]


def linears(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


METHODS = {
    # name: (quantizer, checkpoint dtype, layer classes expected, max bits per weight, weights exact)
    "paretoq_ternary": (ternary_rows, torch.bfloat16, {"TernaryLinearA16"}, 2.6, True),
    "binary_rows": (binary_rows, torch.float16, {"BinaryLinear"}, 1.6, True),
    "paretoq_2bit_seq": (seq_2bit, torch.bfloat16, {"OffsetDualBinaryLinear"}, 3.6, True),
    "billm_order1_blocks": (billm_blocks, torch.float16, {"OffsetDualBinaryLinear"}, 5.0, True),
    # four independently rounded levels: v0 + v3 = v1 + v2 holds only to a few ulps of the dtype
    "residual_order2_bf16": (residual_order2, torch.bfloat16, {"OffsetDualBinaryLinear"}, 3.6, False),
    "residual_order2_fp16": (residual_order2, torch.float16, {"OffsetDualBinaryLinear"}, 3.6, False),
    "ptq161": (ptq161, torch.float16, {"SalientOffsetDualBinaryLinear"}, 7.0, True),
    "billm_salient_columns": (billm_salient, torch.float16, {"SalientOffsetDualBinaryLinear"}, 8.0, True),
}
EPS_OF = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_repacked_exactly(tmp_path, method):
    quantize, dtype, classes, max_bits, exact = METHODS[method]
    folder = write_fakequant(tmp_path / method, quantize, dtype=dtype)
    assert detect(folder) == "fakequant"
    loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    assert loaded.plugin.name == "fakequant"
    layers = linears(loaded.model)
    assert {type(m).__name__ for m in layers} == classes
    assert all(m.bits_per_weight <= max_bits for m in layers), [m.bits_per_weight for m in layers]
    assert loaded.plugin.summary.get("dense", 0) == 0
    # the same folder through the dense plugin is the oracle
    dense = load_model(folder, format="dense", device="cpu", dtype="float32", progress=False)
    for ours, ref in zip(layers, linears(dense.model)):
        w, err = ref.dequantize(), (ours.dequantize() - ref.dequantize()).abs()
        if exact:
            assert torch.equal(ours.dequantize(), w)
        else:  # the documented slack: 2 ulps of the checkpoint dtype times the row's max |w|
            assert (err.amax(1) <= 2 * EPS_OF[dtype] * w.abs().amax(1)).all()
    tol = 1e-4 if exact else 2 * EPS_OF[dtype]
    torch.testing.assert_close(prefill_logits(loaded.model, IDS), prefill_logits(dense.model, IDS),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["paretoq_ternary", "ptq161"])
def test_contract(tmp_path, method):
    quantize, dtype = METHODS[method][:2]
    folder = write_fakequant(tmp_path / method, quantize, dtype=dtype)
    reader = CheckpointReader(folder)
    expected = {s.prefix: reader.get(f"{s.prefix}.weight").double() for g in groups(0) for s in g}
    check_format("fakequant", folder, groups(0), expected_weights=expected)


def test_bf16_model_dtype(tmp_path):
    folder = write_fakequant(tmp_path / "t", seq_2bit)
    loaded = load_model(folder, device="cpu", dtype="bfloat16", progress=False)
    dense = load_model(folder, format="dense", device="cpu", dtype="bfloat16", progress=False)
    a, b = prefill_logits(loaded.model, IDS), prefill_logits(dense.model, IDS)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


# -- worked examples of FORMATS.md §5 -----------------------------------------------------------------
def _exact(row_values, expect_kind, dtype=torch.float32):
    w = torch.tensor([row_values], dtype=torch.float64).to(dtype)
    plan = analyze(w, {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype])
    assert isinstance(plan, Plan), plan
    assert plan.kind == expect_kind
    layer = build_layer(w, plan, eps=EPS["F32"], ulps=2.0)
    torch.testing.assert_close(layer.dequantize(), w.float(), rtol=0, atol=1e-7)
    return plan


def test_billm_worked_example():
    w = torch.tensor([0.9, -0.1, 0.3, -0.7, 0.05, -0.3], dtype=torch.float64)
    b = residual_order2(w.unsqueeze(0), None)[0]
    torch.testing.assert_close(b, torch.tensor([0.6889, -0.0944, 0.1444, -0.6389, 0.1444, -0.0944],
                                               dtype=torch.float64), rtol=0, atol=1e-4)
    # four distinct values with v0 + v3 = v1 + v2: one affine grid, no salient column
    plan = _exact(b.tolist() + b[:2].tolist(), "affine")
    assert plan.num_salient == 0


def test_ptq161_worked_example():
    row = [0.48, -0.4, 0.0667, -0.4]  # §5.4: W_hat of the example row
    assert _exact(row, "affine").num_salient == 0  # three values always fit {o, o+a1, o+a2}


def test_grid_kinds_and_tolerance():
    assert _exact([0.5, -0.5, 0.0, 0.5, -0.5, 0.0, 0.0, 0.5], "ternary").group_size == 8
    assert _exact([0.5, -0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 0.5], "binary").group_size == 8
    # a 4-level grid rounded to bf16 (v0 + v3 = v1 + v2 holds to a few ulps only) is still exact
    levels = torch.tensor([-0.1037, 0.0241, 0.1519, 0.2797], dtype=torch.float64)
    row = levels[[0, 1, 2, 3, 3, 2, 1, 0]].to(torch.bfloat16)
    s = row.double().unique()
    assert s[0] + s[3] != s[1] + s[2]
    plan = analyze(row.unsqueeze(0), "BF16")
    assert isinstance(plan, Plan) and plan.kind == "affine" and plan.num_salient == 0
    # a real 4-level non-grid is not accepted as one
    bad = torch.tensor([[-1.0, 0.0, 0.3, 1.0] * 2])
    plan = analyze(bad, "F32")
    assert not (isinstance(plan, Plan) and plan.num_salient == 0)


# -- what must not be claimed / served dense -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_dense_llama_goes_to_dense(tmp_path, dtype):
    folder = write_fakequant(tmp_path / "dense", lambda w, g: w, dtype=dtype)
    assert detect(folder) == "dense"


def test_pbllm_unstructured_salient_is_dense_with_reason(tmp_path, caplog):
    folder = write_fakequant(tmp_path / "pb", pbllm, dtype=torch.float16)
    assert detect(folder) == "dense"  # scattered 8-bit weights: no grid, so fakequant does not claim it
    with caplog.at_level(logging.WARNING, logger="bitserve.plugins.fakequant"):
        loaded = load_model(folder, format="fakequant", device="cpu", dtype="float32", progress=False)
    assert all(isinstance(m, DenseLinear) for m in linears(loaded.model))
    warnings = [r.getMessage() for r in caplog.records if r.name == "bitserve.plugins.fakequant"]
    assert len(warnings) == 8 and all("kept dense" in w and "off-grid" in w for w in warnings), warnings
    assert "model.layers.0.self_attn.q_proj" in warnings[0]


def test_partly_quantized_model(tmp_path, caplog):
    # layer 0's MLP left dense (as some methods keep a layer in full precision): claimed, that layer dense
    folder = write_fakequant(tmp_path / "mix", ternary_rows, skip=("layers.0.mlp.down_proj",))
    assert detect(folder) == "fakequant"
    with caplog.at_level(logging.WARNING, logger="bitserve.plugins.fakequant"):
        loaded = load_model(folder, device="cpu", dtype="float32", progress=False)
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, DenseLinear)
    assert type(loaded.model.model.layers[1].mlp.down_proj).__name__ == "TernaryLinearA16"
    assert loaded.plugin.summary == {"ternary": 7, "dense": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == "bitserve.plugins.fakequant"]
    assert len(warnings) == 1 and "layers.0.mlp.down_proj kept dense" in warnings[0]


def test_never_claims_other_formats(tmp_path):
    from tiny_checkpoints import bitnet_config, random_bitnet_state, write_bitnet_checkpoint

    config = bitnet_config(num_hidden_layers=1)
    bitnet = write_bitnet_checkpoint(tmp_path / "bn", config, random_bitnet_state(config, 1), mode="online")
    reader = CheckpointReader(bitnet)
    cfg = json.loads((bitnet / "config.json").read_text())
    assert not FakeQuantFormat().detect(cfg, reader.names(), reader)
    # FBI-style extra tensors next to ternary-looking weights: another format's checkpoint
    folder = write_fakequant(tmp_path / "fbi", ternary_rows)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.wscale"] = torch.ones(1, H)
    save_file(tensors, str(folder / "model.safetensors"))
    reader = CheckpointReader(folder)
    assert not FakeQuantFormat().detect(json.loads((folder / "config.json").read_text()), reader.names(), reader)


def test_priority_between_specific_formats_and_dense():
    reg = FormatRegistry()
    others = [reg.get(n).priority for n in reg.names() if n not in ("fakequant", "dense")]
    assert reg.get("dense").priority < FakeQuantFormat.priority < min(others)


def test_detection_reads_only_sampled_rows(tmp_path, monkeypatch):
    folder = write_fakequant(tmp_path / "t", ternary_rows)
    reader = CheckpointReader(folder)
    config = json.loads((folder / "config.json").read_text())

    def no_full_reads(self, name, **kwargs):
        raise AssertionError(f"detection read the whole tensor {name}")

    monkeypatch.setattr(CheckpointReader, "get", no_full_reads)
    assert FakeQuantFormat(config).detect(config, reader.names(), reader)


def test_sampling_spreads_over_layers():
    names = [f"model.layers.{i}.{m}.{p}_proj.weight" for i in range(12)
             for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps]
    picks = sample_projection_names(names, 4)
    assert len(picks) == 4 and len(set(picks)) == 4
    assert {p.split(".")[2] for p in picks} == {"0", "4", "7", "11"}
    assert len({p.split(".")[-2] for p in picks}) == 4


def test_misfit_reason_is_specific():
    w = torch.randn(8, 64)
    result = analyze(w, "F32")
    assert isinstance(result, Misfit)
    assert "distinct values" in result.reason and "limit 25%" in result.reason


def test_level_counting_on_wide_rows():
    """Rows wider than the sampled columns: counts equal torch.unique's, including a level the column
    sample misses (only in an unsampled column) and a row with many values."""
    from bitserve.plugins.fakequant_grid import top_levels

    gen = torch.Generator().manual_seed(7)
    rows = [torch.tensor([-0.5, 0.0, 0.5])[torch.randint(0, 3, (1024,), generator=gen)],
            torch.full((1024,), 0.25),
            torch.randn(1024, generator=gen)]
    rare = torch.tensor([-1.0, 1.0])[torch.randint(0, 2, (1024,), generator=gen)]
    rare[3] = 2.0  # column 3 is not among the sampled columns (every 16th)
    rows.append(rare)
    x = torch.stack(rows)
    levels, counts, distinct = top_levels(x)
    for i, row in enumerate(rows):
        values, freq = row.unique(return_counts=True)
        assert int(distinct[i]) == len(values)
        top = sorted(zip(freq.tolist(), values.tolist()), reverse=True)[:4]
        got = sorted(((int(c), float(v)) for c, v in zip(counts[i], levels[i]) if c > 0), reverse=True)
        assert [c for c, _ in got] == [c for c, _ in top]
        if len(values) <= 4:
            assert sorted(v for _, v in got) == sorted(values.tolist())
    # and a wide ternary weight with two off-grid columns is analysed as ternary + 2 salient columns
    w = torch.stack(rows[:1] * 6)
    w[:, 100] = torch.arange(6) * 0.01 + 0.3
    w[:, 700] = -0.7
    plan = analyze(w, "F32")
    assert plan.kind == "ternary" and plan.salient.nonzero().squeeze(1).tolist() == [100, 700]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["paretoq_ternary", "binary_rows", "paretoq_2bit_seq", "ptq161"])
def test_cuda_matches_cpu(tmp_path, method):
    quantize, dtype = METHODS[method][:2]
    folder = write_fakequant(tmp_path / method, quantize, dtype=dtype)
    cpu = load_model(folder, device="cpu", dtype="float32", progress=False)
    ref = prefill_logits(cpu.model, IDS)
    for model_dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
        gpu = load_model(folder, device="cuda", dtype=model_dtype, progress=False)
        assert {type(m) for m in linears(gpu.model)} == {type(m) for m in linears(cpu.model)}
        out = prefill_logits(gpu.model, IDS).cpu()
        assert (out - ref).abs().max() <= tol * ref.abs().max(), (model_dtype, (out - ref).abs().max())
