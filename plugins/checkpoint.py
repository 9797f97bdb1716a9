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


def read_json_object(path: Path) -> dict:
    """A JSON file whose top level is an object (config.json, an index, a sidecar); CheckpointError
    naming the file when it is missing, unreadable, not UTF-8, malformed or not an object."""
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, found {type(value).__name__}")
    return value


def require_finite(tensor: torch.Tensor, where: str, chunk: int = 1 << 22) -> torch.Tensor:
    """``tensor`` if it holds no NaN or Inf, else CheckpointError ``<where> contains NaN or Inf``
    (checked in chunks: on a whole bf16 embedding ``isfinite``'s temporaries reach ~2.4x the tensor)."""
    flat = tensor.reshape(-1)
    if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
        raise CheckpointError(f"{where} contains NaN or Inf")
    return tensor


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
                raise CheckpointError(f"{path}: not a safetensors file, or a truncated one (its first 8 bytes give a "
                                      f"header of {header_len} bytes; the file has {size})")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets))
                or offsets[0] > offsets[1] or not isinstance(shape, list) or not all(map(_is_index, shape))
                or not isinstance(info.get("dtype"), str)):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}': {info!r}"[:400])
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {end} of the data section but the file holds "
                f"only {data_size} bytes (truncated file?)"
            )
        count = 1
        for d in shape:
            count *= d
        width = _ST_DTYPE_BYTES.get(info["dtype"])
        if width is not None and end - begin != count * width:
            raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes, expected {count * width}")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors '{a}' and '{b}' overlap")
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
        self.read_names: set[str] = set()  # every tensor get() returned (the loader reports the rest)

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
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: malformed index ('weight_map' must map tensor names to file names)")
            files = sorted({self.folder / f for f in weight_map.values()})
            outside = [str(f) for f in files if not f.resolve().is_relative_to(self.folder.resolve())]
            if outside:  # ("../x", "/etc/..."): a checkpoint reads only its own folder
                raise CheckpointError(f"{index}: shard(s) outside the checkpoint folder: {', '.join(outside)}")
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
        self.read_names.add(name)
        if file in self._bin_states:
            # a view into the mapped file: copy it out so the caller owns contiguous memory
            return self._bin_states[file][name].clone(memory_format=torch.contiguous_format)
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt")
            tensor = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read tensor '{name}': {e}") from e
        # safetensors returns a view into a private mmap of the *whole* file: a kept
        # view would pin that mapping, so every page read while loading (e.g. the
        # packed bytes that get repacked) would stay resident next to the model's
        # own copies. Return a tensor that owns its memory.
        return tensor.clone()
