"""The format plugin interface: how a bit format turns stored tensors into linears.

A plugin is a class registered under the entry-point group ``bitserve.formats``
(built-ins register the same way). The loader asks each installed plugin whether
it claims a checkpoint (:meth:`FormatPlugin.detect`), then builds every linear
layer of the model through :meth:`FormatPlugin.load_linear`. Model-level quirks
are returned by :meth:`FormatPlugin.model_overrides` as ModelConfig fields, not
forks of the model code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Collection, Sequence

import torch
from torch import nn

from bitserve.kernels import dispatch
from bitserve.plugins.checkpoint import CheckpointReader


@dataclass(frozen=True)
class LinearSpec:
    """One logical linear as the model expects it: on-disk name prefix and shape."""

    prefix: str  # e.g. "model.layers.0.self_attn.q_proj" (tensors are "<prefix>.weight", ...)
    out_features: int
    in_features: int


class QuantLinear(nn.Module, ABC):
    """A ready-to-run linear layer holding weights in its kernel layout.

    Contract for implementations:
    - ``forward(x)`` maps ``[..., in_features]`` to ``[..., out_features]`` in x's dtype,
      calling :mod:`bitserve.kernels` ops; no dense copy of the weight is kept.
    - Rows are independent: output row ``i`` depends on input row ``i`` only (per-token
      activation scales, never per-batch ones). The engine pads batches with rows of garbage
      (CUDA graphs) and relies on them not reaching the real rows.
    - ``act_quant`` names the activation quantization the layer applies before
      its matmul (``"int8_per_token"`` or ``None``); the contract test uses it to
      build the float64 reference.
    - ``dequantize()`` returns the float32 ``[out, in]`` weight it represents
      (tests and conversions only; it allocates the dense matrix).
    - ``nbytes`` and ``bits_per_weight`` count every tensor the layer holds.
    """

    act_quant: str | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight this layer computes with."""

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer does to x before quantizing it (identity unless overridden)."""
        return x

    def forward_rmsnorm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(rmsnorm(x))`` -- the model calls this for every linear right after an RMSNorm.
        Override to fuse the norm into the layer's own activation handling; the result must equal
        the unfused one (up to the kernels' rounding)."""
        return self(dispatch.rmsnorm(x, norm_weight, eps))

    def forward_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self.forward_rmsnorm(h, ...), h)`` with ``h = x + residual`` -- the model calls this
        for the linears after a decoder layer's residual add (q/k/v, gate/up) and carries ``h`` on
        as the residual stream. Layers that keep the default ``forward_rmsnorm`` get the add and
        the norm in one kernel on GPUs; override to fuse the add into your own norm."""
        if type(self).forward_rmsnorm is QuantLinear.forward_rmsnorm:
            y, h = dispatch.add_rmsnorm(x, residual, norm_weight, eps)
            return self(y), h
        h = x + residual
        return self.forward_rmsnorm(h, norm_weight, eps), h

    @property
    def bias_vector(self) -> torch.Tensor | None:
        return getattr(self, "bias", None)

    @property
    def nbytes(self) -> int:
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bpw={self.bits_per_weight:.3f}"


class FormatPlugin(ABC):
    """Base class of bit-format plugins. Subclass, set ``name``, implement the methods.

    ``priority`` orders detection (higher first); the generic ``dense`` format
    has the lowest priority so that specific formats win.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def __init__(self, config: dict | None = None):
        # the checkpoint's config.json (empty until the registry binds a checkpoint)
        self.config = dict(config or {})

    @abstractmethod
    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        """Return True when this plugin recognises the checkpoint (FORMATS.md §7)."""

    def model_overrides(self, config: dict) -> dict:
        """ModelConfig fields this format forces (e.g. a norm after each linear)."""
        return {}

    @abstractmethod
    def load_linear(
        self,
        reader: CheckpointReader,
        specs: Sequence[LinearSpec],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> QuantLinear:
        """Read the tensors of one linear (or several to fuse along the output axis,
        in the given order), repack them once into the kernel layout, and return a
        ready layer. Raise CheckpointError naming the file and tensor on bad data."""
