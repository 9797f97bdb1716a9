"""``onebit``: OneBit checkpoints (``model_type: bitllama``, FORMATS.md §3).

Per projection ``<p>`` with logical weight ``[N, K]``:

- ``<p>.weight``: the sign matrix S, int8 ``[N, K/8]``, column ``8j + b`` in bit ``b`` of byte
  ``j`` (LSB first), bit 1 <=> -1 (``BitLlamaForCausalLMInf``, packed). A training checkpoint
  (``BitLlamaForCausalLM``) stores the latent float ``[N, K]`` instead; only its sign is used,
  a zero counting as +1 as OneBit's packing script does.
- ``<p>.input_factor``: g ``[K]``; ``<p>.weight_scale``: h ``[N]``.

The layer computes ``((x * g) @ S.T) * h`` (:class:`~bitserve.plugins.lowbit_layers.BinaryLinear`);
the non-affine LayerNorm OneBit puts after every projection is the model flag
``proj_out_layernorm`` (:meth:`OneBitFormat.model_overrides`). Each projection of a fused group
keeps its own g, so a group is a :class:`~bitserve.plugins.gguf_layers.ConcatLinear` of one
BinaryLinear per part.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from bitserve.kernels.ondisk import onebit_to_kernel_layout
from bitserve.kernels.packing import pack_sign_bits, sign_bits
from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.lowbit_layers import ConcatLinear
from bitserve.plugins.lowbit_layers import BinaryLinear

MODEL_TYPE = "bitllama"
PACKED_DTYPES = {"I8", "U8"}  # OneBit writes int8; the same bytes as uint8 read identically
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which OneBit's BitLinear/BitLinearInf use


def read_finite(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor of the given shape with no NaN/Inf, as float32."""
    value = reader.get(name, shape=shape, dtypes=FLOAT_DTYPES).float()
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' contains NaN or Inf")
    return value


def read_onebit_signs(reader: CheckpointReader, spec: LinearSpec) -> torch.Tensor:
    """``<p>.weight`` (packed int8 or latent float) -> binary kernel layout ``uint8[N, K/8]``."""
    name = f"{spec.prefix}.weight"
    n, k = spec.out_features, spec.in_features
    if k % 8:
        raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}': in_features={k} is not a multiple of 8, "
                              "which OneBit's bit packing needs")
    dtype, shape = reader.dtype(name), reader.shape(name)
    if dtype in PACKED_DTYPES and shape == (n, k // 8):
        return onebit_to_kernel_layout(reader.get(name))
    if dtype in FLOAT_DTYPES and shape == (n, k):  # a training checkpoint's latent weight
        latent = reader.get(name)
        if torch.isnan(latent).any():
            raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' contains NaN")
        return pack_sign_bits(sign_bits(latent))
    raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' has dtype {dtype} and shape {list(shape)}, "
                          f"expected packed signs (I8 [{n}, {k // 8}]) or a latent float weight ([{n}, {k}])")


def load_onebit_linear(reader: CheckpointReader, spec: LinearSpec, device: torch.device) -> BinaryLinear:
    bias_name = f"{spec.prefix}.bias"
    if reader.has(bias_name):
        raise CheckpointError(f"{reader.file_of(bias_name)}: tensor '{bias_name}': OneBit adds a projection bias "
                              "after its LayerNorm (attention_bias), which bitserve does not support")
    packed = read_onebit_signs(reader, spec)
    g = read_finite(reader, f"{spec.prefix}.input_factor", (spec.in_features,))
    h = read_finite(reader, f"{spec.prefix}.weight_scale", (spec.out_features,))
    return BinaryLinear(packed.to(device), in_scale=g.to(device), out_scale=h.to(device))


class OneBitFormat(FormatPlugin):
    name = "onebit"
    description = "OneBit (bitllama): packed signs, input_factor g, weight_scale h, LayerNorm after each projection"
    priority = 10

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        if config.get("quantization_config"):
            return False
        if config.get("model_type") == MODEL_TYPE:
            return True
        names = set(tensor_names)
        suffix = ".input_factor"
        return any(n.endswith(suffix) and f"{n[: -len(suffix)]}.weight_scale" in names for n in names)

    def model_overrides(self, config: dict) -> dict:
        return {"proj_out_layernorm": True, "proj_out_layernorm_eps": LAYERNORM_EPS}

    def load_linear(self, reader, specs: Sequence[LinearSpec], *, device, dtype) -> QuantLinear:
        parts = [load_onebit_linear(reader, spec, device) for spec in specs]
        return parts[0] if len(parts) == 1 else ConcatLinear(parts)
