"""``fakequant``: dense checkpoints that hold quantized values (FORMATS.md §5, ParetoQ).

BiLLM, PB-LLM and PTQ1.61 save dense fake-quantized fp16 weights; ParetoQ's released ternary /
2-bit MobileLLM models are dense bf16 holding quantized values. This plugin recognises such
checkpoints by the few distinct values per row or row-group (:mod:`bitserve.plugins.fakequant_grid`)
and repacks each linear exactly into a low-bit layer (:mod:`bitserve.plugins.fakequant_layers`):
binary (1 bit), ternary (2 bits, per-row scale) or dual-binary planes with group scales (2 bits),
with off-grid salient columns kept dense. A linear that fits no grid is served dense, with a
warning that says why.

Detection reads only a few rows of a few projections (``safetensors`` slices), and claims a
checkpoint only when most sampled projections fit a grid; a plain dense model goes to ``dense``.
The priority sits below every specific format (bitnet, onebit, fbi, dual_binary, ...) and above
``dense``; checkpoints with a ``quantization_config`` or with extra per-projection tensors
(scales, planes, ``wscale``/``wbias``, ...) are never claimed.
"""

from __future__ import annotations

import logging
import re
from typing import Collection, Sequence

import torch
from safetensors import safe_open

from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.fakequant_grid import EPS, GridSettings, Misfit, Plan, analyze, merge_plans
from bitserve.plugins.fakequant_layers import GridError, build_layer

log = logging.getLogger(__name__)

_PROJ = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.([A-Za-z0-9_.]+)$")
SAMPLE_TENSORS = 4  # projections read at detection
SAMPLE_ROWS = 16  # rows read from each


def sample_projection_names(names: Collection[str], count: int = SAMPLE_TENSORS) -> list[str]:
    """Up to ``count`` projection weights from layers spread over the depth, cycling the projection kinds."""
    by_layer: dict[int, dict[str, str]] = {}
    for n in names:
        m = _PROJ.match(n)
        if m and m.group(4) == "weight":
            by_layer.setdefault(int(m.group(1)), {})[m.group(3)] = n
    layers = sorted(by_layer)
    if not layers:
        return []
    kinds = ("q", "down", "gate", "o", "k", "up", "v")
    picks: list[str] = []
    for i in range(count):
        present = by_layer[layers[round(i * (len(layers) - 1) / max(1, count - 1))]]
        kind = next((kinds[(i + j) % len(kinds)] for j in range(len(kinds)) if kinds[(i + j) % len(kinds)] in present))
        if present[kind] not in picks:
            picks.append(present[kind])
    return picks


def read_sample_rows(reader: CheckpointReader, name: str, rows: int = SAMPLE_ROWS) -> torch.Tensor:
    """``rows`` evenly spaced rows of a 2-D tensor, read as a slice (the rest is never touched)."""
    shape = reader.shape(name)
    if len(shape) != 2:
        raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' has shape {list(shape)}, expected 2-D")
    step = max(1, shape[0] // rows)
    if not isinstance(reader, CheckpointReader) or reader.file_of(name).suffix != ".safetensors":
        return reader.get(name)[::step][:rows]  # GGUF or .bin: no slicing reads
    try:
        with safe_open(str(reader.file_of(name)), framework="pt") as f:
            return f.get_slice(name)[0:shape[0]:step][:rows].clone()
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{reader.file_of(name)}: cannot read rows of tensor '{name}': {e}") from e


class FakeQuantFormat(FormatPlugin):
    name = "fakequant"
    description = "dense fp16/bf16 holding binary/ternary/2-bit values (BiLLM, PB-LLM, PTQ1.61, ParetoQ), repacked"
    priority = -50  # below every specific format, above dense (-100)
    settings = GridSettings()

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        self.summary: dict[str, int] = {}  # linears loaded per kind ("binary", ..., "dense")

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        if config.get("quantization_config"):
            return False
        projections = [m for n in tensor_names if (m := _PROJ.match(n))]
        if not projections or any(m.group(4) not in ("weight", "bias") for m in projections):
            return False  # another format's extra tensors (scales, planes, wscale/wbias, ...)
        weights = [m.group(0) for m in projections if m.group(4) == "weight"]
        if any(reader.dtype(n) not in FLOAT_DTYPES for n in weights):
            return False
        sample = sample_projection_names(weights)
        fits = 0
        for name in sample:
            result = analyze(read_sample_rows(reader, name), reader.dtype(name), self.settings)
            fits += isinstance(result, Plan)
        return 2 * fits > len(sample)

    def load_linear(self, reader, specs: Sequence[LinearSpec], *, device, dtype) -> QuantLinear:
        weights, dtypes, biases = [], [], []
        for spec in specs:
            name = f"{spec.prefix}.weight"
            weights.append(reader.get(name, shape=(spec.out_features, spec.in_features), dtypes=FLOAT_DTYPES))
            dtypes.append(reader.dtype(name))
            bias_name = f"{spec.prefix}.bias"
            biases.append(reader.get(bias_name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES).to(dtype)
                          if reader.has(bias_name) else None)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(s.out_features, dtype=dtype)
                              for b, s in zip(biases, specs)])
        names = ", ".join(s.prefix for s in specs)
        layer = self._repack(weights, dtypes, specs, bias, dtype, names)
        return layer.to(device)

    def _repack(self, weights, dtypes, specs, bias, dtype, names) -> QuantLinear:
        results = [analyze(w, d, self.settings) for w, d in zip(weights, dtypes)]
        misfits = [(s.prefix, r) for s, r in zip(specs, results) if isinstance(r, Misfit)]
        if misfits:
            prefix, misfit = misfits[0]
            return self._dense(weights, bias, dtype, names, f"{prefix}: {misfit.reason}")
        plan = merge_plans(results, specs[0].in_features)
        eps = max(EPS[d] for d in dtypes)
        try:
            layer = build_layer(torch.cat(weights), plan, eps=eps, ulps=self.settings.tolerance_ulps, bias=bias)
        except GridError as e:
            return self._dense(weights, bias, dtype, names, str(e))
        kind = plan.kind + ("+salient" if plan.num_salient else "")
        self.summary[kind] = self.summary.get(kind, 0) + 1
        log.info("fakequant: %s -> %s (group %d, %d salient columns, %.2f bits/weight)", names, plan.kind,
                 plan.group_size, plan.num_salient, layer.bits_per_weight)
        return layer

    def _dense(self, weights, bias, dtype, names, reason) -> DenseLinear:
        self.summary["dense"] = self.summary.get("dense", 0) + 1
        log.warning("fakequant: %s kept dense (%s)", names, reason)
        return DenseLinear(torch.cat(weights).to(dtype), bias)
