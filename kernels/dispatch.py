"""Choose the implementation of each op for the tensors at hand.

Weight ops (what the plugins' QuantLinears call), and the model's element-wise steps (RoPE,
gated activation, RMSNorm, OneBit's output LayerNorm: ``rope_qk``, ``act_and_mul``, ``rmsnorm``,
``layer_norm_parts``):

- CUDA tensors -> the ``torch.ops.bitserve.*`` custom ops (:mod:`bitserve.kernels.ops`), which run
  the Triton kernels (GEMV for small M, tiled GEMM for prefill; see each kernel module) and are
  opaque to ``torch.compile`` / safe under CUDA graphs once autotuned (warm up every M bucket
  before capturing).
- CPU tensors -> the plain-torch twins directly (no custom-op overhead per call).
- ``with use_triton(True):`` forces the Triton path on any device (tests on CPU, with
  ``TRITON_INTERPRET=1`` set before the kernel modules are imported); ``use_triton(False)`` forces
  the twins, also on CUDA.

Nothing here imports Triton or touches a GPU at import time.
"""

from __future__ import annotations

import torch

from bitserve.kernels import ops, reference, reference_lowbit
from bitserve.kernels.ops import forced_backend, use_triton  # noqa: F401  (public API)


def _triton_forced() -> bool:
    return forced_backend() == "triton"


# torch.compile cannot trace a ContextVar: marked as torch.compiler.assume_constant_result marks a
# function (as torch marks its own), a compiled function takes the choice in force when it is
# compiled (``use_triton`` is a switch for tests and benchmarks, set around whole runs). Calling
# assume_constant_result itself would import torch._dynamo, and with it Triton, on import.
_triton_forced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _via_op(x: torch.Tensor) -> bool:
    # CUDA: always the custom op (it falls back to the twin inside use_triton(False)); CPU: only when forced
    return x.is_cuda or _triton_forced()


def ternary_linear_w2a8(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference.ternary_linear_w2a8` for the contract."""
    if _via_op(x):
        return ops.ternary_w2a8(x, packed, weight_scale.float(), bias)
    return reference.ternary_linear_w2a8(x, packed, weight_scale, bias)


def ternary_linear_w2a8_rmsnorm(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W2A8 linear of ``rmsnorm(x)``; see :func:`bitserve.kernels.reference.ternary_linear_w2a8_rmsnorm`."""
    if _via_op(x):
        return ops.ternary_w2a8_rmsnorm(x, norm_weight, float(eps), packed, weight_scale.float(), bias)
    return reference.ternary_linear_w2a8_rmsnorm(x, norm_weight, eps, packed, weight_scale, bias)


def ternary_linear_w2a8_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W2A8 linear of rmsnorm(x + residual), x + residual)``; see
    :func:`bitserve.kernels.reference.ternary_linear_w2a8_add_rmsnorm`."""
    if _via_op(x):
        return ops.ternary_w2a8_add_rmsnorm(x, residual, norm_weight, float(eps), packed, weight_scale.float(), bias)
    return reference.ternary_linear_w2a8_add_rmsnorm(x, residual, norm_weight, eps, packed, weight_scale, bias)


def ternary_linear_w2a16(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference_lowbit.ternary_linear_w2a16`."""
    if _via_op(x):
        return ops.ternary_w2a16(x, packed, weight_scale.float(), bias)
    return reference_lowbit.ternary_linear_w2a16(x, packed, weight_scale, bias)


def binary_linear_w1a16(
    x: torch.Tensor,
    packed: torch.Tensor,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    in_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference_lowbit.binary_linear_w1a16`."""
    if _via_op(x):
        return ops.binary_w1a16(x, packed, in_scale, out_scale, in_bias, bias)
    return reference_lowbit.binary_linear_w1a16(x, packed, in_scale, out_scale, in_bias, bias)


def dual_binary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha1: torch.Tensor,
    alpha2: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference_lowbit.dual_binary_linear`."""
    if _via_op(x):
        return ops.dual_binary(x, packed, alpha1, alpha2, group_size, bias)
    return reference_lowbit.dual_binary_linear(x, packed, alpha1, alpha2, group_size, bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference_lowbit.int8_linear` (the opt-in int8 LM head)."""
    if _via_op(x):
        return ops.int8_linear(x, weight, scale, bias, out_dtype)
    return reference_lowbit.int8_linear(x, weight, scale, bias, out_dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE of one layer's queries ``[T, H, D]`` and keys ``[T, KVH, D]`` (one kernel on
    CUDA, contiguous outputs); see :func:`bitserve.kernels.reference.rope_qk`."""
    if _via_op(q) and q.shape[-1] % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1:
        return ops.rope_qk(q, k, cos.contiguous(), sin.contiguous())
    return reference.rope_qk(q, k, cos, sin)


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` of the fused gate/up output ``[T, 2I]`` (one kernel on CUDA); see
    :func:`bitserve.kernels.reference.act_and_mul`."""
    if _via_op(x) and x.dim() == 2 and x.stride(-1) == 1:
        return ops.act_and_mul(x, act)
    return reference.act_and_mul(x, act)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (one kernel on CUDA); see :func:`bitserve.kernels.reference.rmsnorm`."""
    if _via_op(x) and x.dim() == 2 and x.stride(-1) == 1:
        return ops.rmsnorm(x, weight, float(eps))
    return reference.rmsnorm(x, weight, eps)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rmsnorm(x + residual), x + residual)``: the residual add and the norm in one kernel on
    CUDA; see :func:`bitserve.kernels.reference.add_rmsnorm`."""
    if _via_op(x) and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
        return ops.add_rmsnorm(x, residual, weight, float(eps))
    return reference.add_rmsnorm(x, residual, weight, eps)


def layer_norm_parts(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """OneBit's non-affine LayerNorm of each part of a fused output (one kernel on CUDA); see
    :func:`bitserve.kernels.reference.layer_norm_parts`."""
    if _via_op(x) and x.dim() == 2 and x.stride(-1) == 1:
        return ops.layer_norm_parts(x, [int(n) for n in sizes], float(eps))
    return reference.layer_norm_parts(x, sizes, eps)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """See :func:`bitserve.kernels.reference.write_kv_cache`."""
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> torch.Tensor:
    """See :func:`bitserve.kernels.reference.paged_attention`."""
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
