"""Triton weight kernels against their plain-torch twins and a float64 dequantized oracle.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (tests/triton_interp.py); the ``gpu``
variants run the same checks on CUDA (fixed GPU launch configs, so no autotuning here).

Error bounds (``y`` the kernel, ``r`` the float64 oracle, ``S = |x| @ |W|.T`` the sum of absolute
products, ``u`` the output's unit roundoff: 2**-8 bf16, 2**-11 fp16, 2**-24 fp32):
``|y - r| <= 2u|r| + c*S`` with ``c = K * 2**-24`` for float accumulation of exact operands, plus
``2**-15`` where fp32 (or scaled) activations enter a bf16 dot as hi + lo parts. W2A8: the oracle
quantizes x exactly like the twin, so only the fp32 epilogue remains (``2u|r| +
2**-21 * (|acc / s_x * ws| + |bias|)``); on GPUs fused multiply-adds may move an activation code by one at a rounding tie,
allowed as two codes' worth (``2 * max|x| / 127 * |scale|``). Under the interpreter W2A8 must equal
the twin bit for bit. Outputs and split-K workspaces are poisoned (NaN / INT32_MIN) before each
launch and every output element must be finite.
"""

from __future__ import annotations

import pytest
import torch

import random_inputs
import triton_interp

triton_interp.enable()
pytest.importorskip("triton")

from bitserve.kernels import (binary, binary_prefill, dispatch, int8_head, lowbit_decode, ops,  # noqa: E402
                              reference, reference_lowbit, ternary, ternary_decode, ternary_prefill, tl_common)
from bitserve.kernels.packing import (  # noqa: E402
    pack_dual_binary,
    pack_sign_bits,
    pack_ternary,
    quantize_weight_int8_rows,
    signs_from_bits,
)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs on CPU-only hosts")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
MS = [1, 2, 7, 16, 33, 128]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}

# launch configs on a GPU (None on the CPU: the interpreter defaults of each module)
GPU_CFG = {
    "gemv": {"BLOCK_N": 16, "BLOCK_J": 128, "num_warps": 4, "num_stages": 1},
    "gemm": {"BLOCK_N": 64, "BLOCK_J": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "binary": {"BLOCK_N": 64, "BLOCK_J": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "dual": {"BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "head_gemv": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
    "head_gemm": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
}


def cfg(device, name):
    return GPU_CFG[name] if device == "cuda" else None


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch):
    """Every scratch buffer starts as garbage: NaN floats, INT32_MIN / -128 integers."""
    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)

    monkeypatch.setattr(tl_common, "workspace", poisoned)


def poisoned_out(m, n, dtype, device):
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


def gen(*key):
    return random_inputs.generator(*key)  # fresh every run; BITSERVE_TEST_SEED (pytest's header) repeats one


def rand_x(m, k, dtype, g, scale=2.0):
    x = torch.randn(m, k, generator=g) * scale
    x[:, ::7] *= 4  # a few larger activations per token
    return x.to(dtype)


def assert_bound(y, ref, tol, what=""):
    y = y.double().cpu()
    assert torch.isfinite(y).all(), f"{what}: unwritten or non-finite outputs"
    err = (y - ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} exceeds its bound by {worst:.2f}x"


def float_bound(ref, s_abs, dtype, k, split):
    c = k * 2.0 ** -24 + (2.0 ** -15 if split else 0.0)
    return 2 * UNIT[dtype] * ref.abs() + c * s_abs + 1e-12


# -- ternary ---------------------------------------------------------------------------------------
def ternary_case(m, n, k, dtype, device, seed, per_channel, with_bias):
    g = gen("t", m, n, k, str(dtype), seed)
    x = rand_x(m, k, dtype, g)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n if per_channel else 1, generator=g) + 0.25
    bias = (torch.randn(n, generator=g)).to(dtype) if with_bias else None
    packed = pack_ternary(t)
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    return x, t, ws, bias, (dev(x), dev(packed), dev(ws), dev(bias))


def w2a8_oracle(x, t, ws, bias):
    xq, sx = reference.quantize_activations_int8(x)  # the contract quantizes in float32
    y = (xq.double() @ t.double().t()) / sx.double() * ws.double()
    mag = y.abs()  # what the fp32 epilogue rounds: |acc / s_x * ws| + |bias|
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag, x.float().abs().amax(-1, keepdim=True).double().clamp(min=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_ternary_w2a8(device, dtype, m):
    n, k = 72, 328
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 0, m % 2 == 0, m != 2)
    # K = 328: no dp4a (K % 16 != 0)
    path = "gemv" if m <= ternary.GEMV_MAX_M else "gemm" if m <= ternary_prefill.MIN_M else "wide"
    out = poisoned_out(m, n, dtype, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=True, config=cfg(device, path) if path != "wide" else None)
    assert y is out
    ref, mag, amax = w2a8_oracle(x, t, ws, bias)
    tol = 2 * UNIT[dtype] * ref.abs() + 2.0 ** -21 * mag + 1e-12
    if device == "cuda":
        tol = tol + 2 * amax / 127 * ws.double().abs()
    assert_bound(y, ref, tol, f"W2A8 {path}")
    twin = reference.ternary_linear_w2a8(x, pack_ternary(t), ws, bias)
    if device == "cpu":
        assert torch.equal(y, twin), "the interpreter must reproduce the twin bit for bit"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,m,split_k", [("gemv", 7, None), ("gemv", 16, 1), ("gemv", 1, 2), ("gemv", 2, 5),
                                            ("gemm", 1, None), ("gemm", 2, 1), ("gemm", 33, 2), ("gemm", 7, 3),
                                            ("wide", 1, None), ("wide", 33, 2), ("wide", 7, 3), ("wide", 128, None)])
def test_ternary_w2a8_paths_and_split_k(device, path, m, split_k):
    n, k, dtype = 40, 200, torch.bfloat16
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 1, True, True)
    out = poisoned_out(m, n, torch.float32, device)  # fp32 output buffer for bf16 activations
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=True, path=path, split_k=split_k,
                               config=cfg(device, path) if path != "wide" else None)
    ref, mag, amax = w2a8_oracle(x, t, ws, bias)
    tol = 2.0 ** -21 * mag + 1e-12 + (2 * amax / 127 * ws.double().abs() if device == "cuda" else 0)
    assert_bound(y, ref, tol, f"W2A8 {path} split {split_k}")
    if device == "cpu":  # fp32 output: the twin run on the same activations in fp32
        assert torch.equal(y, reference.ternary_linear_w2a8(x.float(), pack_ternary(t), ws, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_ternary_w2a8_dp4a(device, dtype, m):
    """The dp4a GEMV (path="dp4a"; K a multiple of 16, not a power of two) against the oracle."""
    n, k = 72, 336
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 5, m % 2 == 0, m != 2)
    out = poisoned_out(m, n, dtype, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=True, path="dp4a")
    assert y is out
    ref, mag, amax = w2a8_oracle(x, t, ws, bias)
    tol = 2 * UNIT[dtype] * ref.abs() + 2.0 ** -21 * mag + 1e-12
    if device == "cuda":
        tol = tol + 2 * amax / 127 * ws.double().abs()
    assert_bound(y, ref, tol, "W2A8 dp4a")
    if device == "cpu":
        assert torch.equal(y, reference.ternary_linear_w2a8(x, pack_ternary(t), ws, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,split_k,config", [
    (1, 1, None), (1, 3, None), (2, 2, None), (9, 4, None), (1, None, {"BLOCK_N": 1, "BLOCK_W": 16, "num_warps": 1}),
    (5, 2, {"BLOCK_N": 8, "BLOCK_W": 4, "BLOCK_M": 2, "num_warps": 1}),
    # both tile orders (tl_common.n_major_tiles picks one by Triton version)
    (7, 2, {"N_MAJOR": True}), (3, None, {"N_MAJOR": False}),
    (6, 1, {"BLOCK_N": 8, "BLOCK_W": 4, "BLOCK_M": 4, "num_warps": 1, "N_MAJOR": True})])
def test_ternary_w2a8_dp4a_split_k_and_tiles(device, m, split_k, config):
    """Split-K (int32 partials: the result may not depend on the split), ragged tiles in N, M and K,
    tiles ordered tokens-first or rows-first."""
    n, k, dtype = 40, 208, torch.bfloat16
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 6, True, True)
    out = poisoned_out(m, n, torch.float32, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=True, path="dp4a", split_k=split_k, config=config)
    ref, mag, amax = w2a8_oracle(x, t, ws, bias)
    tol = 2.0 ** -21 * mag + 1e-12 + (2 * amax / 127 * ws.double().abs() if device == "cuda" else 0)
    assert_bound(y, ref, tol, f"W2A8 dp4a split {split_k} {config}")
    if device == "cpu":
        assert torch.equal(y, reference.ternary_linear_w2a8(x.float(), pack_ternary(t), ws, bias))


