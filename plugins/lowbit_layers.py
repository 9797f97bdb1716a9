"""Ready QuantLinears over the bitserve weight ops, for format plugins (and the int8 LM head).

Each holds its weights in a kernel layout of :mod:`bitserve.kernels.packing` and calls
:mod:`bitserve.kernels.dispatch` (Triton on CUDA, the plain-torch twins on CPU):

| layer | weights | op |
|---|---|---|
| :class:`TernaryLinearA16` | ternary K-slab + float multiplier ``[1]``/``[N]`` | W2A16 (no activation quantization) |
| :class:`BinaryLinear` | sign bits + ``in_scale[K]``, ``out_scale[N]``, ``in_bias[K]`` | W1A16 (OneBit, FBI-LLM) |
| :class:`DualBinaryLinear` | two bit planes + ``alpha1/alpha2[N, K/G]`` | dual-binary (DB-LLM) |
| :class:`Int8LMHead` | ``int8[V, H]`` + ``scale[V]`` | W8A16, opt-in LM head |

(:class:`bitserve.plugins.bitnet.TernaryLinear` is the W2A8 layer.)
"""

from __future__ import annotations

import torch

from bitserve.kernels import dispatch
from bitserve.kernels.packing import (
    quantize_weight_int8_rows,
    signs_from_bits,
    unpack_dual_binary,
    unpack_sign_bits,
    unpack_ternary,
)
from bitserve.plugins.base import QuantLinear


def _buf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().reshape(-1).contiguous()


class TernaryLinearA16(QuantLinear):
    """Ternary weights x float activations (formats that do not quantize activations, e.g. MLX BitNet)."""

    act_quant = None

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(packed.shape[1] * 4, packed.shape[0])
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.ternary_linear_w2a16(x, self.packed, self.scale, self.bias)

    def dequantize(self) -> torch.Tensor:
        return unpack_ternary(self.packed, torch.float32) * self.scale.unsqueeze(1)


class BinaryLinear(QuantLinear):
    """``y = ((x * in_scale) @ S.T) * out_scale + x @ in_bias (+ bias)``, S = +-1 (binary kernel layout).

    OneBit: ``in_scale = g`` (input_factor), ``out_scale = h`` (weight_scale); its non-affine
    LayerNorm over the outputs stays in the model. FBI-LLM: ``in_scale = alpha`` (wscale),
    ``in_bias = beta`` (wbias).
    """

    act_quant = None

    def __init__(self, packed: torch.Tensor, in_scale: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None, in_bias: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__(packed.shape[1] * 8, packed.shape[0])
        self.register_buffer("packed", packed)
        self.register_buffer("in_scale", _buf(in_scale))
        self.register_buffer("out_scale", _buf(out_scale))
        self.register_buffer("in_bias", _buf(in_bias))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.binary_linear_w1a16(x, self.packed, self.in_scale, self.out_scale, self.in_bias, self.bias)

    def dequantize(self) -> torch.Tensor:
        w = signs_from_bits(unpack_sign_bits(self.packed))
        if self.in_scale is not None:
            w = w * self.in_scale.unsqueeze(0)
        if self.out_scale is not None:
            w = w * self.out_scale.unsqueeze(1)
        if self.in_bias is not None:
            w = w + self.in_bias.unsqueeze(0)
        return w


class DualBinaryLinear(QuantLinear):
    """``W = alpha1 * B1 + alpha2 * B2`` with B in {0, 1} and scales per row and group of ``group_size``."""

    act_quant = None

    def __init__(self, packed: torch.Tensor, alpha1: torch.Tensor, alpha2: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__(packed.shape[1] * 4, packed.shape[0])
        self.group_size = int(group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("alpha1", alpha1.float().contiguous())
        self.register_buffer("alpha2", alpha2.float().contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.dual_binary_linear(x, self.packed, self.alpha1, self.alpha2, self.group_size, self.bias)

    def dequantize(self) -> torch.Tensor:
        b1, b2 = unpack_dual_binary(self.packed, self.group_size)
        a1 = self.alpha1.repeat_interleave(self.group_size, dim=1)
        a2 = self.alpha2.repeat_interleave(self.group_size, dim=1)
        return a1 * b1.float() + a2 * b2.float()


class Int8LMHead(QuantLinear):
    """Opt-in int8 LM head: per-row absmax int8 weights ``[V, H]`` and a float32 scale per row.

    ``Int8LMHead.from_dense(model.lm_head_weight())`` quantizes once (chunked; no float32 copy of
    the whole head). ``forward(hidden, out_dtype=torch.float32)`` gives logits; for tied
    embeddings, :meth:`embed` looks token ids up in the same int8 table, so the bf16 table can be
    dropped (int8 rows dequantized on the fly: ``q[id] * scale[id]``).
    """

    act_quant = None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be int8 [V, H], got {weight.dtype} {tuple(weight.shape)}")
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.float().reshape(-1))

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "Int8LMHead":
        q, scale = quantize_weight_int8_rows(weight)
        return cls(q, scale)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return dispatch.int8_linear(x, self.weight, self.scale, None, out_dtype)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (self.weight[ids].float() * self.scale[ids].unsqueeze(-1)).to(dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.unsqueeze(1)


class ConcatLinear(QuantLinear):
    """Fused projections whose parts cannot share one layer: different storage types (GGUF q/k in
    TQ1_0, v in F16) or per-part input scales (OneBit's g, FBI's alpha/beta of each projection).

    Each part keeps its own storage and activation handling; the outputs are concatenated. ``act_quant`` is the parts' common value, or
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
