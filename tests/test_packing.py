"""Ternary packing: FORMATS.md §1.5 worked examples, transformers' packer, kernel layout."""

import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitserve.kernels import packing
from bitserve.kernels.packing import (
    hf_pack_ternary,
    hf_to_kernel_layout,
    hf_unpack_ternary,
    pack_ternary,
    unpack_ternary,
)


def _random_ternary(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


# -- FORMATS.md §1.5 "Packing example" -------------------------------------------------
def test_formats_example_4x1():
    t = torch.tensor([[-1], [0], [1], [1]], dtype=torch.int8)
    packed = hf_pack_ternary(t)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xA4]]
    assert torch.equal(hf_unpack_ternary(packed), t)


def test_formats_example_8x2():
    t = torch.tensor(
        [[-1, 1], [0, 0], [1, -1], [1, 0], [0, 1], [-1, -1], [1, 1], [0, -1]], dtype=torch.int8
    )
    packed = hf_pack_ternary(t)
    assert packed.tolist() == [[0x98, 0xA2], [0x49, 0x05]]
    assert torch.equal(hf_unpack_ternary(packed), t)
    # the §1.3 formula, spelled out: T[s*R + r, k] = ((P[r, k] >> 2s) & 3) - 1
    r = 2
    for s in range(4):
        for row in range(r):
            for k in range(2):
                assert ((packed[row, k].item() >> (2 * s)) & 3) - 1 == t[s * r + row, k].item()


def test_hf_unpack_dtype_and_formats_bytes():
    packed = torch.tensor([[0x98, 0xA2], [0x49, 0x05]], dtype=torch.uint8)
    out = hf_unpack_ternary(packed, torch.float32)
    assert out.dtype == torch.float32
    assert out[:, 0].tolist() == [-1, 0, 1, 1, 0, -1, 1, 0]
    assert out[:, 1].tolist() == [1, 0, -1, 0, 1, -1, 1, -1]


# -- agreement with transformers (the independent oracle) -------------------------------
@pytest.mark.parametrize("n,k,seed", [(4, 1, 0), (8, 2, 1), (12, 20, 2), (64, 48, 3), (160, 64, 4)])
def test_matches_transformers_pack_weights(n, k, seed):
    t = _random_ternary(n, k, seed)
    ours = hf_pack_ternary(t)
    theirs = pack_weights(t.clone())  # pack_weights adds 1 in place
    assert ours.shape == (n // 4, k)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_weights(ours, torch.int8), t)
    assert torch.equal(hf_unpack_ternary(theirs), t)


def test_random_bytes_unpack_like_transformers():
    # any byte without code 3 is valid; compare decoders on random valid bytes
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 3, (4, 10, 36), generator=gen, dtype=torch.uint8)
    packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
    assert torch.equal(hf_unpack_ternary(packed, torch.int16), unpack_weights(packed, torch.int16))


# -- kernel layout ----------------------------------------------------------------------
def test_kernel_layout_definition():
    # byte P[n, j] holds T[n, j + s*Q] in bits 2s..2s+1 (code t+1)
    t = _random_ternary(6, 20, 11)
    p = pack_ternary(t)
    q = 5
    assert p.shape == (6, q) and p.dtype == torch.uint8
    for n in range(6):
        for j in range(q):
            byte = p[n, j].item()
            for s in range(4):
                assert ((byte >> (2 * s)) & 3) - 1 == t[n, j + s * q].item()


@pytest.mark.parametrize("n,k", [(1, 4), (3, 12), (20, 36), (96, 200)])
def test_kernel_round_trip(n, k):
    t = _random_ternary(n, k, n + k)
    p = pack_ternary(t)
    assert p.shape == (n, k // 4)
    assert not ((p >> 6) & 3).eq(3).any()
    assert torch.equal(unpack_ternary(p), t)
    assert torch.equal(unpack_ternary(p, torch.float32), t.float())
    # float input ternary values pack the same
    assert torch.equal(pack_ternary(t.float()), p)


@pytest.mark.parametrize("n,k", [(12, 20), (36, 12), (100, 44), (4, 4)])
@pytest.mark.parametrize("row_chunk", [4, 8, 12, 4096])
def test_hf_to_kernel_layout(n, k, row_chunk):
    t = _random_ternary(n, k, 3 * n + k)
    hf = pack_weights(t.clone())
    expected = pack_ternary(hf_unpack_ternary(hf))
    got = hf_to_kernel_layout(hf, row_chunk=row_chunk)
    assert got.dtype == torch.uint8 and got.shape == (n, k // 4)
    assert torch.equal(got, expected)
    assert torch.equal(unpack_ternary(got), t)


def test_hf_to_kernel_layout_chunking_is_used(monkeypatch):
    # with a small row_chunk the repack works on slices, never on the whole matrix
    t = _random_ternary(48, 20, 5)
    hf = hf_pack_ternary(t)
    seen = []
    real = packing.pack_ternary

    def spy(x):
        seen.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(packing, "pack_ternary", spy)
    got = hf_to_kernel_layout(hf, row_chunk=8)
    assert torch.equal(unpack_ternary(got), t)
    assert seen and max(seen) <= 2 and sum(seen) == 48


# -- errors -------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="N=6"):
        hf_pack_ternary(torch.zeros(6, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="K=6"):
        pack_ternary(torch.zeros(4, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match="K=10"):
        hf_to_kernel_layout(torch.zeros(2, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2-D"):
        pack_ternary(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        hf_pack_ternary(torch.zeros(2, 4, 4, dtype=torch.int8))
