"""The weight kernels compile for real GPUs (sm_80, sm_90) on this CPU-only machine, and the
decode kernel's main loop is what its design says (no shared-memory round trips, dp4a, 128-bit loads).

The interpreter tests check what the kernels compute; they cannot see whether ptxas accepts the
code (inline PTX, block shapes) or what the loop costs. ``benchmarks/kernel_sass.py`` compiles every
launch of the 2B4T survey through :mod:`bitserve.kernels.aot` in a subprocess (kernels must not be
interpreted there) and returns per-kernel SASS figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not importorskip: importing triton here, before the interpreter tests set TRITON_INTERPRET, would
# leave triton's own jit helpers (the tl.sum/tl.max combiners) compiled-only for the whole session
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[90, 80])
def survey(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / f"sm{request.param}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--quick",
                          "--arch", str(request.param), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return request.param, json.loads(out.read_text())


def test_every_weight_op_compiles_without_spills(survey):
    """Every launch compiles; on sm_90 (H100/H200, the GPUs bitserve is tuned for) none spills
    registers -- the first prefill configs did (255 registers and up to 536 B of stack per thread)."""
    arch, rows = survey
    assert {r["op"] for r in rows} == {"w2a8", "w2a8+norm", "w2a16", "binary", "dual", "int8head", "pointwise", "kv"}
    assert {r["kernel"] for r in rows if r["op"] == "pointwise"} == {
        "_rope_qk_kernel", "_act_and_mul_kernel", "_rmsnorm_kernel", "_layer_norm_parts_kernel"}
    assert {r["kernel"] for r in rows if r["op"] == "w2a8+norm"} == {"_rmsnorm_quantize_int8_kernel", "_w2a8_dp4a_kernel"}
    for r in rows:
        assert r["registers"] > 0, r
        if arch >= 90:
            assert r["local"] == 0, f"sm_{arch}: {r['kernel']} ({r['op']} {r['shape']} M={r['M']}) spills registers"


def test_kv_kernels_compile_for_every_cache_dtype(survey):
    """The KV-cache kernels (writes, decode with and without the split reduction, prefill; int-n
    with attention sinks and with pre-RoPE keys) compile at 2B4T's attention shapes, and on sm_90
    none spills: the pre-RoPE int-n prefill spilled 160 B per thread with 4 warps (now 8)."""
    arch, rows = survey
    kv = [r for r in rows if r["op"] == "kv"]
    assert {(r["shape"], r["path"]) for r in kv} >= {
        (dt, p) for dt in ("bf16", "int8", "int4", "int2") for p in ("write", "decode", "decode/split", "prefill")}
    assert {(r["shape"], r["path"]) for r in kv if r["shape"] in ("int4", "int2")} >= {
        ("int4", "decode/sinks"), ("int4", "prefill/rope"), ("int2", "decode/sinks"), ("int2", "prefill/rope")}
    kernels = {r["kernel"] for r in kv}
    assert kernels == {"_write_float_kernel", "_write_int8_kernel", "_write_v_intn_kernel", "_finalize_k_intn_kernel",
                       "_decode_kernel", "_reduce_kernel", "_prefill_kernel"}, kernels
    for r in kv:
        assert r["registers"] > 0, r
        if arch >= 90:
            assert r["local"] == 0, f"sm_{arch}: {r['kernel']} ({r['shape']} {r['path']}) spills registers"
    for r in kv:  # the attention loops run on tensor cores
        if r["kernel"] in ("_decode_kernel", "_prefill_kernel"):
            assert r["loop_mma"] > 0, r


def test_dp4a_decode_loop(survey):
    arch, rows = survey
    dp4a = [r for r in rows if r["kernel"] == "_w2a8_dp4a_kernel"]  # default plans and the bench's sweep configs
    assert {(r["shape"], r["M"]) for r in dp4a if r["path"] == "dp4a" and r["op"] == "w2a8"} == {
        ("qkv", 1), ("qkv", 8), ("gate_up", 1), ("gate_up", 8)}
    assert len({r["path"] for r in dp4a}) > 5
    for r in dp4a:
        what = f"sm_{arch} {r['shape']} M={r['M']} {r['path']}"
        assert r["loop_barriers"] == 0 and r["loop_shared"] == 0, f"{what}: the loop converts layouts through shared memory"
        assert r["loop_idp4a"] > 0, f"{what}: no IDP.4A in the loop"
        assert set(r["loop_loads"]) == {"LDG.E.128"}, f"{what}: loads {r['loop_loads']} are not all 128-bit"
        assert r["instr_per_weight_per_token"] < 1.0, f"{what}: {r['instr_per_weight_per_token']:.2f} instructions per weight"


def test_dp4a_is_leaner_than_the_first_gemv(survey):
    """The reason it exists: the byte-unpacking GEMV spends ~3.6 instructions and 16 barriers per
    loop on the same weights (docs/kernels.md)."""
    _, rows = survey
    by = {(r["kernel"], r["shape"], r["M"]): r for r in rows}
    for shape in ("qkv", "gate_up"):
        new = next(r for r in rows if r["kernel"] == "_w2a8_dp4a_kernel" and r["shape"] == shape and r["M"] == 1
                   and r["path"] == "dp4a")
        old = by[("_ternary_gemv_kernel", shape, 1)]
        assert new["instr_per_weight_per_token"] * 3 < old["instr_per_weight_per_token"]


def test_dp4a_default_tile_order_is_the_leaner_one(survey):
    """At M = 8 the dp4a GEMV's two tile orders compile differently (by Triton version: 3.6 and 3.7
    break a layout tie the other way); the default (tl_common.n_major_tiles) must be the leaner."""
    arch, rows = survey
    by = {r["path"]: r["loop_instructions"] for r in rows
          if r["kernel"] == "_w2a8_dp4a_kernel" and r["shape"] == "qkv" and r["M"] == 8}
    assert by["dp4a"] == min(by["dp4a/n-major"], by["dp4a/m-major"]), f"sm_{arch}: {by}"


def test_pdl_variant_compiles_with_grid_dependency_control(survey):
    """bench.py --sweep times the dp4a GEMV as a programmatic dependent launch: the quantization
    kernel lets it start early and it waits (griddepcontrol) before reading the activations."""
    arch, rows = survey
    pdl = {r["kernel"]: r for r in rows if r["path"] == "dp4a/pdl"}
    if arch < 90:
        assert not pdl, "griddepcontrol needs sm_90: no PDL launch below"
        return
    assert pdl["_w2a8_dp4a_kernel"]["pdl"] and pdl["_w2a8_dp4a_kernel"]["griddepcontrol"]
    assert pdl["_quantize_int8_kernel"]["griddepcontrol"] and not pdl["_quantize_int8_kernel"]["pdl"]
    plain = [r for r in rows if r["path"] == "dp4a" and r["M"] == 1]
    assert plain and not any(r["pdl"] or r["griddepcontrol"] for r in plain)


def test_float_activation_decode_loops(survey):
    """kernels/lowbit_decode.py: no shared memory in the loop, fewer instructions per weight than the
    tiled kernels at M=1 (which unpack every weight into a tensor-core operand)."""
    arch, rows = survey
    dec = {(r["op"], r["shape"]): r for r in rows if r["kernel"] == "_lowbit_gemv_kernel"}
    assert {op for op, _ in dec} == {"binary", "dual", "w2a16"}
    for (op, shape), r in dec.items():
        what = f"sm_{arch} {op} {shape}"
        assert r["loop_barriers"] == 0 and r["loop_shared"] == 0, f"{what}: shared-memory round trips in the loop"
        assert r["loop_loads"].get("LDG.E.128", 0) > 0, f"{what}: loads {r['loop_loads']}"
    tiled = {r["op"]: r for r in rows if r["kernel"] in ("_binary_kernel", "_dual_binary_kernel") and r["M"] == 1}
    assert dec[("binary", "gate_up")]["instr_per_weight_per_token"] * 2 < tiled["binary"]["instr_per_weight_per_token"]
    assert dec[("dual", "gate_up")]["instr_per_weight_per_token"] < tiled["dual"]["instr_per_weight_per_token"]


def test_wide_prefill_gemm_is_one_dot_per_step(survey):
    """kernels/ternary_prefill.py: one tensor-core dot per K step: fewer loop instructions than the
    four-dot GEMM at M = 512 (the default above ternary_prefill.MIN_M tokens), and on sm_90 fewer
    barriers and registers; at M = 32, where the four-dot GEMM stays the default, it compiles too."""
    arch, rows = survey
    gemm = [r for r in rows if r["kernel"] == "_ternary_gemm_kernel" and r["op"] == "w2a8"]
    wide = {r["M"]: r for r in gemm if r["path"] == "wide"}
    four = {r["M"]: r for r in gemm if r["path"] == "gemm"}
    assert set(wide) == {32, 512} and all(r["loop_mma"] > 0 for r in wide.values())
    assert wide[512]["loop_instructions"] < four[512]["loop_instructions"], (wide[512], four[512])
    if arch >= 90:  # wgmma takes the weight operand from shared memory: one staging per step instead of four
        assert wide[512]["loop_barriers"] < four[512]["loop_barriers"], (wide[512], four[512])
        assert wide[512]["registers"] < four[512]["registers"], (wide[512], four[512])


def test_binary_wide_prefill_gemm(survey):
    """kernels/binary_prefill.py (default above 32 tokens): eight bit slabs in one dot per step."""
    arch, rows = survey
    wide = next(r for r in rows if r["kernel"] == "_binary_kernel" and r["M"] == 512 and r["path"] == "wide")
    tiled = next(r for r in rows if r["kernel"] == "_binary_kernel" and r["M"] == 512 and r["path"] == "gemm")
    assert wide["loop_mma"] > 0
    assert wide["instr_per_weight_per_token"] < tiled["instr_per_weight_per_token"], (wide, tiled)
    if arch >= 90:
        assert wide["loop_barriers"] < tiled["loop_barriers"], (wide, tiled)
