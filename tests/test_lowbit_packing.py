"""Kernel layouts of binary / dual-binary / int8 weights and every on-disk layout of FORMATS.md.

Round trips (on-disk -> plain values -> kernel layout -> plain values), the layouts' defining
formulas checked element by element, FORMATS.md's worked examples byte for byte, and the GGUF
ternary blocks against the ``gguf`` package's own (de)quantizers where it is installed.
"""

import numpy as np
import pytest
import torch

from bitserve.kernels import ondisk
from bitserve.kernels.packing import (
    pack_dual_binary,
    pack_sign_bits,
    pack_ternary,
    quantize_weight_int8_rows,
    sign_bits,
    signs_from_bits,
    unpack_dual_binary,
    unpack_sign_bits,
    unpack_ternary,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ternary(n, k, seed):
    return torch.randint(-1, 2, (n, k), generator=_gen(seed), dtype=torch.int8)


def _bits(n, k, seed):
    return torch.randint(0, 2, (n, k), generator=_gen(seed), dtype=torch.uint8)


# -- binary kernel layout --------------------------------------------------------------------------
def test_binary_layout_definition():
    bits = _bits(5, 24, 1)
    p = pack_sign_bits(bits)
    q8 = 3
    assert p.shape == (5, q8) and p.dtype == torch.uint8
    for n in range(5):
        for j in range(q8):
            for s in range(8):
                assert (p[n, j].item() >> s) & 1 == bits[n, j + s * q8].item()


@pytest.mark.parametrize("n,k", [(1, 8), (7, 40), (33, 200)])
def test_binary_round_trip(n, k):
    bits = _bits(n, k, n + k)
    assert torch.equal(unpack_sign_bits(pack_sign_bits(bits)), bits)
    w = torch.randn(n, k, generator=_gen(k))
    assert torch.equal(signs_from_bits(sign_bits(w)), torch.where(w < 0, -1.0, 1.0))


def test_binary_errors():
    with pytest.raises(ValueError, match="K=12"):
        pack_sign_bits(torch.zeros(2, 12, dtype=torch.uint8))


# -- dual-binary kernel layout --------------------------------------------------------------------
@pytest.mark.parametrize("group", [4, 32, 64, 96])
def test_dual_binary_layout_definition(group):
    k = 192
    b1, b2 = _bits(3, k, group), _bits(3, k, group + 1)
    p = pack_dual_binary(b1, b2, group)
    assert p.shape == (3, k // 4)
    gb = group // 4
    for n in range(3):
        for g in range(k // group):
            for j in range(gb):
                byte = p[n, g * gb + j].item()
                for s in range(4):
                    col = g * group + j + s * gb
                    assert (byte >> (2 * s)) & 1 == b1[n, col].item()
                    assert (byte >> (2 * s + 1)) & 1 == b2[n, col].item()
    u1, u2 = unpack_dual_binary(p, group)
    assert torch.equal(u1, b1) and torch.equal(u2, b2)


def test_dual_binary_per_row_group_is_ternary_slab_layout():
    # G == K: the K-slab rule of the ternary layout with code B1 + 2*B2
    b1, b2 = _bits(4, 40, 3), _bits(4, 40, 4)
    codes = (b1 + 2 * b2).to(torch.uint8)
    q = 10  # byte j holds columns j, j + K/4, j + K/2, j + 3K/4 at bits 0, 2, 4, 6 (the ternary layout)
    want = codes[:, :q] | codes[:, q:2 * q] << 2 | codes[:, 2 * q:3 * q] << 4 | codes[:, 3 * q:] << 6
    assert torch.equal(pack_dual_binary(b1, b2, 40), want)
    t = codes.to(torch.int8) - 1  # pack_ternary stores t + 1: the same bytes where t is ternary
    ok = (codes < 3).all(dim=1)
    assert torch.equal(pack_ternary(t[ok])[:, :], want[ok])


def test_packers_refuse_values_they_cannot_store():
    """Packing would wrap out-of-range entries into other codes without a word: +-1 signs given
    as sign bits (-1 -> 255), a ternary 5 or 2, a bit plane with a 2."""
    with pytest.raises(ValueError, match=r"sign bits .*entry \[0, 1\] is -1"):
        pack_sign_bits(torch.tensor([[1, -1, 1, 1, 1, 1, 1, 1]], dtype=torch.int8))
    for bad in (5, 2, -2):
        with pytest.raises(ValueError, match=f"ternary .*is {bad}"):
            pack_ternary(torch.tensor([[0, 1, bad, -1]]))
    with pytest.raises(ValueError, match="b2"):
        pack_dual_binary(_bits(2, 40, 0), torch.full((2, 40), 2, dtype=torch.uint8), 8)
    assert torch.equal(pack_sign_bits(torch.ones(1, 8, dtype=torch.bool)), torch.tensor([[255]], dtype=torch.uint8))


def test_dual_binary_errors():
    with pytest.raises(ValueError, match="group_size"):
        pack_dual_binary(_bits(2, 40, 0), _bits(2, 40, 1), 24)
    with pytest.raises(ValueError, match="shape"):
        pack_dual_binary(_bits(2, 40, 0), _bits(3, 40, 1), 8)


# -- int8 rows ---------------------------------------------------------------------------------
def test_int8_rows_quantization():
    w = torch.randn(37, 50, generator=_gen(2)) * torch.linspace(0.01, 3, 37).unsqueeze(1)
    w[5] = 0
    q, s = quantize_weight_int8_rows(w, row_chunk=8)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[torch.arange(37) != 5] == 127).all()
    assert s[5] == 1 and (q[5] == 0).all()
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


# -- OneBit (FORMATS.md §3) ------------------------------------------------------------------------
def test_onebit_example_byte():
    signs = torch.tensor([[1, -1, -1, 1, 1, 1, -1, 1]])
    packed = ondisk.pack_bits_lsb(sign_bits(signs))
    assert packed.tolist() == [[0x46]]
    assert torch.equal(signs_from_bits(ondisk.unpack_bits_lsb(packed), torch.int64), signs)


@pytest.mark.parametrize("n,k", [(3, 16), (20, 200)])
def test_onebit_to_kernel_layout(n, k):
    bits = _bits(n, k, 7 * n + k)
    stored = ondisk.pack_bits_lsb(bits).view(torch.int8)  # OneBit stores signed int8
    assert (stored < 0).any()
    kernel = ondisk.onebit_to_kernel_layout(stored)
    assert torch.equal(kernel, pack_sign_bits(bits))
    assert torch.equal(unpack_sign_bits(kernel), bits)


def test_dual_binary_planes_to_kernel_layout():
    b1, b2 = _bits(9, 128, 1), _bits(9, 128, 2)
    kernel = ondisk.dual_binary_planes_to_kernel_layout(ondisk.pack_bits_lsb(b1), ondisk.pack_bits_lsb(b2), 64)
    u1, u2 = unpack_dual_binary(kernel, 64)
    assert torch.equal(u1, b1) and torch.equal(u2, b2)


# -- Microsoft GPU W2A8 (FORMATS.md §1.6) -------------------------------------------------------------
def test_ms_tile_map_is_bijection():
    rows, cols = ondisk._ms_tile_map()
    pairs = {(int(r), int(c)) for r, c in zip(rows.reshape(-1), cols.reshape(-1))}
    assert len(pairs) == 16 * 32 and all(0 <= r < 16 and 0 <= c < 32 for r, c in pairs)


def test_ms_word_interleave_order():
    # README: reading the new word's 2-bit fields in order yields slots 0,4,8,12,1,5,9,13,2,6,10,14,3,7,11,15
    order = sorted(range(16), key=lambda o: ondisk._MS_SHIFT[o])
    assert order == [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96)])
