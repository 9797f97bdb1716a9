"""Triton KV-cache kernels (quantize-and-write, paged decode / prefill attention) against
their plain-torch twins: fresh random data, poisoned outputs, GQA ratios 1/4/8, odd
context lengths and block boundaries. On a CPU the kernels run under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

import triton_interp

# on a CPU: TRITON_INTERPRET=1 before the kernel modules are imported, and the interpreter's bf16
# casts fixed to round like a GPU's
triton_interp.enable()
pytest.importorskip("triton")

from bitserve.kernels import kv_attention, kv_quant, reference  # noqa: E402
from bitserve.kernels import kv_reference as ref  # noqa: E402
from bitserve.kernels.kv_reference import AttnMeta, KVLayer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, KVH, D, NB, SLOTS = 16, 2, 32, 48, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_layer(kind: str, bits: int, gen: torch.Generator, dtype=torch.float32, poison: bool = False,
               B: int = B, D: int = D, KVH: int = KVH, NB: int = NB) -> KVLayer:  # noqa: N803
    """A layer with random contents (or poison: codes 0x5A, scales NaN)."""
    def rnd(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(DEVICE)

    def codes(shape, lo, hi, dt):
        if poison:
            return torch.full(shape, 0x5A, dtype=dt, device=DEVICE)
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int32).to(dt).to(DEVICE)

    def scales(*shape, signed=False):
        if poison:
            return torch.full(shape, float("nan"), dtype=torch.float16, device=DEVICE)
        return (rnd(*shape, lo=-1, hi=1) if signed else rnd(*shape, lo=0.01, hi=0.3)).half()

    if kind == "float":
        x = lambda: torch.randn(NB, B, KVH, D, generator=gen).to(dtype).to(DEVICE)  # noqa: E731
        return KVLayer("float", x(), x())
    if kind == "int8":
        shape = (NB, B, KVH, D)
        return KVLayer("int8", codes(shape, -127, 128, torch.int8), codes(shape, -127, 128, torch.int8), 8,
                       k_scale=scales(NB, B, KVH).mul(0.1), v_scale=scales(NB, B, KVH).mul(0.1))
    shape = (NB, B, KVH, D * bits // 8)
    stage = torch.randn(SLOTS, B, KVH, D, generator=gen).to(dtype).to(DEVICE)
    return KVLayer("intn", codes(shape, 0, 256, torch.uint8), codes(shape, 0, 256, torch.uint8), bits,
                   scales(NB, KVH, D), scales(NB, KVH, D, signed=True), scales(NB, B, KVH),
                   scales(NB, B, KVH, signed=True), stage)


def clone(layer: KVLayer) -> KVLayer:
    return KVLayer(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(layer).items()})


def assert_same_storage(a: KVLayer, b: KVLayer) -> None:
    """Bitwise equal under the interpreter; on a GPU (its fp32 division may differ by an ulp)
    a code may be off by one at a rounding boundary in a few elements, scales by an fp16 ulp."""
    for name, x in vars(a).items():
        if not isinstance(x, torch.Tensor):
            continue
        y = getattr(b, name)
        if DEVICE.type == "cpu":
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name  # NaN poison compares bitwise
        elif x.dtype == torch.float16:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=0, equal_nan=True, msg=name)
        else:
            cx = ref.unpack_planar(x, a.bits) if x.dtype == torch.uint8 else x
            cy = ref.unpack_planar(y, a.bits) if y.dtype == torch.uint8 else y
            diff = (cx.int() - cy.int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, name


def random_slots(t: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(NB * B, generator=gen)[:t].to(DEVICE)


def strided_rows(t: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``[t, KVH, D]`` with a row stride wider than KVH * D (like a slice of a fused qkv)."""
    wide = torch.randn(t, 3 * KVH * D, generator=gen).to(dtype).to(DEVICE)
    return wide[:, KVH * D : 2 * KVH * D].view(t, KVH, D)


