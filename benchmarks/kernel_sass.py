#!/usr/bin/env python
"""What each weight kernel (and the element-wise and KV-cache kernels between them) compiles to on a real GPU, without one: a static survey of the SASS.

    python benchmarks/kernel_sass.py [--arch 90] [--quick] [--json FILE]

For BitNet b1.58 2B4T's linear shapes it calls the kernel wrappers under
:func:`bitserve.kernels.aot.compile_only` (every launch is compiled for ``sm_<arch>`` with the
specialization a real launch would get, not run), then reads each kernel's main loop: instructions
per iteration, how many weights one thread covers per iteration (from the launch config), hence
**instructions per weight**, global-load widths, ``BAR`` (shared-memory round trips, usually a
layout conversion), ``IDP.4A`` and tensor-core instructions, and registers per thread. Prints a
table and, with ``--json``, writes the rows. Run on the CPU with ``TRITON_INTERPRET`` unset; the
ternary-decode numbers in docs/kernels.md came from here.

This is not a timing: it finds instruction-bound loops and shared-memory round trips, which
decided the dp4a GEMV's design between GPU sessions (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# sm_75 fails in Triton (the kernels' int8/bf16 tl.dot needs sm_80+); sm_100/sm_120 compile, but the SASS
# reader (aot.sass_summary) misreads them: no MMA counted in the GEMMs, no main loop found in several kernels
SUPPORTED_ARCHS = (80, 86, 89, 90)
SHAPES_2B4T = [("qkv", 3840, 2560), ("q|o", 2560, 2560), ("k|v", 640, 2560), ("gate_up", 13824, 2560),
               ("down", 2560, 6912)]


def _cases(quick: bool, arch: int):
    """(op, shape name, N, K, M, path, call) for every survey row; ``call`` launches the wrapper."""
    import torch

    from bitserve.kernels import binary, int8_head, ternary

    def ternary_call(n, k, m, path, act_int8, config=None):
        x = torch.randn(m, k).bfloat16()
        packed = torch.zeros(n, k // 4, dtype=torch.uint8)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        return lambda: ternary.ternary_linear(x, packed, torch.ones(n), None, out, act_int8=act_int8, path=path,
                                              config=config)

    def normed_call(n, k, m, residual=False):
        x = torch.randn(m, k).bfloat16()
        res = torch.randn(m, k).bfloat16() if residual else None
        packed = torch.zeros(n, k // 4, dtype=torch.uint8)
        return lambda: ternary.ternary_linear_rmsnorm(x, torch.ones(k, dtype=torch.bfloat16), 1e-5, packed,
                                                      torch.ones(n), None, torch.empty(m, n, dtype=torch.bfloat16),
                                                      residual=res)

    def binary_call(n, k, m, path=None):
        x = torch.randn(m, k).bfloat16()
        return lambda: binary.binary_linear(x, torch.zeros(n, k // 8, dtype=torch.uint8), torch.ones(k), torch.ones(n),
                                            None, None, torch.empty(m, n, dtype=torch.bfloat16), path=path)

    def dual_call(n, k, m, path=None, group=128):
        x = torch.randn(m, k).bfloat16()
        a = torch.ones(n, k // group)
        return lambda: binary.dual_binary_linear(x, torch.zeros(n, k // 4, dtype=torch.uint8), a, a, group, None,
                                                 torch.empty(m, n, dtype=torch.bfloat16), path=path)

    def head_call(n, k, m):
        x = torch.randn(m, k).bfloat16()
        return lambda: int8_head.int8_linear(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n), None,
                                             torch.empty(m, n, dtype=torch.bfloat16))

    shapes = SHAPES_2B4T if not quick else [s for s in SHAPES_2B4T if s[0] in ("qkv", "gate_up")]
    for name, n, k in shapes:
        for path in ("dp4a", "gemv"):
            yield "w2a8", name, n, k, 1, path, ternary_call(n, k, 1, path, True)
        yield "w2a8", name, n, k, 8, "dp4a", ternary_call(n, k, 8, "dp4a", True)
        if name == "qkv":  # both tile orders (the default is tl_common.n_major_tiles(): by Triton version)
            for order in (False, True):
                yield "w2a8", name, n, k, 8, "dp4a/" + ("n-major" if order else "m-major"), \
                    ternary_call(n, k, 8, "dp4a", True, {"N_MAJOR": order})
        yield "w2a8+norm", name, n, k, 1, "auto", normed_call(n, k, 1)
        yield "w2a8+norm", name, n, k, 1, "residual", normed_call(n, k, 1, residual=True)
        for path in ("decode", "gemv"):
            yield "w2a16", name, n, k, 1, path, ternary_call(n, k, 1, path, False)
        if name == "gate_up":
            for m in (32, 512):
                for path in ("wide", "gemm"):
                    yield "w2a8", name, n, k, m, path, ternary_call(n, k, m, path, True)
            for path in ("wide", "gemm"):
                yield "w2a16", name, n, k, 512, path, ternary_call(n, k, 512, path, False)
            for path in ("decode", "gemm"):
                yield "binary", name, n, k, 1, path, binary_call(n, k, 1, path)
                yield "dual", name, n, k, 1, path, dual_call(n, k, 1, path)
            for path in ("wide", "gemm"):
                yield "binary", name, n, k, 512, path, binary_call(n, k, 512, path)
            for path in ("wide", "gemm"):
                yield "dual", name, n, k, 512, path, dual_call(n, k, 512, path)
    for m in (1, 128):
        yield "int8head", "lm_head", 128256, 2560, m, "auto", head_call(128256, 2560, m)
    # the element-wise kernels between the linears (kernels/pointwise.py), 2B4T: 20 heads / 5 KV heads
    # of 128, intermediate 6912
    from bitserve.kernels import pointwise

    def rope_call(m):
        qkv = torch.randn(m, 3840).bfloat16()
        cos = torch.randn(m, 128).bfloat16()
        return lambda: pointwise.rope_qk(qkv[:, :2560].view(m, 20, 128), qkv[:, 2560:3200].view(m, 5, 128), cos, cos)

    def act_call(m):
        x = torch.randn(m, 13824).bfloat16()
        return lambda: pointwise.act_and_mul(x, "relu2")

    def norm_call(m, residual=False):
        x = torch.randn(m, 2560).bfloat16()
        res = torch.randn(m, 2560).bfloat16() if residual else None
        return lambda: pointwise.rmsnorm(x, torch.ones(2560, dtype=torch.bfloat16), 1e-5, res)

    def parts_call(m):
        x = torch.randn(m, 3840).bfloat16()
        return lambda: pointwise.layer_norm_parts(x, [2560, 640, 640], 1e-5)

    for m in (1, 64):
        yield "pointwise", "rope_qk", 3200, 128, m, "auto", rope_call(m)
        yield "pointwise", "act_and_mul", 6912, 13824, m, "auto", act_call(m)
        yield "pointwise", "rmsnorm", 2560, 2560, m, "auto", norm_call(m)
        yield "pointwise", "add_rmsnorm", 2560, 2560, m, "residual", norm_call(m, residual=True)
        yield "pointwise", "layernorm|qkv", 3840, 3840, m, "auto", parts_call(m)
    yield from _kv_cases()
    # the launch configs kernels/bench.py --sweep tries on a GPU, so that none of them fails there
    from bitserve.kernels.bench import DP4A_SWEEP, config_label

    name, n, k = SHAPES_2B4T[0]
    if arch >= 90:  # griddepcontrol is sm_90+
        yield "w2a8", name, n, k, 1, "dp4a/pdl", _with_pdl(ternary_call(n, k, 1, "dp4a", True, {"PDL": True}))
    for bn, bw, w in DP4A_SWEEP:
        cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": w, "num_stages": 1}
        yield "w2a8", name, n, k, 1, "dp4a/" + config_label(cfg), ternary_call(n, k, 1, "dp4a", True, cfg)


# the KV-cache kernels (kernels/kv_quant.py, kernels/kv_attention.py) at 2B4T's attention shapes: 20 query
# heads, 5 KV heads of 128; blocks of 16 tokens (bf16, int8) or 64 (int4/int2, the engine's defaults)
KV_HEADS, KV_GROUP, KV_DIM, KV_BLOCKS = 5, 4, 128, 64
KV_KINDS = (("bf16", "float", 16, 16), ("int8", "int8", 8, 16), ("int4", "intn", 4, 64), ("int2", "intn", 2, 64))


def _kv_layer(kind: str, bits: int, block: int, sinks: int = 0):
    """A zero-filled KV layer of one kind (compiled, never run: the contents do not matter)."""
    import torch

    from bitserve.kernels.kv_reference import KVLayer

    shape = (KV_BLOCKS, block, KV_HEADS, KV_DIM)
    if kind == "float":
        return KVLayer("float", torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
    if kind == "int8":
        scales = lambda: torch.zeros(KV_BLOCKS, block, KV_HEADS, dtype=torch.float16)  # noqa: E731
        return KVLayer("int8", torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8), 8,
                       k_scale=scales(), v_scale=scales())
    packed = (KV_BLOCKS, block, KV_HEADS, KV_DIM * bits // 8)
    per_channel = lambda: torch.zeros(KV_BLOCKS, KV_HEADS, KV_DIM, dtype=torch.float16)  # noqa: E731
    per_token = lambda: torch.zeros(KV_BLOCKS, block, KV_HEADS, dtype=torch.float16)  # noqa: E731
    sink = (lambda: torch.zeros(KV_BLOCKS, sinks, KV_HEADS, KV_DIM, dtype=torch.bfloat16)) if sinks else (lambda: None)
    return KVLayer("intn", torch.zeros(packed, dtype=torch.uint8), torch.zeros(packed, dtype=torch.uint8), bits,
                   per_channel(), per_channel(), per_token(), per_token(),
                   torch.zeros(8, block, KV_HEADS, KV_DIM, dtype=torch.bfloat16), sink(), sink())


def _kv_meta(seqs: list[tuple[int, int]], block: int, rope: bool = False):
    """(queries, AttnMeta) of a step whose sequences hold ``context`` tokens, ``new`` of them this step."""
    import torch

    from bitserve.kernels.kv_reference import AttnMeta

    width = max(-(-n // block) for n, _ in seqs)
    qsl = [0]
    for _, new in seqs:
        qsl.append(qsl[-1] + new)
    lens = [n for n, _ in seqs]
    t = qsl[-1]
    cos = torch.zeros(max(lens), KV_DIM, dtype=torch.bfloat16) if rope else None
    meta = AttnMeta(torch.zeros(len(seqs), width, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                    torch.tensor(qsl, dtype=torch.int32), lens, qsl, torch.zeros(len(seqs), dtype=torch.int32),
                    torch.zeros(t, KV_HEADS, KV_DIM, dtype=torch.bfloat16), cos, cos)
    return torch.zeros(t, KV_HEADS * KV_GROUP, KV_DIM, dtype=torch.bfloat16), meta


def _kv_cases():
    """Survey rows of the KV kernels: writes, decode (with and without split reduction) and prefill
    attention for every cache dtype, and the int-n variants (attention sinks, pre-RoPE keys)."""
    import torch

    from bitserve.kernels import kv_attention, kv_quant

    def write_call(kind, bits, block):
        layer = _kv_layer(kind, bits, block)
        rows = torch.zeros(16, KV_HEADS, KV_DIM, dtype=torch.bfloat16)
        slots = torch.zeros(16, dtype=torch.int64)
        if kind == "float":
            return lambda: kv_quant.write_kv_float(rows, rows, layer, slots)
        if kind == "int8":
            return lambda: kv_quant.write_kv_int8(rows, rows, layer, slots)
        idx = torch.zeros(2, dtype=torch.int64)
        fin = torch.zeros(2, dtype=torch.int32)

        def intn():
            kv_quant.write_v_intn(rows, layer, slots)
            kv_quant.finalize_k_intn(rows, layer, idx, fin, fin, idx)
        return intn

    def attention_call(kind, bits, block, seqs, splits=None, sinks=0, rope=False):
        layer = _kv_layer(kind, bits, block, sinks)
        q, meta = _kv_meta(seqs, block, rope)
        return lambda: kv_attention.paged_attention(q, layer, meta, splits=splits)

    context = 2048
    for label, kind, bits, block in KV_KINDS:
        n = KV_HEADS * KV_GROUP * KV_DIM
        yield "kv", label, n, KV_DIM, 16, "write", write_call(kind, bits, block)
        yield "kv", label, n, context, 8, "decode", attention_call(kind, bits, block, [(context, 1)] * 8, splits=1)
        yield "kv", label, n, context, 8, "decode/split", attention_call(kind, bits, block, [(context, 1)] * 8, splits=4)
        yield "kv", label, n, context, 512, "prefill", attention_call(kind, bits, block, [(context, 512)])
        if kind == "intn":
            yield "kv", label, n, context, 8, "decode/sinks", attention_call(kind, bits, block, [(context, 1)] * 8,
                                                                             splits=1, sinks=4)
            yield "kv", label, n, context, 512, "prefill/rope", attention_call(kind, bits, block, [(context, 512)],
                                                                              rope=True)


def _with_pdl(call):
    """``call`` as if the device supported programmatic dependent launch (the survey runs on a CPU)."""
    from bitserve.kernels import ternary_decode

    def run():
        supported = ternary_decode.pdl_supported
        ternary_decode.pdl_supported = lambda device: True
        try:
            return call()
        finally:
            ternary_decode.pdl_supported = supported

    return run


def weights_per_thread(launch, op: str, c: dict) -> float | None:
    """Weights one thread covers per main-loop iteration, from the launch's tile sizes."""
    threads = 32 * launch.num_warps
    if "BLOCK_W" in c:  # words of 32 (binary) or 16 (ternary, dual-binary) weights
        return c["BLOCK_N"] * c["BLOCK_W"] * (32 if op == "binary" else 16) / threads
    if "BLOCK_J" in c and "BLOCK_N" in c:  # bytes of 4 (ternary) / 8 (binary) weights
        per_byte = 8 if op == "binary" else 4
        return c["BLOCK_N"] * c["BLOCK_J"] * per_byte / threads
    if "BLOCK_K" in c and "BLOCK_N" in c:  # int8 rows
        return c["BLOCK_N"] * c["BLOCK_K"] / threads
    return None