def test_ms_gpu_round_trip(n, k):
    t = _ternary(n, k, n * k)
    packed = ondisk.ms_gpu_pack(t)
    assert packed.shape == (n, k // 4) and packed.dtype == torch.int8
    assert torch.equal(ondisk.ms_gpu_unpack(packed), t)
    assert torch.equal(ondisk.ms_gpu_to_kernel_layout(packed), pack_ternary(t))


def test_ms_gpu_codes_and_first_tile_element():
    # code t+2; element (0, 0) of the permuted tile is source (0, 0); (0, 16) -> source (8, 0)... by the map
    t = torch.zeros(16, 32, dtype=torch.int8)
    t[0, 0] = 1
    words = ondisk.ms_gpu_pack(t).view(torch.int32).view(-1)
    # slot 0 of word 0 holds source (0, 0): code 3 at bit offset 0; every other slot holds code 2
    assert int(words[0]) & 3 == 3
    assert all(((int(w) & 0xFFFFFFFF) >> ondisk._MS_SHIFT[o]) & 3 == 2 for i, w in enumerate(words) for o in range(16)
               if (i, o) != (0, 0))
    with pytest.raises(ValueError):
        ondisk.ms_gpu_pack(torch.zeros(8, 32, dtype=torch.int8))


# -- GGUF TQ2_0 / TQ1_0 (FORMATS.md §2.1, §2.2) -----------------------------------------------------------
def test_tq2_0_example():
    t = torch.zeros(1, 256, dtype=torch.int8)
    t[0, [0, 32, 64, 96]] = torch.tensor([1, -1, 0, 1], dtype=torch.int8)
    t[0, [1, 33, 65, 97]] = torch.tensor([-1, 0, 0, 0], dtype=torch.int8)
    data = ondisk.tq2_0_pack(t, torch.tensor([[1.5]]))
    assert data.shape == (1, 66)
    assert data[0, 0].item() == 0x92 and data[0, 1].item() == 0x54
    assert data[0, 64:66].tolist() == [0x00, 0x3E]
    back, d = ondisk.tq2_0_unpack(data)
    assert torch.equal(back, t) and d.tolist() == [[1.5]]


def test_tq1_0_example():
    t = torch.zeros(1, 256, dtype=torch.int8)
    t[0, [0, 32, 64, 96, 128]] = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int8)
    t[0, [240, 244, 248, 252]] = torch.tensor([-1, 1, 1, 0], dtype=torch.int8)
    data = ondisk.tq1_0_pack(t, torch.tensor([[1.5]]))
    assert data.shape == (1, 54)
    assert data[0, 0].item() == 188 and data[0, 48].item() == 80
    back, d = ondisk.tq1_0_unpack(data)
    assert torch.equal(back, t) and d.tolist() == [[1.5]]


