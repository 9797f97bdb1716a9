"""The contract every format plugin passes (ours and third parties').

Use it from a plugin's tests::

    from bitserve.plugins.testing import check_format
    check_format("myformat", checkpoint_dir, [[LinearSpec("model.layers.0.mlp.gate_proj", 64, 32),
                                               LinearSpec("model.layers.0.mlp.up_proj", 64, 32)]])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import CheckpointReader
from bitserve.plugins.registry import FormatRegistry


def _reference_forward(layer: QuantLinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64 reference: the layer's declared activation handling, then a dense matmul."""
    xi = layer.input_transform(x).double()
    if layer.act_quant == "int8_per_token":
        scale = 127.0 / xi.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        xi = (xi * scale).round().clamp(-128, 127) / scale
    elif layer.act_quant is not None:
        raise AssertionError(f"unknown act_quant {layer.act_quant!r}")
    y = xi @ weight.double().t()
    if layer.bias_vector is not None:
        y = y + layer.bias_vector.double()
    return y


def _open(checkpoint: Path):
    """``(reader, config)`` of a safetensors folder or a GGUF file (or a folder holding one)."""
    from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint, find_gguf

    gguf_file = find_gguf(checkpoint)
    if gguf_file is not None:
        reader = GGUFCheckpoint(gguf_file)
        return reader, reader.config
    return CheckpointReader(checkpoint), json.loads((checkpoint / "config.json").read_text())


def check_format(
    plugin: str | FormatPlugin,
    checkpoint: str | Path,
    groups: Sequence[Sequence[LinearSpec]],
    *,
    expected_weights: Mapping[str, torch.Tensor] | None = None,
    registry: FormatRegistry | None = None,
    ms: Sequence[int] = (1, 3, 64),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_bits_per_weight: float = 16.0,
    seed: int = 0,
) -> dict:
    """Load single and fused linears through ``plugin`` and check them against float64.

    Checks: the checkpoint is detected as this format; every layer is a
    QuantLinear of the right shape; a fused layer equals its parts stacked;
    ``dequantize()`` equals ``expected_weights`` (when given, e.g. from the
    format's worked example); ``forward`` matches a float64 reference built from
    the dequantized weight for each M in ``ms``; the output keeps x's dtype; the
    layer holds at most ``max_bits_per_weight`` bits per weight (no dense copy).
    Returns a small report (max errors, bits per weight).
    """
    checkpoint = Path(checkpoint)
    device = torch.device(device)
    registry = registry or FormatRegistry()
    reader, config = _open(checkpoint)
    if isinstance(plugin, str):
        plugin = registry.get(plugin, config)
    detected = registry.detect(config, reader.names(), reader)
    assert detected.name == plugin.name, f"checkpoint detected as '{detected.name}', expected '{plugin.name}'"

    gen = torch.Generator().manual_seed(seed)
    report = {"max_rel_error": 0.0, "bits_per_weight": []}
    for group in groups:
        singles = [plugin.load_linear(reader, [spec], device=device, dtype=dtype) for spec in group]
        fused = plugin.load_linear(reader, list(group), device=device, dtype=dtype)
        for spec, layer in zip(group, singles):
            assert isinstance(layer, QuantLinear), f"{spec.prefix}: load_linear returned {type(layer).__name__}"
            assert (layer.out_features, layer.in_features) == (spec.out_features, spec.in_features), (
                f"{spec.prefix}: layer shape {(layer.out_features, layer.in_features)} != spec"
            )
            assert layer.nbytes > 0
            assert layer.bits_per_weight <= max_bits_per_weight, (
                f"{spec.prefix}: {layer.bits_per_weight:.2f} bits per weight > {max_bits_per_weight}"
            )
            if expected_weights is not None and spec.prefix in expected_weights:
                torch.testing.assert_close(
                    layer.dequantize().double(), expected_weights[spec.prefix].double(), rtol=1e-3, atol=1e-6,
                    msg=lambda m, p=spec.prefix: f"{p}: dequantized weight differs from expected: {m}",
                )
        stacked = torch.cat([layer.dequantize() for layer in singles])
        assert fused.out_features == sum(s.out_features for s in group)
        torch.testing.assert_close(fused.dequantize(), stacked, rtol=0, atol=0,
                                   msg=lambda m: f"fused layer differs from its parts: {m}")
        weight = fused.dequantize()
        for m in ms:
            x = torch.randn(m, group[0].in_features, generator=gen).to(device=device, dtype=dtype)
            y = fused(x)
            assert y.dtype == dtype and y.shape == (m, fused.out_features), f"bad output {y.dtype} {tuple(y.shape)}"
            assert torch.isfinite(y).all(), "non-finite output"
            ref = _reference_forward(fused, x, weight)
            err = (y.double() - ref).abs()
            bound = atol + rtol * ref.abs().max()
            assert err.max() <= bound, f"M={m}: max error {err.max():.3g} > bound {bound:.3g}"
            report["max_rel_error"] = max(report["max_rel_error"], float(err.max() / ref.abs().max().clamp(min=1e-12)))
        report["bits_per_weight"].append(fused.bits_per_weight)
    return report
