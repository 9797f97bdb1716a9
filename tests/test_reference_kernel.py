"""The plain-torch W1.58A8 op against FORMATS.md §1.5 and an independent float64/int64 oracle."""

import pytest
import torch

from bitserve.kernels import reference
from bitserve.kernels.packing import pack_ternary, unpack_ternary
from bitserve.kernels.reference import quantize_activations_int8, ternary_linear_w2a8, ternary_matmul_int


def _ternary(n, k, gen):
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


def _oracle(x, t, scale, bias, quant_dtype=torch.float64):
    """float64: per-token absmax int8 fake-quant of x, dense T, multiply by scale, add bias.

    ``quant_dtype`` is the precision of the quantization step only (s_x and x*s_x).
    """
    xd = x.to(quant_dtype)
    s = 127.0 / xd.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (xd * s).round().clamp(-128, 127).double()
    s = s.double()
    y = (xq @ t.double().t()) / s * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y


# -- FORMATS.md §1.5 worked example -----------------------------------------------------
def test_formats_worked_example():
    x = torch.tensor([[0.5, -1.0, 0.25, 2.0]])
    x_q, s_x = quantize_activations_int8(x)
    assert x_q.dtype == torch.int8
    assert x_q.tolist() == [[32, -64, 16, 127]]
    assert s_x.shape == (1, 1) and s_x.item() == pytest.approx(63.5)
    t = torch.tensor([[1, 0, -1, 1], [-1, -1, 0, 1]], dtype=torch.int8)
    packed = pack_ternary(t)
    assert ternary_matmul_int(x_q, packed).tolist() == [[143.0, 159.0]]
    y = ternary_linear_w2a8(x, packed, torch.tensor([1.5]))
    assert y.dtype == torch.float32 and y.shape == (1, 2)
    torch.testing.assert_close(y, torch.tensor([[143 / 63.5 * 1.5, 159 / 63.5 * 1.5]]), rtol=1e-6, atol=0)
    assert y[0].tolist() == pytest.approx([3.3780, 3.7559], abs=5e-5)


def test_rounding_half_to_even_and_zero_row():
    # x*s lands exactly on .5: -63.5 rounds to -64 (half-to-even); 0.5 -> 0; 1.5 -> 2
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
    x_q, s_x = quantize_activations_int8(x)
    assert x_q[0].tolist() == [127, -64, 0, 2]
    assert x_q[1].tolist() == [0, 0, 0, 0]
    assert s_x[1].item() == pytest.approx(127.0 / 1e-5)
    y = ternary_linear_w2a8(x, pack_ternary(torch.ones(4, 4, dtype=torch.int8)), torch.tensor([1.0]))
    assert torch.isfinite(y).all() and y[1].abs().max() == 0


# -- random data vs float64 oracle ----------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("n,k", [(4, 4), (24, 36), (96, 64), (40, 520)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_float64(m, n, k, per_channel, with_bias):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k + per_channel)
    x = torch.randn(m, k, generator=gen) * 3
    t = _ternary(n, k, gen)
    scale = (torch.rand(n if per_channel else 1, generator=gen) + 0.1).float()
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = ternary_linear_w2a8(x, pack_ternary(t), scale, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = _oracle(x, t, scale, bias)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 7, 33])
def test_bf16_matches_float64(m):
    gen = torch.Generator().manual_seed(m)
    n, k = 48, 96
    x = (torch.randn(m, k, generator=gen)).bfloat16()
    t = _ternary(n, k, gen)
    scale = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen).bfloat16()
    y = ternary_linear_w2a8(x, pack_ternary(t), scale, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # bf16 inputs have 8 significant bits, so x*s_x often lands exactly on a .5 tie
    # that float32 and float64 round differently; the op quantizes in float32.
    ref = _oracle(x, t, scale, bias.float(), quant_dtype=torch.float32)
    # the only remaining error is the final rounding to bf16 (8 significant bits)
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)