def test_ternary_dp4a_refuses_shapes_it_cannot_read():
    x = torch.randn(1, 200)  # K % 16 != 0: slabs of 50 bytes are not whole words
    packed = pack_ternary(torch.zeros(8, 200, dtype=torch.int8))
    with pytest.raises(ValueError, match="K % 16"):
        ternary.ternary_linear(x, packed, torch.ones(1), path="dp4a")
    with pytest.raises(ValueError, match="int8 activations"):
        ternary.ternary_linear(torch.randn(1, 208), pack_ternary(torch.zeros(8, 208, dtype=torch.int8)),
                               torch.ones(1), act_int8=False, path="dp4a")


def test_w2a8_default_path_by_m_and_k(monkeypatch):
    """Default dispatch: W2A8 with M <= ternary_decode.MAX_M and K % 16 == 0 -> dp4a, else GEMV/GEMM;
    W2A16 with K % 16 == 0 -> the float decode GEMV."""
    taken = []
    for name, fn in [("dp4a", "ternary_w2a8_gemv")]:
        monkeypatch.setattr(ternary_decode, fn, lambda *a, _n=name, **kw: taken.append(_n))
    monkeypatch.setattr(ternary, "ternary_gemv", lambda *a, **kw: taken.append("gemv"))
    monkeypatch.setattr(ternary, "ternary_gemm", lambda *a, **kw: taken.append("gemm"))
    monkeypatch.setattr(ternary, "_w2a16_decode", lambda *a, **kw: taken.append("decode"))
    monkeypatch.setattr(ternary, "_w2a8_wide", lambda *a, **kw: taken.append("wide"))
    for m, k, act_int8 in [(1, 208, True), (ternary_decode.MAX_M, 208, True), (ternary_decode.MAX_M + 1, 208, True),
                           (1, 200, True), (1, 208, False), (ternary_prefill.MIN_M + 1, 208, True),
                           (ternary_prefill.MIN_M + 1, 208, False)]:
        ternary.ternary_linear(torch.zeros(m, k), pack_ternary(torch.zeros(8, k, dtype=torch.int8)), torch.ones(1),
                               act_int8=act_int8)
    assert taken == ["dp4a", "dp4a", "gemm", "gemv", "decode", "wide", "wide"]


def _dot4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kern(a_ptr, b_ptr, c_ptr, o_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        o = dot4(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs), False)
        tl.store(o_ptr + offs, o)

    return kern


dot4 = ternary_decode.dot4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the emulation runs on the interpreter")
def test_dot4_emulation_matches_dp4a_definition():
    """The interpreter's stand-in for PTX dp4a.u32.s32: bytes of a unsigned, of b signed, summed into c."""
    kern = _dot4_kernel()
    g = gen("dot4")
    a, b = (torch.randint(-2 ** 31, 2 ** 31 - 1, (64,), generator=g, dtype=torch.int32) for _ in range(2))
    c = torch.randint(-2 ** 20, 2 ** 20, (64,), generator=g, dtype=torch.int32)
    o = torch.empty_like(c)
    kern[(1,)](a, b, c, o, BLOCK=64)
    ua = a.view(torch.uint8).view(64, 4).long()  # little-endian bytes
    sb = b.view(torch.int8).view(64, 4).long()
    assert torch.equal(o.long(), c.long() + (ua * sb).sum(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_ternary_w2a16(device, dtype, m):
    n, k = 72, 328
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 2, m % 2 == 1, m != 7)
    # K = 328: no float decode GEMV (K % 16 != 0)
    path = "gemv" if m <= ternary.GEMV_MAX_M else "gemm" if m <= ternary_prefill.MIN_M else "wide"
    out = poisoned_out(m, n, dtype, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=False,
                               config=cfg(device, path) if path != "wide" else None)
    xd64 = x.double()
    ref = (xd64 @ t.double().t()) * ws.double() + (bias.double() if bias is not None else 0)
    s_abs = (xd64.abs() @ t.double().abs().t()) * ws.double()
    split = path != "gemv" and dtype == torch.float32
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, split), f"W2A16 {path}")
    twin = reference_lowbit.ternary_linear_w2a16(x, pack_ternary(t), ws, bias)
    assert_bound(twin, ref, float_bound(ref, s_abs, dtype, k, False), "W2A16 twin")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,m,split_k", [("gemv", 9, 3), ("gemm", 1, 4), ("gemm", 128, 2), ("wide", 128, 2),
                                            ("wide", 33, None), ("wide", 5, 3)])
def test_ternary_w2a16_paths_and_split_k(device, path, m, split_k):
    n, k, dtype = 40, 200, torch.float16
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 3, False, True)
    out = poisoned_out(m, n, dtype, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=False, path=path, split_k=split_k,
                               config=cfg(device, path) if path != "wide" else None)
    ref = (x.double() @ t.double().t()) * ws.double() + bias.double()
    s_abs = (x.double().abs() @ t.double().abs().t()) * ws.double()
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, False), f"W2A16 {path} split {split_k}")


# -- binary W1A16 ------------------------------------------------------------------------------------
VARIANTS = ["plain", "onebit", "fbi"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_binary_w1a16(device, dtype, m):
    variant = VARIANTS[MS.index(m) % 3]
    n, k = 72, 200
    g = gen("b", m, str(dtype))
    x = rand_x(m, k, dtype, g)
    bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    gvec = torch.rand(k, generator=g) + 0.5 if variant != "plain" else None
    hvec = torch.rand(n, generator=g) + 0.5 if variant == "onebit" else None
    beta = torch.randn(k, generator=g) * 0.1 if variant == "fbi" else None
    bias = torch.randn(n, generator=g).to(dtype) if variant != "onebit" else None
    packed = pack_sign_bits(bits)
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    out = poisoned_out(m, n, dtype, device)
    y = binary.binary_linear(dev(x), dev(packed), dev(gvec), dev(hvec), dev(beta), dev(bias), out,
                             split_k=2 if m == 16 else None, config=cfg(device, "binary"), path="gemm")
    s = signs_from_bits(bits, torch.float64)
    w = s * (gvec.double() if gvec is not None else 1.0)
    w = w * (hvec.double().unsqueeze(1) if hvec is not None else 1.0)
    w = w + (beta.double() if beta is not None else 0.0)
    ref = x.double() @ w.t() + (bias.double() if bias is not None else 0.0)
    wa = torch.ones(n, k, dtype=torch.float64) * (gvec.double() if gvec is not None else 1.0)
    wa = wa * (hvec.double().unsqueeze(1) if hvec is not None else 1.0)
    s_abs = x.double().abs() @ wa.t() + ((x.double().abs() @ beta.double().abs()).unsqueeze(1) if beta is not None else 0)
    split = not (dtype == torch.bfloat16 and gvec is None)
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, split), f"binary {variant}")
    twin = reference_lowbit.binary_linear_w1a16(x, packed, gvec, hvec, beta, bias)
    assert_bound(twin, ref, float_bound(ref, s_abs, dtype, k, False), f"binary twin {variant}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,variant,split_k", [(33, "onebit", None), (64, "fbi", 2), (7, "plain", None),
                                               (40, "onebit", 3)])
