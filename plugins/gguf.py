"""``gguf``: llama.cpp / bitnet.cpp GGUF files of the llama and bitnet architectures (FORMATS.md §2).

Linears stored as TQ1_0, TQ2_0 or I2_S become :class:`~bitserve.plugins.bitnet.TernaryLinear`
(kernel layout, one float multiplier per output row, per-token int8 activations — the W1.58A8
semantics BitNet models are trained with, and what llama.cpp approximates with its 8-bit
activation blocks). Linears stored as F32/F16/BF16/Q8_0 become
:class:`~bitserve.plugins.dense.DenseLinear` (Q8_0 dequantized once at load). llama.cpp's optional
per-tensor ``blk.N.<linear>.scale`` multiplies the output and is folded into the multiplier.
A fused projection (q/k/v, gate/up) whose parts mix ternary and float storage becomes a
:class:`~bitserve.plugins.lowbit_layers.ConcatLinear` of one layer per part.

The reader side (file parsing, names, metadata -> config, decoding) lives in ``gguf_*.py``;
the loader opens ``.gguf`` paths with :class:`~bitserve.plugins.gguf_checkpoint.GGUFCheckpoint`
and this plugin claims exactly those readers.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.bitnet import TernaryLinear
from bitserve.plugins.checkpoint import CheckpointError, CheckpointReader, require_finite
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint
from bitserve.plugins.gguf_layers import DequantizedW8Linear
from bitserve.plugins.lowbit_layers import ConcatLinear
from bitserve.plugins.gguf_tensors import TERNARY_TYPES, TernaryWeight, is_dense_type


class GGUFFormat(FormatPlugin):
    name = "gguf"
    description = "GGUF files (llama / bitnet architectures; TQ1_0, TQ2_0, I2_S linears; float and block types dense)"
    priority = 50

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        return isinstance(reader, GGUFCheckpoint)

    def load_linear(self, reader, specs: Sequence[LinearSpec], *, device: torch.device, dtype: torch.dtype) -> QuantLinear:
        if not isinstance(reader, GGUFCheckpoint):
            raise CheckpointError(f"{reader.folder}: format 'gguf' reads .gguf files only (this is not one)")
        kinds = [self._kind(reader, s) for s in specs]
        if len(set(kinds)) > 1:  # e.g. q/k ternary, v kept in F16: one layer per storage kind
            return ConcatLinear([self.load_linear(reader, [s], device=device, dtype=dtype) for s in specs])
        bias = self._bias(reader, specs, device, dtype)
        if kinds[0] == "float":
            weights = [self._finite(reader, f"{s.prefix}.weight", (s.out_features, s.in_features)).float()
                       * self._output_scale(reader, s) for s in specs]
            return DenseLinear(torch.cat(weights).to(device=device, dtype=dtype), bias)
        parts: list[TernaryWeight] = []
        for s in specs:
            part = reader.ternary(f"{s.prefix}.weight", (s.out_features, s.in_features))
            factor = self._output_scale(reader, s)
            parts.append(part if factor == 1.0 else part.scaled(factor))
        if any(p.dense is not None for p in parts):
            weight = torch.cat([p.to_dense() for p in parts])
            return DequantizedW8Linear(weight.to(device=device, dtype=dtype), bias)
        packed = torch.cat([p.packed for p in parts]).to(device)
        scale = torch.cat([p.row_scale for p in parts]).to(device)
        return TernaryLinear(packed, scale, bias)

    @staticmethod
    def _kind(reader: GGUFCheckpoint, spec: LinearSpec) -> str:
        name = f"{spec.prefix}.weight"
        kind = reader.ggml_type(name)
        if kind in TERNARY_TYPES:
            return "ternary"
        if is_dense_type(kind):
            return "float"
        raise CheckpointError(f"{reader.describe(name)} has GGML type {kind}, which bitserve does not run "
                              f"(linears: {', '.join(TERNARY_TYPES)}, or float / block types read dense)")

    @staticmethod
    def _output_scale(reader: GGUFCheckpoint, spec: LinearSpec) -> float:
        name = f"{spec.prefix}.output_scale"
        if not reader.has(name):
            return 1.0
        value = reader.get(name)
        if value.numel() != 1 or not torch.isfinite(value).all():
            raise CheckpointError(f"{reader.describe(name)} must be one finite number, got shape {list(value.shape)}")
        return float(value.float().reshape(-1)[0])

    @staticmethod
    def _finite(reader: GGUFCheckpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return require_finite(reader.get(name, shape=shape), reader.describe(name))

    @staticmethod
    def _bias(reader: GGUFCheckpoint, specs, device, dtype) -> torch.Tensor | None:
        names = [f"{s.prefix}.bias" for s in specs]
        if not any(reader.has(n) for n in names):
            return None
        return torch.cat([
            GGUFFormat._finite(reader, n, (s.out_features,)).to(device, dtype) if reader.has(n)
            else torch.zeros(s.out_features, device=device, dtype=dtype)
            for n, s in zip(names, specs)
        ])
