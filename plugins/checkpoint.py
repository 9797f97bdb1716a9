"""Read tensors of a checkpoint folder without loading what is not asked for.

Supports a single ``model.safetensors``, sharded checkpoints with
``model.safetensors.index.json``, and any other ``*.safetensors`` files in the
folder. Every file is validated when the reader opens (header parses, tensor
byte ranges fit the file), so a truncated or corrupt file fails before any
weight is loaded. Errors name the file and tensor.

A folder without safetensors may hold PyTorch ``pytorch_model.bin`` files (or
the shards of ``pytorch_model.bin.index.json``), as ``save_pretrained`` writes
them with ``safe_serialization=False`` (OneBit, FBI-LLM). They are opened with
``torch.load(weights_only=True, mmap=True)`` (:mod:`bitserve.plugins.checkpoint_bin`);
dtypes are reported with the same safetensors strings (``'F32'``, ``'I8'``, ...).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from bitserve.plugins.checkpoint_bin import find_bin_files, load_bin_state, st_dtype_name


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match what is expected."""


_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raise CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {end} of the data section but the file holds "
                f"only {data_size} bytes (truncated file?)"
            )
        count = 1
        for d in info["shape"]:
            count *= d
        width = _ST_DTYPE_BYTES.get(info["dtype"])
        if width is not None and end - begin != count * width:
            raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes, expected {count * width}")
    return header


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face style checkpoint folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder does not exist")
        self._files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._bin_states: dict[Path, dict[str, torch.Tensor]] = {}  # memory-mapped .bin state dicts
        for file in self._files:
            for name, meta in self._file_entries(file):
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor '{name}' also appears in {self._where[name]}")
                self._where[name] = file
                self._meta[name] = meta
        self._handles: dict[Path, object] = {}

    def _file_entries(self, file: Path):
        """``(name, (dtype string, shape))`` of every tensor in one weight file."""
        if file.suffix == ".bin":
            state = self._bin_states[file] = load_bin_state(file, CheckpointError)
            return [(name, (st_dtype_name(t.dtype), tuple(t.shape))) for name, t in state.items()]
        return [(name, (info["dtype"], tuple(info["shape"])))
                for name, info in _read_safetensors_header(file).items() if name != "__metadata__"]

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from e
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: shard(s) listed but missing: {', '.join(missing)}")
            return files
        files = sorted(self.folder.glob("*.safetensors")) or find_bin_files(self.folder, CheckpointError)
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors (or pytorch_model*.bin) weight files found")
        return files

    # -- metadata -----------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> str:
        """safetensors dtype string ('U8', 'BF16', ...)."""
        return self._meta[self._require(name)][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._require(name)][1]

    def file_of(self, name: str) -> Path:
        return self._where[self._require(name)]

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Tensor bytes (headers excluded) of the given names, or of the whole checkpoint."""
        total = 0
        for name in self._where if names is None else names:
            dtype, shape = self._meta[name]
            count = 1
            for d in shape:
                count *= d
            total += count * _ST_DTYPE_BYTES.get(dtype, 1)
        return total

    # -- data ---------------------------------------------------------------------
    def _require(self, name: str) -> str:
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        return name

    def get(
        self,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtypes: Iterable[str] | None = None,
    ) -> torch.Tensor:
        """Load one tensor, checking its shape and safetensors dtype when given."""
        self._require(name)
        file = self._where[name]
        actual_dtype, actual_shape = self._meta[name]
        if dtypes is not None and actual_dtype not in set(dtypes):
            raise CheckpointError(
                f"{file}: tensor '{name}' has dtype {actual_dtype}, expected one of {sorted(set(dtypes))}"
            )
        if shape is not None and tuple(actual_shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(actual_shape)}, expected {list(shape)}")
        if file in self._bin_states:
            # a view into the mapped file: copy it out so the caller owns contiguous memory
            return self._bin_states[file][name].clone(memory_format=torch.contiguous_format)
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read tensor '{name}': {e}") from e
        # safetensors returns a view into a private mmap of the *whole* file: a kept
        # view would pin that mapping, so every page read while loading (e.g. the
        # packed bytes that get repacked) would stay resident next to the model's
        # own copies. Return a tensor that owns its memory.
        return tensor.clone()
