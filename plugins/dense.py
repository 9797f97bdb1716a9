"""``dense``: ordinary fp32/fp16/bf16 Hugging Face llama checkpoints."""

from __future__ import annotations

from typing import Collection, Sequence

import torch
import torch.nn.functional as F

from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointReader, require_finite


class DenseLinear(QuantLinear):
    """A plain float linear (also used for layers a low-bit format leaves dense)."""

    act_quant = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


def load_dense_linear(
    reader: CheckpointReader, specs: Sequence[LinearSpec], *, device: torch.device, dtype: torch.dtype
) -> DenseLinear:
    """Read float ``<prefix>.weight`` (and optional ``.bias``) of each spec, fused along the output axis."""
    weights, biases = [], []
    for spec in specs:
        name = f"{spec.prefix}.weight"
        w = reader.get(name, shape=(spec.out_features, spec.in_features), dtypes=FLOAT_DTYPES)
        weights.append(require_finite(w, f"{reader.file_of(name)}: tensor '{name}'").to(device=device, dtype=dtype))
        bias_name = f"{spec.prefix}.bias"
        if reader.has(bias_name):
            b = reader.get(bias_name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES)
            biases.append(require_finite(b, f"{reader.file_of(bias_name)}: tensor '{bias_name}'").to(device, dtype))
        else:
            biases.append(None)
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b if b is not None else torch.zeros(s.out_features, device=device, dtype=dtype) for b, s in zip(biases, specs)]
        )
    return DenseLinear(weight, bias)


class DenseFormat(FormatPlugin):
    name = "dense"
    description = "fp32/fp16/bf16 weights (Hugging Face llama layout)"
    priority = -100  # the fallback: any specific format wins

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        if config.get("quantization_config"):
            return False
        probe = [n for n in tensor_names if n.endswith("_proj.weight")]
        return bool(probe) and all(reader.dtype(n) in FLOAT_DTYPES for n in probe)

    def load_linear(self, reader, specs, *, device, dtype):
        return load_dense_linear(reader, specs, device=device, dtype=dtype)
