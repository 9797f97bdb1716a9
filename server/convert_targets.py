"""What each ``--to`` target writes for one projection, and how it rewrites config.json.

| target | tensors of a projection ``<p>`` (``[N, K]`` logical) | FORMATS.md |
|---|---|---|
| ``bitnet`` | ``weight`` U8 ``[N/4, K]`` (four slabs along N, code t+1), ``weight_scale`` ``[1]`` = mean|W| | §1.3-1.4 (2B4T, autobitlinear offline) |
| ``onebit`` | ``weight`` I8 ``[N, K/8]`` (LSB = first column, 1 <=> -1), ``input_factor`` F32 ``[K]``, ``weight_scale`` F32 ``[N]`` | §3.2, SVID §3.4 |
| ``fbi`` | ``weight`` latent float ``[N, K]``, ``wscale``/``wbias`` F32 ``[1, K]`` | §4.2 |
| ``dual_binary`` | ``b1``/``b2`` U8 ``[N, K/8]``, ``alpha1``/``alpha2`` ``[N, K/G]`` | §5.3, ``docs/formats_lowbit.md`` |
| ``dense`` | ``weight`` float ``[N, K]`` (the dequantized weight) | a plain Hugging Face llama/bitnet |

Every target also keeps ``<p>.bias`` when the source has one.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch

from bitserve.convert_math import (
    absmean_ternary,
    fbi_column_binarize,
    flexible_dual_binarize,
    svid_rank1,
    ternary_to_dual_binary,
)
from bitserve.convert_options import ConvertOptions
from bitserve.convert_source import SourceCheckpoint, Ternary
from bitserve.kernels.ondisk import pack_bits_lsb
from bitserve.kernels.packing import hf_pack_ternary
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.checkpoint import CheckpointError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W_hat|| / ||W||`` (Frobenius, float64)."""
    w = weight.double()
    norm = float(w.norm())
    return float((w - approx.double()).norm()) / norm if norm else float((approx.double()).norm())


def _need(condition: bool, source: SourceCheckpoint, spec: LinearSpec, what: str) -> None:
    if not condition:
        raise CheckpointError(f"{source.folder}: tensor '{spec.prefix}.weight' ({spec.out_features}x"
                              f"{spec.in_features}): {what}")


class Target(ABC):
    name: str = ""
    from_formats: tuple[str, ...] = ("dense",)

    def __init__(self, options: ConvertOptions):
        self.options = options

    def check(self, source: SourceCheckpoint) -> None:
        if source.format not in self.from_formats:
            raise CheckpointError(f"{source.folder}: converting a {source.format} checkpoint to '{self.name}' is not "
                                  f"supported (this target converts from: {', '.join(self.from_formats)})")

    @abstractmethod
    def config(self, source: SourceCheckpoint) -> dict:
        """The new config.json."""

    @abstractmethod
    def linear(self, spec: LinearSpec, weight, source: SourceCheckpoint) -> tuple[dict[str, torch.Tensor], float]:
        """(tensors to write, relative reconstruction error) for one projection."""

    @staticmethod
    def _base_config(source: SourceCheckpoint) -> dict:
        cfg = copy.deepcopy(source.config)
        cfg.pop("quantization_config", None)
        return cfg


class BitNetTarget(Target):
    """Absmean ternary per tensor in the 2B4T offline layout (autobitlinear: W_hat = T * weight_scale);
    ternary sources (GGUF TQ1_0/TQ2_0/I2_S) are repacked losslessly."""

    name = "bitnet"
    from_formats = ("dense", "bitnet")

    def config(self, source):
        cfg = self._base_config(source)
        cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline"}
        return cfg

    def linear(self, spec, weight, source):
        _need(spec.out_features % 4 == 0, source, spec, "out_features must be a multiple of 4 for the bitnet layout")
        _need(spec.in_features % 4 == 0, source, spec, "in_features must be a multiple of 4")
        if isinstance(weight, Ternary):  # a ternary source (bitnet, GGUF): repacked as it is
            _need(bool((weight.scale == weight.scale[0]).all()), source, spec,
                  "its rows have different scales, and the bitnet layout has one per tensor "
                  "(convert to dual_binary or dense instead)")
            codes, common = weight.t, weight.scale[:1]
            if common.item() < 0:  # (GGUF blocks may carry a negative d): the same weights, a positive scale
                codes, common = -codes, -common
            elif common.item() == 0:  # an all-zero matrix; the bitnet loader wants a positive scale
                codes, common = torch.zeros_like(codes), torch.ones_like(common)
            scale = common.to(TORCH_DTYPES[self.options.scale_dtype])
            if not torch.equal(scale.float(), common):
                scale = common.float()  # keep the conversion exact
            tensors = {f"{spec.prefix}.weight": hf_pack_ternary(codes), f"{spec.prefix}.weight_scale": scale}
            return tensors, 0.0
        t, gamma = absmean_ternary(weight)
        scale = torch.tensor([gamma]).to(TORCH_DTYPES[self.options.scale_dtype])
        tensors = {f"{spec.prefix}.weight": hf_pack_ternary(t), f"{spec.prefix}.weight_scale": scale}
        return tensors, relative_error(weight, t.float() * scale.float())


