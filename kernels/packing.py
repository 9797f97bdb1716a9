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

Hugging Face "bitnet" layout (FORMATS.md §1.3)
---------------------------------------------
``uint8[N // 4, K]``: with ``R = N // 4``, ``T[s*R + r, k] = ((P[r, k] >> 2s) & 3) - 1``
(four slabs along the output axis, code ``t + 1``).
"""

from __future__ import annotations

import torch

_SHIFTS = (0, 2, 4, 6)


def _check_ternary(t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"ternary matrix must be 2-D, got shape {tuple(t.shape)}")


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