def survey(arch: int, quick: bool) -> list[dict]:
    from bitserve.kernels import aot

    rows = []
    for op, name, n, k, m, path, call in _cases(quick, arch):
        with aot.compile_only(arch) as launches:
            call()
        for launch in launches:
            summ = aot.sass_summary(launch.sass())
            meta = {key: v for key, v in launch.meta.items() if key.startswith("BLOCK_")}
            wpt = None if "quantize" in launch.name else weights_per_thread(launch, op, meta)
            tokens = min(m, meta.get("BLOCK_M", 1))  # each weight a thread loads serves this many real tokens
            per_weight = summ["loop_instructions"] / (wpt * tokens) if wpt and "loop_instructions" in summ else None
            rows.append({
                "op": op, "shape": name, "N": n, "K": k, "M": m, "path": path, "kernel": launch.name,
                "arch": arch, "warps": launch.num_warps, **launch.resources(), "tiles": meta,
                "loop_instructions": summ.get("loop_instructions"), "instr_per_weight_per_token": per_weight,
                "loop_barriers": summ.get("loop_barriers"), "loop_shared": summ.get("loop_shared"),
                "loop_loads": summ.get("loop_loads"), "loop_idp4a": summ.get("loop_idp4a"),
                "loop_mma": summ.get("loop_mma"), "instructions": summ["instructions"],
                "pdl": bool(launch.meta.get("launch_pdl")), "griddepcontrol": "griddepcontrol" in launch.ptx(),
            })
    return rows


