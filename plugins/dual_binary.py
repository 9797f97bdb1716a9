"""``dual_binary``: bitserve's own on-disk layout for DB-LLM dual-binary weights (FORMATS.md §5.3).

DB-LLM published no code and no checkpoints, so this layout is ours (``docs/formats_lowbit.md``
documents it byte by byte; ``bitserve.converters`` writes it). A projection ``<p>`` with logical
weight ``[N, K]`` is stored as

| tensor | dtype | shape | meaning |
|---|---|---|---|
| ``<p>.b1`` | U8 | ``[N, K/8]`` | bit plane B1: column ``8j + b`` in bit ``b`` of byte ``j`` (LSB first), 1 <=> B1 = 1 |
| ``<p>.b2`` | U8 | ``[N, K/8]`` | bit plane B2, same packing |
| ``<p>.alpha1`` | F32/F16/BF16 | ``[N, K/G]`` | scale of B1 per output row and group of G input columns |
| ``<p>.alpha2`` | same | ``[N, K/G]`` | scale of B2 |
| ``<p>.bias`` | float, optional | ``[N]`` | bias |

``W[n, k] = alpha1[n, k // G] * B1[n, k] + alpha2[n, k // G] * B2[n, k]`` with B in {0, 1}.
``config.json``'s ``quantization_config``: ``quant_method: "dual_binary"``, ``format_version: 1``,
``group_size: G`` (a multiple of 8 dividing every K), optional ``activation_quant``
(``"int8_per_token"`` when the source model was trained with int8 activations, e.g. a BitNet
converted losslessly; default none) and optional ``modules_to_not_convert`` (layers stored as a
float ``<p>.weight``). The planes are repacked once at load into the dual-binary kernel layout
(:func:`bitserve.kernels.ondisk.dual_binary_planes_to_kernel_layout`).
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from bitserve.kernels import dispatch
from bitserve.kernels.ondisk import dual_binary_planes_to_kernel_layout
from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.dense import load_dense_linear
from bitserve.plugins.lowbit_layers import DualBinaryLinear

QUANT_METHOD = "dual_binary"
FORMAT_VERSION = 1
ACTIVATION_QUANTS = (None, "none", "int8_per_token")
PLANE_SUFFIXES = ("b1", "b2", "alpha1", "alpha2")


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """float32 ``round(x * s) / s`` with ``s = 127 / max|x|`` per token (FORMATS.md §1.5)."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (xf * scale).round().clamp(-128, 127) / scale


class DualBinaryLinearA8(DualBinaryLinear):
    """:class:`DualBinaryLinear` behind per-token int8 activation quantization (a BitNet model
    converted to dual-binary keeps the activation handling it was trained with)."""

    act_quant = "int8_per_token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant_int8_per_token(x)
        y = dispatch.dual_binary_linear(xq, self.packed, self.alpha1, self.alpha2, self.group_size,
                                        None if self.bias is None else self.bias.float())
        return y.to(x.dtype)


def read_settings(config: dict) -> tuple[int, str | None]:
    """``(group_size, activation_quant)`` from config.json, validated."""
    qc = config.get("quantization_config") or {}
    version = qc.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"config.json: dual_binary format_version {version!r} is not supported "
                              f"(this bitserve reads version {FORMAT_VERSION})")
    group_size = qc.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % 8:
        raise CheckpointError(f"config.json: dual_binary quantization_config.group_size must be a positive "
                              f"multiple of 8, got {group_size!r}")
    act = qc.get("activation_quant")
    if act not in ACTIVATION_QUANTS:
        raise CheckpointError(f"config.json: dual_binary activation_quant {act!r} is not one of "
                              f"{[a for a in ACTIVATION_QUANTS if a]} (or absent)")
    return group_size, (None if act in (None, "none") else act)


def _load_planes(reader: CheckpointReader, spec: LinearSpec, group_size: int, device) -> tuple:
    n, k = spec.out_features, spec.in_features
    if k % group_size:
        raise CheckpointError(f"{reader.folder}: {spec.prefix}: in_features={k} is not a multiple of the "
                              f"dual_binary group_size {group_size}")
    b1 = reader.get(f"{spec.prefix}.b1", shape=(n, k // 8), dtypes={"U8"})
    b2 = reader.get(f"{spec.prefix}.b2", shape=(n, k // 8), dtypes={"U8"})
    alphas = []
    for name in (f"{spec.prefix}.alpha1", f"{spec.prefix}.alpha2"):
        a = reader.get(name, shape=(n, k // group_size), dtypes=FLOAT_DTYPES).float()
        if not torch.isfinite(a).all():
            raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' contains NaN or Inf")
        alphas.append(a.to(device))
    packed = dual_binary_planes_to_kernel_layout(b1, b2, group_size).to(device)
    return packed, alphas[0], alphas[1]


class DualBinaryFormat(FormatPlugin):
    name = "dual_binary"
    description = "dual-binary W = a1*B1 + a2*B2 (DB-LLM FDB; bitserve's bit-plane layout, group-wise scales)"
    priority = 10

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == QUANT_METHOD

    def load_linear(self, reader, specs: Sequence[LinearSpec], *, device, dtype) -> QuantLinear:
        group_size, act = read_settings(self.config)
        stored = [reader.has(f"{s.prefix}.b1") for s in specs]
        if not any(stored):
            if all(reader.has(f"{s.prefix}.weight") for s in specs):
                return load_dense_linear(reader, specs, device=device, dtype=dtype)
            raise CheckpointError(f"{reader.folder}: tensor '{specs[0].prefix}.b1' is missing from the checkpoint "
                                  f"(and there is no float '{specs[0].prefix}.weight' either)")
        if not all(stored):
            dense = [s.prefix for s, has in zip(specs, stored) if not has]
            raise CheckpointError(f"{reader.folder}: cannot fuse {[s.prefix for s in specs]}: {dense} have no "
                                  f"dual-binary planes (b1/b2) while the others do")
        packed, alpha1, alpha2, biases = [], [], [], []
        for spec in specs:
            p, a1, a2 = _load_planes(reader, spec, group_size, device)
            packed.append(p)
            alpha1.append(a1)
            alpha2.append(a2)
            bias_name = f"{spec.prefix}.bias"
            biases.append(reader.get(bias_name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES).to(device, dtype)
                          if reader.has(bias_name) else None)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(s.out_features, device=device, dtype=dtype)
                              for b, s in zip(biases, specs)])
        cls = DualBinaryLinearA8 if act == "int8_per_token" else DualBinaryLinear
        return cls(torch.cat(packed), torch.cat(alpha1), torch.cat(alpha2), group_size, bias)
