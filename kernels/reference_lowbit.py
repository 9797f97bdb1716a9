"""Plain-torch twins of the weight ops beyond W2A8: W2A16, binary W1A16, dual-binary, int8 (LM head).

Companions of :mod:`bitserve.kernels.reference` (which holds the W2A8 twin): the numerical
contract of :mod:`bitserve.kernels.ternary`, :mod:`bitserve.kernels.binary` and
:mod:`bitserve.kernels.int8_head`. They run anywhere torch runs, in float32, and never hold more
than a tile (``reference._TILE_ELEMENTS`` weights) of a dense weight at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitserve.kernels import reference
from bitserve.kernels.packing import unpack_dual_binary


def _rows_per_tile(k: int) -> int:
    return max(1, reference._TILE_ELEMENTS // max(1, k))


def _finish(y: torch.Tensor, bias: torch.Tensor | None, lead, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, y.shape[-1])


def ternary_linear_w2a16(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ternary weights x unquantized activations: ``y = (x @ T.T) * weight_scale (+ bias)``.

    Same weight arguments as :func:`bitserve.kernels.reference.ternary_linear_w2a8` (kernel layout
    ``uint8[N, K/4]``, float multiplier ``[1]`` or ``[N]``); float32 accumulation; output in x.dtype.
    """
    lead = x.shape[:-1]
    acc = reference.ternary_matmul_int(x.reshape(-1, x.shape[-1]).float(), packed)  # float x: LUT path, fp32
    return _finish(acc * weight_scale.float(), bias, lead, x.dtype)


def _sign_lut(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` float32: the eight signs (slabs 0..7, bit 1 <=> -1) held by each byte."""
    codes = torch.arange(256, device=device, dtype=torch.int32)
    return torch.stack([1 - 2 * ((codes >> s) & 1) for s in range(8)], dim=1).float()


def binary_linear_w1a16(
    x: torch.Tensor,
    packed: torch.Tensor,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    in_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign weights with scale vectors: ``y = ((x * in_scale) @ S.T) * out_scale + x @ in_bias (+ bias)``.

    packed: ``uint8[N, K/8]`` binary kernel layout (:func:`bitserve.kernels.packing.pack_sign_bits`,
    ``S = 1 - 2*bit``); in_scale ``[K]`` (OneBit g, FBI-LLM alpha), out_scale ``[N]`` (OneBit h),
    in_bias ``[K]`` (FBI-LLM beta: adds the scalar ``x . beta`` to every output), bias ``[N]``;
    each optional. float32 math; output in x.dtype.
    """
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float()
    m, k = xf.shape
    n, q8 = packed.shape
    if 8 * q8 != k:
        raise ValueError(f"packed weight has K={8 * q8} but activations have K={k}")
    xg = xf * in_scale.float() if in_scale is not None else xf
    xs = xg.reshape(m, 8, q8).transpose(1, 2).reshape(m, k)  # (j, s) order, like the LUT rows
    lut = _sign_lut(packed.device)
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    rows = _rows_per_tile(k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = F.embedding(packed[start:stop].int(), lut).view(stop - start, k)
        torch.matmul(xs, w.t(), out=y[:, start:stop])
    if out_scale is not None:
        y = y * out_scale.float()
    if in_bias is not None:
        y = y + (xf @ in_bias.float()).unsqueeze(1)
    return _finish(y, bias, lead, x.dtype)


def dual_binary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha1: torch.Tensor,
    alpha2: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-binary weights ``W = alpha1 * B1 + alpha2 * B2`` (B in {0,1}, scales per row and group).

    packed: ``uint8[N, K/4]`` dual-binary kernel layout (:func:`bitserve.kernels.packing.pack_dual_binary`);
    alpha1/alpha2: ``[N, K/group_size]``. ``y = x @ W.T (+ bias)``; float32 math; output in x.dtype.
    """
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float()
    m, k = xf.shape
    n = packed.shape[0]
    if 4 * packed.shape[1] != k:
        raise ValueError(f"packed weight has K={4 * packed.shape[1]} but activations have K={k}")
    if alpha1.shape != (n, k // group_size) or alpha2.shape != alpha1.shape:
        raise ValueError(f"alpha1/alpha2 must be [{n}, {k // group_size}], got {tuple(alpha1.shape)}, "
                         f"{tuple(alpha2.shape)}")
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    rows = _rows_per_tile(k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        b1, b2 = unpack_dual_binary(packed[start:stop], group_size)
        a1 = alpha1[start:stop].float().repeat_interleave(group_size, dim=1)
        a2 = alpha2[start:stop].float().repeat_interleave(group_size, dim=1)
        torch.matmul(xf, (a1 * b1.float() + a2 * b2.float()).t(), out=y[:, start:stop])
    return _finish(y, bias, lead, x.dtype)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A16 linear (the int8 LM head): ``y = (x @ Wq.T) * scale (+ bias)``.

    weight: ``int8[N, K]``; scale: float ``[N]`` per output row (or ``[1]``); float32 math, a tile
    of the weight in float at a time; output in ``out_dtype`` (default x.dtype).
    """
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float()
    m, k = xf.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight has K={weight.shape[1]} but activations have K={k}")
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    rows = _rows_per_tile(k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        torch.matmul(xf, weight[start:stop].float().t(), out=y[:, start:stop])
    return _finish(y * scale.float(), bias, lead, out_dtype or x.dtype)
