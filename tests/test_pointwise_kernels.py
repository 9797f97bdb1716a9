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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("m,k", [(1, 64), (7, 2560), (33, 6912)])
def test_rmsnorm_matches_twin_and_float64(device, x_dtype, w_dtype, m, k):
    g = torch.Generator().manual_seed(m * 31 + k)
    rows = torch.randn(m, k + 24, generator=g) * 4
    rows[:, ::11] *= 8  # a few outliers per row
    x = rows.to(x_dtype).to(device)[:, 5:5 + k]  # strided rows, as a slice of a wider output
    w = (torch.rand(k, generator=g) + 0.5).to(w_dtype).to(device)
    with dispatch.use_triton(True):
        got = dispatch.rmsnorm(x, w, 1e-5)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    assert got.dtype == out_dtype and got.shape == (m, k)
    xd = x.cpu().double()
    want = w.cpu().double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    # the twin's two roundings (to x's dtype, then the product), plus the float32 sum of squares
    # (fp16 also has subnormals below 2**-14: an absolute step of 2**-24 there)
    bound = (UNIT[x_dtype] + UNIT[out_dtype] + k * 2.0 ** -24) * want.abs() + 2.0 ** -22
    err = (got.cpu().double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}"
    twin = reference.rmsnorm(x.cpu(), w.cpu(), 1e-5)
    diff = (got.cpu().double() - twin.double()).abs()
    assert (diff <= (2 * UNIT[out_dtype] + k * 2.0 ** -24) * twin.double().abs() + 2.0 ** -22).all()
    if out_dtype != torch.float32:  # the same roundings: nearly always the same value
        assert (diff == 0).float().mean() > 0.95


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (9, 6912)])
def test_add_rmsnorm_is_the_norm_of_the_sum(device, dtype, m, k):
    """The residual add in the norm's kernel: ``h`` is exactly torch's ``x + residual`` and the
    norm is the kernel's own norm of ``h``."""
    g = torch.Generator().manual_seed(m + k)
    x, res = ((torch.randn(m, k, generator=g) * 3).to(dtype).to(device) for _ in range(2))
    w = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    with dispatch.use_triton(True):
        y, h = dispatch.add_rmsnorm(x, res, w, 1e-6)
        want = dispatch.rmsnorm(x + res, w, 1e-6)
    assert torch.equal(h, x + res) and torch.equal(y, want)
    twin_y, twin_h = reference.add_rmsnorm(x.cpu(), res.cpu(), w.cpu(), 1e-6)
    assert torch.equal(twin_h, h.cpu())
    torch.testing.assert_close(twin_y, y.cpu(), rtol=2 * UNIT[dtype] + k * 2.0 ** -24, atol=2.0 ** -22)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[64], [48, 16, 16], [100, 100, 7, 50], [2560, 640, 640], [6912, 6912]])
def test_layer_norm_parts_matches_float64(device, dtype, sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    m = 5
    x = ((torch.randn(m, sum(sizes), generator=g) + 0.3) * 3).to(dtype).to(device)
    with dispatch.use_triton(True):
        got = dispatch.layer_norm_parts(x, sizes, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    want = []
    for part in x.cpu().double().split(sizes, dim=-1):
        mean = part.mean(-1, keepdim=True)
        var = ((part - mean) ** 2).mean(-1, keepdim=True)
        want.append((part - mean) / torch.sqrt(var + 1e-5))
    want = torch.cat(want, dim=-1)
    err = (got.cpu().double() - want).abs()
    assert (err <= 2 * UNIT[dtype] * want.abs() + 1e-5).all(), f"max error {err.max().item():.3g}"
    twin = reference.layer_norm_parts(x.cpu(), sizes, 1e-5).double()
    assert ((twin - want).abs() <= 2 * UNIT[dtype] * want.abs() + 1e-5).all()


def test_onebit_model_runs_the_kernels(tmp_path):
    """A OneBit model -- RMSNorm, per-part output LayerNorm, RoPE, SiLU gating, binary linears --
    on the Triton kernels (interpreted on a CPU-only host) gives the twins' logits."""
    from binary_checkpoints import save_checkpoint
    from test_onebit import onebit_config, random_onebit

    from bitserve.loader import load_model
    from bitserve.model.prefill import prefill_logits

    config = onebit_config()
    stored, _ = random_onebit(config, seed=9)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(save_checkpoint(tmp_path / "onebit", config, stored), device=device, dtype="float32",
                        progress=False)
    ids = [5, 17, 3, 42, 8, 23, 11]
    with dispatch.use_triton(False):
        want = prefill_logits(loaded.model, ids)
    with dispatch.use_triton(True):
        got = prefill_logits(loaded.model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bench_cases_agree_with_their_torch_ops():
    """kernels/bench.py's pointwise section (GPU only) times these pairs: they compute the same."""
    from bitserve.kernels import bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, tri, twin in bench.pointwise_cases(1, torch.Generator(device=device).manual_seed(0), device=device):
        a, b = tri(), twin()
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert bench.rel_err(x.float(), y.float()) < 2e-2, name


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
