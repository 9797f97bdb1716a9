"""The two layers the GGUF format needs beyond the shared ones.

:class:`DequantizedW8Linear` runs ternary weights that cannot become kernel-layout rows with one
multiplier each (TQ1_0/TQ2_0 files whose blocks carry different scales within a row): the
dequantized float weight with the same per-token int8 activations as
:class:`bitserve.plugins.bitnet.TernaryLinear`, so every ternary GGUF linear has one activation
semantics whatever its block scales. It holds a dense copy (16/32 bits per weight) and is used
only for such files.

:class:`ConcatLinear` is a fused projection whose parts are stored in different kinds of types.
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


class ConcatLinear(QuantLinear):
    """Fused projections whose parts are stored in different kinds of types (e.g. q/k in TQ1_0, v in F16).

    Each part keeps its own storage and activation handling, as llama.cpp computes each tensor with
    its own type; the outputs are concatenated. ``act_quant`` is the parts' common value, or
    ``"per_part"`` when they differ (no single float64 reference describes the fused layer then).
    """

    def __init__(self, parts: list[QuantLinear]):
        super().__init__(parts[0].in_features, sum(p.out_features for p in parts))
        self.parts = torch.nn.ModuleList(parts)
        kinds = {p.act_quant for p in parts}
        self.act_quant = kinds.pop() if len(kinds) == 1 else "per_part"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    @property
    def bias_vector(self) -> torch.Tensor | None:
        biases = [p.bias_vector for p in self.parts]
        if all(b is None for b in biases):
            return None
        device = next(b for b in biases if b is not None).device
        return torch.cat([b.float() if b is not None else torch.zeros(p.out_features, device=device)
                          for b, p in zip(biases, self.parts)])