class OneBitTarget(Target):
    """OneBit's packed inference layout from the SVID rank-1 start (sign(W), |W| ~ h g^T)."""

    name = "onebit"

    def config(self, source):
        model_type = source.config.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise CheckpointError(f"{source.folder}: OneBit is a llama architecture; cannot convert model_type "
                                  f"'{model_type}'")
        cfg = self._base_config(source)
        cfg["model_type"] = "bitllama"
        cfg["architectures"] = ["BitLlamaForCausalLMInf"]
        return cfg

    def linear(self, spec, weight, source):
        _need(spec.in_features % 8 == 0, source, spec, "in_features must be a multiple of 8 for OneBit's packing")
        r = svid_rank1(weight, max_iters=self.options.svid_iters)
        bits = (weight < 0).to(torch.uint8)  # 1 <=> -1; a zero weight is +1 (FORMATS.md §3.2)
        h, g = r.h.float(), r.g.float()
        tensors = {f"{spec.prefix}.weight": pack_bits_lsb(bits).view(torch.int8),
                   f"{spec.prefix}.input_factor": g, f"{spec.prefix}.weight_scale": h}
        approx = (1.0 - 2.0 * bits.double()) * torch.outer(h.double(), g.double())
        return tensors, relative_error(weight, approx)


class FBITarget(Target):
    """FBI-LLM's column pattern: latent weight, ``wscale`` = alpha, ``wbias`` = beta per input column."""

    name = "fbi"

    def config(self, source):
        return self._base_config(source)

    def linear(self, spec, weight, source):
        latent, alpha, beta = fbi_column_binarize(weight, latent_dtype=weight.dtype)
        tensors = {f"{spec.prefix}.weight": latent, f"{spec.prefix}.wscale": alpha, f"{spec.prefix}.wbias": beta}
        return tensors, relative_error(weight, alpha * torch.sign(latent.float()) + beta)


class DualBinaryTarget(Target):
    """DB-LLM flexible dual binarization (dense) or the exact ternary split (bitnet)."""

    name = "dual_binary"
    from_formats = ("dense", "bitnet")

    def check(self, source):
        super().check(source)
        g = self.options.group_size
        bad = sorted({s.in_features for s in source.specs if s.in_features % g})
        if bad:
            raise CheckpointError(f"{source.folder}: dual_binary group_size {g} does not divide in_features "
                                  f"{bad}; pick a multiple of 8 that divides every in_features")

    def config(self, source):
        cfg = self._base_config(source)
        qc = {"quant_method": "dual_binary", "format_version": 1, "group_size": self.options.group_size}
        if source.format == "bitnet":
            qc["activation_quant"] = "int8_per_token"  # keep the W1.58A8 activation handling
            kept = (source.config.get("quantization_config") or {}).get("modules_to_not_convert")
            if kept:
                qc["modules_to_not_convert"] = list(kept)
        cfg["quantization_config"] = qc
        return cfg

    def linear(self, spec, weight, source):
        g = self.options.group_size
        alpha_dtype = TORCH_DTYPES[self.options.alpha_dtype]
        if source.format == "bitnet" and not isinstance(weight, Ternary):
            return {f"{spec.prefix}.weight": weight}, 0.0  # a layer the bitnet checkpoint keeps in float
        if isinstance(weight, Ternary):
            db = ternary_to_dual_binary(weight.t, weight.scale, g)
            if not torch.equal(db.alpha1.to(alpha_dtype).float(), db.alpha1):
                alpha_dtype = torch.float32  # keep the conversion exact
            target = weight.dequantize()
        else:
            db = flexible_dual_binarize(weight, g, iters=self.options.fdb_iters, alpha_dtype=alpha_dtype)
            target = weight
        tensors = {f"{spec.prefix}.b1": pack_bits_lsb(db.b1), f"{spec.prefix}.b2": pack_bits_lsb(db.b2),
                   f"{spec.prefix}.alpha1": db.alpha1.to(alpha_dtype),
                   f"{spec.prefix}.alpha2": db.alpha2.to(alpha_dtype)}
        return tensors, relative_error(target, db.dequantize())


class DenseTarget(Target):
    """Dequantized float weights: ``W = T * scale`` of a bitnet source, or a dense source recast."""

    name = "dense"
    from_formats = ("dense", "fakequant", "bitnet")

    def config(self, source):
        cfg = self._base_config(source)
        cfg["torch_dtype"] = self.options.dense_dtype
        return cfg

    def linear(self, spec, weight, source):
        w = weight.dequantize() if isinstance(weight, Ternary) else weight.float()
        out = w.to(TORCH_DTYPES[self.options.dense_dtype])
        return {f"{spec.prefix}.weight": out}, relative_error(w, out.float())


TARGETS: dict[str, type[Target]] = {t.name: t for t in (BitNetTarget, OneBitTarget, FBITarget, DualBinaryTarget,
                                                         DenseTarget)}
