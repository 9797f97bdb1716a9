"""Find the few-levels structure of fake-quantized dense weights (FORMATS.md §5).

BiLLM, PB-LLM, PTQ1.61 and ParetoQ publish dense fp16/bf16 weights that hold quantized values:
each row (or row-group of G input columns) uses only a handful of distinct values. This module
finds that structure, exactly, for three shapes of grid:

| kind | per row / row-group | exact repack |
|---|---|---|
| ``binary`` | values in ``{-a, +a}`` per row | sign bits + ``a[N]`` (1 bit) |
| ``ternary`` | values in ``{-a, 0, +a}`` per row | ternary + ``a[N]`` (2 bits) |
| ``affine`` | at most 4 values ``{o, o+a1, o+a2, o+a1+a2}`` per row-group (any 3 values, or 4 with ``v0 + v3 = v1 + v2``: uniform 2-bit grids, ParetoQ's SEQ, residual binarization, ``mu +- alpha``) | two bit planes + ``a1, a2, o [N, K/G]`` (2 bits) |

Columns whose entries fall off the grid (structured salient columns kept in higher precision,
BiLLM / PTQ1.61) are allowed up to ``max_salient_fraction`` of K; they are stored dense. Level
values are compared exactly (the checkpoint holds the same float for every weight of a level); the
one tolerance is for the 4-level relation ``v0 + v3 = v1 + v2``, which rounding the four levels to
the checkpoint dtype can break by a few ulps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KINDS = ("binary", "ternary", "affine")
_CHUNK = 1 << 22  # weights analysed at once
EPS = {"F16": 2.0 ** -10, "BF16": 2.0 ** -7, "F32": 2.0 ** -23, "F64": 2.0 ** -52}


@dataclass(frozen=True)
class GridSettings:
    max_salient_fraction: float = 0.25  # columns that may stay dense, as a fraction of K
    group_sizes: tuple[int, ...] = (256, 128, 64, 32)  # tried for 'affine' after whole rows
    tolerance_ulps: float = 2.0  # slack of v0 + v3 = v1 + v2, in ulps of the checkpoint dtype x max|v|


@dataclass
class Plan:
    """A grid that holds a weight exactly (outside ``salient`` columns)."""

    kind: str
    group_size: int
    salient: torch.Tensor  # bool [K]
    bits_per_weight: float

    @property
    def num_salient(self) -> int:
        return int(self.salient.sum())


@dataclass
class Misfit:
    """Why no grid fits; ``best`` is the closest attempt (for the warning)."""

    reason: str
    best: Plan | None = field(default=None)


def plan_bits(kind: str, group_size: int, k: int, num_salient: int) -> float:
    """Estimated bits per weight of a plan (float32 scales, 16-bit salient columns)."""
    main = {"binary": 1.0 + 32.0 / k, "ternary": 2.0 + 32.0 / k}.get(kind, 2.0 + 96.0 / group_size)
    return main + 16.0 * num_salient / k


def top_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four most frequent values of each row of ``x [P, G]``.

    Returns ``(levels [P, 4], counts [P, 4], distinct [P])``; absent slots have count 0.
    Fast path: levels found in a sample of columns that account for every entry of a row are all
    of its values; only the other rows are sorted.
    """
    p, g = x.shape
    if g <= 4 * _SAMPLE_COLUMNS:
        return _top_levels_sorted(x)
    sample = x[:, :: g // _SAMPLE_COLUMNS]
    levels, present, _ = _top_levels_sorted(sample)
    counts = torch.stack([((x == levels[:, i:i + 1]) & (present[:, i:i + 1] > 0)).sum(1) for i in range(4)], 1)
    complete = counts.sum(1) == g
    distinct = (counts > 0).sum(1)
    if not bool(complete.all()):
        rest = (~complete).nonzero().squeeze(1)
        lv, ct, ds = _top_levels_sorted(x[rest])
        levels[rest], counts[rest], distinct[rest] = lv, ct, ds
    order = counts.argsort(dim=1, descending=True, stable=True)
    return levels.gather(1, order), counts.gather(1, order), distinct


_SAMPLE_COLUMNS = 64


def _top_levels_sorted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, g = x.shape
    s = x.sort(-1).values
    boundary = s[:, 1:] != s[:, :-1]
    run = torch.cat([torch.zeros(p, 1, dtype=torch.long), boundary.long().cumsum(-1)], dim=1)
    counts = torch.zeros(p, g, dtype=torch.long).scatter_add_(1, run, torch.ones_like(run))
    values = torch.zeros(p, g, dtype=s.dtype).scatter_(1, run, s)
    k = min(4, g)
    top_counts, top_ids = counts.topk(k, dim=1)
    levels = values.gather(1, top_ids)
    if k < 4:
        levels = torch.cat([levels, levels.new_zeros(p, 4 - k)], 1)
        top_counts = torch.cat([top_counts, top_counts.new_zeros(p, 4 - k)], 1)
    return levels, top_counts, run[:, -1] + 1


def accept_levels(levels: torch.Tensor, counts: torch.Tensor, kind: str, eps: float, ulps: float) -> torch.Tensor:
    """Greedy (most frequent first) choice of the levels that form a ``kind`` grid; bool ``[P, 4]``."""
    present = counts > 0
    acc = torch.zeros_like(present)
    if kind in ("binary", "ternary"):
        mag = torch.full(levels.shape[:1], float("nan"), dtype=levels.dtype)
        for i in range(4):
            v = levels[:, i]
            zero = v == 0
            fits = torch.isnan(mag) | (v.abs() == mag)
            ok = present[:, i] & (fits & ~zero if kind == "binary" else zero | fits)
            acc[:, i] = ok
            mag = torch.where(ok & ~zero & torch.isnan(mag), v.abs(), mag)
        return acc
    if kind != "affine":
        raise ValueError(f"unknown grid kind {kind!r}")
    acc[:, :3] = present[:, :3]
    s = levels.sort(-1).values
    defect = (s[:, 0] + s[:, 3] - s[:, 1] - s[:, 2]).abs()
    tol = ulps * eps * levels.abs().amax(-1)
    acc[:, 3] = present[:, 3] & (defect <= tol)
    return acc


def level_index(x: torch.Tensor, levels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per entry of ``x [P, G]``: the slot (0..3) of ``levels`` it equals, or 4 when none."""
    slot = torch.full(x.shape, 4, dtype=torch.long)
    for i in reversed(range(4)):
        slot.masked_fill_((x == levels[:, i:i + 1]) & (counts[:, i:i + 1] > 0), i)
    return slot


def _scan(weight: torch.Tensor, group_size: int, kinds: tuple[str, ...], eps: float, ulps: float):
    """Per kind: off-grid column mask ``[K]``; and the largest distinct count of a row-group."""
    n, k = weight.shape
    gs = k // group_size
    rows = max(1, _CHUNK // k)
    cols = {kind: torch.zeros(k, dtype=torch.bool) for kind in kinds}
    max_distinct = 0
    for start in range(0, n, rows):
        x = weight[start:start + rows].float()
        r = x.shape[0]
        flat = x.reshape(r * gs, group_size)
        levels, counts, distinct = top_levels(flat)
        max_distinct = max(max_distinct, int(distinct.max()))
        slot = level_index(flat, levels, counts)
        for kind in kinds:
            acc = accept_levels(levels, counts, kind, eps, ulps)
            on = torch.cat([acc, acc.new_zeros(acc.shape[0], 1)], 1).gather(1, slot)
            cols[kind] |= (~on).reshape(r, k).any(0)
    return cols, max_distinct


def analyze(weight: torch.Tensor, dtype: str, settings: GridSettings = GridSettings()) -> Plan | Misfit:
    """The cheapest exact grid for ``weight [R, K]`` (R may be a sample of rows), or why none fits."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    eps = EPS.get(dtype)
    if eps is None:
        return Misfit(f"dtype {dtype} is not a float type")
    if not torch.isfinite(weight).all():
        return Misfit("weight contains NaN or Inf")
    n, k = weight.shape
    limit = int(settings.max_salient_fraction * k)
    candidates: list[Plan] = []
    best_attempt: Plan | None = None
    worst_distinct = 0
    groups = [k] + [g for g in settings.group_sizes if g < k and k % g == 0 and g % 4 == 0]
    for g in groups:
        kinds = tuple(kd for kd in KINDS if g == k or kd == "affine")
        kinds = tuple(kd for kd in kinds if kd != "binary" or k % 8 == 0)
        if k % 4:
            break  # no packed layout holds a K that is not a multiple of 4
        cols, distinct = _scan(weight, g, kinds, eps, settings.tolerance_ulps)
        worst_distinct = max(worst_distinct, distinct)
        for kind in kinds:
            c = int(cols[kind].sum())
            plan = Plan(kind, g, cols[kind], plan_bits(kind, g, k, c))
            if c <= limit:
                candidates.append(plan)
            elif best_attempt is None or c <= best_attempt.num_salient:  # ties: the widest grid
                best_attempt = plan
        if any(p.num_salient == 0 for p in candidates):
            break  # a smaller group can only cost more scales
    if candidates:
        return min(candidates, key=lambda p: p.bits_per_weight)
    if k % 4:
        return Misfit(f"in_features={k} is not a multiple of 4")
    att = best_attempt
    return Misfit(
        f"no few-levels grid fits: row-groups hold up to {worst_distinct} distinct values; the closest grid "
        f"({att.kind}, group {att.group_size}) leaves {att.num_salient}/{k} columns off-grid "
        f"({100 * att.num_salient / k:.0f}%, limit {100 * settings.max_salient_fraction:.0f}%)",
        att,
    )


def merge_plans(plans: list[Plan], k: int) -> Plan:
    """One plan for weights fused along N: the widest kind, the smallest group, the union of salient columns."""
    kind = max((p.kind for p in plans), key=KINDS.index)
    # a grid that holds per group of G holds per group of any divisor of G
    group = math.gcd(*(p.group_size for p in plans)) if kind == "affine" else k
    salient = torch.zeros(k, dtype=torch.bool)
    for p in plans:
        salient |= p.salient
    return Plan(kind, group, salient, plan_bits(kind, group, k, int(salient.sum())))