def _fmt_loads(loads: dict | None) -> str:
    if not loads:
        return "-"
    return " ".join(f"{v}x{k.replace('LDG.E.', '').replace('LDG.E', '32')}" for k, v in loads.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=SUPPORTED_ARCHS,
                    help="CUDA compute capability x10 (80 = A100, 90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="only the qkv and gate_up shapes")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_sass compiles kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    print(f"compiling the weight kernels for sm_{args.arch} ...", file=sys.stderr)
    rows = survey(args.arch, args.quick)
    hdr = f"{'op':9} {'shape':8} {'M':>4} {'path':14} {'kernel':26} {'regs':>4} {'spill':>5} {'loop':>5} {'ins/w':>6} {'BAR':>3} {'IDP':>4} {'MMA':>4}  loads"
    print(hdr)
    for r in rows:
        ipw = r["instr_per_weight_per_token"]
        print(f"{r['op']:9} {r['shape']:8} {r['M']:>4} {r['path']:14} {r['kernel'][:26]:26} {r['registers']:>4} {r['local']:>5} "
              f"{r['loop_instructions'] or 0:>5} {('%.2f' % ipw) if ipw else '-':>6} {r['loop_barriers'] or 0:>3} "
              f"{r['loop_idp4a'] or 0:>4} {r['loop_mma'] or 0:>4}  {_fmt_loads(r['loop_loads'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
