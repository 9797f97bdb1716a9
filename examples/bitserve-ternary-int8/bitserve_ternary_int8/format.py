"""``ternary_int8``: ternary weights stored one per byte (int8 in {-1, 0, 1}) plus a scale per row.

On disk (safetensors, Hugging Face llama names; ``config.json`` has
``"quantization_config": {"quant_method": "ternary_int8"}``):

- ``<prefix>.weight``: int8 ``[N, K]``, every value -1, 0 or 1;
- ``<prefix>.weight_scale``: float ``[N]`` (one multiplier per output row) or ``[1]``.

W = weight * weight_scale[:, None]. Activations stay in floating point. At load the bytes are
repacked once into bitserve's 2-bit kernel layout, so the layer holds 2 bits per weight and runs
bitserve's ternary W2A16 kernels (Triton on CUDA, the plain-torch twin on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from safetensors.torch import save_file

from bitserve.kernels.packing import pack_ternary
from bitserve.plugins.base import FormatPlugin, LinearSpec
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.lowbit_layers import TernaryLinearA16

QUANT_METHOD = "ternary_int8"


class TernaryInt8Format(FormatPlugin):
    name = "ternary_int8"
    description = "ternary weights as int8 {-1, 0, 1} with a float scale per row (example plugin)"
    priority = 10

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD

    def load_linear(self, reader: CheckpointReader, specs: Sequence[LinearSpec], *, device: torch.device,
                    dtype: torch.dtype) -> TernaryLinearA16:
        packed, scales = [], []
        for spec in specs:
            name = f"{spec.prefix}.weight"
            w = reader.get(name, shape=(spec.out_features, spec.in_features), dtypes=("I8",))
            if bool(((w < -1) | (w > 1)).any()):
                raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' holds values outside {{-1, 0, 1}}")
            scale_name = f"{spec.prefix}.weight_scale"
            scale = reader.get(scale_name, dtypes=FLOAT_DTYPES).float().reshape(-1)
            if scale.numel() not in (1, spec.out_features):
                raise CheckpointError(f"{reader.file_of(scale_name)}: tensor '{scale_name}' has "
                                      f"{scale.numel()} values, expected 1 or {spec.out_features}")
            packed.append(pack_ternary(w))
            scales.append(scale.expand(spec.out_features))
        return TernaryLinearA16(torch.cat(packed).to(device), torch.cat(scales).to(device))


def write_checkpoint(folder: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a ``ternary_int8`` checkpoint: a llama ``config`` and float tensors by HF name.

    Every ``*_proj.weight`` is ternarized with the absmean rule per row (scale = mean |w| of the
    row, weight = round(w / scale) clipped to [-1, 1]); everything else is stored as given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            scale = t.float().abs().mean(dim=1).clamp(min=1e-8)
            out[name] = (t.float() / scale[:, None]).round().clamp(-1, 1).to(torch.int8)
            out[name[: -len("weight")] + "weight_scale"] = scale
        else:
            out[name] = t.contiguous()
    save_file(out, str(folder / "model.safetensors"))
    cfg = dict(config)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder
