"""The checkpoint a conversion reads: a dense Hugging Face llama, or a ternary one (``bitnet`` or GGUF).

Gives the converters each projection as either a float weight (dense) or exact ternary values
with a per-row multiplier (bitnet, read through the bitnet plugin itself so every scale
convention of FORMATS.md §1.4 is honoured), plus the tensors that are copied unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitserve.kernels.packing import unpack_ternary
from bitserve.loader import check_layer_count, refuse_latent_bitnet
from bitserve.model_config import ModelConfig
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.bitnet import TernaryLinear
from bitserve.plugins.checkpoint import FLOAT_DTYPES, CheckpointError, CheckpointReader, require_finite
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.registry import FormatRegistry

SOURCE_FORMATS = ("dense", "fakequant", "bitnet", "gguf")  # fakequant checkpoints are dense on disk


@dataclass
class Ternary:
    """Exact ternary projection: ``W = t * scale[:, None]``."""

    t: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.t.float() * self.scale.unsqueeze(1)


def projection_specs(cfg: ModelConfig) -> list[LinearSpec]:
    """Every decoder projection, in file order, with its logical shape."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    specs = []
    for layer in range(cfg.num_layers):
        a, m = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        specs += [LinearSpec(f"{a}.q_proj", cfg.q_size, h), LinearSpec(f"{a}.k_proj", cfg.kv_size, h),
                  LinearSpec(f"{a}.v_proj", cfg.kv_size, h), LinearSpec(f"{a}.o_proj", h, cfg.q_size),
                  LinearSpec(f"{m}.gate_proj", i, h), LinearSpec(f"{m}.up_proj", i, h),
                  LinearSpec(f"{m}.down_proj", h, i)]
    return specs


class SourceCheckpoint:
    """A checkpoint folder opened for conversion."""

    def __init__(self, folder: str | Path, config: dict, registry: FormatRegistry | None = None,
                 reader: CheckpointReader | None = None):
        self.folder = Path(folder)
        self.config = config
        self.reader = reader if reader is not None else CheckpointReader(self.folder)
        plugin = (registry or FormatRegistry()).detect(config, self.reader.names(), self.reader)
        if plugin.name not in SOURCE_FORMATS:
            raise CheckpointError(f"{self.folder}: is a '{plugin.name}' checkpoint; bitserve converts from dense "
                                  f"checkpoints (to bitnet, onebit, fbi, dual_binary) and ternary ones, bitnet "
                                  f"or GGUF (to bitnet, dual_binary, dense or GGUF)")
        if plugin.name == "dense":
            refuse_latent_bitnet(config, self.folder)
        # a ternary GGUF converts like a bitnet checkpoint: the same layers, the same W2A8 semantics
        self.format = "bitnet" if plugin.name in ("bitnet", "gguf") else "dense"
        self.container = "gguf" if plugin.name == "gguf" else "safetensors"
        self._plugin = plugin
        self.model = ModelConfig.from_hf(config)
        self.specs = projection_specs(self.model)
        prefixes = tuple(s.prefix + "." for s in self.specs)
        self.passthrough = sorted(n for n in self.reader.names() if not n.startswith(prefixes))
        self._dense_shapes: dict[str, tuple[int, ...]] = {}  # what the model loads of them (check_loadable)
        qc = config.get("quantization_config") or {}
        if self.format == "bitnet" and qc.get("use_rms_norm"):
            raise CheckpointError(f"{self.folder}: bitnet use_rms_norm (an RMSNorm inside every linear) has no "
                                  f"equivalent in the target formats")

    def extras(self, spec: LinearSpec) -> dict[str, torch.Tensor]:
        """Tensors of a projection copied unchanged (its bias)."""
        name = f"{spec.prefix}.bias"
        if self.reader.has(name):
            return {name: self.reader.get(name, shape=(spec.out_features,), dtypes=FLOAT_DTYPES)}
        return {}

    def dense_weight(self, spec: LinearSpec) -> torch.Tensor:
        """The float weight ``[N, K]`` as stored (dense sources, or bitnet layers kept dense)."""
        name = f"{spec.prefix}.weight"
        return require_finite(self.reader.get(name, shape=(spec.out_features, spec.in_features), dtypes=FLOAT_DTYPES),
                              f"{self.reader.file_of(name)}: tensor '{name}'")

    def check_loadable(self) -> None:
        """Refuse (CheckpointError naming the file and tensor), before anything is read, what the
        loader would refuse in the converted folder: tensors of layers beyond ``num_hidden_layers``,
        and embeddings, norms or LM head that are missing or of the wrong shape or dtype. The skeleton
        of the source model says which it needs and of what shape (:meth:`passthrough_tensor` then
        checks their values as it reads them)."""
        from bitserve.model import LlamaForCausalLM

        check_layer_count(self.reader, self.model.num_layers, self.folder)
        skeleton = LlamaForCausalLM(self.model, lambda specs: DenseLinear(torch.empty(
            sum(s.out_features for s in specs), specs[0].in_features, device="meta")))
        self._dense_shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()
                              if p.device.type == "meta"}
        for name, shape in self._dense_shapes.items():
            have = tuple(self.reader.shape(name))  # CheckpointError when missing
            if have != shape:
                raise CheckpointError(f"{self.reader.file_of(name)}: tensor '{name}' has shape {list(have)}, "
                                      f"expected {list(shape)}")
            if self.reader.dtype(name) not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.reader.file_of(name)}: tensor '{name}' has dtype "
                                      f"{self.reader.dtype(name)}, expected one of {sorted(FLOAT_DTYPES)}")

    def passthrough_tensor(self, name: str) -> torch.Tensor:
        """A tensor copied unchanged; one the model loads (embeddings, norms, LM head) must be finite,
        as the loader requires."""
        if name not in self._dense_shapes:
            return self.reader.get(name)
        return require_finite(self.reader.get(name), f"{self.reader.file_of(name)}: tensor '{name}'")

    def projection(self, spec: LinearSpec) -> torch.Tensor | Ternary:
        """A float weight, or the exact ternary values of a bitnet projection."""
        if self.format == "dense":
            return self.dense_weight(spec)
        layer = self._plugin.load_linear(self.reader, [spec], device=torch.device("cpu"), dtype=torch.float32)
        if isinstance(layer, DenseLinear):
            return layer.weight
        if not isinstance(layer, TernaryLinear):
            raise CheckpointError(f"{self.folder}: {spec.prefix}: unexpected layer {type(layer).__name__}")
        return Ternary(unpack_ternary(layer.packed), layer.scale.float().clone())
