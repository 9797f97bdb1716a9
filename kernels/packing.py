"""Bit packing of ternary weights: the kernel layout and on-disk layouts.

Kernel layout ("K-slab", what every bitserve ternary op reads)
-------------------------------------------------------------
A ternary matrix ``T[N, K]`` (entries -1/0/+1, ``K % 4 == 0``) is stored as
``uint8[N, K // 4]``. With ``Q = K // 4``, byte ``P[n, j]`` holds the four
weights ``T[n, j + s*Q]`` for ``s = 0..3`` in bit pairs ``2s..2s+1`` as the
code ``t + 1`` (-1 -> 0, 0 -> 1, +1 -> 2; code 3 never occurs).

Why: a row of the weight is contiguous (coalesced GEMV loads), and any tile
``P[:, j0:j1]`` unpacks with four shifts into four contiguous column slabs
``[j0 + s*Q, j1 + s*Q)`` of ``T``, so a kernel can tile K freely and load the
matching activation slabs without gathers.

Other kernel layouts (defined with their packers below)
------------------------------------------------------
- binary (OneBit, FBI-LLM): ``uint8[N, K/8]``, bit ``s`` of ``P[n, j]`` is the sign bit of
  column ``j + s*K/8`` (1 <=> -1): the same K-slab rule with eight 1-bit slabs.
- dual-binary (DB-LLM): ``uint8[N, K/4]``, the 2-bit code ``B1 + 2*B2`` in K-slabs taken per
  group of ``G`` columns (four slabs of ``G/4`` columns inside each group).
- int8 rows (LM head): plain ``int8[N, K]`` with a float32 scale per row.
On-disk layouts of FORMATS.md (TQ1_0, TQ2_0, I2_S, Microsoft GPU, OneBit, bit planes) are
decoded and repacked into these by :mod:`bitserve.kernels.ondisk`.

Hugging Face "bitnet" layout (FORMATS.md §1.3)
---------------------------------------------
``uint8[N // 4, K]``: with ``R = N // 4``, ``T[s*R + r, k] = ((P[r, k] >> 2s) & 3) - 1``
(four slabs along the output axis, code ``t + 1``).
"""

from __future__ import annotations

import torch

_SHIFTS = (0, 2, 4, 6)


