"""PyTorch ``.bin`` weight files: which ones a folder holds, and reading them safely.

Used by :class:`bitserve.plugins.checkpoint.CheckpointReader` only when a folder has no
safetensors. Files are found by the names ``save_pretrained(safe_serialization=False)`` writes
(``pytorch_model.bin``, or the shards listed in ``pytorch_model.bin.index.json``). Each file is
opened with ``torch.load(weights_only=True, mmap=True)``: the unpickler only rebuilds tensors and
plain containers (never runs code from the file), and tensor data stays in the mapped file until
a tensor is asked for. A file must hold a flat ``{name: tensor}`` state dict.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_PATTERN = "pytorch_model*.bin"

# torch dtype -> the safetensors dtype string the rest of the reader speaks
ST_DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def find_bin_files(folder: Path, error: type[Exception]) -> list[Path]:
    """The ``.bin`` weight files of ``folder`` (index first), or ``[]`` when there are none."""
    index = folder / BIN_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise error(f"{index}: malformed index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise error(f"{index}: malformed index ('weight_map' must map tensor names to file names)")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise error(f"{index}: shard(s) listed but missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob(BIN_PATTERN))


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    # a file in the legacy (pre zip) serialization cannot be mapped: read it whole, still weights-only
    return torch.load(path, map_location="cpu", weights_only=True)


def _unpickler_reason(e: Exception) -> str:
    """What the weights-only unpickler refused, without torch's advice to load with
    ``weights_only=False`` or to allowlist globals (either would run the file's code)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
    reason = (detail or lines or ["unsupported content"])[0]
    return reason.split("WeightsUnpickler error:", 1)[-1].split(" Please ", 1)[0].strip()


def load_bin_state(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Open one ``.bin`` state dict (weights only, memory-mapped); raise ``error`` naming the file."""
    try:
        state = _torch_load(path)
    except pickle.UnpicklingError as e:
        raise error(f"{path}: refused to unpickle: the file holds objects other than tensors (bitserve reads "
                    f"plain state dicts of tensors only and never runs pickled code): {_unpickler_reason(e)}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise error(f"{path}: cannot read PyTorch weight file (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict):
        raise error(f"{path}: expected a state dict of tensors, found a {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise error(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor "
                        "(a flat state dict of name -> tensor)")
    return state


def st_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string (``'F32'``, ``'I8'``, ...) of a torch dtype."""
    return ST_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
