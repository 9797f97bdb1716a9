"""Run bitserve's Triton kernels on the CPU: ``TRITON_INTERPRET=1`` plus interpreter fixes.

Triton decides at ``@triton.jit`` time whether a kernel is interpreted, so :func:`enable` must run
before any ``bitserve.kernels`` Triton module is imported (it reloads them if one already was).

Triton 3.7's interpreter stores bfloat16 as raw uint16 bits, but its ``tl.dot`` multiplies those
bits as integers, its integer -> bfloat16 cast writes the integer itself into the uint16 storage,
and its float32 -> bfloat16 cast truncates (GPUs round to nearest even). All three are wrong on
the interpreter only; :func:`enable` patches them so that bf16 dots compute
``float32(a) @ float32(b)`` -- what a GPU's bf16 MMA does with fp32 accumulation (products of bf16
values are exact in fp32) up to summation order -- and casts to bf16 round like the GPU's.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

KERNEL_MODULES = ("bitserve.kernels.tl_common", "bitserve.kernels.ternary_decode", "bitserve.kernels.lowbit_decode",
                  "bitserve.kernels.ternary_prefill", "bitserve.kernels.ternary", "bitserve.kernels.binary_prefill",
                  "bitserve.kernels.binary", "bitserve.kernels.int8_head", "bitserve.kernels.pointwise")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def enable() -> None:
    """No-op with CUDA; else interpret Triton on the CPU (fixing bf16 dots and int->bf16 casts)."""
    if on_gpu():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if not getattr(builder, "_bitserve_patched", False):
        create_dot = builder.create_dot
        cast_impl = builder.cast_impl

        def _as_f32(h):
            if h.dtype.scalar == tl.bfloat16:
                data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)
            return h

        def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return create_dot(self, _as_f32(a), _as_f32(b), d, input_precision, max_num_imprecise_acc)

        def to_bf16(src):
            f32 = _as_f32(src).data.astype(np.float32)
            bits = torch.from_numpy(np.ascontiguousarray(f32)).to(torch.bfloat16).view(torch.int16).numpy()
            return interp.TensorHandle(bits.view(np.uint16).reshape(f32.shape), tl.bfloat16)

        def patched_cast(self, src, dst_type):
            if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
                return to_bf16(src)
            return cast_impl(self, src, dst_type)

        def patched_fp_to_fp(self, src, dst_type, rounding_mode):
            if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
                return to_bf16(src)
            return fp_to_fp(self, src, dst_type, rounding_mode)

        fp_to_fp = builder.create_fp_to_fp
        builder.create_dot = patched_dot
        builder.cast_impl = patched_cast
        builder.create_fp_to_fp = patched_fp_to_fp
        builder._bitserve_patched = True
        _fix_index(interp)
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None and not _interpreted(module):
            importlib.reload(module)


def _fix_index(interp) -> None:
    """Triton 3.6's interpreter (the GPU machines' version; 3.7.1 fixed it) turns a scalar tensor into a
    Python int with ``int(array)``, which NumPy 2 refuses for the shape-(1,) arrays it holds: every
    ``range()`` over a loaded bound fails. Index through ``.item()`` instead (the pinned 3.7.1 needs
    nothing: this re-sets what it already does)."""
    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_bitserve_patched", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._bitserve_patched = True
    interp._patch_lang_tensor = patched


def _interpreted(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    for value in vars(module).values():
        fn = getattr(value, "fn", value)  # autotuner -> jit function
        if isinstance(fn, InterpretedFunction):
            return True
        if type(fn).__name__ == "JITFunction":
            return False
    return True
