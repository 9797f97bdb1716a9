"""The weight ops as torch custom ops (``torch.ops.bitserve.*``), so models compile and graph-capture.

Each op has a fake (meta) implementation for ``torch.compile`` and an eager implementation that
runs the Triton kernel (CUDA tensors, or any tensor inside ``use_triton(True)`` -- the CPU then
needs ``TRITON_INTERPRET=1``) or the plain-torch twin (CPU, or inside ``use_triton(False)``).
Importing this module registers the ops and touches no GPU; Triton is imported on first use.

| op | arguments | twin |
|---|---|---|
| ``bitserve::ternary_w2a8`` | x, packed u8[N,K/4], weight_scale f32[1/N], bias? | ``reference.ternary_linear_w2a8`` |
| ``bitserve::ternary_w2a16`` | same | ``reference_lowbit.ternary_linear_w2a16`` |
| ``bitserve::ternary_w2a8_rmsnorm`` | x, norm_weight, eps, packed, weight_scale, bias? | ``reference.ternary_linear_w2a8_rmsnorm`` |
| ``bitserve::ternary_w2a8_add_rmsnorm`` | x, residual, norm_weight, eps, packed, weight_scale, bias? -> (y, x + residual) | ``reference.ternary_linear_w2a8_add_rmsnorm`` |
| ``bitserve::binary_w1a16`` | x, packed u8[N,K/8], in_scale?[K], out_scale?[N], in_bias?[K], bias? | ``reference_lowbit.binary_linear_w1a16`` |
| ``bitserve::dual_binary`` | x, packed u8[N,K/4], alpha1/alpha2 [N,K/G], group_size, bias? | ``reference_lowbit.dual_binary_linear`` |
| ``bitserve::int8_linear`` | x, weight i8[N,K], scale f32[1/N], bias?, out_dtype? | ``reference_lowbit.int8_linear`` |

All map ``x [..., K]`` to ``[..., N]`` (x's dtype unless ``out_dtype``). The decoder's element-wise
steps between them (:mod:`bitserve.kernels.pointwise`) are ops too:

| op | arguments | twin |
|---|---|---|
| ``bitserve::rope_qk`` | q [T,H,D], k [T,KVH,D], cos/sin [T,D] -> (q, k) | ``reference.rope_qk`` |
| ``bitserve::act_and_mul`` | x [T,2I], act name -> [T,I] | ``reference.act_and_mul`` |
| ``bitserve::rmsnorm`` | x [T,K], weight [K], eps | ``reference.rmsnorm`` |
| ``bitserve::add_rmsnorm`` | x [T,K], residual [T,K], weight [K], eps -> (norm, x + residual) | ``reference.add_rmsnorm`` |
| ``bitserve::layer_norm_parts`` | x [T,N], part sizes, eps | ``reference.layer_norm_parts`` |
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from typing import Iterator, Optional

import torch
from torch import Tensor

from bitserve.kernels import reference, reference_lowbit

_BACKEND: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("bitserve_kernel_backend", default=None)


@contextlib.contextmanager
def use_triton(enabled: bool = True) -> Iterator[None]:
    """Within the block, run the ops on Triton (True; on the CPU that needs ``TRITON_INTERPRET=1``)
    or on the plain-torch twins (False), whatever the device. Scoped to the current context."""
    token = _BACKEND.set("triton" if enabled else "reference")
    try:
        yield
    finally:
        _BACKEND.reset(token)


def forced_backend() -> Optional[str]:
    """``"triton"``/``"reference"`` inside :func:`use_triton`, else None (choose by device)."""
    return _BACKEND.get()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton_for(x: Tensor) -> bool:
    """The backend rule: forced choice if any, else Triton exactly for CUDA tensors (when installed)."""
    forced = _BACKEND.get()
    if forced is not None:
        return forced == "triton"
    return x.is_cuda and triton_available()


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _out_shape(x: Tensor, n: int) -> list[int]:
    return [*x.shape[:-1], n]


# -- ternary ----------------------------------------------------------------------------------------
@torch.library.custom_op("bitserve::ternary_w2a8", mutates_args=())
def ternary_w2a8(x: Tensor, packed: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import ternary

        y = ternary.ternary_linear(_flat(x), packed, weight_scale, bias, act_int8=True)
        return y.reshape(_out_shape(x, packed.shape[0]))
    return reference.ternary_linear_w2a8(x, packed, weight_scale, bias)


@torch.library.custom_op("bitserve::ternary_w2a16", mutates_args=())
def ternary_w2a16(x: Tensor, packed: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import ternary

        y = ternary.ternary_linear(_flat(x), packed, weight_scale, bias, act_int8=False)
        return y.reshape(_out_shape(x, packed.shape[0]))
    return reference_lowbit.ternary_linear_w2a16(x, packed, weight_scale, bias)


@ternary_w2a8.register_fake
def _(x, packed, weight_scale, bias=None):
    return x.new_empty(_out_shape(x, packed.shape[0]))


@ternary_w2a16.register_fake
def _(x, packed, weight_scale, bias=None):
    return x.new_empty(_out_shape(x, packed.shape[0]))


@torch.library.custom_op("bitserve::ternary_w2a8_rmsnorm", mutates_args=())
def ternary_w2a8_rmsnorm(x: Tensor, norm_weight: Tensor, eps: float, packed: Tensor, weight_scale: Tensor,
                         bias: Optional[Tensor] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import ternary

        y = ternary.ternary_linear_rmsnorm(_flat(x), norm_weight, eps, packed, weight_scale, bias)
        return y.reshape(_out_shape(x, packed.shape[0]))
    return reference.ternary_linear_w2a8_rmsnorm(x, norm_weight, eps, packed, weight_scale, bias)


@ternary_w2a8_rmsnorm.register_fake
def _(x, norm_weight, eps, packed, weight_scale, bias=None):
    return x.new_empty(_out_shape(x, packed.shape[0]), dtype=torch.promote_types(norm_weight.dtype, x.dtype))


@torch.library.custom_op("bitserve::ternary_w2a8_add_rmsnorm", mutates_args=())
def ternary_w2a8_add_rmsnorm(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, packed: Tensor,
                             weight_scale: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    _check_residual(x, residual)
    if use_triton_for(x):
        from bitserve.kernels import ternary

        y, h = ternary.ternary_linear_rmsnorm(_flat(x), norm_weight, eps, packed, weight_scale, bias,
                                              residual=_flat(residual))
        return y.reshape(_out_shape(x, packed.shape[0])), h.reshape(x.shape)
    y, h = reference.ternary_linear_w2a8_add_rmsnorm(x, residual, norm_weight, eps, packed, weight_scale, bias)
    return y.contiguous(), h.contiguous()  # the fake's layout, whatever x's strides


@ternary_w2a8_add_rmsnorm.register_fake
def _(x, residual, norm_weight, eps, packed, weight_scale, bias=None):
    y = x.new_empty(_out_shape(x, packed.shape[0]), dtype=torch.promote_types(norm_weight.dtype, x.dtype))
    return y, x.new_empty(x.shape)


def _check_residual(x: Tensor, residual: Tensor) -> None:
    """``x + residual`` ops take both in one dtype and shape (the Triton kernels add them as
    stored; the fakes promise x's dtype for the sum)."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                         f"{tuple(residual.shape)}")


# -- binary / dual-binary ----------------------------------------------------------------------------
@torch.library.custom_op("bitserve::binary_w1a16", mutates_args=())
def binary_w1a16(x: Tensor, packed: Tensor, in_scale: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                 in_bias: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import binary

        y = binary.binary_linear(_flat(x), packed, in_scale, out_scale, in_bias, bias)
        return y.reshape(_out_shape(x, packed.shape[0]))
    return reference_lowbit.binary_linear_w1a16(x, packed, in_scale, out_scale, in_bias, bias)


@binary_w1a16.register_fake
def _(x, packed, in_scale=None, out_scale=None, in_bias=None, bias=None):
    return x.new_empty(_out_shape(x, packed.shape[0]))


@torch.library.custom_op("bitserve::dual_binary", mutates_args=())
def dual_binary(x: Tensor, packed: Tensor, alpha1: Tensor, alpha2: Tensor, group_size: int,
                bias: Optional[Tensor] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import binary

        y = binary.dual_binary_linear(_flat(x), packed, alpha1, alpha2, group_size, bias)
        return y.reshape(_out_shape(x, packed.shape[0]))
    return reference_lowbit.dual_binary_linear(x, packed, alpha1, alpha2, group_size, bias)


@dual_binary.register_fake
def _(x, packed, alpha1, alpha2, group_size, bias=None):
    return x.new_empty(_out_shape(x, packed.shape[0]))


# -- int8 (LM head) ----------------------------------------------------------------------------------
@torch.library.custom_op("bitserve::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import int8_head

        y = int8_head.int8_linear(_flat(x), weight, scale, bias, out_dtype=out_dtype)
        return y.reshape(_out_shape(x, weight.shape[0]))
    return reference_lowbit.int8_linear(x, weight, scale, bias, out_dtype)


@int8_linear.register_fake
def _(x, weight, scale, bias=None, out_dtype=None):
    return x.new_empty(_out_shape(x, weight.shape[0]), dtype=out_dtype or x.dtype)


# -- element-wise steps of the decoder ---------------------------------------------------------------
@torch.library.custom_op("bitserve::rope_qk", mutates_args=())
def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton_for(q):
        from bitserve.kernels import pointwise

        return pointwise.rope_qk(q, k, cos, sin)
    return reference.rope_qk(q, k, cos, sin)


@rope_qk.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("bitserve::act_and_mul", mutates_args=())
def act_and_mul(x: Tensor, act: str) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import pointwise

        return pointwise.act_and_mul(x, act)
    return reference.act_and_mul(x, act).contiguous()


@act_and_mul.register_fake
def _(x, act):
    return x.new_empty([*x.shape[:-1], x.shape[-1] // 2])


@torch.library.custom_op("bitserve::rmsnorm", mutates_args=())
def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import pointwise

        return pointwise.rmsnorm(x, weight, eps)
    return reference.rmsnorm(x, weight, eps).contiguous()


@rmsnorm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("bitserve::add_rmsnorm", mutates_args=())
def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_residual(x, residual)
    if use_triton_for(x):
        from bitserve.kernels import pointwise

        return pointwise.rmsnorm(x, weight, eps, residual)
    y, h = reference.add_rmsnorm(x, residual, weight, eps)
    return y.contiguous(), h.contiguous()


@add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape)


@torch.library.custom_op("bitserve::layer_norm_parts", mutates_args=())
def layer_norm_parts(x: Tensor, sizes: list[int], eps: float) -> Tensor:
    if use_triton_for(x):
        from bitserve.kernels import pointwise

        return pointwise.layer_norm_parts(x, sizes, eps)
    return reference.layer_norm_parts(x, sizes, eps)


@layer_norm_parts.register_fake
def _(x, sizes, eps):
    return x.new_empty(x.shape)
