"""Shared Triton pieces of the weight kernels: activation quantization, split-K epilogue, launch helpers.

Imported only when a Triton kernel runs (never by ``import bitserve.kernels``). Whether Triton
interprets kernels on the CPU is decided when a ``@triton.jit`` function is defined, i.e. when a
kernel module is first imported: set ``TRITON_INTERPRET=1`` before that (the tests do).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# programs per SM that the split-K heuristics aim for (retune with bench.py's split sweep)
WAVES = 2
# columns per step of the activation quantization kernel
QUANT_BLOCK_K = 1024
# set to 1 to let Triton's autotuner pick launch configs at run time (slow first calls: every new
# shape and M bucket benchmarks all candidates); by default each wrapper uses fixed configs
# chosen from kernels/bench.py runs on an H100
AUTOTUNE_ENV = "BITSERVE_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def launch(kernel, grid, config: dict | None, args: tuple, meta: dict) -> None:
    """Run ``kernel`` (an autotuner or a jit function) with ``config`` (its tunables), or autotuned.

    A config whose pipelining needs more shared memory than the device has (fp32 activations
    with deep pipelines, say) is retried with fewer stages instead of failing.
    """
    if config is None:
        kernel[grid](*args, **meta)
        return
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner's jit function, or the jit function
    cfg = dict(config)
    while True:
        try:
            fn[grid](*args, **meta, **cfg)
            return
        except OutOfResources:
            if cfg.get("num_stages", 1) <= 1:
                raise
            cfg["num_stages"] -= 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 when interpreting, like an H100/H200)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pick_split_k(tiles: int, k_iters: int, device: torch.device, max_split: int = 16) -> int:
    """How many K slices so that ``tiles * split`` programs fill the GPU about ``WAVES`` times.

    ``k_iters`` is the number of K steps of the smallest block one split must keep (>= 1 each).
    """
    target = WAVES * sm_count(device)
    if tiles >= target or k_iters <= 1:
        return 1
    return int(max(1, min(max_split, k_iters, triton.cdiv(target, tiles))))


def rows_per_program(n: int, groups: int, device: torch.device, max_rows: int = 16) -> int:
    """Output rows per program of a decode GEMV (a power of two <= ``max_rows``): the most that still
    give ``n / rows * groups`` programs filling the GPU about ``WAVES`` times, down to one row (then
    the caller splits K)."""
    rows = max_rows
    while rows > 1 and triton.cdiv(n, rows) * groups < WAVES * sm_count(device):
        rows //= 2
    return rows


@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton in use."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def n_major_tiles() -> bool:
    """Whether the decode GEMVs should order their ``[tokens, rows, words]`` tiles rows first.

    Their operands are broadcast along tokens (weights) or rows (activations), so the pointers are
    equally contiguous along both, and Triton's coalescing breaks that tie by dimension order --
    before 3.7 the other way round. Only one order gives each thread several tokens of the same
    weight words (shared unpacking); the other gives it one token and several rows (~30% more
    loop instructions at M = 8 with Triton 3.6, ``benchmarks/kernel_sass.py``)."""
    return triton_version() < (3, 7)


def block_m_for(m: int) -> int:
    """BLOCK_M of the tiled (``tl.dot``) kernels for M tokens: 16, 32, 64 or 128."""
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


@dataclass(frozen=True)
class TiledPlan:
    """How a tiled kernel over ``[M, N]`` output tiles is launched."""

    tunables: dict | None  # the config for :func:`launch` (BLOCK_M is a kernel argument instead), None: autotune
    block_m: int
    split_k: int
    part: torch.Tensor | None  # split-K partials ``[split_k, M, N]`` (None without split)

    def grid(self, m: int, n: int):
        split = self.split_k
        return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)


def plan_tiled(m: int, n: int, config: dict | None, split_k: int | None, k_steps: int, max_split: int,
               device: torch.device, part_dtype: torch.dtype = torch.float32) -> TiledPlan:
    """BLOCK_M (from ``config`` or M), split-K (``pick_split_k`` over ``k_steps`` when not given,
    at most ``max_split``) and the split-K workspace of a tiled kernel."""
    block_m = (config or {}).get("BLOCK_M", block_m_for(m))
    tunables = None if config is None else {k: v for k, v in config.items() if k != "BLOCK_M"}
    if split_k is None:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, (config or {}).get("BLOCK_N", 128))
        split_k = pick_split_k(tiles, k_steps, device)
    split_k = max(1, min(split_k, max_split))
    part = workspace((split_k, m, n), part_dtype, device) if split_k > 1 else None
    return TiledPlan(tunables, block_m, split_k, part)


OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def output_buffer(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[M, N]`` output of a weight kernel: ``out`` after checking that the kernel can write it
    (shape, a float dtype, the device, unit column stride and rows that do not overlap: the kernels
    address it by its row stride only), or a new one of ``dtype``."""
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    if (tuple(out.shape) != (m, n) or out.dtype not in OUT_DTYPES or out.device != device
            or (n > 1 and out.stride(1) != 1) or (m > 1 and out.stride(0) < n)):
        raise ValueError(f"out must be a float32/float16/bfloat16 [{m}, {n}] tensor on {device} with contiguous rows, "
                         f"got {out.dtype} {tuple(out.shape)} strides {tuple(out.stride())} on {out.device}")
    return out


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (the kernels take only a row stride)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch a kernel fully overwrites (split-K partials ``[SPLIT_K, M, N]``, ``s_x``); tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def bucket(m: int) -> int:
    """Autotune key for M: the next power of two (at most 1024), so every M is not retuned."""
    return min(1024, triton.next_power_of_2(max(1, m)))


