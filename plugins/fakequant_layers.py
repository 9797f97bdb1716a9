"""Exact low-bit layers for fake-quantized dense weights, built from a :class:`fakequant_grid.Plan`.

- ``binary`` -> :class:`~bitserve.plugins.lowbit_layers.BinaryLinear` (sign bits, ``out_scale = a[N]``)
- ``ternary`` -> :class:`~bitserve.plugins.lowbit_layers.TernaryLinearA16` (``scale = a[N]``)
- ``affine`` -> :class:`~bitserve.plugins.lowbit_layers.DualBinaryLinear`, or
  :class:`OffsetDualBinaryLinear` when some row-group has no zero level
- salient columns -> the ``Salient*`` subclass of any of them (those input columns kept dense)

Every built layer is checked against the weight it replaces before it is returned.
"""

from __future__ import annotations

import torch

from bitserve.kernels import dispatch
from bitserve.kernels.packing import pack_dual_binary, pack_sign_bits, pack_ternary
from bitserve.plugins.base import QuantLinear
from bitserve.plugins.fakequant_grid import Plan, top_levels
from bitserve.plugins.lowbit_layers import BinaryLinear, DualBinaryLinear, TernaryLinearA16


class GridError(ValueError):
    """A weight does not fit the plan it was given (the caller keeps it dense)."""


