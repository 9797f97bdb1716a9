"""``fbi``: FBI-LLM checkpoints (a plain llama config.json, FORMATS.md §4).

Per projection ``<p>`` with logical weight ``[N, K]`` (every linear but ``lm_head``):

- ``<p>.weight``: the latent float weight ``[N, K]``; only its sign is used.
- ``<p>.wscale`` (alpha) and ``<p>.wbias`` (beta): ``[1, K]``, one value per input column (the
  "column" pattern of the released models). The "single" pattern (one scalar each) loads the
  same way; the "row" pattern ``[N, 1]`` is refused (its beta would need a per-output term).

``W_hat[n, k] = alpha_k * sign(W[n, k]) + beta_k``, run as ``((x * alpha) @ S.T) + x . beta``
by :class:`~bitserve.plugins.lowbit_layers.BinaryLinear` with the signs packed once at load.
PyTorch's ``sign(0) = 0`` has no 1-bit code: an exactly zero latent weight becomes +1 and is
reported with a warning naming the tensor (FORMATS.md §4.2's lossy edge case). Each projection of
a fused group keeps its own alpha and beta, so a group is a
:class:`~bitserve.plugins.gguf_layers.ConcatLinear` of one BinaryLinear per part.
"""

from __future__ import annotations

import logging
from typing import Collection, Sequence

import torch

from bitserve.kernels.packing import pack_sign_bits, sign_bits
from bitserve.plugins.base import FormatPlugin, LinearSpec, QuantLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader
from bitserve.plugins.lowbit_layers import ConcatLinear
from bitserve.plugins.lowbit_layers import BinaryLinear

log = logging.getLogger(__name__)


def read_column_vector(reader: CheckpointReader, name: str, spec: LinearSpec) -> torch.Tensor:
    """``wscale``/``wbias`` as a float32 ``[K]`` vector (column ``[1, K]``, or a single scalar)."""
    k, n = spec.in_features, spec.out_features
    value = reader.get(name, dtypes=FLOAT_DTYPES).float()
    file = reader.file_of(name)
    shape = tuple(value.shape)
    if shape == (n, 1) and n != 1:
        raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)}: FBI-LLM's 'row' scaling pattern "
                              f"is not supported (expected the 'column' pattern [1, {k}])")
    if shape == (1, k) or shape == (k,):
        vector = value.reshape(k)
    elif value.numel() == 1:  # the "single" pattern
        vector = value.reshape(1).expand(k).clone()
    else:
        raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)}, expected [1, {k}]")
    if not torch.isfinite(vector).all():
        raise CheckpointError(f"{file}: tensor '{name}' contains NaN or Inf")
    return vector


def read_latent_signs(reader: CheckpointReader, spec: LinearSpec) -> torch.Tensor:
    """The signs of ``<p>.weight`` in the binary kernel layout (a zero counts as +1, with a warning)."""
    name = f"{spec.prefix}.weight"
    n, k = spec.out_features, spec.in_features
    latent = reader.get(name, shape=(n, k), dtypes=FLOAT_DTYPES)
    if k % 8:
        raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}': in_features={k} is not a multiple of 8, "
                              "which the packed sign layout needs")
    if torch.isnan(latent).any():
        raise CheckpointError(f"{reader.file_of(name)}: tensor '{name}' contains NaN")
    zeros = int((latent == 0).sum())
    if zeros:
        log.warning("%s: tensor '%s' has %d exactly-zero latent weight(s); FBI-LLM computes sign(0) = 0, "
                    "a 1-bit weight cannot: they are loaded as +1", reader.file_of(name), name, zeros)
    return pack_sign_bits(sign_bits(latent))


def load_fbi_linear(reader: CheckpointReader, spec: LinearSpec, device: torch.device,
                    dtype: torch.dtype) -> BinaryLinear:
    packed = read_latent_signs(reader, spec)
    alpha = read_column_vector(reader, f"{spec.prefix}.wscale", spec)
    beta = read_column_vector(reader, f"{spec.prefix}.wbias", spec)
    bias_name = f"{spec.prefix}.bias"
    bias = None
    if reader.has(bias_name):
        bias = reader.get(bias_name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES).to(device, dtype)
    return BinaryLinear(packed.to(device), in_scale=alpha.to(device), in_bias=beta.to(device), bias=bias)


class FBIFormat(FormatPlugin):
    name = "fbi"
    description = "FBI-LLM: llama with latent float weights, per-input-column wscale/wbias, signs packed at load"
    priority = 10

    def detect(self, config: dict, tensor_names: Collection[str], reader: CheckpointReader) -> bool:
        if config.get("quantization_config"):
            return False
        names = set(tensor_names)
        suffix = ".wscale"
        return any(n.endswith(suffix) and f"{n[: -len(suffix)]}.wbias" in names for n in names)

    def load_linear(self, reader, specs: Sequence[LinearSpec], *, device, dtype) -> QuantLinear:
        parts = [load_fbi_linear(reader, spec, device, dtype) for spec in specs]
        return parts[0] if len(parts) == 1 else ConcatLinear(parts)