# -- programmatic dependent launch (sm_90+) ----------------------------------------------------------


@triton.jit
def grid_dependency_wait():
    """PTX ``griddepcontrol.wait``: block until the previous kernel in the stream has finished and
    its writes are visible (a no-op unless this kernel was launched with ``launch_pdl``)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_dependency_launch_dependents():
    """PTX ``griddepcontrol.launch_dependents``: a kernel launched after this one with PDL may start."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: a CUDA device of compute capability 9.0+ and a Triton whose
    launcher has the ``launch_pdl`` option. False when interpreting."""
    if device.type != "cuda" or interpreting():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and \
        torch.cuda.get_device_capability(device) >= (9, 0)


# -- per-token int8 activation quantization ---------------------------------------------------------


@triton.jit
def rne(v):
    """Round half to even (fp32, |v| <= 2**22) like torch.round: ``(v + 1.5*2**23) - 1.5*2**23``.

    On GPUs the compiler may fuse the product that produced ``v`` into the add (one rounding
    instead of two), which can move a result that lies within an ulp of a .5 tie by one.
    """
    return (v + 12582912.0) - 12582912.0


@triton.jit
def inv_times_127(amax, BLOCK: tl.constexpr):
    """``[BLOCK]`` copies of ``(1 / amax) * 127`` rounded like torch's ``127.0 / t`` (a reciprocal, then a product)."""
    return tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), tl.zeros([BLOCK], tl.float32) + amax) * 127.0


@triton.jit
def not_finite(v):
    """1 where ``v`` is NaN or +-inf, else 0 (int32)."""
    return tl.where(tl.abs(v) < float("inf"), 0, 1)


@triton.jit
def nan_if(flag, s):
    """``s``, or NaN where ``flag``: a row with a NaN or inf gets ``s_x = NaN``, so its outputs are NaN
    (as with the twin) instead of finite garbage (GPUs' max/min drop NaN)."""
    return tl.where(flag > 0, float("nan"), s)


@triton.jit
def int8_code(v):
    """``clamp(rne(v), -128, 127)``, 0 for NaN (a NaN row's codes; its ``s_x`` is NaN): converting NaN
    to an integer is undefined and its row sum could overflow."""
    q = tl.minimum(tl.maximum(rne(v), -128.0), 127.0)
    return tl.where(q == q, q, 0.0)


