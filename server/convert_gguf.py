"""Write a ternary checkpoint (e.g. the ``bitnet`` format, or another ternary GGUF) as a GGUF file
(``bitserve convert --to gguf-*``).

:func:`write_gguf` loads every linear through the checkpoint's own format plugin (so all
BitNet variants — packed ``bitlinear``/``autobitlinear``, online bf16 — are handled once, by
the code that serves them), takes the ternary matrix and its multiplier, and writes:

- ``tq2_0`` / ``tq1_0``: llama.cpp's block types, ``d`` = the row's multiplier (fp16) in every
  block that has a non-zero weight and 0 in all-zero blocks — byte for byte what llama.cpp's
  quantizer makes of ``T * scale``. Architecture ``bitnet`` (``llama`` for llama sources, with
  llama.cpp's q/k row permutation).
- ``i2_s``: bitnet.cpp's layout (FORMATS.md §2.4), per-tensor f32 scale in the tail;
  architecture ``bitnet-b1.58`` (bitnet.cpp's name for the 2B-4T graph). Needs one scale per tensor.

Embeddings keep their stored float type (BF16/F16/F32, or ``dense_type``), norms are F32,
metadata follows llama.cpp's keys (``<arch>.hidden_activation`` is written for BitNet), and the
tokenizer goes in as ``tokenizer.*`` metadata (:mod:`bitserve.plugins.gguf_vocab_writer`).
Lossless for bf16 scales with TQ types (fp16 holds every bf16 value of a normal
magnitude) and for any float32 scale with I2_S; a scale that fp16 rounds is reported.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType, quants

from bitserve.model_config import ModelConfig
from bitserve.kernels.ondisk import QK, i2_s_pack, tq1_0_pack, tq2_0_pack
from bitserve.kernels.packing import unpack_ternary
from bitserve.plugins.base import LinearSpec
from bitserve.plugins.bitnet import TernaryLinear
from bitserve.loader import config_source, open_checkpoint
from bitserve.plugins.checkpoint import CheckpointError
from bitserve.plugins.dense import DenseLinear
from bitserve.plugins.gguf_config import LLAMA3_PRESETS, llama3_rope_factors
from bitserve.plugins.gguf_file import I2_S_TYPE_ID
from bitserve.plugins.gguf_names import gguf_name, llama_qk_heads, rows_to_gguf_order
from bitserve.plugins.gguf_paths import find_gguf
from bitserve.plugins.gguf_vocab_writer import tokenizer_metadata
from bitserve.plugins.registry import FormatRegistry
from bitserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LINEAR_TYPES = ("tq2_0", "tq1_0", "i2_s")
DENSE_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
               "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
_FILE_TYPES = {"tq2_0": LlamaFileType.MOSTLY_TQ2_0, "tq1_0": LlamaFileType.MOSTLY_TQ1_0, "i2_s": 40}
_SOURCE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def _float_tensor(t: torch.Tensor, kind: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype = DENSE_TYPES[kind]
    if kind == "f32":
        return t.float().numpy(), qtype
    if kind == "f16":
        return t.to(torch.float16).numpy(), qtype
    if kind == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], -1), qtype
    return quants.quantize(t.float().numpy(), qtype), qtype


def _check_fp16(name: str, scale: torch.Tensor) -> None:
    rounded = scale.to(torch.float16).float()
    if not torch.isfinite(rounded).all():
        raise CheckpointError(f"{name}: scale {scale.abs().max():g} does not fit the fp16 block scale of TQ types")
    err = ((rounded - scale).abs() / scale.abs().clamp(min=1e-30)).max()
    if err > 0:
        log.warning("%s: TQ block scales are fp16; the scale is rounded (relative error %.2g)", name, float(err))


class _Converter:
    def __init__(self, src: Path, linear_type: str, dense_type: str | None):
        if linear_type not in LINEAR_TYPES:
            raise ValueError(f"linear_type must be one of {LINEAR_TYPES}, got {linear_type!r}")
        if dense_type is not None and dense_type not in DENSE_TYPES:
            raise ValueError(f"dense_type must be one of {sorted(DENSE_TYPES)} or None, got {dense_type!r}")
        self.src, self.linear_type, self.dense_type = src, linear_type, dense_type
        self.reader, self.hf_config = open_checkpoint(src)  # a checkpoint folder or a GGUF file
        self.plugin = FormatRegistry().detect(self.hf_config, self.reader.names(), self.reader)
        if self.plugin.name == "dense":
            raise CheckpointError(f"{src}: a dense checkpoint has no ternary linears for GGUF {linear_type.upper()}; "
                                  f"quantize it first (bitserve convert SRC DST --to bitnet), then convert that")
        self.cfg = ModelConfig.from_hf(self.hf_config, self.plugin.model_overrides(self.hf_config),
                                       config_source(self.reader, src))
        self.num_ternary = 0  # linears written as ternary (a file of only float linears is refused)
        cfg = self.cfg
        bitnet = cfg.attn_sub_norm or cfg.ffn_sub_norm
        if bitnet and not (cfg.attn_sub_norm and cfg.ffn_sub_norm):
            raise CheckpointError(f"{src}: GGUF BitNet graphs have both sub-norms; this model has only one")
        if not bitnet and cfg.hidden_act != "silu":
            raise CheckpointError(f"{src}: llama GGUF graphs use SiLU, this model uses {cfg.hidden_act}")
        if bitnet and not cfg.tie_word_embeddings:
            raise CheckpointError(f"{src}: GGUF BitNet graphs use token_embd as the LM head; this model has its own")
        if linear_type == "i2_s" and not bitnet:
            raise CheckpointError(f"{src}: I2_S is a bitnet.cpp type for BitNet architectures; use tq2_0/tq1_0")
        self.arch = ("bitnet-b1.58" if linear_type == "i2_s" else "bitnet") if bitnet else "llama"

    # -- metadata ---------------------------------------------------------------------
    def metadata(self, w: GGUFWriter) -> None:
        cfg = self.cfg
        w.add_name(self.src.stem if self.src.is_file() else self.src.name)
        w.add_file_type(int(_FILE_TYPES[self.linear_type]))
        w.add_quantization_version(2)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        if self.arch != "llama":
            w.add_string(f"{self.arch}.hidden_activation", cfg.hidden_act)
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            w.add_string(f"{self.arch}.rope.scaling.type", "linear")
            w.add_float32(f"{self.arch}.rope.scaling.factor", float(scaling["factor"]))
        elif kind == "llama3":
            preset = (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                      int(scaling["original_max_position_embeddings"]))
            if preset not in LLAMA3_PRESETS:
                raise CheckpointError(f"{self.src}: llama3 RoPE scaling {preset} is not a preset the GGUF reader knows")
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg.head_dim, cfg.rope_theta, *preset).astype(np.float32))
        elif kind:
            raise CheckpointError(f"{self.src}: RoPE scaling '{kind}' cannot be written to GGUF")
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.src
            if find_gguf(self.src) is not None:  # a GGUF source: its own vocabulary, as a tokenizer.json
                Tokenizer(self.src).save_pretrained(tmp)
                folder = Path(tmp)
            for key, (value, vtype) in tokenizer_metadata(folder, self.hf_config, cfg.vocab_size).items():
                if isinstance(value, list):
                    w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
                else:
                    w.add_key_value(key, value, vtype)

    # -- tensors ----------------------------------------------------------------------
    def dense(self, w: GGUFWriter, hf: str, kind: str | None = None) -> None:
        t = self.reader.get(hf)
        choice = kind or self.dense_type or _SOURCE_DTYPES.get(t.dtype, "f32")
        data, qtype = _float_tensor(t, choice)
        w.add_tensor(gguf_name(hf), data, raw_dtype=qtype)

    def linear(self, w: GGUFWriter, spec: LinearSpec) -> None:
        name = gguf_name(f"{spec.prefix}.weight")
        layer = self.plugin.load_linear(self.reader, [spec], device=torch.device("cpu"), dtype=torch.float32)
        heads = llama_qk_heads(f"{spec.prefix}.weight", self.cfg.num_heads, self.cfg.num_kv_heads) \
            if self.arch == "llama" else None
        order = rows_to_gguf_order(spec.out_features, heads) if heads else None
        if isinstance(layer, DenseLinear):
            weight = layer.weight.float() if order is None else layer.weight.float()[order]
            data, qtype = _float_tensor(weight, self.dense_type or "f32")
            w.add_tensor(name, data, raw_dtype=qtype)
        elif isinstance(layer, TernaryLinear):
            self.num_ternary += 1
            if layer.input_norm is not None:
                raise CheckpointError(f"{self.src}: {spec.prefix} has an input RMSNorm inside the linear, "
                                      "which GGUF graphs do not have")
            t, scale = unpack_ternary(layer.packed), layer.scale.float()
            if order is not None:
                t, scale = t[order], scale[order]
            self._ternary(w, name, t, scale)
        else:
            raise CheckpointError(f"{self.src}: {spec.prefix} loads as {type(layer).__name__}; only W1.58A8 ternary "
                                  "(TernaryLinear) and dense linears can be written to GGUF")
        if layer.bias_vector is not None:
            bias = layer.bias_vector.float() if order is None else layer.bias_vector.float()[order]
            w.add_tensor(gguf_name(f"{spec.prefix}.bias"), bias.numpy())

    def _ternary(self, w: GGUFWriter, name: str, t: torch.Tensor, scale: torch.Tensor) -> None:
        n, k = t.shape
        if self.linear_type == "i2_s":
            if not torch.all(scale == scale[0]):
                raise CheckpointError(f"{self.src}: {name}: I2_S holds one scale per tensor; this layer has one per row")
            data = i2_s_pack(t, float(scale[0])).numpy()
            # gguf's enum has no id 36: hand the writer int8 bytes so it keeps our shape and type id
            w.add_tensor(name, data.view(np.int8), raw_shape=(n, k), raw_dtype=I2_S_TYPE_ID)
            return
        if k % QK:
            raise CheckpointError(f"{self.src}: {name}: K={k} is not a multiple of {QK}, "
                                  f"required by {self.linear_type.upper()}; "
                                  "use i2_s")
        _check_fp16(name, scale)
        nonzero = t.view(n, k // QK, QK).ne(0).any(-1)
        d = torch.where(nonzero, scale.unsqueeze(1), torch.zeros(()))
        pack, qtype = ((tq2_0_pack, GGMLQuantizationType.TQ2_0) if self.linear_type == "tq2_0"
                       else (tq1_0_pack, GGMLQuantizationType.TQ1_0))
        w.add_tensor(name, pack(t, d).numpy(), raw_dtype=qtype)

    def specs(self, i: int) -> list[LinearSpec]:
        cfg, p = self.cfg, f"model.layers.{i}"
        h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        return [LinearSpec(f"{p}.self_attn.q_proj", q, h), LinearSpec(f"{p}.self_attn.k_proj", kv, h),
                LinearSpec(f"{p}.self_attn.v_proj", kv, h), LinearSpec(f"{p}.self_attn.o_proj", h, q),
                LinearSpec(f"{p}.mlp.gate_proj", f, h), LinearSpec(f"{p}.mlp.up_proj", f, h),
                LinearSpec(f"{p}.mlp.down_proj", h, f)]


def write_gguf(src_checkpoint_dir: str | Path, dst_path: str | Path, linear_type: str = "tq2_0",
               progress: bool = True, dense_type: str | None = None) -> Path:
    """Convert the checkpoint folder (or ternary GGUF file) ``src_checkpoint_dir`` into the GGUF file ``dst_path``.

    ``linear_type``: ``tq2_0`` | ``tq1_0`` | ``i2_s``; ``dense_type`` overrides the type of the
    embedding table (``f32``/``f16``/``bf16``/``q8_0``; default: as stored). Returns ``dst_path``.
    """
    conv = _Converter(Path(src_checkpoint_dir), linear_type, dense_type)
    dst = Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")  # dst appears only once it is complete
    w = GGUFWriter(str(partial), conv.arch)
    try:
        conv.metadata(w)
        conv.dense(w, "model.embed_tokens.weight")
        for i in range(conv.cfg.num_layers):
            p = f"model.layers.{i}"
            conv.dense(w, f"{p}.input_layernorm.weight", "f32")
            for spec in conv.specs(i):
                conv.linear(w, spec)
            conv.dense(w, f"{p}.post_attention_layernorm.weight", "f32")
            if conv.arch != "llama":
                conv.dense(w, f"{p}.self_attn.attn_sub_norm.weight", "f32")
                conv.dense(w, f"{p}.mlp.ffn_sub_norm.weight", "f32")
        conv.dense(w, "model.norm.weight", "f32")
        if not conv.cfg.tie_word_embeddings:
            conv.dense(w, "lm_head.weight")
        if not conv.num_ternary:
            raise CheckpointError(f"{conv.src}: no linear of this {conv.plugin.name} checkpoint is ternary; "
                                  f"GGUF {linear_type.upper()} needs ternary linears")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        partial.replace(dst)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    return dst