# -- packing --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
def test_planar_packing_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 32), generator=gen)
    packed = ref.pack_planar(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 32 * bits // 8)
    assert torch.equal(ref.unpack_planar(packed, bits), codes)
    dp = 32 * bits // 8  # channel e sits in byte e % dp at bits (e // dp) * b
    for e in (0, 1, dp - 1, dp, 31):
        field = (packed[..., e % dp].int() >> (bits * (e // dp))) & ((1 << bits) - 1)
        assert torch.equal(field, codes[..., e])


# -- writes ---------------------------------------------------------------------------


def test_write_int8_matches_twin():
    gen = torch.Generator().manual_seed(1)
    t = 37
    k, v = strided_rows(t, gen) * 3, strided_rows(t, gen)
    k[5] = 0.0  # a constant row: scale clamps to SCALE_MIN
    slots = random_slots(t, gen)
    twin = make_layer("int8", 8, gen, poison=True)
    tri = clone(twin)
    ref.write_kv_int8(k, v, twin, slots)
    kv_quant.write_kv_int8(k, v, tri, slots)
    assert_same_storage(twin, tri)
    got = twin.k.view(-1, KVH, D)[slots].float() * twin.k_scale.view(-1, KVH)[slots].float().unsqueeze(-1)
    assert (got - k).abs().max() <= k.abs().amax() / 127 * 0.51 + 1e-3  # half a step (fp16 scale rounding)


@pytest.mark.parametrize("kind,bits", [("float", 16), ("int8", 8), ("intn", 4)])
def test_writes_of_head_dims_that_are_not_powers_of_two(kind, bits, monkeypatch):
    """The Triton writes tile a head with tl.arange(0, D): other head dims take the twins (with the
    Triton path forced, as on CUDA) instead of failing to compile."""
    from bitserve.kernels import kv_dispatch

    monkeypatch.setenv("BITSERVE_KV_TRITON", "1")
    gen = torch.Generator().manual_seed(24)
    d, t = 24, 11
    k, v = torch.randn(t, KVH, d, generator=gen).to(DEVICE), torch.randn(t, KVH, d, generator=gen).to(DEVICE)
    slots = random_slots(t, gen)
    layer = make_layer(kind, bits, gen, D=d, poison=True)
    twin = clone(layer)
    if kind == "intn":
        kv_dispatch.write_v_intn(v, layer, slots)
        ref.write_v_intn(v, twin, slots)
    else:
        kv_dispatch.write_kv(k, v, layer, slots)
        (reference.write_kv_cache(k, v, twin.k, twin.v, slots) if kind == "float"
         else ref.write_kv_int8(k, v, twin, slots))
    assert_same_storage(twin, layer)


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_write_float_matches_twin(src_dtype, cache_dtype):
    """Keys and values of a float cache written in one launch, cast like the twin's index copy."""
    gen = torch.Generator().manual_seed(2)
    t = 37
    k, v = strided_rows(t, gen, src_dtype) * 3, strided_rows(t, gen, src_dtype)
    slots = random_slots(t, gen)
    shape = (NB, B, KVH, D)
    twin = KVLayer("float", torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE),
                   torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE))
    tri = clone(twin)
    reference.write_kv_cache(k, v, twin.k, twin.v, slots)
    kv_quant.write_kv_float(k, v, tri, slots)
    assert torch.equal(twin.k.view(torch.uint8), tri.k.view(torch.uint8))  # NaN poison left where unwritten
    assert torch.equal(twin.v.view(torch.uint8), tri.v.view(torch.uint8))
    assert torch.equal(tri.k.view(-1, KVH, D)[slots], k.to(cache_dtype))


@pytest.mark.parametrize("bits", [4, 2])
def test_write_v_intn_matches_twin(bits):
    gen = torch.Generator().manual_seed(bits)
    t = 29
    v = strided_rows(t, gen)
    v[3] = 1.5  # constant row
    slots = random_slots(t, gen)
    twin = make_layer("intn", bits, gen, poison=True)
    tri = clone(twin)
    ref.write_v_intn(v, twin, slots)
    kv_quant.write_v_intn(v, tri, slots)
    assert_same_storage(twin, tri)
    codes = ref.unpack_planar(twin.v.view(-1, KVH, D * bits // 8)[slots], bits).float()
    got = codes * twin.v_scale.view(-1, KVH)[slots].float().unsqueeze(-1) + \
        twin.v_zero.view(-1, KVH)[slots].float().unsqueeze(-1)
    step = (v.amax(-1) - v.amin(-1)) / ((1 << bits) - 1)
    assert ((got - v).abs() <= step.unsqueeze(-1) * 0.51 + 2e-3).all()


@pytest.mark.parametrize("bits", [4, 2])
def test_finalize_k_intn_matches_twin(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    t = 2 * B + 9
    k_new = strided_rows(t, gen) + torch.linspace(-2, 2, D).to(DEVICE)  # per-channel offsets
    # three blocks fill: one entirely from this step, one with 5 staged rows, one with B-1 staged rows
    fin_block = torch.tensor([7, 3, 40], device=DEVICE)
    fin_slot = torch.tensor([-1, 2, 4], dtype=torch.int32, device=DEVICE)
    fin_old = torch.tensor([0, 5, B - 1], dtype=torch.int32, device=DEVICE)
    fin_src = torch.tensor([0, B, 2 * B - 5], device=DEVICE)
    twin = make_layer("intn", bits, gen, poison=True)
    twin.k_stage = torch.randn(SLOTS, B, KVH, D, generator=gen).to(DEVICE)
    tri = clone(twin)
    ref.finalize_k_intn(k_new, twin, fin_block, fin_slot, fin_old, fin_src)
    kv_quant.finalize_k_intn(k_new, tri, fin_block, fin_slot, fin_old, fin_src)
    assert_same_storage(twin, tri)
    # block 3 = staging rows 0..4 of slot 2, then k_new rows B..B+10
    rows = torch.cat((twin.k_stage[2, :5], k_new[B : 2 * B - 5]))
    deq = ref.unpack_planar(twin.k[3], bits).float() * twin.k_scale[3].float() + twin.k_zero[3].float()
    step = (rows.amax(0) - rows.amin(0)) / ((1 << bits) - 1)
    assert ((deq - rows).abs() <= step * 0.51 + 2e-3).all()
    assert not torch.isnan(twin.k_scale[[7, 3, 40]]).any()


def assert_same_storage_up_to_nan_bits(a: KVLayer, b: KVLayer) -> None:
    """:func:`assert_same_storage` with every NaN made the same NaN first (the sign and payload of a
    NaN that arithmetic produced differ between torch on the CPU and the kernel's explicit NaN)."""
    for layer in (a, b):
        for x in vars(layer).values():
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x.masked_fill_(x.isnan(), float("nan"))
    assert_same_storage(a, b)


@pytest.mark.parametrize("kind,bits", [("int8", 8), ("values", 4), ("values", 2), ("keys", 4), ("keys", 2)])
def test_rows_with_nan_quantize_like_the_twin(kind, bits):
    """A row (per-token scales) or channel (int-n keys' per-block scales) holding a NaN gets a NaN
    scale and codes 0, so it dequantizes to NaN in the kernel as in the twin. GPUs' min/max drop
    NaN: without the explicit check the kernel stored a finite scale and garbage codes there (a
    silently wrong key or value where the twin gives NaN); the other rows are untouched."""
    gen = torch.Generator().manual_seed(40 + bits)
    nan = float("nan")
    if kind == "keys":
        t = B
        k_new = strided_rows(t, gen)
        k_new[3, 1, 5] = nan  # channel 5 of head 1 in the block
        fin = [torch.tensor([9], device=DEVICE), torch.tensor([-1], dtype=torch.int32, device=DEVICE),
               torch.tensor([0], dtype=torch.int32, device=DEVICE), torch.tensor([0], device=DEVICE)]
        twin = make_layer("intn", bits, gen, poison=True)
        tri = clone(twin)
        ref.finalize_k_intn(k_new, twin, *fin)
        kv_quant.finalize_k_intn(k_new, tri, *fin)
        assert_same_storage_up_to_nan_bits(twin, tri)
        scale = tri.k_scale[9].float()
        assert torch.isnan(scale[1, 5]) and torch.isnan(tri.k_zero[9, 1, 5].float())
        assert int(torch.isnan(scale).sum()) == 1  # the other channels and head 0 keep finite scales
        deq = ref.unpack_planar(tri.k[9], bits).float() * tri.k_scale[9].float() + tri.k_zero[9].float()
        assert torch.isnan(deq[:, 1, 5]).all() and not torch.isnan(deq[:, 1, :5]).any()
        return
    t = 21
    x = strided_rows(t, gen)
    x[4, 0, 7] = nan
    x[11, 1, 0] = nan
    slots = random_slots(t, gen)
    twin = make_layer("int8" if kind == "int8" else "intn", bits, gen, poison=True)
    tri = clone(twin)
    if kind == "int8":
        ref.write_kv_int8(x, x, twin, slots)
        kv_quant.write_kv_int8(x, x, tri, slots)
        codes, scale = tri.v.view(-1, KVH, D)[slots], tri.v_scale.view(-1, KVH)[slots].float()
    else:
        ref.write_v_intn(x, twin, slots)
        kv_quant.write_v_intn(x, tri, slots)
        codes = ref.unpack_planar(tri.v.view(-1, KVH, D * bits // 8)[slots], bits)
        scale = tri.v_scale.view(-1, KVH)[slots].float()
        assert torch.equal(torch.isnan(tri.v_zero.view(-1, KVH)[slots].float()), torch.isnan(scale))
    assert_same_storage_up_to_nan_bits(twin, tri)
    bad = torch.zeros(t, KVH, dtype=torch.bool, device=DEVICE)
    bad[4, 0] = bad[11, 1] = True
    assert torch.equal(torch.isnan(scale), bad)
    assert int(codes[bad].abs().sum()) == 0


# -- attention ------------------------------------------------------------------------

# (context length, new tokens): decodes at odd lengths and block boundaries, a prefill
# from scratch, chunks over a cached prefix starting mid-block and at a block boundary,
# a chunk that fills exactly to a block boundary
SEQS = [(37, 1), (16, 1), (17, 1), (1, 1), (50, 13), (23, 23), (64, 32), (48, 9), (33, 2)]


def make_batch(gen: torch.Generator, seqs, heads: int, dtype=torch.float32, B: int = B, D: int = D,  # noqa: N803
               KVH: int = KVH, NB: int = NB):  # noqa: N803
    perm = torch.randperm(NB, generator=gen).tolist()
    width = max(-(-n // B) for n, _ in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.long)
    qsl, first, used = [0], [], 0
    for i, (n, length) in enumerate(seqs):
        nb = -(-n // B)
        tables[i, :nb] = torch.tensor(perm[used : used + nb])
        used += nb
        qsl.append(qsl[-1] + length)
        first.append(i % SLOTS if (n - length) % B else -1)
    t = qsl[-1]
    q = torch.randn(t, heads, D, generator=gen).to(dtype).to(DEVICE)
    lens = [n for n, _ in seqs]
    meta = AttnMeta(tables.to(DEVICE), torch.tensor(lens, device=DEVICE), torch.tensor(qsl, device=DEVICE), lens, qsl,
                    torch.tensor(first, dtype=torch.int32, device=DEVICE),
                    torch.randn(t, KVH, D, generator=gen).to(dtype).to(DEVICE))
    return q, meta


CASES = [("float", 16), ("int8", 8), ("int4", 4), ("int2", 2)]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kind,bits", CASES, ids=[c[0] for c in CASES])
def test_paged_attention_matches_twin(kind, bits, group):
    gen = torch.Generator().manual_seed(100 * bits + group)
    layer = make_layer("intn" if kind in ("int4", "int2") else kind, bits, gen)
    q, meta = make_batch(gen, SEQS, KVH * group)
    want = ref.paged_attention(q, layer, meta)
    for splits in (1, 3):
        out = torch.full_like(want, float("nan"))
        got = kv_attention.paged_attention(q, layer, meta, splits=splits, out=out)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,bits", [("float", 16), ("int4", 4)])
def test_paged_attention_bf16(kind, bits):
    gen = torch.Generator().manual_seed(7)
    layer = make_layer("intn" if kind == "int4" else kind, bits, gen, dtype=torch.bfloat16)
    q, meta = make_batch(gen, SEQS[:6], KVH * 4, dtype=torch.bfloat16)
    want = ref.paged_attention(q, layer, meta).float()
    got = kv_attention.paged_attention(q, layer, meta, splits=2).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_paged_attention_pre_rope_keys_matches_twin():
    gen = torch.Generator().manual_seed(3)
    layer = make_layer("intn", 4, gen)
    q, meta = make_batch(gen, SEQS, KVH * 4)
    angles = torch.arange(64).float().unsqueeze(1) * (10000.0 ** (-torch.arange(0, D, 2).float() / D))
    emb = torch.cat((angles, angles), dim=-1)
    meta.rope_cos, meta.rope_sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    want = ref.paged_attention(q, layer, meta)
    got = kv_attention.paged_attention(q, layer, meta, splits=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # RoPE after dequantization is a rotation: removing the tables changes the result
    meta.rope_cos = meta.rope_sin = None
    assert (ref.paged_attention(q, layer, meta) - want).abs().max() > 1e-2


def test_paged_attention_64_token_blocks_int4():
    """int4/int2's default block size: one block per tile, long contexts, a chunk crossing blocks."""
    gen = torch.Generator().manual_seed(5)
    layer = make_layer("intn", 4, gen, B=64)
    q, meta = make_batch(gen, [(130, 1), (64, 1), (200, 70), (65, 65), (128, 3)], KVH * 4, B=64)
    want = ref.paged_attention(q, layer, meta)
    torch.testing.assert_close(kv_attention.paged_attention(q, layer, meta, splits=2), want, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,bits", CASES, ids=[c[0] for c in CASES])
def test_paged_attention_2b4t_shapes_gpu(kind, bits):
    """2B4T attention shapes (20 heads, 5 KV heads, head_dim 128) in bf16 on the GPU."""
    gen = torch.Generator().manual_seed(11)
    bs = 64 if kind in ("int4", "int2") else 16
    layer = make_layer("intn" if kind in ("int4", "int2") else kind, bits, gen, dtype=torch.bfloat16, B=bs,
                       D=128, KVH=5, NB=320)
    seqs = [(2048, 1), (1000, 1), (513, 1), (700, 300), (96, 96)]
    q, meta = make_batch(gen, seqs, 20, dtype=torch.bfloat16, B=bs, D=128, KVH=5, NB=320)
    want = ref.paged_attention(q, layer, meta).float()
    # The kernel rounds dequantized keys/values and the softmax weights to bf16 for the tensor-core
    # dots (relative 2**-9 each); with |q|, |k| ~ N(0, 1) over 128 dims a score moves by up to
    # ~2**-9 * sum|q||k| / sqrt(128) ~ 0.015, so outputs move by ~1.5% of |v| (observed 0.033 on an
    # H100 for int8). Bound the worst element by 6e-2 and the mean error by 4e-3 (a wrong block,
    # scale or softmax gives errors of order 1 everywhere).
    atol = 2e-2 if kind == "float" else 6e-2
    for splits in (None, 1):
        got = kv_attention.paged_attention(q, layer, meta, splits=splits).float()
        torch.testing.assert_close(got, want, atol=atol, rtol=2e-2)
        assert (got - want).abs().mean() < 4e-3


def test_unrope_inverts_rope():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, KVH, D, generator=gen)
    angles = torch.rand(9, D // 2, generator=gen) * 50
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    torch.testing.assert_close(ref.unrope(ref.apply_rope(x, cos, sin), cos, sin), x, atol=1e-5, rtol=0)


# -- attention sinks (int-n): the first tokens of each sequence in full precision ------------------


def with_random_sinks(layer: KVLayer, gen: torch.Generator, sinks: int) -> KVLayer:
    layer.sink_k = torch.randn(layer.k.shape[0], sinks, KVH, D, generator=gen).to(layer.k_stage.dtype).to(DEVICE)
    layer.sink_v = torch.randn(layer.k.shape[0], sinks, KVH, D, generator=gen).to(layer.k_stage.dtype).to(DEVICE)
    return layer


@pytest.mark.parametrize("bits,sinks,rope", [(4, 4, False), (2, 1, False), (4, 3, True), (2, B, False)])
def test_paged_attention_with_sinks_matches_twin(bits, sinks, rope):
    gen = torch.Generator().manual_seed(40 + bits + sinks)
    layer = with_random_sinks(make_layer("intn", bits, gen), gen, sinks)
    q, meta = make_batch(gen, SEQS, KVH * 4)
    if rope:
        angles = torch.arange(64).float().unsqueeze(1) * (10000.0 ** (-torch.arange(0, D, 2).float() / D))
        emb = torch.cat((angles, angles), dim=-1)
        meta.rope_cos, meta.rope_sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    want = ref.paged_attention(q, layer, meta)
    for splits in (1, 3):
        out = torch.full_like(want, float("nan"))
        got = kv_attention.paged_attention(q, layer, meta, splits=splits, out=out)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the sinks are used: without them the result differs
    plain = KVLayer(**{**vars(layer), "sink_k": None, "sink_v": None})
    assert (ref.paged_attention(q, plain, meta) - want).abs().max() > 1e-2


def test_decode_with_sinks_float64_oracle():
    """A decode query sees: positions < S from the sink rows, its own block in full precision,
    every other position dequantized (checked against float64 softmax attention)."""
    gen = torch.Generator().manual_seed(77)
    sinks, heads = 3, KVH * 2
    layer = with_random_sinks(make_layer("intn", 4, gen), gen, sinks)
    q, meta = make_batch(gen, [(41, 1), (20, 1)], heads)
    got = kv_attention.paged_attention(q, layer, meta, splits=2).double()
    for s, (n, q0) in enumerate(zip(meta.seq_lens_host, meta.query_start_host)):
        table = meta.block_tables[s, : -(-n // B)]
        keys = ref.dequant_keys(layer, table).double()[:n]
        values = ref.dequant_values(layer, table).double()[:n]
        keys[:sinks], values[:sinks] = layer.sink_k[table[0]].double(), layer.sink_v[table[0]].double()
        own = (n - 1) // B * B  # own block: staged rows, then this step's key
        slot = int(meta.first_stage[s])
        staged = layer.k_stage[slot, : n - 1 - own].double() if n - 1 > own else keys[:0]
        keys[own:n] = torch.cat((staged, meta.k_new[q0 : q0 + 1].double()))
        group = heads // KVH
        for h in range(heads):
            kv = h // group
            w = torch.softmax(keys[:, kv] @ q[q0, h].double() / D**0.5, dim=0)
            want = w @ values[:, kv]
            assert (got[q0, h * D : (h + 1) * D] - want).abs().max() < 1e-4
