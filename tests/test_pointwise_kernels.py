"""The decoder's element-wise kernels (bitserve.kernels.pointwise): RoPE of q and k in one
kernel, and the gated activation. Oracle: float64 math of the same definitions; the twins too.
Without a GPU the kernels run under ``TRITON_INTERPRET=1``; the ``gpu`` variants on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import triton_interp

triton_interp.enable()
pytest.importorskip("triton")

from bitserve.kernels import dispatch, pointwise, reference  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs on CPU-only hosts")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def rope_tables(positions: torch.Tensor, d: int, theta: float = 10000.0):
    """float64 cos/sin ``[T, D]`` laid out like the model's (each half repeats the pair angles)."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos(), ang.sin()


def rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (j, j + D/2) rotated by their angle, in float64, from the definition."""
    x = x.double()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,heads,kv_heads,d", [(1, 4, 2, 16), (7, 5, 1, 48), (33, 20, 5, 128)])
def test_rope_qk_matches_float64(device, dtype, t, heads, kv_heads, d):
    g = torch.Generator().manual_seed(t * 1000 + d)
    # q and k as the model gets them: strided views into one fused qkv output row per token
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * d, generator=g) * 3).to(dtype).to(device)
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d: (heads + kv_heads) * d].view(t, kv_heads, d)
    positions = torch.randint(0, 4096, (t,), generator=g)
    cos64, sin64 = rope_tables(positions, d)
    cos, sin = cos64.to(dtype).to(device), sin64.to(dtype).to(device)
    with dispatch.use_triton(True):
        q_out, k_out = dispatch.rope_qk(q, k, cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == dtype
    for got, x in ((q_out, q), (k_out, k)):
        want = rope64(x.cpu(), cos.cpu().double(), sin.cpu().double())  # the tables as rounded to dtype
        bound = 2 * UNIT[dtype] * (x.cpu().double().abs().amax(-1, keepdim=True) * math.sqrt(2)) + 1e-30
        err = (got.cpu().double() - want).abs()
        assert (err <= bound).all(), f"max error {err.max().item():.3g}"
        twin = reference.rotate_half_rope(x.cpu(), cos.cpu(), sin.cpu()).double()
        assert ((twin - want).abs() <= 2 * bound).all()  # the twin rounds each product; same function


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("t,i", [(1, 160), (7, 1500), (16, 6912)])
def test_act_and_mul_matches_float64(device, dtype, act, t, i):
    g = torch.Generator().manual_seed(t * 7 + i)
    x = (torch.randn(t, 2 * i, generator=g) * 3).to(dtype).to(device)
    with dispatch.use_triton(True):
        got = dispatch.act_and_mul(x, act)
    assert got.shape == (t, i) and got.dtype == dtype
    gate, up = x.cpu().double().chunk(2, dim=-1)
    a = gate * torch.sigmoid(gate) if act == "silu" else torch.relu(gate) ** 2
    want = a * up
    err = (got.cpu().double() - want).abs()
    assert (err <= 2 * UNIT[dtype] * want.abs() + 1e-6 * a.abs().amax()).all(), f"max error {err.max().item():.3g}"
    twin = reference.act_and_mul(x.cpu(), act).double()
    assert ((twin - want).abs() <= 4 * UNIT[dtype] * want.abs() + 1e-6 * a.abs().amax()).all()


def test_bad_inputs_are_named():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        pointwise.act_and_mul(x, "gelu")
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        pointwise.act_and_mul(torch.randn(2, 9), "silu")
    with pytest.raises(ValueError, match="even head_dim"):
        pointwise.rope_qk(torch.randn(1, 2, 7), torch.randn(1, 1, 7), torch.randn(1, 7), torch.randn(1, 7))


def test_cpu_dispatch_keeps_the_twins():
    """Without CUDA (and outside use_triton) the model's element-wise steps stay plain torch."""
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos, sin = (t.float() for t in rope_tables(torch.arange(3), 16))
    got = dispatch.rope_qk(q, k, cos, sin)
    want = reference.rope_qk(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x = torch.randn(3, 20)
    assert torch.equal(dispatch.act_and_mul(x, "relu2"), torch.relu(x[:, :10]) ** 2 * x[:, 10:])