@triton.jit
def _quantize_int8_kernel(x_ptr, xq_ptr, sx_ptr, xsum_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                          WITH_SUM: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """Per-token absmax int8 (FORMATS.md §1.5).

    x: ``[M, K]`` fp16/bf16/fp32 (row stride ``stride_xm``, unit column stride); xq: ``int8[M, K]``;
    sx: ``float32[M]`` = ``127 / max(max|x[m]|, 1e-5)`` rounded as torch does (``(1 / a) * 127``).
    ``xq = clamp(rne(x * sx), -128, 127)``. WITH_SUM: also ``xsum[m] = sum(xq[m])`` (int32).
    LAUNCH_DEPENDENTS: let a kernel launched after this one with PDL start now (it waits for
    this kernel's results with :func:`grid_dependency_wait`). Grid: ``(M,)``.
    """
    if LAUNCH_DEPENDENTS:
        grid_dependency_launch_dependents()
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        bad = tl.maximum(bad, not_finite(v))
    amax_row = tl.maximum(tl.max(amax, axis=0), 1e-5)
    s = nan_if(tl.max(bad, axis=0), inv_times_127(amax_row, BLOCK_K))
    total = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = int8_code(v * s)
        tl.store(xq_ptr + m * stride_qm + k0 + offs, q.to(tl.int8), mask=mask)
        total += q.to(tl.int32)
    tl.store(sx_ptr + m + offs, s, mask=offs < 1)
    if WITH_SUM:
        tl.store(xsum_ptr + m + offs, tl.zeros([BLOCK_K], tl.int32) + tl.sum(total, axis=0), mask=offs < 1)


def quantize_int8(x: torch.Tensor, with_sum: bool = False, launch_dependents: bool = False):
    """Triton twin of :func:`bitserve.kernels.reference.quantize_activations_int8` for ``[M, K]``.

    Returns ``(x_q int8 [M, K], s_x float32 [M])``, and ``xsum int32 [M]`` (each row's sum of
    ``x_q``) after them when ``with_sum``.
    """
    m, k = x.shape
    xq = workspace((m, k), torch.int8, x.device)
    sx = workspace((m,), torch.float32, x.device)
    xsum = workspace((m,), torch.int32, x.device) if with_sum else None
    if m:
        block = min(QUANT_BLOCK_K, triton.next_power_of_2(k))
        _quantize_int8_kernel[(m,)](x, xq, sx, xsum if with_sum else sx, k, x.stride(0), xq.stride(0),
                                    BLOCK_K=block, WITH_SUM=with_sum, LAUNCH_DEPENDENTS=launch_dependents,
                                    num_warps=4)
    return (xq, sx, xsum) if with_sum else (xq, sx)


_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_to(v, KIND: tl.constexpr):
    """float32 ``v`` rounded to bf16 (1) / fp16 (2) and back, or unchanged (0)."""
    if KIND == 1:
        return v.to(tl.bfloat16).to(tl.float32)
    elif KIND == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _residual_row(x_row, res_row, k0, offs, K, HAS_RES: tl.constexpr, X_ROUND: tl.constexpr):
    """float32 ``x`` (``HAS_RES``: ``round_X(x + res)``, torch's ``x + res`` in x's dtype) at ``k0 + offs``."""
    mask = k0 + offs < K
    v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v = _round_to(v + tl.load(res_row + k0 + offs, mask=mask, other=0.0).to(tl.float32), X_ROUND)
    return v


@triton.jit
def _sum_of_squares_rsqrt(x_row, res_row, h_row, K, eps, BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr,
                          X_ROUND: tl.constexpr):
    """``1 / sqrt(sum(h^2) / K + eps)`` (correctly rounded, like torch on the CPU) of the row ``h``
    (``x``, or ``x + res``, which is then also stored to ``h_row``), broadcast to ``[BLOCK_K]``."""
    offs = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = _residual_row(x_row, res_row, k0, offs, K, HAS_RES, X_ROUND)
        if HAS_RES:
            tl.store(h_row + k0 + offs, v.to(h_row.dtype.element_ty), mask=k0 + offs < K)
        ss += v * v
    zeros = tl.zeros([BLOCK_K], tl.float32)
    ms = tl.math.div_rn(zeros + tl.sum(ss, axis=0), zeros + K)  # a plain "/" is div.full.f32 (2 ulp) on GPUs
    return tl.math.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), tl.math.sqrt_rn(ms + eps))


