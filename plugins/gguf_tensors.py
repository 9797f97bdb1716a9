"""Decode GGUF tensor bytes: float types to torch tensors, ternary types to the kernel layout.

- F32 / F16 / BF16 / F64 are copied as stored. Block types (Q8_0, and the others ``gguf.quants``
  can dequantize: Q4_0 ... Q6_K, IQ*, e.g. the Q4_K embedding llama-quantize gives TQ models)
  are dequantized to float32 once, with ``gguf.quants``: embeddings, norms and non-ternary
  linears are dense in bitserve, so an int8/int4 copy would buy nothing but another code path.
- TQ1_0 / TQ2_0 carry one fp16 ``d`` per 256-weight block; BitNet converters write the same
  ``d`` (the tensor's scale) into every block that has a non-zero weight and 0 into all-zero
  blocks (FORMATS.md §2.3). Such rows become ternary kernel-layout rows with one multiplier
  each, which is exact. Rows whose non-zero blocks carry different ``d`` (a TQ file quantized
  from ordinary float weights) are returned dense instead.
- I2_S: 2-bit codes in 128-element blocks, MSB = first 32-group, one float32 scale at byte
  ``N*K/4`` (FORMATS.md §2.4), via :mod:`bitserve.kernels.ondisk`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from bitserve.kernels.ondisk import QK, i2_s_unpack, tq1_0_unpack, tq2_0_unpack
from bitserve.kernels.packing import pack_ternary, unpack_ternary

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "I2_S")
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")


def is_dense_type(type_name: str) -> bool:
    """Stored as float, or a block type read dequantized (anything but ternary and integer types)."""
    if type_name in FLOAT_TYPES:
        return True
    if type_name in TERNARY_TYPES or type_name in _INTEGER_TYPES:
        return False
    return type_name in GGMLQuantizationType.__members__ and _has_dequantizer(type_name)


@functools.cache
def _has_dequantizer(type_name: str) -> bool:
    qtype = GGMLQuantizationType[type_name]
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True
_NUMPY_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_ROWS = 1024  # rows decoded at a time


def decode_float(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor of ``shape`` (PyTorch order) from its GGUF bytes."""
    if type_name in _NUMPY_FLOATS:
        return torch.from_numpy(np.array(raw).view(_NUMPY_FLOATS[type_name]).reshape(shape))
    if type_name == "BF16":
        return torch.from_numpy(np.array(raw).view(np.int16).reshape(shape)).view(torch.bfloat16)
    if is_dense_type(type_name):
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        blocks = np.asarray(raw).reshape(rows, -1)
        values = quants.dequantize(blocks, GGMLQuantizationType[type_name])
        return torch.from_numpy(values.reshape(shape).astype(np.float32))
    raise ValueError(f"GGML type {type_name} is neither a float type nor a block type gguf.quants dequantizes")


@dataclass
class TernaryWeight:
    """A decoded ternary tensor: kernel-layout rows with one multiplier each, or a dense fallback."""

    packed: torch.Tensor | None  # uint8 [N, K/4] (kernel layout)
    row_scale: torch.Tensor | None  # float32 [N]
    dense: torch.Tensor | None  # float32 [N, K], only when block scales differ within a row

    def take_rows(self, index: torch.Tensor) -> "TernaryWeight":
        pick = (lambda t: None if t is None else t[index].contiguous())
        return TernaryWeight(pick(self.packed), pick(self.row_scale), pick(self.dense))

    def scaled(self, factor: float) -> "TernaryWeight":
        if self.dense is not None:
            return TernaryWeight(None, None, self.dense * factor)
        return TernaryWeight(self.packed, self.row_scale * factor, None)

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        return unpack_ternary(self.packed, torch.float32) * self.row_scale.unsqueeze(1)


def _decode_tq(raw: np.ndarray, type_name: str, n: int, k: int) -> TernaryWeight:
    unpack = {"TQ2_0": tq2_0_unpack, "TQ1_0": tq1_0_unpack}[type_name]
    data = torch.from_numpy(np.array(raw).reshape(n, -1))
    packed, scales, block_d, uniform = [], [], [], True
    for start in range(0, n, _ROWS):
        t, d = unpack(data[start : start + _ROWS])  # int8 [r, K], float32 [r, K/256]
        if not torch.isfinite(d).all():
            raise ValueError("a block scale d is NaN or Inf")
        blocks = t.view(t.shape[0], -1, QK)
        blocks[d == 0] = 0  # a block with d = 0 holds zeros whatever its codes say
        nonzero = blocks.ne(0).any(-1)
        hi = torch.where(nonzero, d, torch.full_like(d, -torch.inf)).amax(1)
        lo = torch.where(nonzero, d, torch.full_like(d, torch.inf)).amin(1)
        has = nonzero.any(1)
        uniform = uniform and bool(((hi == lo) | ~has).all())
        packed.append(pack_ternary(t))
        scales.append(torch.where(has, hi, torch.zeros_like(hi)))
        block_d.append(d)
    packed_t = torch.cat(packed)
    if uniform:
        return TernaryWeight(packed_t, torch.cat(scales), None)
    d_all = torch.cat(block_d).repeat_interleave(QK, dim=1)
    return TernaryWeight(None, None, unpack_ternary(packed_t, torch.float32) * d_all)


def _decode_i2_s(raw: np.ndarray, n: int, k: int) -> TernaryWeight:
    t, scale = i2_s_unpack(torch.from_numpy(np.array(raw)), n, k)
    if not np.isfinite(scale):
        raise ValueError(f"the I2_S scale in the tensor tail is {scale}")
    packed = torch.cat([pack_ternary(t[a : a + _ROWS]) for a in range(0, n, _ROWS)])
    return TernaryWeight(packed, torch.full((n,), scale, dtype=torch.float32), None)


def decode_ternary(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> TernaryWeight:
    """Decode a 2-D TQ1_0 / TQ2_0 / I2_S tensor of PyTorch shape ``(N, K)``."""
    if len(shape) != 2:
        raise ValueError(f"a ternary linear weight must be 2-D, got shape {list(shape)}")
    n, k = shape
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4 (kernel layout)")
    if type_name in ("TQ1_0", "TQ2_0"):
        return _decode_tq(raw, type_name, n, k)
    if type_name == "I2_S":
        return _decode_i2_s(raw, n, k)
    raise ValueError(f"GGML type {type_name} is not a ternary type ({', '.join(TERNARY_TYPES)})")
