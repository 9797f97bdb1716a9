"""On-disk layouts of FORMATS.md <-> plain values, and their one-time repack to kernel layouts.

Every decoder returns plain values (ternary ``int8[N, K]`` of -1/0/+1, or 0/1 bits) plus the
layout's scales; every ``*_to_kernel_layout`` repacks into the layouts of
:mod:`bitserve.kernels.packing` a bounded number of rows at a time. The encoders exist so tests
(and converters) can produce each layout; they follow the byte rules quoted from FORMATS.md.

| layout | FORMATS.md | stored | kernel layout |
|---|---|---|---|
| Hugging Face bitnet | §1.3 | ``uint8[N/4, K]`` | ternary K-slab (``packing.hf_to_kernel_layout``) |
| Microsoft GPU W2A8 | §1.6 | ``int8[N, K/4]`` 16x32 tiles, code t+2 | ternary K-slab |
| GGUF TQ2_0 | §2.1 | 66 B / 256 weights, ``d`` last | ternary K-slab + ``d[N, K/256]`` |
| GGUF TQ1_0 | §2.2 | 54 B / 256 weights, ``d`` last | ternary K-slab + ``d[N, K/256]`` |
| bitnet.cpp I2_S | §2.4 | ``N*K/4 + 32`` B, f32 scale at ``N*K/4`` | ternary K-slab + scale |
| OneBit | §3.2 | ``int8[N, K/8]``, LSB = first column, 1 <=> -1 | binary K-slab |
| dual-binary planes | §5.3 (suggested) | two ``uint8[N, K/8]``, LSB first, 1 <=> B=1 | dual-binary group slabs |
"""

from __future__ import annotations

import numpy as np
import torch

from bitserve.kernels.packing import pack_dual_binary, pack_sign_bits, pack_ternary

_ROWS = 1024  # rows repacked at a time


def _chunked(n: int, fn, rows: int = _ROWS) -> torch.Tensor:
    return torch.cat([fn(start, min(n, start + rows)) for start in range(0, n, rows)], dim=0)


# -- LSB-first bit planes (OneBit, suggested dual-binary) ----------------------------------------


