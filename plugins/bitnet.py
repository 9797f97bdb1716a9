"""``bitnet``: Hugging Face ``quant_method: "bitnet"`` checkpoints (FORMATS.md §1).

- offline: ``<p>.weight`` uint8 ``[N/4, K]`` (four slabs along N, code t+1) and
  ``<p>.weight_scale`` ``[1]``; ``linear_class: bitlinear`` divides by the
  scale, ``autobitlinear`` (Microsoft 2B4T) multiplies (§1.4).
- online: bf16 master weights, ternarized here once at load with the absmean
  rule per tensor (§1.4) into the same packed form.
Both end up in the kernel layout of :mod:`bitserve.kernels.packing` with a
per-output-channel multiplier, so fused q/k/v and gate/up keep each source
tensor's own scale.
"""

from __future__ import annotations

from typing import Collection

import torch

from bitserve.kernels import dispatch
from bitserve.kernels.packing import hf_to_kernel_layout, pack_ternary, unpack_ternary
from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.dense import load_dense_linear

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")


class TernaryLinear(QuantLinear):
    """Ternary weights (kernel layout) x per-token int8 activations, float multiplier per output."""

    act_quant = "int8_per_token"

    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_norm: torch.Tensor | None = None,
        input_norm_eps: float = 1e-6,
    ):
        super().__init__(packed.shape[1] * 4, packed.shape[0])
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("bias", bias)
        # transformers' optional `use_rms_norm`: an RMSNorm on the input inside the linear.
        self.register_buffer("input_norm", input_norm)
        self.input_norm_eps = input_norm_eps

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is None:
            return x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.input_norm_eps)
        return (xf * self.input_norm.float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.ternary_linear_w2a8(self.input_transform(x), self.packed, self.scale, self.bias)

    def forward_rmsnorm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The model's RMSNorm and this layer as one op: on GPUs the norm's kernel writes the int8
        activations directly (no normalised copy, no separate quantization kernel)."""
        if self.input_norm is not None:  # a second norm inside the linear: nothing to fuse
            return super().forward_rmsnorm(x, norm_weight, eps)
        return dispatch.ternary_linear_w2a8_rmsnorm(x, norm_weight, eps, self.packed, self.scale, self.bias)

    def forward_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add, the model's RMSNorm and the int8 quantization in one kernel on GPUs."""
        if self.input_norm is not None:
            return super().forward_add_rmsnorm(x, residual, norm_weight, eps)
        return dispatch.ternary_linear_w2a8_add_rmsnorm(x, residual, norm_weight, eps, self.packed, self.scale,
                                                        self.bias)

    def dequantize(self) -> torch.Tensor:
        return unpack_ternary(self.packed, torch.float32) * self.scale.unsqueeze(1)


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-tensor absmean ternarization exactly as transformers' online AutoBitLinear.

    Returns ``(T int8 [N, K], multiplier)`` with ``W_hat = T * multiplier``.
    """
    w = weight.float()
    inv = 1.0 / w.abs().mean().clamp(min=1e-5)
    t = (w * inv).round().clamp(-1, 1).to(torch.int8)
    return t, float(1.0 / inv)


class BitNetFormat(FormatPlugin):
    name = "bitnet"
    description = "BitNet b1.58 (transformers quant_method 'bitnet'; packed uint8 or online bf16)"
    priority = 10

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == "bitnet"

    @staticmethod
    def _settings(config_qc: dict) -> tuple[str, str]:
        linear_class = config_qc.get("linear_class", "bitlinear")
        mode = config_qc.get("quantization_mode", "offline")
        if linear_class not in LINEAR_CLASSES:
            raise CheckpointError(f"config.json: unknown bitnet linear_class '{linear_class}' (expected {LINEAR_CLASSES})")
        if mode not in QUANTIZATION_MODES:
            raise CheckpointError(f"config.json: unknown bitnet quantization_mode '{mode}' (expected {QUANTIZATION_MODES})")
        if mode == "online" and linear_class != "autobitlinear":
            raise CheckpointError("config.json: bitnet quantization_mode 'online' requires linear_class 'autobitlinear'")
        return linear_class, mode

    def load_linear(self, reader, specs, *, device, dtype):
        qc = self.config.get("quantization_config") or {}
        linear_class, mode = self._settings(qc)
        weight_names = [f"{s.prefix}.weight" for s in specs]
        skip = set(qc.get("modules_to_not_convert") or [])
        if any(s.prefix.split(".")[-1] in skip or s.prefix in skip for s in specs):
            return load_dense_linear(reader, specs, device=device, dtype=dtype)
        if mode == "offline" and all(reader.dtype(n) in FLOAT_DTYPES for n in weight_names) and not any(
            reader.has(f"{s.prefix}.weight_scale") for s in specs
        ):
            # a layer kept in float (e.g. modules_to_not_convert written by name elsewhere)
            return load_dense_linear(reader, specs, device=device, dtype=dtype)

        packed_parts, scale_parts, bias_parts, norms = [], [], [], []
        for spec in specs:
            if mode == "offline":
                packed, mult = self._load_offline(reader, spec, linear_class)
            else:
                packed, mult = self._load_online(reader, spec)
            packed_parts.append(packed.to(device))
            scale_parts.append(torch.full((spec.out_features,), mult, dtype=torch.float32, device=device))
            bias_name = f"{spec.prefix}.bias"
            bias_parts.append(
                reader.get(bias_name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES).to(device, dtype)
                if reader.has(bias_name)
                else None
            )
            if qc.get("use_rms_norm"):
                norm_name = f"{spec.prefix}.rms_norm.weight"
                norms.append(reader.get(norm_name, shape=(spec.in_features,), dtypes=FLOAT_DTYPES).to(device))
        if norms and any(not torch.equal(norms[0], n) for n in norms[1:]):
            raise CheckpointError(
                f"{reader.folder}: cannot fuse {[s.prefix for s in specs]}: their input rms_norm weights differ"
            )
        bias = None
        if any(b is not None for b in bias_parts):
            bias = torch.cat([b if b is not None else torch.zeros(s.out_features, device=device, dtype=dtype)
                              for b, s in zip(bias_parts, specs)])
        return TernaryLinear(
            torch.cat(packed_parts) if len(packed_parts) > 1 else packed_parts[0],
            torch.cat(scale_parts),
            bias,
            input_norm=norms[0] if norms else None,
            input_norm_eps=float(qc.get("rms_norm_eps", 1e-6)),
        )

    @staticmethod
    def _load_offline(reader: CheckpointReader, spec: LinearSpec, linear_class: str) -> tuple[torch.Tensor, float]:
        n, k = spec.out_features, spec.in_features
        if n % 4:
            raise CheckpointError(f"{spec.prefix}: out_features={n} is not a multiple of 4 (unsupported by the bitnet layout)")
        name = f"{spec.prefix}.weight"
        hf_packed = reader.get(name, shape=(n // 4, k), dtypes={"U8"})
        scale_name = f"{spec.prefix}.weight_scale"
        scale = reader.get(scale_name, dtypes=FLOAT_DTYPES)
        if scale.numel() != 1:
            raise CheckpointError(
                f"{reader.file_of(scale_name)}: tensor '{scale_name}' has shape {list(scale.shape)}, expected [1]"
            )
        value = float(scale.float().item())
        if not value > 0 or value != value or value == float("inf"):
            raise CheckpointError(f"{reader.file_of(scale_name)}: tensor '{scale_name}' is {value}, expected a positive scale")
        if any(bool(((hf_packed >> shift) & 3).eq(3).any()) for shift in (0, 2, 4, 6)):
            raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' holds the invalid 2-bit code 3")
        mult = value if linear_class == "autobitlinear" else 1.0 / value
        return hf_to_kernel_layout(hf_packed), mult

    @staticmethod
    def _load_online(reader: CheckpointReader, spec: LinearSpec) -> tuple[torch.Tensor, float]:
        name = f"{spec.prefix}.weight"
        w = reader.get(name, shape=(spec.out_features, spec.in_features), dtypes=FLOAT_DTYPES)
        if spec.in_features % 4:
            raise CheckpointError(f"{spec.prefix}: in_features={spec.in_features} is not a multiple of 4")
        t, mult = absmean_ternarize(w)
        return pack_ternary(t), mult
