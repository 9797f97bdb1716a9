"""Low-bit linear-algebra ops for bitserve.

Each op has a plain-torch twin in :mod:`bitserve.kernels.reference`; Triton
implementations (GPU) are selected by :mod:`bitserve.kernels.dispatch`.
Nothing here touches a GPU at import time.
"""

from bitserve.kernels.dispatch import (
    binary_linear_w1a16,
    dual_binary_linear,
    int8_linear,
    ternary_linear_w2a16,
    ternary_linear_w2a8,
    use_triton,
)
from bitserve.kernels.packing import (
    pack_ternary,
    unpack_ternary,
    hf_unpack_ternary,
    hf_pack_ternary,
    hf_to_kernel_layout,
)
from bitserve.kernels.reference import quantize_activations_int8

__all__ = [
    "ternary_linear_w2a8",
    "ternary_linear_w2a16",
    "binary_linear_w1a16",
    "dual_binary_linear",
    "int8_linear",
    "use_triton",
    "pack_ternary",
    "unpack_ternary",
    "hf_pack_ternary",
    "hf_unpack_ternary",
    "hf_to_kernel_layout",
    "quantize_activations_int8",
]