class OffsetDualBinaryLinear(DualBinaryLinear):
    """``W = offset + alpha1 * B1 + alpha2 * B2`` per row and group: the dual-binary op plus the
    group sums of x times the offsets (``[M, K/G] @ [K/G, N]``, a small dense matmul)."""

    def __init__(self, packed, alpha1, alpha2, offset, group_size, bias=None):
        super().__init__(packed, alpha1, alpha2, group_size, bias)
        self.register_buffer("offset", offset.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = dispatch.dual_binary_linear(xf, self.packed, self.alpha1, self.alpha2, self.group_size)
        sums = xf.reshape(*xf.shape[:-1], -1, self.group_size).sum(-1)
        y = y + sums @ self.offset.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return super().dequantize() + self.offset.repeat_interleave(self.group_size, dim=1)


class _SalientColumns:
    """Mixin: some input columns held dense next to the low-bit weight:
    ``y = base(x with those columns zeroed) + x[..., columns] @ dense.T``.

    ``dense`` holds the checkpoint's own values of those columns (its dtype); whatever the low-bit
    part stores there is never used. A mixin, not a wrapper, so the model holds one QuantLinear
    per linear (bits-per-weight accounting walks QuantLinear modules).
    """

    def __init__(self, *args, columns: torch.Tensor, dense: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("columns", columns.long())
        self.register_buffer("dense", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = super().forward(xf.index_fill(-1, self.columns, 0.0))
        y = y + xf.index_select(-1, self.columns) @ self.dense.float().t()
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        w[:, self.columns] = self.dense.float()
        return w


class SalientBinaryLinear(_SalientColumns, BinaryLinear):
    pass


class SalientTernaryLinearA16(_SalientColumns, TernaryLinearA16):
    pass


class SalientDualBinaryLinear(_SalientColumns, DualBinaryLinear):
    pass


class SalientOffsetDualBinaryLinear(_SalientColumns, OffsetDualBinaryLinear):
    pass


SALIENT = {BinaryLinear: SalientBinaryLinear, TernaryLinearA16: SalientTernaryLinearA16,
           DualBinaryLinear: SalientDualBinaryLinear, OffsetDualBinaryLinear: SalientOffsetDualBinaryLinear}


# -- building ------------------------------------------------------------------------------------
def _row_scale(w: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    return w.masked_fill(salient.unsqueeze(0), 0).abs().amax(1)


def _affine_parts(w: torch.Tensor, salient: torch.Tensor, group_size: int):
    """(b1, b2 uint8 [N, K], alpha1, alpha2, offset float32 [N, K/G]) holding w outside salient columns."""
    n, k = w.shape
    gs = k // group_size
    # salient entries take the value of their group's first regular column (so they add no level)
    cols = torch.arange(k).reshape(gs, group_size)
    regular = ~salient.reshape(gs, group_size)
    first = torch.where(regular.any(1), cols.gather(1, regular.long().argmax(1, keepdim=True)).squeeze(1), -1)
    ref = torch.where(first >= 0, w[:, first.clamp(min=0)], torch.zeros(n, gs))  # [N, gs]
    x = torch.where(salient.reshape(1, gs, group_size), ref.unsqueeze(-1), w.reshape(n, gs, group_size))
    flat = x.reshape(n * gs, group_size)
    levels, counts, distinct = top_levels(flat)
    if int(distinct.max()) > 4:
        row = int(distinct.argmax()) // gs
        raise GridError(f"row {row} has {int(distinct.max())} distinct values in a group of {group_size}")
    present = counts > 0
    lev = levels.double()
    # offset o = the level nearest zero; for four levels its partner p is the one with o + p = sum of the others
    o_idx = torch.where(present, lev.abs(), torch.full_like(lev, float("inf"))).argmin(1, keepdim=True)
    o = lev.gather(1, o_idx)
    total = torch.where(present, lev, torch.zeros_like(lev)).sum(1, keepdim=True)
    key = torch.full_like(lev, 1.5)
    key = key.scatter(1, o_idx, 0.0)
    mismatch = torch.where(present, (2 * (o + lev) - total).abs(), torch.full_like(lev, float("inf")))
    mismatch = mismatch.scatter(1, o_idx, float("inf"))
    partner = mismatch.argmin(1, keepdim=True)
    four = present.sum(1, keepdim=True) == 4
    key = torch.where(four & (torch.arange(4).unsqueeze(0) == partner), torch.full_like(key, 3.0), key)
    key = torch.where(present, key, torch.full_like(key, 3.0))
    order = key.argsort(dim=1, stable=True)
    ordered = lev.gather(1, order)
    ordered_present = present.gather(1, order)
    a1 = torch.where(ordered_present[:, 1], ordered[:, 1] - o[:, 0], torch.zeros_like(o[:, 0]))
    a2 = torch.where(ordered_present[:, 2], ordered[:, 2] - o[:, 0], torch.zeros_like(o[:, 0]))
    o32, a1_32, a2_32 = o[:, 0].float(), a1.float(), a2.float()
    recon = torch.stack([o32, o32 + a1_32, o32 + a2_32, o32 + a1_32 + a2_32], dim=1)  # codes b1 + 2*b2
    code = (flat.unsqueeze(-1) - recon.unsqueeze(1)).abs().argmin(-1).reshape(n, k)
    code = code.masked_fill(salient.unsqueeze(0), 0)
    shape = (n, gs)
    return ((code & 1).to(torch.uint8), (code >> 1).to(torch.uint8),
            a1_32.reshape(shape), a2_32.reshape(shape), o32.reshape(shape))


def _main_parts(w: torch.Tensor, plan: Plan) -> tuple[type, tuple, dict]:
    """(layer class, args, kwargs) holding ``w`` outside the salient columns."""
    if plan.kind == "binary":
        a = _row_scale(w, plan.salient)
        bits = (w < 0) & ~plan.salient.unsqueeze(0)
        return BinaryLinear, (pack_sign_bits(bits),), {"out_scale": a}
    if plan.kind == "ternary":
        a = _row_scale(w, plan.salient)
        t = torch.sign(w).masked_fill(plan.salient.unsqueeze(0), 0)
        return TernaryLinearA16, (pack_ternary(t), a), {}
    if plan.kind == "affine":
        b1, b2, a1, a2, off = _affine_parts(w, plan.salient, plan.group_size)
        packed = pack_dual_binary(b1, b2, plan.group_size)
        if bool((off == 0).all()):
            return DualBinaryLinear, (packed, a1, a2, plan.group_size), {}
        return OffsetDualBinaryLinear, (packed, a1, a2, off, plan.group_size), {}
    raise ValueError(f"unknown grid kind {plan.kind!r}")


def build_layer(weight: torch.Tensor, plan: Plan, *, eps: float, ulps: float,
                bias: torch.Tensor | None = None) -> QuantLinear:
    """The exact low-bit layer for ``weight [N, K]`` under ``plan``; raises GridError when it does not fit.

    ``eps``/``ulps``: the checkpoint dtype's epsilon and the allowed slack (per row, times max|w|).
    """
    w = weight.float()
    cls, args, kwargs = _main_parts(w, plan)
    if plan.num_salient:
        columns = plan.salient.nonzero().squeeze(1)
        cls = SALIENT[cls]
        kwargs.update(columns=columns, dense=weight[:, columns].contiguous())
    layer = cls(*args, bias=bias, **kwargs)
    err = (layer.dequantize() - w).abs().amax(1)
    bound = ulps * eps * w.abs().amax(1)
    bad = err > bound
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise GridError(f"row {row} is off the {plan.kind} grid by {float(err[row]):.3g} "
                        f"(allowed {float(bound[row]):.3g})")
    return layer
