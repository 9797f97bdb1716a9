"""Write a converted checkpoint: safetensors shards of bounded size, the index, config and side files.

Everything is written into a hidden ``.<name>.partial`` folder next to the destination and moved
into place only when complete, so an interrupted conversion never leaves a loadable half model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
# files of a checkpoint folder that are weights (re-written, never copied)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_REWRITTEN = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def parse_size(size: str | int) -> int:
    """``"4GB"``, ``"500MiB"``, ``"2G"`` or a plain number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise ValueError(f"cannot read size {size!r} (examples: 4GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config, chat template, ...: every regular file that is not weights/config."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _REWRITTEN:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


class ShardWriter:
    """Collects tensors and writes ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.folder / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, name the files, write the index when sharded; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self.folder / "shard-00000.tmp").rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / fname)
            names.append(fname)
            weight_map.update({t: fname for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def staging_folder(dst: Path, overwrite: bool) -> Path:
    """A fresh hidden folder next to ``dst``; refuses an existing non-empty ``dst`` unless overwrite."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst}: folder exists and is not empty (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.parent / f".{dst.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(stage: Path, dst: Path) -> None:
    """Move the finished staging folder to ``dst`` (replacing it)."""
    if dst.exists():
        shutil.rmtree(dst)
    stage.rename(dst)
