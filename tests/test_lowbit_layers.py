"""QuantLinears over the new weight ops (CPU twins): forward == float64 of dequantize(), bytes held,
OneBit / FBI-LLM worked examples (FORMATS.md §3.4, §4.2), and the opt-in int8 LM head."""

import pytest
import torch

from bitserve.kernels.ondisk import onebit_to_kernel_layout, pack_bits_lsb
from bitserve.kernels.packing import pack_dual_binary, pack_sign_bits, pack_ternary, sign_bits
from bitserve.plugins.lowbit_layers import BinaryLinear, DualBinaryLinear, Int8LMHead, TernaryLinearA16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_forward(layer, k, dtype=torch.float32, ms=(1, 3, 17), rtol=1e-5):
    w = layer.dequantize().double()
    for m in ms:
        x = torch.randn(m, k, generator=_gen(m)).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (m, layer.out_features)
        ref = x.double() @ w.t()
        if getattr(layer, "bias", None) is not None:
            ref = ref + layer.bias.double()
        scale = (x.double().abs() @ w.abs().t()).max()
        assert (y.double() - ref).abs().max() <= rtol * scale + 1e-9


def test_ternary_a16_layer():
    g = _gen(1)
    t = torch.randint(-1, 2, (24, 40), generator=g, dtype=torch.int8)
    layer = TernaryLinearA16(pack_ternary(t), torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g))
    _check_forward(layer, 40)
    assert layer.act_quant is None
    assert layer.bits_per_weight == pytest.approx(2 + 32 / 40 * 2)  # packed + fp32 scale and bias per row


@pytest.mark.parametrize("variant", ["onebit", "fbi", "plain"])
def test_binary_layer(variant):
    g = _gen(2)
    n, k = 20, 48
    bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    kw = {}
    if variant == "onebit":
        kw = {"in_scale": torch.rand(k, generator=g) + 0.5, "out_scale": torch.rand(n, generator=g) + 0.5}
    elif variant == "fbi":
        kw = {"in_scale": torch.rand(k, generator=g) + 0.5, "in_bias": torch.randn(k, generator=g) * 0.1,
              "bias": torch.randn(n, generator=g)}
    layer = BinaryLinear(pack_sign_bits(bits), **kw)
    _check_forward(layer, k)
    _check_forward(layer, k, torch.bfloat16, ms=(2,), rtol=2 ** -6)


def test_onebit_worked_example():
    # FORMATS.md §3.4: S=[[1,-1],[-1,-1]], g=[0.5,2], h=[1,3], x=[1,1] -> pre-norm output [-1.5, -7.5]
    s = torch.tensor([[1, -1, 1, 1, 1, 1, 1, 1], [-1, -1, 1, 1, 1, 1, 1, 1]])  # padded to K = 8 with g = 0
    stored = pack_bits_lsb(sign_bits(s)).view(torch.int8)
    layer = BinaryLinear(onebit_to_kernel_layout(stored), in_scale=torch.tensor([0.5, 2, 0, 0, 0, 0, 0, 0]),
                         out_scale=torch.tensor([1.0, 3.0]))
    x = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]])
    assert layer(x).tolist() == [[-1.5, -7.5]]


def test_fbi_worked_example():
    # FORMATS.md §4.2: W=[[0.3,-0.2,0.5],[-0.1,0.4,-0.6]], alpha=[0.2,0.3,0.5], beta=[0.01,-0.02,0], x=[1,2,-1]
    w = torch.tensor([[0.3, -0.2, 0.5, 1, 1, 1, 1, 1], [-0.1, 0.4, -0.6, 1, 1, 1, 1, 1]])
    alpha = torch.tensor([0.2, 0.3, 0.5, 0, 0, 0, 0, 0])
    beta = torch.tensor([0.01, -0.02, 0, 0, 0, 0, 0, 0])
    layer = BinaryLinear(pack_sign_bits(sign_bits(w)), in_scale=alpha, in_bias=beta)
    y = layer(torch.tensor([[1.0, 2, -1, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(y, torch.tensor([[-0.93, 0.87]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.dequantize()[:, :3], torch.tensor([[0.21, -0.32, 0.5], [-0.19, 0.28, -0.5]]))


@pytest.mark.parametrize("group", [32, 64])
def test_dual_binary_layer(group):
    g = _gen(group)
    n, k = 12, 128
    b1 = torch.randint(0, 2, (n, k), generator=g)
    b2 = torch.randint(0, 2, (n, k), generator=g)
    layer = DualBinaryLinear(pack_dual_binary(b1, b2, group), torch.rand(n, k // group, generator=g) * 2,
                             -torch.rand(n, k // group, generator=g), group, torch.randn(n, generator=g))
    _check_forward(layer, k)
    # DB-LLM levels with s = 1 (alpha1 = 2s, alpha2 = -s): (B1, B2) = (0,1) (0,0) (1,1) (1,0) -> -1 0 1 2
    lv = DualBinaryLinear(pack_dual_binary(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 0, 1, 0]]), 4),
                          torch.tensor([[2.0]]), torch.tensor([[-1.0]]), 4)
    assert lv.dequantize().tolist() == [[-1, 0, 1, 2]]


def test_int8_lm_head():
    g = _gen(3)
    dense = (torch.randn(300, 64, generator=g) * 0.05).bfloat16()
    head = Int8LMHead.from_dense(dense)
    assert head.weight.dtype == torch.int8 and head.nbytes == 300 * 64 + 300 * 4
    assert (head.dequantize() - dense.float()).abs().max() <= head.scale.max() / 2 + 1e-6
    x = torch.randn(5, 64, generator=g).bfloat16()
    logits = head(x, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and logits.shape == (5, 300)
    ref = x.double() @ head.dequantize().double().t()
    assert (logits.double() - ref).abs().max() <= 1e-5 * (x.double().abs() @ head.dequantize().double().abs().t()).max()
    # vs the bf16 head: int8 rounding only
    dense_logits = x.float() @ dense.float().t()
    assert (logits - dense_logits).abs().max() <= 0.02 * dense_logits.abs().max()
    ids = torch.tensor([0, 299, 7])
    emb = head.embed(ids)
    assert emb.dtype == torch.bfloat16
    assert (emb.float() - dense[ids].float()).abs().max() <= head.scale[ids].max() / 2 + 1e-2 * emb.float().abs().max()