def _check_matrix(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{what} matrix must be 2-D, got shape {tuple(t.shape)}")


def _check_values(t: torch.Tensor, allowed: tuple[int, ...], what: str) -> None:
    """ValueError naming the first entry of ``t`` outside ``allowed`` (packing would wrap it silently)."""
    if t.dtype == torch.bool:
        return
    ok = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    for v in allowed:
        ok |= t == v
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(f"{what} must hold only {allowed}; entry {bad} is {t[tuple(bad)].item()}")


def _check_ternary(t: torch.Tensor) -> None:
    _check_matrix(t, "ternary")
    _check_values(t, (-1, 0, 1), "a ternary matrix")


def _check_bits(t: torch.Tensor, what: str) -> None:
    _check_matrix(t, what)
    _check_values(t, (0, 1), what)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary ``[N, K]`` matrix (any integer/float dtype) into the kernel layout."""
    _check_ternary(t)
    n, k = t.shape
    if k % 4:
        raise ValueError(f"K={k} must be a multiple of 4 for the ternary kernel layout")
    q = k // 4
    codes = (t.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((n, q), dtype=torch.uint8, device=t.device)
    for s, shift in enumerate(_SHIFTS):
        packed |= codes[:, s * q : (s + 1) * q] << shift
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8[N, K/4]`` -> ``[N, K]`` of -1/0/+1."""
    slabs = [((packed >> shift) & 3) for shift in _SHIFTS]
    return (torch.cat(slabs, dim=1).to(torch.int8) - 1).to(dtype)


def hf_unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Unpack the Hugging Face layout ``uint8[N/4, K]`` into ``[N, K]`` ternary values."""
    slabs = [((packed >> shift) & 3) for shift in _SHIFTS]
    return (torch.cat(slabs, dim=0).to(torch.int8) - 1).to(dtype)


def hf_pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, K]`` ternary values into the Hugging Face layout ``uint8[N/4, K]``."""
    _check_ternary(t)
    n, _ = t.shape
    if n % 4:
        raise ValueError(f"N={n} must be a multiple of 4 for the Hugging Face bitnet layout")
    r = n // 4
    codes = (t.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((r, t.shape[1]), dtype=torch.uint8, device=t.device)
    for s, shift in enumerate(_SHIFTS):
        packed |= codes[s * r : (s + 1) * r] << shift
    return packed


def hf_to_kernel_layout(hf_packed: torch.Tensor, row_chunk: int = 4096) -> torch.Tensor:
    """Repack a Hugging Face ``uint8[N/4, K]`` tensor into the kernel layout ``uint8[N, K/4]``.

    Works on ``row_chunk`` packed rows at a time so the transient unpacked
    int8 copy stays small (a few MB) whatever the matrix size.
    """
    r, k = hf_packed.shape
    if k % 4:
        raise ValueError(f"K={k} must be a multiple of 4 for the ternary kernel layout")
    out = torch.empty((4 * r, k // 4), dtype=torch.uint8, device=hf_packed.device)
    step = max(1, row_chunk // 4)
    for start in range(0, r, step):
        stop = min(r, start + step)
        block = hf_packed[start:stop]
        for s, shift in enumerate(_SHIFTS):
            rows = ((block >> shift) & 3).to(torch.int8) - 1
            out[s * r + start : s * r + stop] = pack_ternary(rows)
    return out


# -- generic "blocked K-slab" packing (binary and dual-binary kernel layouts) -------------------
#
# A matrix of small codes C[N, K] (``bits`` bits each, ``S = 8 // bits`` codes per byte) is cut
# along K into blocks of ``block`` columns; inside block ``b`` (columns ``b*block ..``), byte
# ``j < block // S`` holds the codes of columns ``b*block + j + s*(block // S)`` for ``s = 0..S-1``
# in bits ``bits*s ..``. With ``block == K`` this is the K-slab rule of the ternary layout above.


def _pack_codes(codes: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    n, k = codes.shape
    per_byte = 8 // bits
    if block % per_byte or k % block:
        raise ValueError(f"K={k} must be a multiple of the block {block}, itself a multiple of {per_byte}")
    width = block // per_byte
    c = codes.to(torch.uint8).reshape(n, k // block, per_byte, width)
    packed = torch.zeros((n, k // block, width), dtype=torch.uint8, device=codes.device)
    for s in range(per_byte):
        packed |= c[:, :, s] << (bits * s)
    return packed.reshape(n, k // per_byte)


def _unpack_codes(packed: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    n, q = packed.shape
    per_byte = 8 // bits
    width = block // per_byte
    if block % per_byte or q % width:
        raise ValueError(f"packed width {q} is not a multiple of {width} bytes (block {block})")
    p = packed.reshape(n, q // width, 1, width)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(1, 1, per_byte, 1)
    codes = (p >> shifts) & ((1 << bits) - 1)
    return codes.reshape(n, q * per_byte)


# -- binary (sign) kernel layout ------------------------------------------------------------------
#
# Sign matrix S[N, K] (entries +-1, ``K % 8 == 0``) as ``uint8[N, K // 8]``: with ``Q8 = K // 8``,
# bit ``s`` of byte ``P[n, j]`` is the sign bit of ``S[n, j + s*Q8]`` (s = 0..7), and a set bit
# means -1 (OneBit's convention: ``S = 1 - 2*bit``). Same reasons as the ternary K-slab: rows are
# contiguous and a tile of bytes unpacks into eight contiguous column slabs.


def pack_sign_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, K]`` sign bits (1 <=> -1, 0 <=> +1; bool or integer 0/1, not the +-1 signs:
    :func:`sign_bits` turns signs or weights into bits) into the binary kernel layout."""
    _check_bits(bits, "sign bits (1 <=> -1, 0 <=> +1)")
    return _pack_codes(bits.to(torch.uint8), 1, bits.shape[1])


def unpack_sign_bits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_sign_bits`: ``uint8[N, K/8]`` -> ``uint8[N, K]`` of 0/1 (1 <=> -1)."""
    return _unpack_codes(packed, 1, packed.shape[1] * 8)


def signs_from_bits(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 - 2*bit``: the +-1 signs that sign bits stand for."""
    return (1 - 2 * bits.to(torch.int8)).to(dtype)


def sign_bits(w: torch.Tensor) -> torch.Tensor:
    """Sign bits of a real matrix: 1 where ``w < 0``. A zero becomes +1 (lossy edge of 1-bit formats)."""
    return (w < 0).to(torch.uint8)


# -- dual-binary kernel layout --------------------------------------------------------------------
#
# ``W = a1 * B1 + a2 * B2`` with bit planes ``B1, B2`` in {0, 1} ``[N, K]`` and scales per output
# row and group of ``G`` input columns (``a[N, K // G]``; ``G == K`` is one scale per row).
# Stored as ``uint8[N, K // 4]``: the 2-bit code ``B1 + 2*B2`` in the blocked K-slab with block
# ``G``: byte ``P[n, g*G/4 + j]`` (``j < G/4``) holds the code of column ``g*G + j + s*G/4`` in
# bits ``2s..2s+1`` (B1 in bit 2s, B2 in bit 2s+1). Every tile of a group's bytes unpacks into four
# column slabs of that one group, so a kernel applies the group's two scales once per tile.


def _check_group(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 4 or k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 4 dividing K={k}")


def pack_dual_binary(b1: torch.Tensor, b2: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack two ``[N, K]`` bit planes (0/1) into the dual-binary kernel layout ``uint8[N, K/4]``."""
    _check_bits(b1, "bit plane b1")
    _check_bits(b2, "bit plane b2")
    if b1.shape != b2.shape:
        raise ValueError(f"bit planes differ in shape: {tuple(b1.shape)} vs {tuple(b2.shape)}")
    _check_group(b1.shape[1], group_size)
    codes = b1.to(torch.uint8) | (b2.to(torch.uint8) << 1)
    return _pack_codes(codes, 2, group_size)


def unpack_dual_binary(packed: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_dual_binary`: ``(B1, B2)`` as ``uint8[N, K]`` of 0/1."""
    _check_group(packed.shape[1] * 4, group_size)
    codes = _unpack_codes(packed, 2, group_size)
    return codes & 1, codes >> 1


# -- int8 per-row weights (the opt-in int8 LM head) -------------------------------------------------


def quantize_weight_int8_rows(weight: torch.Tensor, row_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per output row: ``W ~= q * scale[:, None]``.

    Returns ``(q int8 [N, K], scale float32 [N])`` with ``scale = max|W[n]| / 127`` (rows of zeros
    get scale 1), ``q = clamp(round(W / scale), -127, 127)``. Works ``row_chunk`` rows at a time
    so that a 128k-row head never exists in float32 at once.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, row_chunk):
        w = weight[start : start + row_chunk].float()
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[start : start + row_chunk] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[start : start + row_chunk] = s
    return q, scale