def test_binary_w1a16_wide(device, dtype, m, variant, split_k):
    """The one-dot prefill GEMM (default above binary_prefill.MIN_M tokens) vs float64."""
    n, k = 40, 200
    g = gen("bw", m, str(dtype), variant)
    x = rand_x(m, k, dtype, g)
    bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    gvec = torch.rand(k, generator=g) + 0.5 if variant != "plain" else None
    hvec = torch.rand(n, generator=g) + 0.5 if variant == "onebit" else None
    beta = torch.randn(k, generator=g) * 0.1 if variant == "fbi" else None
    bias = torch.randn(n, generator=g).to(dtype)
    packed = pack_sign_bits(bits)
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    out = poisoned_out(m, n, dtype, device)
    y = binary.binary_linear(dev(x), dev(packed), dev(gvec), dev(hvec), dev(beta), dev(bias), out, split_k=split_k,
                             path="wide")
    w = signs_from_bits(bits, torch.float64) * (gvec.double() if gvec is not None else 1.0)
    w = w * (hvec.double().unsqueeze(1) if hvec is not None else 1.0) + (beta.double() if beta is not None else 0.0)
    ref = x.double() @ w.t() + bias.double()
    wa = torch.ones(n, k, dtype=torch.float64) * (gvec.double() if gvec is not None else 1.0)
    wa = wa * (hvec.double().unsqueeze(1) if hvec is not None else 1.0)
    s_abs = x.double().abs() @ wa.t() + ((x.double().abs() @ beta.double().abs()).unsqueeze(1) if beta is not None else 0)
    split = not (dtype == torch.bfloat16 and gvec is None)
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, split), f"binary wide {variant}")