def test_leading_dims_preserved():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, generator=gen)
    t = _ternary(8, 16, gen)
    y = ternary_linear_w2a8(x, pack_ternary(t), torch.tensor([0.7]))
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y.double(), _oracle(x.reshape(6, 16), t, torch.tensor([0.7]), None).reshape(2, 3, 8),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [64, 100, 257])
def test_tiled_path_matches(monkeypatch, tile):
    """Force many tiles (fewer rows than N per tile, even a single row) and compare."""
    monkeypatch.setattr(reference, "_TILE_ELEMENTS", tile)
    gen = torch.Generator().manual_seed(tile)
    m, n, k = 7, 37, 128
    x = torch.randn(m, k, generator=gen)
    t = _ternary(n, k, gen)
    scale = torch.rand(n, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    y = ternary_linear_w2a8(x, pack_ternary(t), scale, bias)
    torch.testing.assert_close(y.double(), _oracle(x, t, scale, bias), rtol=1e-5, atol=1e-5)


# -- exact integer accumulation ---------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 4, 4), (5, 33, 100), (3, 17, 4096)])
def test_integer_accumulation_exact(m, n, k):
    gen = torch.Generator().manual_seed(k)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    t = _ternary(n, k, gen)
    acc = ternary_matmul_int(x_q, pack_ternary(t))
    exact = x_q.long() @ t.long().t()
    assert acc.dtype == torch.float32
    assert torch.equal(acc.long(), exact)
    assert torch.equal(acc, exact.float())


def test_integer_accumulation_exact_worst_case():
    # every partial sum at its extreme (|x_q| = 128, t = +-1): exact up to the fp32 limit
    k = reference._EXACT_FP32_MAX_K
    x_q = torch.full((1, k), -128, dtype=torch.int8)
    t = torch.ones(2, k, dtype=torch.int8)
    t[1] = -1
    acc = ternary_matmul_int(x_q, pack_ternary(t))
    assert acc.tolist() == [[-128.0 * k, 128.0 * k]]


def test_integer_accumulation_beyond_fp32_limit():
    # K beyond the exact-fp32 limit switches to float64 accumulation; the result must stay exact
    k = reference._EXACT_FP32_MAX_K + 4
    gen = torch.Generator().manual_seed(1)
    x_q = torch.randint(-128, 128, (1, k), generator=gen, dtype=torch.int8)
    x_q[0, :64] = 127
    t = _ternary(2, k, gen)
    exact = x_q.long() @ t.long().t()
    acc = ternary_matmul_int(x_q, pack_ternary(t))
    assert torch.equal(acc, exact.float())


@pytest.mark.parametrize("m,n,k", [(1, 4, 4), (6, 37, 132), (33, 64, 1024)])
def test_int8_cpu_path_equals_lut_path(m, n, k):
    # int8 activations on CPU take the shift-unpack + int8 GEMM path; any other dtype the LUT path
    gen = torch.Generator().manual_seed(m * n)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    packed = pack_ternary(_ternary(n, k, gen))
    exact = (x_q.long() @ unpack_ternary(packed, torch.int64).t()).float()
    assert torch.equal(ternary_matmul_int(x_q, packed), exact)
    assert torch.equal(ternary_matmul_int(x_q.to(torch.int32), packed), exact)
    assert torch.equal(ternary_matmul_int(x_q.float(), packed), exact)


def test_k_mismatch_raises():
    with pytest.raises(ValueError, match="K="):
        ternary_matmul_int(torch.zeros(1, 8, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.uint8))


# -- no dense weight is materialised -------------------------------------------------------------
def test_no_full_dense_weight(monkeypatch):
    seen = []
    real = reference.F.embedding

    def spy(idx, table, *args, **kwargs):
        out = real(idx, table, *args, **kwargs)
        seen.append(out.numel())
        return out

    real_codes = reference._unpack_codes

    def spy_codes(packed, buf):
        out = real_codes(packed, buf)
        seen.append(out.numel())
        assert buf.numel() <= 1 << 14
        return out

    monkeypatch.setattr(reference.F, "embedding", spy)
    monkeypatch.setattr(reference, "_unpack_codes", spy_codes)
    monkeypatch.setattr(reference, "_TILE_ELEMENTS", 1 << 14)
    gen = torch.Generator().manual_seed(0)
    n, k = 256, 512  # N*K = 2^17 > tile
    x = torch.randn(3, k, generator=gen)
    t = _ternary(n, k, gen)
    y = ternary_linear_w2a8(x, pack_ternary(t), torch.tensor([0.5]))
    torch.testing.assert_close(y.double(), _oracle(x, t, torch.tensor([0.5]), None), rtol=1e-5, atol=1e-5)
    assert len(seen) > 1, "the weight was not tiled"
    assert max(seen) < n * k
    assert max(seen) <= 1 << 14
    assert sum(seen) == n * k  # every weight unpacked exactly once


# -- paged attention -----------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("gather", [1 << 24, 200, 1])
def test_paged_attention_matches_contiguous(monkeypatch, heads, kv_heads, gather):
    """Decode rows and prefill chunks over scattered blocks == per-sequence causal attention,
    bit for bit the same whichever sequences are gathered together."""
    monkeypatch.setattr(reference, "_GATHER_ELEMENTS", gather)
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, dim, num_blocks = 4, 8, 32
    seq_lens, q_lens = [5, 9, 1, 13, 7, 16], [1, 1, 1, 4, 7, 1]
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, width = [], max(-(-n // bs) for n in seq_lens)
    for n in seq_lens:
        need = -(-n // bs)
        tables.append([perm.pop() for _ in range(need)] + [0] * (width - need))
    qsl = [0]
    for L in q_lens:
        qsl.append(qsl[-1] + L)
    q = torch.randn(qsl[-1], heads, dim, generator=gen)
    got = reference.paged_attention(q, k_cache, v_cache, torch.tensor(tables), torch.tensor(seq_lens),
                                    torch.tensor(qsl))
    for s, (n, L) in enumerate(zip(seq_lens, q_lens)):
        blocks = torch.tensor(tables[s][: -(-n // bs)])
        keys = k_cache[blocks].reshape(-1, kv_heads, dim)[:n]
        values = v_cache[blocks].reshape(-1, kv_heads, dim)[:n]
        pos = torch.arange(n)
        want = reference.causal_attention(q[qsl[s]:qsl[s + 1]], keys, values, pos[n - L:], pos)
        torch.testing.assert_close(got[qsl[s]:qsl[s + 1]], want, rtol=1e-5, atol=1e-5)
        alone = reference.paged_attention(q[qsl[s]:qsl[s + 1]], k_cache, v_cache, torch.tensor([tables[s]]),
                                          torch.tensor([n]), torch.tensor([0, L]))
        assert torch.equal(alone, got[qsl[s]:qsl[s + 1]])  # batch invariant
