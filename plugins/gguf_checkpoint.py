"""A GGUF file seen through the :class:`~bitserve.plugins.checkpoint.CheckpointReader` interface.

Tensors are addressed by the Hugging Face names bitserve's model uses
(``model.layers.0.self_attn.q_proj.weight``), so the loader and the plugin machinery work
unchanged. ``dtype(name)`` is the dtype :meth:`GGUFCheckpoint.get` returns (block types such as
Q8_0 read as ``F32``, dequantized); the stored GGML type is :meth:`GGUFCheckpoint.ggml_type`. Ternary
tensors are read with :meth:`GGUFCheckpoint.ternary`. For the ``llama`` architecture the q/k
rows are put back into Hugging Face order on every read. ``config`` is the HF-style config
built from the metadata (:mod:`bitserve.plugins.gguf_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from bitserve.plugins.checkpoint import CheckpointError
from bitserve.plugins.gguf_config import hf_config_from_gguf
from bitserve.plugins.gguf_file import GGUFFile, TensorInfo
from bitserve.plugins.gguf_names import AUXILIARY, hf_name, llama_qk_heads, rows_from_gguf_order
from bitserve.plugins.gguf_paths import find_gguf  # noqa: F401  (re-exported)
from bitserve.plugins.gguf_tensors import (
    FLOAT_TYPES, TERNARY_TYPES, TernaryWeight, decode_float, decode_ternary, is_dense_type,
)


class GGUFCheckpoint:
    """Lazy, validated access to the tensors of one GGUF file under Hugging Face names."""

    def __init__(self, path: str | Path):
        self.file = GGUFFile(path)
        self.path = self.file.path
        self.folder = self.path.parent
        self._by_hf: dict[str, TensorInfo] = {}
        unknown = []
        for name, info in self.file.tensors.items():
            hf = hf_name(name)
            if hf is not None:
                self._by_hf[hf] = info
            elif name not in AUXILIARY:
                unknown.append(name)
        if unknown:
            raise CheckpointError(
                f"{self.path}: tensor(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are not part "
                f"of the llama/bitnet graph bitserve runs (architecture '{self.file.architecture}')"
            )
        rope_freqs = None
        if "rope_freqs.weight" in self.file.tensors:
            info = self.file.tensors["rope_freqs.weight"]
            rope_freqs = self._decode_float(info, "rope_freqs.weight").double().numpy()
        self.config = hf_config_from_gguf(
            self.path, self.file.meta,
            {n: i.shape for n, i in self.file.tensors.items()},
            {n: i.type_name for n, i in self.file.tensors.items()},
            rope_freqs,
        )
        self._permute = self.file.architecture == "llama"
        self.read_names: set[str] = set()  # every tensor get() / ternary() returned (the loader reports the rest)

    # -- CheckpointReader interface -------------------------------------------------
    def names(self) -> set[str]:
        return set(self._by_hf)

    def has(self, name: str) -> bool:
        return name in self._by_hf

    def _info(self, name: str) -> TensorInfo:
        if name not in self._by_hf:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from the GGUF file")
        return self._by_hf[name]

    def dtype(self, name: str) -> str:
        t = self._info(name).type_name
        return t if t in FLOAT_TYPES or not is_dense_type(t) else "F32"  # block types read as float32

    def ggml_type(self, name: str) -> str:
        return self._info(name).type_name

    def gguf_name(self, name: str) -> str:
        return self._info(name).name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def file_of(self, name: str) -> Path:
        self._info(name)
        return self.path

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        infos = self.file.tensors.values() if names is None else (self._info(n) for n in names)
        return sum(i.nbytes for i in infos)

    def describe(self, name: str) -> str:
        """``<file>: tensor '<gguf name>' (<hf name>)`` for error messages."""
        info = self._by_hf.get(name)
        return f"{self.path}: tensor '{info.name}' ({name})" if info else f"{self.path}: tensor '{name}'"

    # -- data -----------------------------------------------------------------------
    def _check(self, name: str, shape, allowed: Iterable[str]) -> TensorInfo:
        info = self._info(name)
        allowed = tuple(allowed)
        if info.type_name not in allowed:
            raise CheckpointError(f"{self.describe(name)} has GGML type {info.type_name}, expected one of {list(allowed)}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{self.describe(name)} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def _decode_float(self, info: TensorInfo, label: str) -> torch.Tensor:
        try:
            return decode_float(self.file.raw(info.name), info.type_name, info.shape)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor '{info.name}' ({label}): {e}") from e

    def _row_order(self, name: str, n_rows: int) -> torch.Tensor | None:
        if not self._permute:
            return None
        heads = llama_qk_heads(name, self.config["num_attention_heads"], self.config["num_key_value_heads"])
        if heads is None:
            return None
        try:
            return rows_from_gguf_order(n_rows, heads)
        except ValueError as e:
            raise CheckpointError(f"{self.describe(name)}: {e}") from e

    def get(self, name: str, *, shape: tuple[int, ...] | None = None, dtypes: Iterable[str] | None = None) -> torch.Tensor:
        """A float tensor (F32/F16/BF16/F64 as stored, block types such as Q8_0 dequantized to float32),
        in HF row order. ``dtypes`` filters by :meth:`dtype` (block types count as ``F32``)."""
        info = self._info(name)
        dense = is_dense_type(info.type_name)
        if dtypes is not None and dense and self.dtype(name) not in set(dtypes):
            dense = False
        if not dense:
            expected = sorted(set(dtypes)) if dtypes is not None else list(FLOAT_TYPES) + ["a block type like Q8_0"]
            raise CheckpointError(f"{self.describe(name)} has GGML type {info.type_name}, expected one of {expected}")
        self._check(name, shape, [info.type_name])
        self.read_names.add(name)
        tensor = self._decode_float(info, name)
        order = self._row_order(name, tensor.shape[0])
        return tensor if order is None else tensor[order].contiguous()

    def ternary(self, name: str, shape: tuple[int, int]) -> TernaryWeight:
        """Decode a TQ1_0 / TQ2_0 / I2_S weight of HF shape ``(N, K)`` (rows in HF order)."""
        info = self._check(name, shape, TERNARY_TYPES)
        self.read_names.add(name)
        try:
            weight = decode_ternary(self.file.raw(info.name), info.type_name, info.shape)
        except ValueError as e:
            raise CheckpointError(f"{self.describe(name)} ({info.type_name}): {e}") from e
        order = self._row_order(name, info.shape[0])
        return weight if order is None else weight.take_rows(order)