# -- dual-binary ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_dual_binary(device, dtype, m):
    n, k, group = [(72, 192, 64), (40, 96, 32), (40, 160, 160)][MS.index(m) % 3]
    g = gen("d", m, str(dtype))
    x = rand_x(m, k, dtype, g)
    b1 = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    b2 = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    a1 = torch.rand(n, k // group, generator=g) + 0.5
    a2 = -(torch.rand(n, k // group, generator=g) + 0.25)
    bias = torch.randn(n, generator=g).to(dtype) if m != 33 else None
    packed = pack_dual_binary(b1, b2, group)
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    out = poisoned_out(m, n, dtype, device)
    y = binary.dual_binary_linear(dev(x), dev(packed), dev(a1), dev(a2), group, dev(bias), out,
                                  split_k=3 if m == 7 else None, config=cfg(device, "dual"), path="gemm")
    w = a1.double().repeat_interleave(group, 1) * b1.double() + a2.double().repeat_interleave(group, 1) * b2.double()
    ref = x.double() @ w.t() + (bias.double() if bias is not None else 0.0)
    s_abs = x.double().abs() @ w.abs().t()
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, dtype != torch.bfloat16), f"dual G={group}")
    twin = reference_lowbit.dual_binary_linear(x, packed, a1, a2, group, bias)
    assert_bound(twin, ref, float_bound(ref, s_abs, dtype, k, False), "dual twin")


# -- CUDA-core decode GEMVs for float activations (kernels/lowbit_decode.py) -------------------------
DECODE_MS = [1, 2, 3, 4]


def _decode_case(kind, m, dtype, seed):
    """(x, packed, kwargs for the wrapper, float64 weight [N, K] incl. scales, extra bias term, n, k)."""
    g = gen("dec", kind, m, str(dtype), seed)
    if kind == "binary":
        n, k = 72, 224
        bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
        gvec, hvec, beta = torch.rand(k, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5, torch.randn(k, generator=g)
        w = signs_from_bits(bits, torch.float64) * gvec.double() * hvec.double().unsqueeze(1) + beta.double()
        return pack_sign_bits(bits), dict(in_scale=gvec, out_scale=hvec, in_bias=beta), w, n, k
    if kind == "dual":
        n, k, group = (40, 192, 48) if seed % 2 else (72, 256, 64)
        b1, b2 = (torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8) for _ in range(2))
        a1, a2 = torch.rand(n, k // group, generator=g) + 0.5, -(torch.rand(n, k // group, generator=g) + 0.25)
        w = a1.double().repeat_interleave(group, 1) * b1.double() + a2.double().repeat_interleave(group, 1) * b2.double()
        return pack_dual_binary(b1, b2, group), dict(alpha1=a1, alpha2=a2, group_size=group), w, n, k
    n, k = 72, 208
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n if seed % 2 else 1, generator=g) + 0.25
    return pack_ternary(t), dict(weight_scale=ws), t.double() * ws.double().reshape(-1, 1), n, k


def _run_decode(kind, x, packed, kw, bias, out, **launch):
    if kind == "binary":
        return binary.binary_linear(x, packed, kw["in_scale"], kw["out_scale"], kw["in_bias"], bias, out, **launch)
    if kind == "dual":
        return binary.dual_binary_linear(x, packed, kw["alpha1"], kw["alpha2"], kw["group_size"], bias, out, **launch)
    return ternary.ternary_linear(x, packed, kw["weight_scale"], bias, out, act_int8=False, **launch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["binary", "dual", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", DECODE_MS)
def test_lowbit_decode_gemv(device, kind, dtype, m):
    """The default path for M <= lowbit_decode.MAX_M (K, group sizes multiples of 16 or 32) vs float64."""
    packed, kw, w, n, k = _decode_case(kind, m, dtype, m)
    g = gen("decx", kind, m, str(dtype))
    x = rand_x(m, k, dtype, g)
    bias = torch.randn(n, generator=g).to(dtype) if m != 3 else None
    dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = poisoned_out(m, n, dtype, device)
    y = _run_decode(kind, dev(x), dev(packed), {a: dev(v) for a, v in kw.items()}, dev(bias), out)
    assert y is out
    ref = x.double() @ w.t() + (bias.double() if bias is not None else 0.0)
    s_abs = x.double().abs() @ w.abs().t()
    if kind == "binary":  # the kernel sums x*g and the masked part separately: bound by |x*g| sums, times h
        s_abs = s_abs + 2 * (x.double().abs() @ (kw["in_scale"].double() * torch.ones(n, k, dtype=torch.float64)).t()
                             * kw["out_scale"].double())
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, False), f"{kind} decode M={m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["binary", "dual", "ternary"])
@pytest.mark.parametrize("m,split_k,config", [(1, 3, None), (2, 2, None), (3, None, {"BLOCK_N": 16, "BLOCK_W": 2}),
                                              (4, 4, {"BLOCK_N": 1, "BLOCK_W": 8, "BLOCK_M": 2})])
def test_lowbit_decode_split_k_and_tiles(device, kind, m, split_k, config):
    """Split-K partials (first slice carries the per-token terms) and ragged N/M/K tiles."""
    packed, kw, w, n, k = _decode_case(kind, m, torch.bfloat16, 7)
    g = gen("decs", kind, m, split_k)
    x = rand_x(m, k, torch.bfloat16, g)
    bias = torch.randn(n, generator=g)
    dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = poisoned_out(m, n, torch.float32, device)
    y = _run_decode(kind, dev(x), dev(packed), {a: dev(v) for a, v in kw.items()}, dev(bias), out,
                    path="decode", split_k=split_k, config=config)
    ref = x.double() @ w.t() + bias.double()
    s_abs = x.double().abs() @ w.abs().t()
    if kind == "binary":
        s_abs = s_abs + 2 * (x.double().abs() @ (kw["in_scale"].double() * torch.ones(n, k, dtype=torch.float64)).t()
                             * kw["out_scale"].double())
    assert_bound(y, ref, float_bound(ref, s_abs, torch.float32, k, False), f"{kind} decode split {split_k} {config}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,block_w,split_k,mode", [
    (64, 4, 1, 1), (64, 8, 3, 1), (16, 4, 2, 1), (32, 8, 1, 1),  # whole groups per K step: summed, then scaled
    (128, 4, 1, 2), (128, 2, 3, 2), (256, 8, 2, 2), (96, 2, 1, 2),  # a step inside one group: a scale per row
    (48, 4, 1, 0), (96, 4, 2, 0), (96, 8, 1, 0)])  # steps straddle groups: a scale per word
def test_dual_decode_group_scale_modes(device, group, block_w, split_k, mode):
    """The dual-binary decode GEMV's three ways of applying the group scales (``GROUPS``), with and
    without split K, vs float64; K = 768 has 3-48 groups."""
    assert lowbit_decode._group_steps(lowbit_decode.DUAL, group // 16, block_w).get("GROUPS") == mode
    g = gen("decg", group, block_w, split_k)
    n, k = 24, 768
    b1, b2 = (torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8) for _ in range(2))
    a1, a2 = torch.rand(n, k // group, generator=g) + 0.5, -(torch.rand(n, k // group, generator=g) + 0.25)
    w = a1.double().repeat_interleave(group, 1) * b1.double() + a2.double().repeat_interleave(group, 1) * b2.double()
    x = rand_x(2, k, torch.bfloat16, g)
    out = poisoned_out(2, n, torch.float32, device)
    y = binary.dual_binary_linear(x.to(device), pack_dual_binary(b1, b2, group).to(device), a1.to(device),
                                  a2.to(device), group, None, out, path="decode", split_k=split_k,
                                  config={"BLOCK_N": 8, "BLOCK_W": block_w})
    ref = x.double() @ w.t()
    s_abs = x.double().abs() @ w.abs().t()
    assert_bound(y, ref, float_bound(ref, s_abs, torch.float32, k, False), f"dual decode G={group} BW={block_w}")


def test_lowbit_decode_default_paths_and_refusals(monkeypatch):
    """Default: decode for M <= lowbit_decode.MAX_M when the words view works, else the tiled kernels."""
    taken = []
    monkeypatch.setattr(lowbit_decode, "lowbit_gemv", lambda kind, *a, **kw: taken.append(kind))
    def launch(kernel, grid, config, args, meta):
        fn = getattr(kernel, "fn", kernel)
        taken.append(fn.__name__ + ("/wide" if meta.get("WIDE") else ""))

    monkeypatch.setattr(tl_common, "launch", launch)
    big = lowbit_decode.MAX_M + 1
    signs = lambda k: pack_sign_bits(torch.zeros(8, k, dtype=torch.uint8))  # noqa: E731
    planes = lambda k, g: pack_dual_binary(torch.zeros(8, k, dtype=torch.uint8), torch.zeros(8, k, dtype=torch.uint8), g)  # noqa: E731
    codes = lambda k: pack_ternary(torch.zeros(8, k, dtype=torch.int8))  # noqa: E731
    for m, k in [(1, 224), (big, 224), (1, 200), (binary_prefill.MIN_M + 1, 224)]:
        binary.binary_linear(torch.zeros(m, k), signs(k))
    for m, group in [(1, 32), (big, 32), (1, 56)]:
        binary.dual_binary_linear(torch.zeros(m, 224), planes(224, group), torch.ones(8, 224 // group),
                                  torch.ones(8, 224 // group), group)
    for m, k in [(1, 224), (big, 224), (1, 200)]:
        ternary.ternary_linear(torch.zeros(m, k), codes(k), torch.ones(1), act_int8=False)
    assert taken == [lowbit_decode.BINARY, "_binary_kernel", "_binary_kernel", "_binary_kernel/wide",
                     lowbit_decode.DUAL, "_dual_binary_kernel", "_dual_binary_kernel",
                     lowbit_decode.TERNARY, "_ternary_gemm_kernel", "_ternary_gemv_kernel"]
    with pytest.raises(ValueError, match="K % 32"):
        binary.binary_linear(torch.zeros(1, 200), signs(200), path="decode")
    with pytest.raises(ValueError, match="group_size % 16"):
        binary.dual_binary_linear(torch.zeros(1, 224), planes(224, 56), torch.ones(8, 4), torch.ones(8, 4), 56,
                                  path="decode")
    with pytest.raises(ValueError, match="W2A8 decodes with path='dp4a'"):
        ternary.ternary_linear(torch.zeros(1, 224), codes(224), torch.ones(1), path="decode")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,group,split_k", [(33, 64, None), (40, 160, 2), (7, 32, None), (64, 16, 3)])
def test_dual_binary_wide(device, dtype, m, group, split_k):
    """The opt-in one-dot-per-plane dual-binary GEMM (path="wide") vs float64."""
    n, k = 40, 320
    g = gen("dw", m, str(dtype), group)
    x = rand_x(m, k, dtype, g)
    b1, b2 = (torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8) for _ in range(2))
    a1, a2 = torch.rand(n, k // group, generator=g) + 0.5, -(torch.rand(n, k // group, generator=g) + 0.25)
    bias = torch.randn(n, generator=g).to(dtype)
    packed = pack_dual_binary(b1, b2, group)
    out = poisoned_out(m, n, dtype, device)
    y = binary.dual_binary_linear(x.to(device), packed.to(device), a1.to(device), a2.to(device), group,
                                  bias.to(device), out, split_k=split_k, path="wide")
    w = a1.double().repeat_interleave(group, 1) * b1.double() + a2.double().repeat_interleave(group, 1) * b2.double()
    ref = x.double() @ w.t() + bias.double()
    s_abs = x.double().abs() @ w.abs().t()
    assert_bound(y, ref, float_bound(ref, s_abs, dtype, k, dtype != torch.bfloat16), f"dual wide G={group}")


# -- int8 LM head -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_int8_linear(device, dtype, m):
    n, k = 100, 200
    g = gen("h", m, str(dtype))
    x = rand_x(m, k, dtype, g)
    q, scale = quantize_weight_int8_rows(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g) if m == 7 else None
    path = "gemv" if m <= int8_head.GEMV_MAX_M else "gemm"
    out_dtype = torch.float32 if m in (2, 33) else dtype  # logits are often wanted in fp32
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    out = poisoned_out(m, n, out_dtype, device)
    y = int8_head.int8_linear(dev(x), dev(q), dev(scale), dev(bias), out, split_k=2 if m == 16 else None,
                              config=cfg(device, "head_" + path))
    w = q.double() * scale.double().unsqueeze(1)
    ref = x.double() @ w.t() + (bias.double() if bias is not None else 0.0)
    s_abs = x.double().abs() @ w.abs().t()
    split = path == "gemm" and dtype != torch.bfloat16
    assert_bound(y, ref, float_bound(ref, s_abs, out_dtype, k, split), f"int8 {path}")
    twin = reference_lowbit.int8_linear(x, q, scale, bias, out_dtype)
    assert_bound(twin, ref, float_bound(ref, s_abs, out_dtype, k, False), "int8 twin")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,m", [("gemv", 9), ("gemm", 1)])
def test_int8_linear_forced_paths(device, path, m):
    n, k, dtype = 100, 200, torch.bfloat16
    g = gen("hp", m, path)
    x = rand_x(m, k, dtype, g)
    q, scale = quantize_weight_int8_rows(torch.randn(n, k, generator=g))
    out = poisoned_out(m, n, dtype, device)
    y = int8_head.int8_linear(x.to(device), q.to(device), scale.to(device), None, out, path=path,
                              config=cfg(device, "head_" + path))
    w = q.double() * scale.double().unsqueeze(1)
    ref = x.double() @ w.t()
    assert_bound(y, ref, float_bound(ref, x.double().abs() @ w.abs().t(), dtype, k, False), f"int8 {path}")


# -- activation quantization kernel ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_int8_kernel(device, dtype):
    g = gen("q", str(dtype))
    x = rand_x(33, 1100, dtype, g)  # K > the kernel's block: two passes
    x[3] = 0
    x[4, :5] = torch.tensor([127.0, -63.5, 0.5, 1.5, 2.5]).to(dtype)  # exact ties round half to even
    x[4, 5:] = 0
    xq, sx = tl_common.quantize_int8(x.to(device))
    rq, rs = reference.quantize_activations_int8(x)
    if device == "cpu":
        assert torch.equal(xq, rq) and torch.equal(sx, rs.view(-1))
    else:
        assert torch.equal(sx.cpu(), rs.view(-1))
        assert (xq.cpu().int() - rq.int()).abs().max() <= 1
    assert xq[4, :5].tolist() == [127, -64, 0, 2, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_rmsnorm_quantize_int8_kernel(device, x_dtype, w_dtype):
    """The fused RMSNorm + int8 quantization vs quantize_activations_int8(rmsnorm(x)): the
    normalised row is rounded to x's dtype, multiplied by the weight in the promoted dtype."""
    g = gen("rmsq", str(x_dtype), str(w_dtype))
    x = rand_x(9, 1100, x_dtype, g)  # K > the kernel's block: several passes
    x[2] = 0  # eps only: all codes 0
    w = (torch.rand(1100, generator=g) + 0.5).to(w_dtype)
    xq, sx, xsum = tl_common.rmsnorm_quantize_int8(x.to(device), w.to(device), 1e-5)
    rq, rs = reference.quantize_activations_int8(reference.rmsnorm(x, w, 1e-5))
    assert torch.equal(xsum.cpu(), xq.cpu().int().sum(1))
    assert xq[2].abs().max() == 0
    diff = (xq.cpu().int() - rq.int()).abs()
    rel = ((sx.cpu() - rs.view(-1)) / rs.view(-1)).abs().max()
    if device == "cpu" and x_dtype != torch.float32:  # rounding x*r to x's dtype absorbs the summation order
        assert torch.equal(xq, rq) and torch.equal(sx, rs.view(-1))
    elif device == "cpu":  # float32 rows keep the last bits of r, whose sum of squares ran in another order
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001 and rel <= 2.0 ** -20
    else:  # on GPUs that ulp can also move a bf16 rounding
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01 and rel <= 2.0 ** -7
    with pytest.raises(ValueError, match="norm weight"):
        tl_common.rmsnorm_quantize_int8(x.to(device), w[:10].to(device), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_quantize_int8_with_residual(device, dtype):
    """The residual add in the norm's kernel: ``h = x + residual`` stored exactly as torch adds
    them (in x's dtype), and the codes those of ``rmsnorm(h)``."""
    g = gen("rmsq-res", str(dtype))
    x, res = rand_x(7, 1100, dtype, g), rand_x(7, 1100, dtype, g)
    wide = torch.zeros(7, 1200, dtype=dtype)
    wide[:, 50:1150] = res  # the residual may be a strided view
    w = (torch.rand(1100, generator=g) + 0.5).to(dtype)
    xq, sx, xsum, h = tl_common.rmsnorm_quantize_int8(x.to(device), w.to(device), 1e-5, wide.to(device)[:, 50:1150])
    assert torch.equal(h.cpu(), x + res)
    want_q, want_s, want_sum = tl_common.rmsnorm_quantize_int8((x + res).to(device), w.to(device), 1e-5)
    assert torch.equal(xq, want_q) and torch.equal(sx, want_s) and torch.equal(xsum, want_sum)
    with pytest.raises(ValueError, match="residual must match"):
        tl_common.rmsnorm_quantize_int8(x.to(device), w.to(device), 1e-5, res[:3].to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,path", [(1, None), (3, "dp4a"), (8, None), (9, None), (33, "gemm"), (2, "gemm"),
                                    (5, "wide")])
def test_ternary_w2a8_rmsnorm(device, m, path):
    """RMSNorm + W2A8 as one op (the model's path for BitNet linears) vs the twin of the unfused pair."""
    n, k = 40, 208
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, torch.bfloat16, device, 8, True, True)
    w = (torch.rand(k, generator=gen("rmsw", m)) + 0.5).bfloat16()
    y = ternary.ternary_linear_rmsnorm(xd, w.to(device), 1e-5, pd, wsd, bd, path=path)
    want = reference.ternary_linear_w2a8(reference.rmsnorm(x, w, 1e-5), pack_ternary(t), ws, bias)
    assert y.dtype == want.dtype == torch.bfloat16
    if device == "cpu":
        assert torch.equal(y, want)
    else:
        normed = reference.rmsnorm(x, w, 1e-5)
        ref, mag, amax = w2a8_oracle(normed, t, ws, bias)
        tol = 2 * UNIT[torch.bfloat16] * ref.abs() + 2.0 ** -21 * mag + 4 * amax / 127 * ws.double().abs()
        assert_bound(y, ref, tol, f"rmsnorm W2A8 M={m}")
    # with a residual added in the norm's kernel: the same as the op on x + residual
    res = rand_x(m, k, torch.bfloat16, gen("rmsres", m))
    y2, h = dispatch.ternary_linear_w2a8_add_rmsnorm(xd, res.to(device), w.to(device), 1e-5, pd, wsd, bd) \
        if path is None else ternary.ternary_linear_rmsnorm(xd, w.to(device), 1e-5, pd, wsd, bd, path=path,
                                                           residual=res.to(device))
    assert torch.equal(h.cpu(), x + res)
    assert torch.equal(y2, ternary.ternary_linear_rmsnorm((x + res).to(device), w.to(device), 1e-5, pd, wsd, bd,
                                                          path=path))


def test_model_runs_bitnet_linears_through_the_fused_norm(tmp_path, monkeypatch):
    """Every BitNet linear after an RMSNorm (q/k/v, o, gate/up, down) goes through forward_rmsnorm,
    and the whole engine on the Triton kernels (interpreter) generates the twins' tokens."""
    from tiny_checkpoints import write_tiny_bitnet_model

    from bitserve.llm import LLM
    from bitserve.plugins.bitnet import TernaryLinear
    from bitserve.sampling_params import SamplingParams

    model = write_tiny_bitnet_model(tmp_path / "m", seed=3)
    calls = []
    for hook in ("forward_rmsnorm", "forward_add_rmsnorm"):
        fused = getattr(TernaryLinear, hook)
        monkeypatch.setattr(TernaryLinear, hook, lambda self, *a, f=fused, h=hook: calls.append(h) or f(self, *a))
    llm = LLM(str(model), dtype="bfloat16", block_size=4, max_num_batched_tokens=16)
    prompts = ["abcab", "hello wor", "zz"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(prompts, params)]
    # per forward, 2 layers x 4 linears; all but the first q/k/v add the residual in the norm
    assert calls and len(calls) % 8 == 0 and calls.count("forward_add_rmsnorm") == 3 * len(calls) // 8
    with dispatch.use_triton(True):
        got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want


# -- dispatch, custom ops, compile ---------------------------------------------------------------------
def test_dispatch_rules(monkeypatch):
    calls = []
    real_ternary, real_twin = ternary.ternary_linear, reference.ternary_linear_w2a8
    monkeypatch.setattr(ternary, "ternary_linear", lambda *a, **kw: calls.append("triton") or real_ternary(*a, **kw))
    monkeypatch.setattr(reference, "ternary_linear_w2a8", lambda *a, **kw: calls.append("twin") or real_twin(*a, **kw))
    x = torch.randn(2, 3, 16)
    packed = pack_ternary(torch.randint(-1, 2, (8, 16), dtype=torch.int8))
    ws = torch.tensor([0.5])
    y_twin = dispatch.ternary_linear_w2a8(x, packed, ws)
    assert calls == ["twin"]
    if torch.cuda.is_available():
        return
    with dispatch.use_triton(True):
        y_tri = dispatch.ternary_linear_w2a8(x, packed, ws)
        with dispatch.use_triton(False):
            assert ops.use_triton_for(x) is False
    assert calls == ["twin", "triton"] and ops.forced_backend() is None
    assert y_tri.shape == (2, 3, 8) and torch.equal(y_tri, y_twin)


def _op_args():
    g = gen("ops")
    x = torch.randn(3, 64, generator=g)
    tern = pack_ternary(torch.randint(-1, 2, (12, 64), generator=g, dtype=torch.int8))
    bits = pack_sign_bits(torch.randint(0, 2, (12, 64), generator=g, dtype=torch.uint8))
    dual = pack_dual_binary(torch.randint(0, 2, (12, 64), generator=g), torch.randint(0, 2, (12, 64), generator=g), 32)
    q, s = quantize_weight_int8_rows(torch.randn(12, 64, generator=g))
    return [
        (torch.ops.bitserve.ternary_w2a8, (x, tern, torch.rand(12) + 0.5, torch.randn(12))),
        (torch.ops.bitserve.ternary_w2a16, (x, tern, torch.rand(1) + 0.5, None)),
        (torch.ops.bitserve.ternary_w2a8_rmsnorm, (x.bfloat16(), torch.rand(64).bfloat16() + 0.5, 1e-5, tern,
                                                  torch.rand(12) + 0.5, None)),
        (torch.ops.bitserve.binary_w1a16, (x, bits, torch.rand(64), torch.rand(12), torch.randn(64), None)),
        (torch.ops.bitserve.dual_binary, (x, dual, torch.rand(12, 2), -torch.rand(12, 2), 32, torch.randn(12))),
        (torch.ops.bitserve.int8_linear, (x, q, s, None, torch.float32)),
        (torch.ops.bitserve.rope_qk, (torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g),
                                      torch.rand(3, 16, generator=g), torch.rand(3, 16, generator=g))),
        (torch.ops.bitserve.act_and_mul, (torch.randn(3, 40, generator=g), "relu2")),
        (torch.ops.bitserve.rmsnorm, (x.bfloat16(), torch.rand(64, generator=g) + 0.5, 1e-5)),
        (torch.ops.bitserve.add_rmsnorm, (x, torch.randn(3, 64, generator=g), torch.rand(64, generator=g) + 0.5, 1e-5)),
        (torch.ops.bitserve.ternary_w2a8_add_rmsnorm, (x, torch.randn(3, 64, generator=g), torch.rand(64) + 0.5, 1e-5,
                                                       tern, torch.rand(12) + 0.5, None)),
        (torch.ops.bitserve.layer_norm_parts, (x, [32, 16, 16], 1e-5)),
    ]


def test_custom_ops_opcheck():
    with dispatch.use_triton(False):
        for op, args in _op_args():
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_custom_ops_opcheck_on_transposed_inputs_and_mismatched_residuals():
    """Fakes promise contiguous outputs of x's dtype: the twins keep that promise for strided x, and
    a residual of another dtype is refused on every path (the Triton kernels add them as stored)."""
    g = gen("ops-strided")
    xt = torch.randn(64, 3, generator=g).t()  # [3, 64], strides (1, 3)
    w = torch.rand(64, generator=g) + 0.5
    tern = pack_ternary(torch.randint(-1, 2, (12, 64), generator=g, dtype=torch.int8))
    with dispatch.use_triton(False):
        for op, args in [
            (torch.ops.bitserve.rmsnorm, (xt, w, 1e-5)),
            (torch.ops.bitserve.add_rmsnorm, (xt, torch.randn(3, 64, generator=g), w, 1e-5)),
            (torch.ops.bitserve.act_and_mul, (torch.randn(40, 3, generator=g).t(), "silu")),
            (torch.ops.bitserve.ternary_w2a8_add_rmsnorm, (xt, torch.randn(3, 64, generator=g), w, 1e-5, tern,
                                                           torch.rand(12) + 0.5, None)),
        ]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    for use in (False, True):
        with dispatch.use_triton(use):
            with pytest.raises(ValueError, match="residual must match"):
                torch.ops.bitserve.add_rmsnorm(xt.bfloat16(), torch.randn(3, 64), w, 1e-5)


def _weight_cases(k=64, n=24):
    g = gen("wrappers", k, n)
    tern = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    bits = pack_sign_bits(torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8))
    dual = pack_dual_binary(torch.randint(0, 2, (n, k), generator=g), torch.randint(0, 2, (n, k), generator=g), 32)
    q, s = quantize_weight_int8_rows(torch.randn(n, k, generator=g))
    ws = torch.rand(n, generator=g) + 0.5
    a1, a2 = torch.rand(n, k // 32, generator=g) + 0.1, torch.rand(n, k // 32, generator=g) + 0.1
    return {
        "w2a8": (lambda x, p, out=None: ternary.ternary_linear(x, p, ws, None, out),
                 lambda x, p: reference.ternary_linear_w2a8(x, p, ws), tern),
        "w2a16": (lambda x, p, out=None: ternary.ternary_linear(x, p, ws, None, out, act_int8=False),
                  lambda x, p: reference_lowbit.ternary_linear_w2a16(x, p, ws), tern),
        "binary": (lambda x, p, out=None: binary.binary_linear(x, p, None, ws, None, None, out),
                   lambda x, p: reference_lowbit.binary_linear_w1a16(x, p, None, ws), bits),
        "dual": (lambda x, p, out=None: binary.dual_binary_linear(x, p, a1, a2, 32, None, out),
                 lambda x, p: reference_lowbit.dual_binary_linear(x, p, a1, a2, 32), dual),
        "int8": (lambda x, p, out=None: int8_head.int8_linear(x, p, s, None, out),
                 lambda x, p: reference_lowbit.int8_linear(x, p, s), q),
    }


@pytest.mark.parametrize("op", ["w2a8", "w2a16", "binary", "dual", "int8"])
@pytest.mark.parametrize("m", [1, 9])
def test_wrappers_check_out_buffers_and_take_strided_weights(op, m):
    """``out=`` must be a float [M, N] buffer with contiguous rows (the kernels address it by row
    stride only: a wrong one was written out of bounds); weights with a column stride are
    made contiguous instead of read as garbage."""
    kernel, twin, weight = _weight_cases()[op]
    n = weight.shape[0]
    x = torch.randn(m, 64, generator=gen("x", op, m))
    for bad in (torch.empty(m, n - 8), torch.empty(m, n, dtype=torch.int32), torch.empty(n, m).t(),
                torch.empty(m, 2 * n)[:, ::2]):
        if bad.shape == (m, n) and bad.stride(1) == 1 and bad.dtype.is_floating_point:
            continue  # (m == 1: a transposed [1, N] is a valid row)
        with pytest.raises(ValueError, match="out must be"):
            kernel(x, weight, bad)
    strided = weight.t().contiguous().t()  # same values, column stride N
    assert strided.stride(1) != 1
    torch.testing.assert_close(kernel(x, strided), twin(x, weight), rtol=1e-4, atol=1e-4)
    into = torch.empty(m, n)
    assert kernel(x, weight, into) is into


@pytest.mark.parametrize("path", ["dp4a", "gemv", "gemm", "wide", "rmsnorm", "add_rmsnorm"])
def test_w2a8_row_with_nan_or_inf_is_nan_and_alone(path):
    """A NaN or inf in one token's activations makes that token's outputs NaN (as in the twin, not
    finite garbage: GPUs' max drops NaN) and leaves every other row exact; in the fused norm path an
    fp16 residual add that overflows does the same."""
    n, k, m = 40, 64, 9 if path in ("gemm", "wide") else 3
    g = gen("nan-row", path)
    tern = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    ws = torch.rand(n, generator=g) + 0.5
    x = torch.randn(m, k, generator=g)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    w = torch.rand(k, generator=g) + 0.5
    if path in ("rmsnorm", "add_rmsnorm"):
        x = x.half()
        res = torch.randn(m, k, generator=g).half()
        res[0, 3], x[0, 3] = 60000.0, 60000.0  # x + res overflows fp16 in row 0
        if path == "rmsnorm":
            y = ternary.ternary_linear_rmsnorm(x, w, 1e-5, tern, ws)
            want = reference.ternary_linear_w2a8_rmsnorm(x, w, 1e-5, tern, ws)
        else:
            y, _ = ternary.ternary_linear_rmsnorm(x, w, 1e-5, tern, ws, residual=res)
            want, _ = reference.ternary_linear_w2a8_add_rmsnorm(x, res, w, 1e-5, tern, ws)
        bad_rows = [1, 2] + ([0] if path == "add_rmsnorm" else [])
    else:
        y = ternary.ternary_linear(x, tern, ws, path=path)
        want = reference.ternary_linear_w2a8(x, tern, ws)
        bad_rows = [1, 2]
    good = [r for r in range(m) if r not in bad_rows]
    assert torch.isnan(y[bad_rows]).all()
    torch.testing.assert_close(y[good], want[good], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["dp4a", "gemv", "gemm", "wide", "decode", "rmsnorm", "binary", "dual", "int8"])
def test_strided_and_expanded_vectors_are_read_right(path):
    """Scales, biases and norm weights that are views with a stride (a column of a matrix) or
    broadcast (a per-tensor scale ``expand``-ed to N: stride 0, N elements) give the twin's result:
    the kernels read vectors at unit stride, so the wrappers make them contiguous (an expanded
    scale was read as N floats from a 1-element storage -- out of bounds on a GPU)."""
    n, k, m = 40, 64, 9 if path in ("gemm", "wide") else 3
    g = gen("strided-vectors", path)
    x = torch.randn(m, k, generator=g)
    column = lambda size: (torch.rand(size, 3, generator=g) + 0.5)[:, 1]  # noqa: E731  stride 3
    bias = column(n)
    assert bias.stride(0) == 3
    if path in ("dp4a", "gemv", "gemm", "wide", "decode", "rmsnorm"):
        tern = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
        for ws in (column(n), (torch.rand(1, generator=g) + 0.5).expand(n)):
            if path == "rmsnorm":
                w = column(k)
                y = ternary.ternary_linear_rmsnorm(x, w, 1e-5, tern, ws, bias)
                want = reference.ternary_linear_w2a8_rmsnorm(x, w.contiguous(), 1e-5, tern, ws.contiguous(),
                                                             bias.contiguous())
            elif path == "decode":
                y = ternary.ternary_linear(x, tern, ws, bias, act_int8=False, path=path)
                want = reference_lowbit.ternary_linear_w2a16(x, tern, ws.contiguous(), bias.contiguous())
            else:
                y = ternary.ternary_linear(x, tern, ws, bias, path=path)
                want = reference.ternary_linear_w2a8(x, tern, ws.contiguous(), bias.contiguous())
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        return
    if path == "binary":
        bits = pack_sign_bits(torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8))
        gin, hout = column(k), column(n)
        y = binary.binary_linear(x, bits, gin, hout, None, bias)
        want = reference_lowbit.binary_linear_w1a16(x, bits, gin.contiguous(), hout.contiguous(), None,
                                                    bias.contiguous())
    elif path == "dual":
        dual = pack_dual_binary(torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8),
                                torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8), 32)
        a1, a2 = torch.rand(n, k // 32, generator=g), torch.rand(n, k // 32, generator=g)
        y = binary.dual_binary_linear(x, dual, a1, a2, 32, bias)
        want = reference_lowbit.dual_binary_linear(x, dual, a1, a2, 32, bias.contiguous())
    else:
        q, s = quantize_weight_int8_rows(torch.randn(n, k, generator=g))
        y = int8_head.int8_linear(x, q, s, bias)
        want = reference_lowbit.int8_linear(x, q, s, bias.contiguous())
    # (float accumulation in another order than the twin's; a misread vector is off by O(1))
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)


def test_dp4a_path_checks_scale_and_bias():
    kernel_x = torch.randn(2, 64)
    tern = pack_ternary(torch.randint(-1, 2, (40, 64), dtype=torch.int8))
    for ws, bias, words in [(torch.ones(2), None, "weight_scale"), (torch.ones(1), torch.ones(1), "bias"),
                            (torch.ones(40), torch.ones(44), "bias")]:
        with pytest.raises(ValueError, match=words):
            ternary.ternary_linear(kernel_x, tern, ws, bias, path="dp4a")
        with pytest.raises(ValueError, match=words):
            ternary.ternary_linear(kernel_x, tern, ws, bias)


def test_custom_ops_under_torch_compile(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # conftest sets it (for transformers)
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    cases = _op_args()
    counts = []

    def fn(*flat):
        outs, i = [], 0
        for op, args in cases:
            outs.append(op(*flat[i:i + len(args)]))
            i += len(args)
        return outs

    def backend(gm, example_inputs):
        counts.append(sum(1 for node in gm.graph.nodes if "bitserve" in str(node.target)))
        return gm.forward

    flat = [a for _, args in cases for a in args]
    eager = fn(*flat)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)(*flat)
    assert counts == [len(cases)], "every op must stay one opaque node of a single graph"
    aot = torch.compile(fn, backend="aot_eager", fullgraph=True)(*flat)  # fake impls under AOT tracing
    for a, b, c in zip(eager, compiled, aot):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _count_custom_op_graphs(fn, *args):
    """``fn(*args)`` under ``torch.compile(fullgraph=True)``: its output and, per graph compiled,
    the bitserve ops in it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sorted({str(n.target) for n in gm.graph.nodes if "bitserve" in str(n.target)}))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)(*args), graphs


def test_quant_linears_and_the_model_compile_to_one_graph(tmp_path, monkeypatch):
    """The plugins' QuantLinears, and a whole model (its linears, norms, RoPE, activation and int8 LM
    head; attention here a plain causal one, not the paged cache), trace into one graph in which each
    weight op is one opaque custom op, and compute what they compute eagerly. (On the CPU the Triton
    path is forced; on CUDA it is the default.)"""
    from tiny_checkpoints import write_tiny_bitnet_model

    from bitserve.loader import load_model
    from bitserve.model.attention import causal_attention
    from bitserve.plugins.bitnet import TernaryLinear
    from bitserve.plugins.lowbit_layers import BinaryLinear, DualBinaryLinear, Int8LMHead, TernaryLinearA16

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # conftest sets it (for transformers)
    monkeypatch.setattr(torch._dynamo.config, "disable", False, raising=False)
    g = gen("compile-layers")
    n, k = 24, 64
    tern = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    bits = lambda: torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)  # noqa: E731
    layers = {
        "bitserve.ternary_w2a8.default": TernaryLinear(tern, torch.rand(n, generator=g) + 0.5, None),
        "bitserve.ternary_w2a16.default": TernaryLinearA16(tern, torch.rand(1, generator=g) + 0.5),
        "bitserve.binary_w1a16.default": BinaryLinear(pack_sign_bits(bits()), torch.rand(k, generator=g),
                                                      torch.rand(n, generator=g)),
        "bitserve.dual_binary.default": DualBinaryLinear(pack_dual_binary(bits(), bits(), 32),
                                                         torch.rand(n, 2, generator=g), -torch.rand(n, 2, generator=g),
                                                         32),
        "bitserve.int8_linear.default": Int8LMHead.from_dense(torch.randn(n, k, generator=g)),
    }
    x = torch.randn(3, k, generator=g)
    with dispatch.use_triton(True):
        for op, layer in layers.items():
            out, graphs = _count_custom_op_graphs(layer, x)
            assert graphs == [[op]], (type(layer).__name__, graphs)
            torch.testing.assert_close(out, layer(x), rtol=0, atol=0)

        lm = load_model(write_tiny_bitnet_model(tmp_path / "m", seed=5), dtype="bfloat16", device="cpu",
                        progress=False, int8_lm_head=True)

        def attention(layer, q, k, v):
            pos = torch.arange(q.shape[0])
            return causal_attention(q, k, v, pos, pos)

        def logits(ids, positions):
            return lm.model.compute_logits(lm.model(ids, positions, attention))

        ids, positions = torch.tensor([3, 5, 7, 9, 11]), torch.arange(5)
        out, graphs = _count_custom_op_graphs(logits, ids, positions)
        assert len(graphs) == 1 and {"bitserve.ternary_w2a8_rmsnorm.default", "bitserve.int8_linear.default",
                                     "bitserve.rope_qk.default", "bitserve.act_and_mul.default"} <= set(graphs[0])
        torch.testing.assert_close(out, logits(ids, positions), rtol=0, atol=0)


def test_import_touches_no_gpu_and_no_triton():
    import subprocess
    import sys

    code = ("import sys, bitserve.kernels, bitserve.kernels.dispatch, bitserve.kernels.ops, "
            "bitserve.plugins.lowbit_layers; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """Autotuned kernels replay inside a CUDA graph (after a warm-up that autotunes each M bucket)."""
    dev = "cuda"
    g = gen("graph")
    packed = pack_ternary(torch.randint(-1, 2, (256, 512), generator=g, dtype=torch.int8)).to(dev)
    ws = (torch.rand(256, generator=g) + 0.5).to(dev)
    for m in (1, 8):
        x = torch.randn(m, 512, generator=g).to(dev, torch.bfloat16)
        want = dispatch.ternary_linear_w2a8(x, packed, ws)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = dispatch.ternary_linear_w2a8(x, packed, ws)
        x.copy_(torch.randn(m, 512, generator=g).to(dev, torch.bfloat16))
        want = dispatch.ternary_linear_w2a8(x, packed, ws)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -7, atol=1e-2)


# -- the GPU launch paths, run by the interpreter -----------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check of the GPU configs (CPU-only hosts)")
def test_autotuned_and_gpu_configs_launch(monkeypatch):
    """Every autotune config (and the GPU test configs) launches and computes the same function.

    The autotuner's timer is replaced by one that runs each candidate once (under the interpreter)
    and reports a made-up time, so the selection code, pruning, grids and config keys all run.
    """
    for mod in (ternary, binary, int8_head):
        monkeypatch.setattr(mod, "interpreting", lambda: False)
    monkeypatch.setenv(tl_common.AUTOTUNE_ENV, "1")
    ran = []

    def fake_bench(fn, quantiles=None, **kw):
        fn()
        ran.append(1)
        t = float(len(ran) % 5 + 1)
        return [t, t, t] if quantiles else t

    kernels = [ternary._ternary_gemv_kernel, ternary._ternary_gemm_kernel, binary._binary_kernel,
               binary._dual_binary_kernel, int8_head._int8_gemv_kernel, int8_head._int8_gemm_kernel]
    for kern in kernels:
        monkeypatch.setattr(kern, "_do_bench", fake_bench)
        monkeypatch.setattr(kern, "cache", {})
    g = gen("autotune")
    m, n, k = 3, 40, 256
    x = rand_x(m, k, torch.bfloat16, g)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) + 0.5
    twin = reference.ternary_linear_w2a8(x, pack_ternary(t), ws)
    for path in ("gemv", "gemm"):
        for config in (None, GPU_CFG[path]):
            y = ternary.ternary_linear(x, pack_ternary(t), ws, path=path, config=config)
            assert torch.equal(y, twin), (path, config)
        y16 = ternary.ternary_linear(x, pack_ternary(t), ws, act_int8=False, path=path, split_k=1)
        ref16 = reference_lowbit.ternary_linear_w2a16(x, pack_ternary(t), ws)
        assert (y16.float() - ref16.float()).abs().max() <= 2 ** -7 * ref16.float().abs().max()
    bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    gvec = torch.rand(k, generator=g) + 0.5
    ref_b = reference_lowbit.binary_linear_w1a16(x, pack_sign_bits(bits), gvec)
    for config in (None, GPU_CFG["binary"]):
        y = binary.binary_linear(x, pack_sign_bits(bits), gvec, config=config)
        assert (y.float() - ref_b.float()).abs().max() <= 2 ** -7 * ref_b.float().abs().max()
    b1, b2 = (torch.randint(0, 2, (n, k), generator=g) for _ in range(2))
    a1, a2 = torch.rand(n, 2, generator=g), -torch.rand(n, 2, generator=g)
    ref_d = reference_lowbit.dual_binary_linear(x, pack_dual_binary(b1, b2, 128), a1, a2, 128)
    for config in (None, GPU_CFG["dual"]):
        y = binary.dual_binary_linear(x, pack_dual_binary(b1, b2, 128), a1, a2, 128, config=config)
        assert (y.float() - ref_d.float()).abs().max() <= 2 ** -7 * ref_d.float().abs().max()
    q, s = quantize_weight_int8_rows(torch.randn(n, k, generator=g))
    ref_h = reference_lowbit.int8_linear(x, q, s)
    for path in ("gemv", "gemm"):
        for config in (None, GPU_CFG["head_" + path]):
            y = int8_head.int8_linear(x, q, s, path=path, config=config)
            assert (y.float() - ref_h.float()).abs().max() <= 2 ** -7 * ref_h.float().abs().max()
    n_configs = sum(len(kern.configs) for kern in kernels)
    assert len(ran) >= n_configs - 4  # pruning drops only configs too large for the block of M


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU-only hosts)")
def test_quant_linears_run_on_triton():
    """The plugins' layers reach the Triton kernels through dispatch (forced here; automatic on CUDA)."""
    from bitserve.plugins.bitnet import TernaryLinear
    from bitserve.plugins.lowbit_layers import BinaryLinear, DualBinaryLinear, Int8LMHead, TernaryLinearA16

    g = gen("layers")
    n, k = 24, 128
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    bits = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    layers = [
        TernaryLinear(pack_ternary(t), torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)),
        TernaryLinearA16(pack_ternary(t), torch.rand(1, generator=g) + 0.5),
        BinaryLinear(pack_sign_bits(bits), torch.rand(k, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5),
        DualBinaryLinear(pack_dual_binary(bits, 1 - bits, 64), torch.rand(n, 2, generator=g), -torch.rand(n, 2, generator=g), 64),
        Int8LMHead.from_dense(torch.randn(n, k, generator=g)),
    ]
    for m in (1, 5):
        x = rand_x(m, k, torch.bfloat16, g)
        for layer in layers:
            want = layer(x)
            with dispatch.use_triton(True):
                got = layer(x)
            assert got.dtype == want.dtype and got.shape == want.shape
            tol = 2 ** -7 * want.float().abs().max() + 1e-6
            assert (got.float() - want.float()).abs().max() <= tol, type(layer).__name__
            if isinstance(layer, TernaryLinear):
                assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_int8", [True, False])
def test_ternary_dequant_path(device, dtype, act_int8):
    """path="dequant" (unpacked codes + the vendor GEMM, for prefill): W2A8 is exact up to the
    same fp32 epilogue as the kernels; W2A16 within the float bound of the dot in x's dtype."""
    m, n, k = 33, 72, 328
    x, t, ws, bias, (xd, pd, wsd, bd) = ternary_case(m, n, k, dtype, device, 9, True, True)
    out = poisoned_out(m, n, dtype, device)
    y = ternary.ternary_linear(xd, pd, wsd, bd, out, act_int8=act_int8, path="dequant")
    assert y is out
    if act_int8:
        ref, mag, amax = w2a8_oracle(x, t, ws, bias)
        tol = 2 * UNIT[dtype] * ref.abs() + 2.0 ** -21 * mag + 1e-12
        if device == "cuda":
            tol = tol + 2 * amax / 127 * ws.double().abs()
        assert_bound(y, ref, tol, "W2A8 dequant")
    else:
        ref = (x.double() @ t.double().t()) * ws.double() + bias.double()
        s_abs = (x.double().abs() @ t.double().abs().t()) * ws.double()
        # the dot rounds to x's dtype once more before the scale: one more unit of roundoff
        bound = float_bound(ref, s_abs, dtype, k, False) + UNIT[dtype] * s_abs
        assert_bound(y, ref, bound, "W2A16 dequant")