@triton.jit
def _rmsnorm_row(x_row, res_row, w_ptr, k0, offs, K, r, HAS_RES: tl.constexpr, X_ROUND: tl.constexpr,
                 Y_ROUND: tl.constexpr):
    mask = k0 + offs < K
    v = _residual_row(x_row, res_row, k0, offs, K, HAS_RES, X_ROUND)
    w = tl.load(w_ptr + k0 + offs, mask=mask, other=0.0).to(tl.float32)
    return _round_to(w * _round_to(v * r, X_ROUND), Y_ROUND), mask


@triton.jit
def _rmsnorm_quantize_int8_kernel(x_ptr, res_ptr, h_ptr, w_ptr, xq_ptr, sx_ptr, xsum_ptr, K, stride_xm, stride_rm,
                                  stride_hm, stride_qm, eps, HAS_RES: tl.constexpr, X_ROUND: tl.constexpr,
                                  Y_ROUND: tl.constexpr, BLOCK_K: tl.constexpr):
    """RMSNorm then per-token int8, one row per program: the quantization of
    :func:`bitserve.kernels.reference.rmsnorm` ``(x)`` without writing the normalised row.

    ``r = 1 / sqrt(sum(x^2) / K + eps)`` (correctly rounded, like torch on the CPU), ``y =
    round_Y(w * round_X(x * r))`` with X/Y the rounding of x's dtype and of the product's
    dtype; then ``xq``, ``sx``, ``xsum`` as :func:`_quantize_int8_kernel`. Three passes over the
    row (sum of squares, absmax, codes); the row is re-read from cache. HAS_RES: the row is
    ``x + res`` (rounded to x's dtype, every pass recomputes it), also stored to ``h``: the
    residual add before the norm in the same kernel. Grid: ``(M,)``.
    """
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m * stride_xm
    res_row = res_ptr + m * stride_rm
    r = _sum_of_squares_rsqrt(x_row, res_row, h_ptr + m * stride_hm, K, eps, BLOCK_K, HAS_RES, X_ROUND)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        y, mask = _rmsnorm_row(x_row, res_row, w_ptr, k0, offs, K, r, HAS_RES, X_ROUND, Y_ROUND)
        amax = tl.maximum(amax, tl.abs(y))
        bad = tl.maximum(bad, not_finite(y))
    s = nan_if(tl.max(bad, axis=0), inv_times_127(tl.maximum(tl.max(amax, axis=0), 1e-5), BLOCK_K))
    total = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        y, mask = _rmsnorm_row(x_row, res_row, w_ptr, k0, offs, K, r, HAS_RES, X_ROUND, Y_ROUND)
        q = int8_code(y * s)
        tl.store(xq_ptr + m * stride_qm + k0 + offs, q.to(tl.int8), mask=mask)
        total += q.to(tl.int32)
    tl.store(sx_ptr + m + offs, s, mask=offs < 1)
    tl.store(xsum_ptr + m + offs, tl.zeros([BLOCK_K], tl.int32) + tl.sum(total, axis=0), mask=offs < 1)


