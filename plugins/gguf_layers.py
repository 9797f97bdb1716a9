"""The layer the GGUF format needs beyond the shared ones.

:class:`DequantizedW8Linear` runs ternary weights that cannot become kernel-layout rows with one
multiplier each (TQ1_0/TQ2_0 files whose blocks carry different scales within a row): the
dequantized float weight with the same per-token int8 activations as
:class:`bitserve.plugins.bitnet.TernaryLinear`, so every ternary GGUF linear has one activation
semantics whatever its block scales. It holds a dense copy (16/32 bits per weight) and is used
only for such files. (Fused projections with parts of different types use
:class:`bitserve.plugins.lowbit_layers.ConcatLinear`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitserve.kernels.reference import quantize_activations_int8
from bitserve.plugins.base import QuantLinear


class DequantizedW8Linear(QuantLinear):
    act_quant = "int8_per_token"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_q, s_x = quantize_activations_int8(x.reshape(-1, x.shape[-1]))
        y = F.linear(x_q.float(), self.weight.float()).div_(s_x)
        if self.bias is not None:
            y = y.add_(self.bias.float())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()