@pytest.mark.parametrize("kind", ["TQ2_0", "TQ1_0"])
def test_gguf_round_trip_and_kernel_layout(kind):
    n, k = 6, 512
    t = _ternary(n, k, 11)
    d = (torch.rand(n, k // 256, generator=_gen(3)) + 0.5).half().float()
    data = (ondisk.tq2_0_pack if kind == "TQ2_0" else ondisk.tq1_0_pack)(t, d)
    assert data.shape == (n, k // 256 * (66 if kind == "TQ2_0" else 54))
    packed, scales = ondisk.gguf_ternary_to_kernel_layout(data, kind)
    assert torch.equal(unpack_ternary(packed), t) and torch.equal(scales, d)


@pytest.mark.parametrize("kind", ["TQ2_0", "TQ1_0"])
def test_gguf_matches_gguf_package(kind):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    n, k = 5, 768
    t = _ternary(n, k, 5)
    t[:, :256][0] = 1  # every block has a non-zero, so the reference quantizer's d = max|x| = gamma
    gamma = torch.tensor(0.8125)  # exact in fp16
    w = (t.float() * gamma).numpy()
    theirs = quants.quantize(w, qtype)
    d = torch.full((n, k // 256), float(gamma))
    d[(t.reshape(n, -1, 256) == 0).all(-1)] = 0.0
    ours = (ondisk.tq2_0_pack if kind == "TQ2_0" else ondisk.tq1_0_pack)(t, d)
    assert np.array_equal(ours.numpy(), theirs)
    back, _ = (ondisk.tq2_0_unpack if kind == "TQ2_0" else ondisk.tq1_0_unpack)(torch.from_numpy(theirs))
    assert torch.equal(back, t)
    assert np.array_equal(quants.dequantize(theirs, qtype), w)


# -- bitnet.cpp I2_S (FORMATS.md §2.4) ------------------------------------------------------------------
def test_i2_s_example():
    t = torch.zeros(1, 128, dtype=torch.int8)
    t[0, [0, 32, 64, 96]] = torch.tensor([1, -1, 0, 1], dtype=torch.int8)
    t[0, 1] = -1
    data = ondisk.i2_s_pack(t, 1.5)
    assert data.numel() == 64
    assert data[0].item() == 0x86 and data[1].item() == 0x15
    assert data[32:36].tolist() == [0x00, 0x00, 0xC0, 0x3F]
    back, scale = ondisk.i2_s_unpack(data, 1, 128)
    assert torch.equal(back, t) and scale == 1.5


@pytest.mark.parametrize("n,k", [(4, 32), (12, 160)])
def test_i2_s_round_trip(n, k):
    t = _ternary(n, k, n + 2 * k)
    data = ondisk.i2_s_pack(t, 0.37)
    assert data.numel() == n * k // 4 + 32
    packed, scale = ondisk.i2_s_to_kernel_layout(data, n, k)
    assert torch.equal(unpack_ternary(packed), t) and scale == pytest.approx(0.37)