def check_residual(x: torch.Tensor, residual: torch.Tensor | None) -> None:
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"the residual must match x ({tuple(x.shape)}, {x.dtype}, unit column stride), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton twin of ``quantize_activations_int8(rmsnorm(x, weight, eps))`` for ``[M, K]``
    (:mod:`bitserve.kernels.reference`): ``(x_q int8 [M, K], s_x float32 [M], xsum int32 [M])``;
    with ``residual``, of ``h = x + residual`` (in x's dtype), and ``h`` is returned fourth."""
    m, k = x.shape
    if weight.shape != (k,):
        raise ValueError(f"norm weight must be [{k}], got {tuple(weight.shape)}")
    weight = weight.contiguous()  # read at unit stride
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if x.dtype not in _ROUNDING or out_dtype not in _ROUNDING:
        raise ValueError(f"rmsnorm_quantize_int8 takes float16/bfloat16/float32, got {x.dtype} and {weight.dtype}")
    check_residual(x, residual)
    xq = workspace((m, k), torch.int8, x.device)
    sx = workspace((m,), torch.float32, x.device)
    xsum = workspace((m,), torch.int32, x.device)
    h = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    if m:
        block = min(QUANT_BLOCK_K, triton.next_power_of_2(k))
        res, hh = (residual, h) if residual is not None else (x, x)
        _rmsnorm_quantize_int8_kernel[(m,)](x, res, hh, weight, xq, sx, xsum, k, x.stride(0), res.stride(0),
                                            hh.stride(0), xq.stride(0), float(eps), HAS_RES=residual is not None,
                                            X_ROUND=_ROUNDING[x.dtype], Y_ROUND=_ROUNDING[out_dtype],
                                            BLOCK_K=block, num_warps=4)
    return (xq, sx, xsum) if residual is None else (xq, sx, xsum, h)


# -- split-K epilogue ----------------------------------------------------------------------------------


@triton.jit
def store_tile(total, offs_m, offs_n, M, N, pid_k, out_ptr, stride_om, part_ptr, rowdiv_ptr, colmul_ptr, bias_ptr,
               HAS_ROWDIV: tl.constexpr, COLMUL: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):
    """Finish a ``[BM, BN]`` tile of accumulators (rows ``offs_m``, columns ``offs_n``).

    DIRECT: ``y = total / rowdiv[m] * colmul[n] + bias[n]`` -- each factor optional (COLMUL: 0
    none, 1 one scalar, 2 a vector ``[N]``), the division IEEE (``div_rn``) -- stored to ``out``
    (row stride ``stride_om``) in its dtype. Else the raw ``total`` goes to the split-K workspace
    ``part[pid_k, m, n]`` (``[SPLIT_K, M, N]`` contiguous) and :func:`splitk_epilogue` applies the
    same epilogue to the sum, so a result does not depend on the split beyond float summation.
    """
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        y = total.to(tl.float32)
        if HAS_ROWDIV:
            r = tl.load(rowdiv_ptr + offs_m, mask=m_mask, other=1.0)
            y = tl.math.div_rn(y, tl.broadcast_to(r[:, None], y.shape))
        if COLMUL == 1:
            y = y * tl.load(colmul_ptr)
        elif COLMUL == 2:
            y = y * tl.load(colmul_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :], total, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(part_ptr, out_ptr, rowdiv_ptr, colmul_ptr, bias_ptr, M, N, stride_om,
                            SPLIT_K, HAS_ROWDIV: tl.constexpr, COLMUL: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum split-K partials ``part [SPLIT_K, M, N]`` (int32 exact accumulators, or float32) and
    finish them with :func:`store_tile`. Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.load(part_ptr + idx, mask=mask, other=0)
    for s in range(1, SPLIT_K):
        acc += tl.load(part_ptr + (s * M).to(tl.int64) * N + idx, mask=mask, other=0)
    store_tile(acc, offs_m, offs_n, M, N, 0, out_ptr, stride_om, part_ptr, rowdiv_ptr, colmul_ptr, bias_ptr,
               HAS_ROWDIV, COLMUL, HAS_BIAS, True)


def splitk_epilogue(part: torch.Tensor, out: torch.Tensor, rowdiv: torch.Tensor | None,
                    colmul: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    split, m, n = part.shape
    colmul_kind = 0 if colmul is None else (1 if colmul.numel() == 1 else 2)
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 256))
    _splitk_epilogue_kernel[grid](
        part, out, rowdiv if rowdiv is not None else part, colmul if colmul is not None else part,
        bias if bias is not None else part, m, n, out.stride(0),
        SPLIT_K=split, HAS_ROWDIV=rowdiv is not None, COLMUL=colmul_kind, HAS_BIAS=bias is not None,
        BLOCK_M=16, BLOCK_N=256, num_warps=4,
    )


# -- float dot helpers ------------------------------------------------------------------------------


@triton.jit
def dot_f32x(x, w, acc, SPLIT_X: tl.constexpr):
    """``acc + x @ w`` for float32 ``x`` and bf16 ``w`` holding small exact values.

    SPLIT_X: x as bf16 ``hi + lo`` (two dots, ~16 significant bits); else x rounded to bf16 once
    (exact when x came from bf16 and was only scaled by powers of two).
    """
    hi = x.to(tl.bfloat16)
    acc = tl.dot(hi, w, acc)
    if SPLIT_X:
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(lo, w, acc)
    return acc


@triton.jit
def to_bf16(v):
    """Small integers (any int type) -> bf16, through float32 (exact below 256)."""
    return v.to(tl.float32).to(tl.bfloat16)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order (consecutive programs share weight tiles in L2)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m
