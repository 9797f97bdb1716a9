"""Open a GGUF file: metadata, tensor table and raw tensor bytes, validated once at open.

The header and key/value metadata are parsed by the ``gguf`` library's ``GGUFReader``; its tensor
table step is replaced (``_build_tensors``) because the library maps every type id through its own
enum and multiplies by ``type_size``, which fails for bitnet.cpp's I2_S (type id 36, fork-only, whose
data is ``N*K/4 + 32`` bytes despite ``type_size = 1``; FORMATS.md §2.4). Byte sizes are computed here,
and every tensor's byte range is checked against the file size before anything is read, so a
truncated file fails at open with the file and tensor named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from bitserve.plugins.checkpoint import CheckpointError

I2_S_TYPE_ID = 36  # bitnet.cpp's fork; upstream used 36 for the removed IQ4_NL_4_4 (FORMATS.md §2)
I2_S_TAIL_BYTES = 32
# architectures whose files may carry I2_S (bitnet.cpp converts all three; FORMATS.md §2.6)
I2_S_ARCHITECTURES = ("bitnet", "bitnet-b1.58", "bitnet-25")
# bitnet.cpp's other ids, which collide with upstream ones (39 is upstream MXFP4): in its own
# architectures they are its lookup-table layouts, tied to its CPU kernels (FORMATS.md §2, §2.5)
BITNET_CPP_TYPES = {37: "I8_S", 38: "TL1", 39: "TL2"}
BITNET_CPP_ARCHITECTURES = ("bitnet-b1.58", "bitnet-25")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    type_name: str  # "F32", "TQ2_0", "I2_S", ...
    shape: tuple[int, ...]  # PyTorch order: (N, K) for a GGUF tensor of ne = {K, N}
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count


class _TableReader(GGUFReader):
    """GGUFReader that records the raw tensor table instead of building typed numpy views.

    ``_get`` reads through a plain ndarray view of the memory map: the library's own version slices
    the ``np.memmap`` subclass, whose per-slice bookkeeping makes a 128k-token vocabulary take
    seconds to parse (same bytes, same byte order handling).
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        itemsize = int(np.empty([], dtype=dtype).itemsize)
        arr = plain[offset : offset + itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs: int, fields) -> None:  # noqa: D401 (library hook)
        self.raw_table = []
        for field in fields:
            _len, name_data, _ndims, dims, raw_type, rel_offset = field.parts
            name = bytes(name_data).decode("utf-8")
            ne = tuple(int(d) for d in dims)
            self.raw_table.append((name, int(raw_type[0]), ne, int(start_offs) + int(rel_offset[0])))
        self.tensors = []


def _field_value(field) -> Any:
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
        return list(value)
    return value


class GGUFFile:
    """One parsed GGUF file. ``meta`` holds every key/value (python values), ``tensors`` the table."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file does not exist")
        size = self.path.stat().st_size
        try:
            reader = _TableReader(str(self.path), "r")
        except Exception as e:  # the library raises ValueError/IndexError/KeyError/... on damaged headers
            raise CheckpointError(f"{self.path}: not a readable GGUF file (truncated or corrupt header?): "
                                  f"{type(e).__name__}: {e}") from e
        self.data: np.memmap = reader.data
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        try:
            self.meta: dict[str, Any] = {
                key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")
            }
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: unreadable GGUF metadata value: {e}") from e
        self.architecture = str(self.meta.get("general.architecture", ""))
        self.tensors: dict[str, TensorInfo] = {}
        for name, type_id, ne, offset in reader.raw_table:
            info = self._tensor_info(name, type_id, ne, offset)
            if info.offset + info.nbytes > size:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' ({info.type_name}, {info.nbytes} bytes at offset {info.offset}) "
                    f"ends past the end of the file ({size} bytes; truncated file?)"
                )
            self.tensors[name] = info
        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            if a.offset + a.nbytes > b.offset:
                raise CheckpointError(
                    f"{self.path}: tensor '{a.name}' ({a.type_name}, {a.nbytes} bytes) overlaps tensor '{b.name}' "
                    "(wrong type id or corrupt tensor table?)"
                )

    def _tensor_info(self, name: str, type_id: int, ne: tuple[int, ...], offset: int) -> TensorInfo:
        shape = tuple(reversed(ne))
        numel = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if type_id == I2_S_TYPE_ID and self.architecture in I2_S_ARCHITECTURES:
            if numel % 128:
                raise CheckpointError(f"{self.path}: tensor '{name}' is I2_S with {numel} elements "
                                      "(not a multiple of the 128-element block)")
            return TensorInfo(name, type_id, "I2_S", shape, offset, numel // 4 + I2_S_TAIL_BYTES)
        if type_id in BITNET_CPP_TYPES and self.architecture in BITNET_CPP_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has bitnet.cpp type {BITNET_CPP_TYPES[type_id]} (id {type_id}), a "
                "layout tied to bitnet.cpp's CPU kernels that bitserve does not read; use the I2_S / TQ1_0 / TQ2_0 "
                "GGUF or the Hugging Face checkpoint of the model")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            hint = (" (I2_S in bitnet.cpp files of a bitnet architecture)" if type_id == I2_S_TYPE_ID else
                    f" (bitnet.cpp's {BITNET_CPP_TYPES[type_id]}?)" if type_id in BITNET_CPP_TYPES else "")
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has unknown GGML type id {type_id}{hint} "
                f"in a file of architecture '{self.architecture}'"
            ) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if not ne or ne[0] % block:
            raise CheckpointError(f"{self.path}: tensor '{name}' of type {qtype.name} has row length "
                                  f"{ne[0] if ne else 0}, not a multiple of its block size {block}")
        return TensorInfo(name, type_id, qtype.name, shape, offset, numel // block * type_size)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a read-only view into the memory-mapped file)."""
        info = self.tensors[name]
        return self.data[info.offset : info.offset + info.nbytes]

    def value(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)