def pack_bits_lsb(bits: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` 0/1 -> ``uint8[N, K/8]``: column ``8j + b`` in bit ``b`` of byte ``j``."""
    n, k = bits.shape
    if k % 8:
        raise ValueError(f"K={k} must be a multiple of 8")
    b = bits.to(torch.uint8).reshape(n, k // 8, 8)
    out = torch.zeros((n, k // 8), dtype=torch.uint8, device=bits.device)
    for i in range(8):
        out |= b[:, :, i] << i
    return out


def unpack_bits_lsb(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits_lsb`; accepts int8 storage (bytes >= 128 read as negative)."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    shifts = torch.arange(8, dtype=torch.uint8, device=p.device)
    return ((p.unsqueeze(-1) >> shifts) & 1).reshape(p.shape[0], -1)


def onebit_to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """OneBit ``<p>.weight`` (``int8[N, K/8]``, bit 1 <=> -1, LSB first) -> binary kernel layout."""
    return _chunked(packed.shape[0], lambda a, b: pack_sign_bits(unpack_bits_lsb(packed[a:b])))


def dual_binary_planes_to_kernel_layout(plane1: torch.Tensor, plane2: torch.Tensor, group_size: int) -> torch.Tensor:
    """Two LSB-first bit planes ``uint8[N, K/8]`` (1 <=> B=1) -> dual-binary kernel layout."""
    if plane1.shape != plane2.shape:
        raise ValueError(f"bit planes differ in shape: {tuple(plane1.shape)} vs {tuple(plane2.shape)}")
    return _chunked(plane1.shape[0], lambda a, b: pack_dual_binary(
        unpack_bits_lsb(plane1[a:b]), unpack_bits_lsb(plane2[a:b]), group_size))


# -- Microsoft GPU W2A8 (gpu/pack_weight.py, FORMATS.md §1.6) --------------------------------------

def _ms_tile_map() -> tuple[np.ndarray, np.ndarray]:
    """Source (row, col) inside a 16x32 tile of each element (i, j) of the permuted tile."""
    i = np.arange(16)[:, None]
    j = np.arange(32)[None, :]
    t = 2 * i + j // 16
    return (t // 16) * 8 + t % 8 + 0 * j, j % 16 + 16 * ((t % 16) // 8)


# bit offset, inside a little-endian 32-bit word, of the 2-bit slot o after interleaving
_MS_SHIFT = [8 * (o % 4) + 2 * (o // 4) for o in range(16)]


def ms_gpu_pack(t: torch.Tensor) -> torch.Tensor:
    """Encode ternary ``[N, K]`` (N % 16 == K % 32 == 0) into the Microsoft GPU layout ``int8[N, K/4]``."""
    n, k = t.shape
    if n % 16 or k % 32:
        raise ValueError(f"Microsoft GPU layout needs N % 16 == 0 and K % 32 == 0, got {(n, k)}")
    codes = (t.to(torch.int64) + 2).numpy()
    rows, cols = _ms_tile_map()
    tiles = codes.reshape(n // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)  # [bn, bk, 16, 32]
    perm = tiles[:, :, rows, cols]  # [bn, bk, 16, 32]
    words = perm.reshape(-1, 16)  # 16 consecutive codes = one 32-bit word (4 bytes x 4 codes)
    out = np.zeros(words.shape[0], dtype=np.uint32)
    for o in range(16):
        out |= (words[:, o].astype(np.uint32) & 3) << _MS_SHIFT[o]
    return torch.from_numpy(out.view(np.int8).reshape(n, k // 4).copy())


def ms_gpu_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Decode the Microsoft GPU layout ``int8[N, K/4]`` into ternary ``int8[N, K]``."""
    n, q = packed.shape
    k = 4 * q
    if n % 16 or k % 32:
        raise ValueError(f"Microsoft GPU layout needs N % 16 == 0 and K % 32 == 0, got {(n, k)}")
    words = np.ascontiguousarray(packed.cpu().numpy()).view(np.uint32).reshape(-1)
    codes = np.stack([(words >> _MS_SHIFT[o]) & 3 for o in range(16)], axis=1)  # [words, 16]
    perm = codes.reshape(n // 16, k // 32, 16, 32)
    rows, cols = _ms_tile_map()
    tiles = np.zeros_like(perm)
    tiles[:, :, rows, cols] = perm
    if (tiles == 0).any():
        raise ValueError("Microsoft GPU layout holds the invalid code 0 (codes are t+2 in 1..3)")
    t = tiles.transpose(0, 2, 1, 3).reshape(n, k).astype(np.int8) - 2
    return torch.from_numpy(t)


def ms_gpu_to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """Microsoft GPU ``int8[N, K/4]`` -> ternary kernel layout (tiles of 16 rows are independent)."""
    return _chunked(packed.shape[0], lambda a, b: pack_ternary(ms_gpu_unpack(packed[a:b])))


# -- GGUF TQ2_0 (FORMATS.md §2.1) ----------------------------------------------------------------
TQ2_0_BYTES = 66
TQ1_0_BYTES = 54
QK = 256


def _f16_bytes(d: torch.Tensor) -> np.ndarray:
    return d.to(torch.float16).numpy().view(np.uint8).reshape(*d.shape, 2)


def _f16_from_bytes(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def tq2_0_pack(t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Ternary ``[N, K]`` + fp16-representable scales ``[N, K/256]`` -> ``uint8[N, K/256*66]``."""
    n, k = t.shape
    if k % QK:
        raise ValueError(f"K={k} must be a multiple of {QK}")
    c = (t.to(torch.int64) + 1).numpy().reshape(n, k // QK, 2, 4, 32)  # [.., half h, l, m]
    qs = np.zeros((n, k // QK, 2, 32), dtype=np.uint8)
    for l in range(4):
        qs |= (c[:, :, :, l, :] << (2 * l)).astype(np.uint8)
    blocks = np.concatenate([qs.reshape(n, k // QK, 64), _f16_bytes(d)], axis=2)
    return torch.from_numpy(blocks.reshape(n, -1))


def tq2_0_unpack(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8[N, K/256*66]`` -> (ternary ``int8[N, K]``, ``d`` float32 ``[N, K/256]``)."""
    n = data.shape[0]
    blocks = data.numpy().reshape(n, -1, TQ2_0_BYTES)
    nb = blocks.shape[1]
    qs = blocks[:, :, :64].reshape(n, nb, 2, 1, 32)
    codes = (qs >> (2 * np.arange(4).reshape(1, 1, 1, 4, 1))) & 3  # [n, nb, h, l, m]
    if (codes == 3).any():
        raise ValueError("TQ2_0 block holds the invalid code 3")
    t = codes.reshape(n, nb * QK).astype(np.int8) - 1
    return torch.from_numpy(t), _f16_from_bytes(blocks[:, :, 64:66])


# -- GGUF TQ1_0 (FORMATS.md §2.2) ----------------------------------------------------------------
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int64)


def _trits_to_byte(c: np.ndarray) -> np.ndarray:
    """``c[..., 5]`` trits (first most significant) -> ``ceil(q * 256 / 243)``."""
    q = (c * _POW3[::-1]).sum(-1)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _byte_to_trits(b: np.ndarray, count: int) -> np.ndarray:
    out = []
    for i in range(count):
        u = (b.astype(np.int64) * (3 ** i)) & 0xFF
        out.append((u * 3) >> 8)
    return np.stack(out, axis=-1)


def tq1_0_pack(t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n, k = t.shape
    if k % QK:
        raise ValueError(f"K={k} must be a multiple of {QK}")
    c = (t.to(torch.int64) + 1).numpy().reshape(n, k // QK, QK)
    w0 = c[:, :, :160].reshape(n, -1, 5, 32).transpose(0, 1, 3, 2)  # byte m: weights m + 32*i
    w1 = c[:, :, 160:240].reshape(n, -1, 5, 16).transpose(0, 1, 3, 2)  # byte 32+m: 160 + m + 16*i
    w2 = c[:, :, 240:].reshape(n, -1, 4, 4).transpose(0, 1, 3, 2)  # qh[j]: 240 + j + 4*i (4 trits, x3)
    w2 = np.concatenate([w2, np.zeros((*w2.shape[:-1], 1), dtype=w2.dtype)], axis=-1)
    blocks = np.concatenate([_trits_to_byte(w0), _trits_to_byte(w1), _trits_to_byte(w2), _f16_bytes(d)], axis=2)
    return torch.from_numpy(blocks.reshape(n, -1))


def tq1_0_unpack(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = data.shape[0]
    blocks = data.numpy().reshape(n, -1, TQ1_0_BYTES)
    nb = blocks.shape[1]
    w0 = _byte_to_trits(blocks[:, :, :32], 5).transpose(0, 1, 3, 2).reshape(n, nb, 160)
    w1 = _byte_to_trits(blocks[:, :, 32:48], 5).transpose(0, 1, 3, 2).reshape(n, nb, 80)
    w2 = _byte_to_trits(blocks[:, :, 48:52], 4).transpose(0, 1, 3, 2).reshape(n, nb, 16)
    c = np.concatenate([w0, w1, w2], axis=2)
    if (c > 2).any():
        raise ValueError("TQ1_0 block decodes to an invalid trit")
    return torch.from_numpy(c.reshape(n, nb * QK).astype(np.int8) - 1), _f16_from_bytes(blocks[:, :, 52:54])


def gguf_ternary_to_kernel_layout(data: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TQ1_0 / TQ2_0 rows -> (ternary kernel layout, per-block ``d[N, K/256]``)."""
    unpack = {"TQ2_0": tq2_0_unpack, "TQ1_0": tq1_0_unpack}[kind]
    parts, scales = [], []
    for start in range(0, data.shape[0], _ROWS):
        t, d = unpack(data[start : start + _ROWS])
        parts.append(pack_ternary(t))
        scales.append(d)
    return torch.cat(parts), torch.cat(scales)


# -- bitnet.cpp I2_S (FORMATS.md §2.4, canonical 128-element blocks) -----------------------------
I2S_BLOCK = 128


def i2_s_pack(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Ternary ``[N, K]`` (N*K % 128 == 0) + f32 scale -> ``uint8[N*K/4 + 32]``."""
    flat = (t.to(torch.int64) + 1).numpy().reshape(-1)
    if flat.size % I2S_BLOCK:
        raise ValueError(f"N*K={flat.size} must be a multiple of {I2S_BLOCK}")
    c = flat.reshape(-1, 4, 32)  # [block, group g = j // 32, j % 32]
    data = np.zeros((c.shape[0], 32), dtype=np.uint8)
    for g in range(4):
        data |= (c[:, g, :] << (6 - 2 * g)).astype(np.uint8)
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype=np.float32).view(np.uint8)
    return torch.from_numpy(np.concatenate([data.reshape(-1), tail]))


def i2_s_unpack(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, float]:
    """``uint8[N*K/4 + 32]`` -> (ternary ``int8[N, K]``, f32 scale read at byte ``N*K/4``)."""
    raw = data.numpy()
    nbytes = n * k // 4
    if raw.size < nbytes + 4:
        raise ValueError(f"I2_S data has {raw.size} bytes, expected {nbytes} + 32")
    blocks = raw[:nbytes].reshape(-1, 1, 32)
    codes = (blocks >> (6 - 2 * np.arange(4).reshape(1, 4, 1))) & 3  # [block, g, 32]
    if (codes == 3).any():
        raise ValueError("I2_S data holds the invalid code 3")
    scale = float(raw[nbytes : nbytes + 4].copy().view(np.float32)[0])
    return torch.from_numpy(codes.reshape(n, k).astype(np.int8) - 1), scale


def i2_s_to_kernel_layout(data: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, float]:
    t, scale = i2_s_unpack(data, n, k)
    return _chunked(n, lambda a, b: pack_ternary(t[a:b])), scale
