"""GPU benchmark of the weight kernels against torch bf16 matmul and a device-to-device copy.

    python -m bitserve.kernels.bench --out-dir DIR [--quick] [--ops w2a8,w2a16,binary,dual,int8head,pointwise]

For BitNet b1.58 2B4T's linears (fused q/k/v, q/o, k/v, fused gate-up 13824x2560, down 2560x6912),
a 7B and a 70B-like shape, and M in {1, 8, 32, 128, 512}: median time per call in microseconds
(CUDA events around CUDA-graph replays of many calls, after warm-up and autotuning, rotating
through enough weight/activation copies that L2 cannot hold them), achieved GB/s (weights,
scales, activations and outputs, each counted once), that as a share of a device-to-device copy
measured in the same run (bytes read + written), and the speedup over ``torch.nn.functional.linear``
on the dense bf16 equivalent. Each op's output is checked against its plain-torch twin
(relative error column). Writes ``bench.json``, ``bench.png`` (when matplotlib is there) and
prints a table; the TARGETS lines compare with the issue's targets (reported, never asserted).
``pointwise``: the element-wise kernels of a decoder layer (RoPE, gated activation, residual add +
RMSNorm, OneBit's LayerNorm) against the eager torch ops they replace, both timed in CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES_2B4T = [("2b4t.qkv", 3840, 2560), ("2b4t.q|o", 2560, 2560), ("2b4t.k|v", 640, 2560),
               ("2b4t.gate_up", 13824, 2560), ("2b4t.down", 2560, 6912)]
SHAPES_BIG = [("7b.gate_up", 22016, 4096), ("70b.down", 8192, 28672)]
MS = [1, 8, 32, 128, 512]
HEAD = ("2b4t.lm_head", 128256, 2560)
ROTATE_BYTES_FACTOR = 3  # rotate through >= 3x L2 of distinct buffers
MAX_COPIES = 512
OPS = ("w2a8", "w2a16", "binary", "dual", "int8head", "pointwise")  # what --ops may name


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def copies_for(set_bytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES_FACTOR * _l2_bytes() / max(1, set_bytes))))


def time_calls(calls, reps: int = 15, min_graph_us: float = 2000.0) -> tuple[float, str]:
    """Median microseconds per call of ``calls`` (a list, one per buffer copy, run round-robin).

    Captures one CUDA graph replaying the calls (at least every copy once and ~min_graph_us of
    work), times ``reps`` replays with CUDA events and divides by the calls per graph. Falls
    back to timing eager loops with events when capture fails.
    """
    for c in calls[: min(3, len(calls))]:
        c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    torch.cuda.synchronize()
    est = max(1e-3, start.elapsed_time(end) * 1000 / len(calls))
    n = max(len(calls), int(min_graph_us / est))
    n = min(n, 4 * len(calls) + 2000)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls[: min(3, len(calls))]:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / n)
        del graph
        return statistics.median(times), "graph"
    except Exception as exc:  # pragma: no cover - depends on the device
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eager loops)", file=sys.stderr)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start.record()
            for i in range(n):
                calls[i % len(calls)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / n)
        return statistics.median(times), "eager"


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    us, _ = time_calls([lambda: dst.copy_(src)], reps=10, min_graph_us=0)
    return 2 * nbytes / (us * 1e-6) / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


# -- per-op setups: return (calls, bytes per call, twin check) --------------------------------------
def setup_ternary(n, k, m, act_int8, path, gen, split_k=None, config=None):
    from bitserve.kernels import ops, reference, reference_lowbit, ternary
    from bitserve.kernels.packing import pack_ternary

    packed = pack_ternary(torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=gen))
    ws = torch.rand(n, device="cuda", generator=gen) + 0.5
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    set_bytes = packed.numel() + ws.numel() * 4 + x.numel() * 2 + m * n * 2
    r = copies_for(set_bytes)
    sets = [(packed.clone(), ws, torch.randn(m, k, device="cuda", generator=gen).bfloat16()) for _ in range(r - 1)]
    sets.insert(0, (packed, ws, x))
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(min(r, 8))]

    def make(i):
        p, s, xx = sets[i]
        out = outs[i % len(outs)]
        if path == "auto":
            op = ops.ternary_w2a8 if act_int8 else ops.ternary_w2a16
            return lambda: op(xx, p, s, None)
        if path == "rmsnorm":  # the model's BitNet path: RMSNorm + quantization in one kernel, then the GEMV/GEMM
            norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            return lambda: ternary.ternary_linear_rmsnorm(xx, norm_w, 1e-5, p, s, None, out)
        if path == "dp4a-preq":  # the GEMV alone: activations quantized once, outside the timing
            from bitserve.kernels import ternary_decode, tl_common

            q = tl_common.quantize_int8(xx, with_sum=True)
            return lambda: ternary_decode.ternary_w2a8_gemv_prequantized(*q, p, s, None, out, split_k=split_k,
                                                                        config=config)
        return lambda: ternary.ternary_linear(xx, p, s, None, out, act_int8=act_int8, path=path, split_k=split_k,
                                              config=config)

    twin = reference.ternary_linear_w2a8 if act_int8 else reference_lowbit.ternary_linear_w2a16
    if path == "rmsnorm":
        def twin(xx, pp, ss):
            return reference.ternary_linear_w2a8_rmsnorm(xx, torch.ones(k, device="cuda", dtype=torch.bfloat16), 1e-5,
                                                         pp, ss)
    check = lambda: rel_err(make(0)(), twin(x, packed, ws))  # noqa: E731
    return [make(i) for i in range(r)], set_bytes, check


def setup_binary(n, k, m, gen, path="auto"):
    from bitserve.kernels import binary, ops, reference_lowbit
    from bitserve.kernels.packing import pack_sign_bits

    packed = pack_sign_bits(torch.randint(0, 2, (n, k), device="cuda", dtype=torch.uint8, generator=gen))
    g = torch.rand(k, device="cuda", generator=gen) + 0.5
    h = torch.rand(n, device="cuda", generator=gen) + 0.5
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    set_bytes = packed.numel() + (k + n) * 4 + x.numel() * 2 + m * n * 2
    sets = [(packed.clone(), g.clone(), h.clone(), x.clone()) if i else (packed, g, h, x)
            for i in range(copies_for(set_bytes))]
    if path == "auto":
        calls = [(lambda p=p, gg=gg, hh=hh, xx=xx: ops.binary_w1a16(xx, p, gg, hh, None, None))
                 for p, gg, hh, xx in sets]
    else:
        calls = [(lambda p=p, gg=gg, hh=hh, xx=xx: binary.binary_linear(xx, p, gg, hh, None, None, path=path))
                 for p, gg, hh, xx in sets]
    check = lambda: rel_err(calls[0](), reference_lowbit.binary_linear_w1a16(x, packed, g, h))  # noqa: E731
    return calls, set_bytes, check


def setup_dual(n, k, m, gen, path="auto", group=128):
    from bitserve.kernels import binary, ops, reference_lowbit
    from bitserve.kernels.packing import pack_dual_binary

    b = [torch.randint(0, 2, (n, k), device="cuda", dtype=torch.uint8, generator=gen) for _ in range(2)]
    packed = pack_dual_binary(b[0], b[1], group)
    a1 = torch.rand(n, k // group, device="cuda", generator=gen) + 0.5
    a2 = -torch.rand(n, k // group, device="cuda", generator=gen)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    set_bytes = packed.numel() + 2 * a1.numel() * 4 + x.numel() * 2 + m * n * 2
    sets = [(packed.clone(), a1.clone(), a2.clone(), x.clone()) if i else (packed, a1, a2, x)
            for i in range(copies_for(set_bytes))]
    if path == "auto":
        calls = [(lambda p=p, b1=b1, b2=b2, xx=xx: ops.dual_binary(xx, p, b1, b2, group, None))
                 for p, b1, b2, xx in sets]
    else:
        calls = [(lambda p=p, b1=b1, b2=b2, xx=xx: binary.dual_binary_linear(xx, p, b1, b2, group, None, path=path))
                 for p, b1, b2, xx in sets]
    check = lambda: rel_err(calls[0](), reference_lowbit.dual_binary_linear(x, packed, a1, a2, group))  # noqa: E731
    return calls, set_bytes, check


def setup_int8(n, k, m, gen):
    from bitserve.kernels import ops, reference_lowbit
    from bitserve.kernels.packing import quantize_weight_int8_rows

    q, s = quantize_weight_int8_rows(torch.randn(n, k, device="cuda", generator=gen))
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    set_bytes = q.numel() + n * 4 + x.numel() * 2 + m * n * 4
    sets = [(q.clone(), x.clone()) if i else (q, x) for i in range(copies_for(set_bytes))]
    calls = [(lambda w=w, xx=xx: ops.int8_linear(xx, w, s, None, torch.float32)) for w, xx in sets]
    check = lambda: rel_err(calls[0](), reference_lowbit.int8_linear(x, q, s, None, torch.float32))  # noqa: E731
    return calls, set_bytes, check


def setup_dense(n, k, m, gen):
    w = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    set_bytes = w.numel() * 2 + x.numel() * 2 + m * n * 2
    sets = [(w.clone(), x.clone()) if i else (w, x) for i in range(copies_for(set_bytes))]
    return [(lambda ww=ww, xx=xx: F.linear(xx, ww)) for ww, xx in sets], set_bytes


def launch_floor_us() -> tuple[float, str]:
    """Time per empty Triton kernel among many in one CUDA graph (the floor under every kernel
    here), and how it was timed ("graph", or "eager" when capture failed: then it is the Python
    launch cost). The 2026-11-27 H100 run printed 18 us, far above a graph launch: recorded with
    its timing mode since."""
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    buf = torch.empty(1, device="cuda")
    return time_calls([lambda: _empty[(1,)](buf)], reps=10)


DP4A_SWEEP = [  # (BLOCK_N, BLOCK_W, num_warps) of the dp4a decode GEMV at M=1; split-K from the heuristic
    (2, 256, 2), (4, 256, 4), (8, 128, 4), (8, 256, 4), (16, 128, 4), (16, 256, 8), (32, 64, 4)]


def sweep_plan() -> list:
    """Tuning data for the fixed GPU configs (2B4T shapes), most telling first (``--budget-s`` cuts
    the tail): at M=1 the first GEMV, the dp4a GEMV alone on pre-quantized activations (what fusing
    the quantization upstream gives), the fused RMSNorm path and PDL; at M = 32, 128, 512 the
    four-dot GEMM, the one-dot GEMM and the ``dequant`` path (and at 32 the dp4a GEMV, four token
    groups over L2-resident weights instead of the GEMM's split-K partials); dp4a vs GEMM at M = 2..16 (and
    dp4a's two tile orders at M = 8); then dp4a
    launch configs and forced split-K."""
    def w2a8(label, n, k, m, path, split=None, config=None):
        return ("w2a8", label, n, k, m, path, split, config)

    plan = []
    for label, n, k in SHAPES_2B4T:
        plan += [w2a8(label, n, k, 1, "gemv"), w2a8(label, n, k, 1, "dp4a-preq"), w2a8(label, n, k, 1, "rmsnorm"),
                 w2a8(label, n, k, 1, "dp4a", config={"PDL": True})]
    for label, n, k in SHAPES_2B4T:
        plan += [w2a8(label, n, k, m, p) for m in (32, 128, 512)
                 for p in ("gemm", "wide", "dequant") + (("dp4a",) if m == 32 else ())]
    for label, n, k in SHAPES_2B4T:
        plan += [w2a8(label, n, k, m, p) for m in (2, 4, 8, 16) for p in ("dp4a", "gemm")]
        if label in ("2b4t.qkv", "2b4t.gate_up"):  # both dp4a tile orders (the default follows the Triton version)
            plan += [w2a8(label, n, k, 8, "dp4a", config={"N_MAJOR": o}) for o in (False, True)]
    for label, n, k in SHAPES_2B4T:
        plan += [w2a8(label, n, k, 1, "dp4a", config={"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "num_stages": 1})
                 for bn, bw, nw in DP4A_SWEEP]
        plan += [w2a8(label, n, k, 1, "dp4a", split=s) for s in (1, 2, 4)]
    plan += [("w2a16", label, n, k, 512, "dequant", None, None) for label, n, k in SHAPES_2B4T[3:]]
    return plan


def config_label(config: dict) -> str:
    """``16x128w4`` for a launch config (BLOCK_N x BLOCK_J/BLOCK_W, warps)."""
    if "BLOCK_N" not in config:  # keys over the default plan
        return ",".join(f"{k.lower()}" if v is True else f"{k.lower()}={v}" for k, v in config.items())
    inner = config.get("BLOCK_W", config.get("BLOCK_J", config.get("BLOCK_K", "?")))
    return f"{config['BLOCK_N']}x{inner}w{config.get('num_warps', '?')}" + (",pdl" if config.get("PDL") else "")


def best_configs() -> dict:
    from bitserve.kernels import binary, int8_head, ternary

    out = {}
    for mod, names in ((ternary, ("_ternary_gemv_kernel", "_ternary_gemm_kernel")),
                       (binary, ("_binary_kernel", "_dual_binary_kernel")),
                       (int8_head, ("_int8_gemv_kernel", "_int8_gemm_kernel"))):
        for name in names:
            cache = getattr(getattr(mod, name), "cache", {}) or {}
            out[name] = {str(k): str(v) for k, v in cache.items()}
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    floor_us, floor_how = launch_floor_us()
    print(f"device {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
          f"L2 {_l2_bytes() >> 20} MiB; device-to-device copy {copy_gbps:.0f} GB/s; "
          f"empty Triton kernel {floor_us:.2f} us each ({floor_how})", flush=True)
    shapes = SHAPES_2B4T + ([] if args.quick else SHAPES_BIG)
    ms = [1, 32, 512] if args.quick else MS
    ops_wanted = set(args.ops.split(","))
    plan = []  # (op, label, n, k, m, path, split_k, config)
    for label, n, k in shapes:
        for m in ms:
            if "w2a8" in ops_wanted:
                plan.append(("w2a8", label, n, k, m, "auto", None, None))
    side = [("2b4t.gate_up", 13824, 2560), ("2b4t.down", 2560, 6912)]
    sweeping = args.sweep or not args.quick
    for op in ("w2a16", "binary", "dual"):
        if op in ops_wanted:
            plan += [(op, label, n, k, m, "auto", None, None) for label, n, k in side for m in (1, 32, 512)]
    if "int8head" in ops_wanted:
        plan += [("int8head", HEAD[0], HEAD[1], HEAD[2], m, "auto", None, None) for m in (1, 8, 32, 128)]
    if "w2a8" in ops_wanted and sweeping:  # tuning data, most telling first
        plan += sweep_plan()
    for op in ("w2a16", "binary", "dual"):
        if op in ops_wanted and sweeping:
            forced = "gemv" if op == "w2a16" else "gemm"  # the CUDA-core decode GEMV vs the tiled kernel
            plan += [(op, label, n, k, m, p, None, None) for label, n, k in side for m in (1, 4)
                     for p in ("decode", forced)]
            plan += [(op, label, n, k, m, p, None, None) for label, n, k in side for m in (128, 512)
                     for p in ("wide", "gemm")]  # the one-dot prefill GEMMs vs the tiled ones

    t_start = time.time()
    pointwise = run_pointwise(gen) if "pointwise" in ops_wanted else []  # a few seconds: first
    dense_cache: dict = {}
    records = []
    for op, label, n, k, m, path, split, config in plan:
        if time.time() - t_start > args.budget_s:
            print(f"time budget of {args.budget_s}s reached: skipping the rest", flush=True)
            break
        if op == "w2a8":
            calls, nbytes, check = setup_ternary(n, k, m, True, path, gen, split, config)
        elif op == "w2a16":
            calls, nbytes, check = setup_ternary(n, k, m, False, path, gen, split, config)
        elif op == "binary":
            calls, nbytes, check = setup_binary(n, k, m, gen, path)
        elif op == "dual":
            calls, nbytes, check = setup_dual(n, k, m, gen, path)
        else:
            calls, nbytes, check = setup_int8(n, k, m, gen)
        err = check()
        us, how = time_calls(calls)
        if (n, k, m) not in dense_cache:
            dcalls, dbytes = setup_dense(n, k, m, gen)
            dense_cache[(n, k, m)] = (time_calls(dcalls)[0], dbytes)
            del dcalls
        bf16_us, bf16_bytes = dense_cache[(n, k, m)]
        gbps = nbytes / (us * 1e-6) / 1e9
        path = path if split is None else f"{path}/s{split}"
        if config:
            path += "/" + config_label(config)
        rec = dict(op=op, shape=label, N=n, K=k, M=m, path=path, us=round(us, 3), bf16_us=round(bf16_us, 3),
                   GBps=round(gbps, 1), pct_copy=round(100 * gbps / copy_gbps, 1),
                   bf16_pct_copy=round(100 * bf16_bytes / (bf16_us * 1e-6) / 1e9 / copy_gbps, 1),
                   speedup=round(bf16_us / us, 2), bytes=nbytes, rel_err=float(f"{err:.3g}"), timing=how,
                   copies=len(calls))
        records.append(rec)
        print(f"{op:8s} {label:13s} {path:18s} M={m:4d}  {us:9.2f} us  bf16 {bf16_us:9.2f} us  x{rec['speedup']:5.2f}  "
              f"{gbps:7.0f} GB/s ({rec['pct_copy']:5.1f}% copy)  err {err:.1e}", flush=True)
        del calls
        torch.cuda.empty_cache()
    return dict(device=dev, torch=torch.__version__, triton=__import__("triton").__version__, copy_GBps=round(copy_gbps, 1),
                launch_floor_us=round(floor_us, 3), launch_floor_timing=floor_how,
                l2_bytes=_l2_bytes(), records=records, pointwise=pointwise, best_configs=best_configs())


def pointwise_cases(m: int, gen, device: str = "cuda") -> list:
    """(name, Triton call, torch-twin call) for the element-wise kernels of a 2B4T layer at M
    tokens (``kernels/pointwise.py`` against the eager torch ops they replace)."""
    from bitserve.kernels import pointwise, reference

    bf = torch.bfloat16

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(bf)

    qkv = rand(m, 3840)
    angles = torch.rand(m, 64, generator=gen, device=device) * 1000
    cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(bf) for f in (torch.cos, torch.sin))
    q, k = qkv[:, :2560].view(m, 20, 128), qkv[:, 2560:3200].view(m, 5, 128)
    gate_up, x, res, w = rand(m, 13824), rand(m, 2560), rand(m, 2560), rand(2560)
    return [
        ("rope_qk", lambda: pointwise.rope_qk(q, k, cos, sin), lambda: reference.rope_qk(q, k, cos, sin)),
        ("act_and_mul", lambda: pointwise.act_and_mul(gate_up, "relu2"), lambda: reference.act_and_mul(gate_up, "relu2")),
        ("add_rmsnorm", lambda: pointwise.rmsnorm(x, w, 1e-5, res), lambda: reference.add_rmsnorm(x, res, w, 1e-5)),
        ("layernorm|qkv", lambda: pointwise.layer_norm_parts(qkv, [2560, 640, 640], 1e-5),
         lambda: reference.layer_norm_parts(qkv, [2560, 640, 640], 1e-5)),
    ]


def run_pointwise(gen) -> list[dict]:
    """Per-call time of each element-wise kernel and of the eager torch ops it replaces, both in
    CUDA graphs (so this is the kernels' own cost, as in the engine's graph-replayed decode)."""
    rows = []
    for m in (1, 32):
        for name, tri, twin in pointwise_cases(m, gen):
            a, b = tri(), twin()
            a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
            err = max(rel_err(x.float(), y.float()) for x, y in zip(a, b))
            t_us, _ = time_calls([tri])
            e_us, _ = time_calls([twin])
            rows.append(dict(op=name, M=m, triton_us=round(t_us, 3), torch_us=round(e_us, 3),
                             speedup=round(e_us / t_us, 2), rel_err=float(f"{err:.3g}")))
            print(f"pointwise {name:14s} M={m:3d}  {t_us:7.2f} us  torch ops {e_us:7.2f} us  x{e_us / t_us:5.2f}  "
                  f"err {err:.1e}", flush=True)
    return rows


def targets(result: dict) -> list[str]:
    """The issue's targets, as lines (reported, not asserted)."""
    lines = []
    auto = [r for r in result["records"] if r["op"] == "w2a8" and r["path"] == "auto"]
    m1 = [r for r in auto if r["M"] == 1 and r["shape"].startswith("2b4t")]
    if m1:
        lines.append("M=1 2B4T >= 70% copy: " + ", ".join(f"{r['shape']} {r['pct_copy']:.0f}%" for r in m1))
        lines.append("M=1 2B4T >= 5x bf16:  " + ", ".join(f"{r['shape']} {r['speedup']:.2f}x" for r in m1))
    m32 = [r for r in auto if r["M"] == 32]
    if m32:
        lines.append("M=32 >= 3x bf16:      " + ", ".join(f"{r['shape']} {r['speedup']:.2f}x" for r in m32))
    pre = [r for r in auto if r["M"] >= 128]
    if pre:
        lines.append("prefill >= 1x bf16:   " + ", ".join(f"{r['shape']}/M{r['M']} {r['speedup']:.2f}x" for r in pre))
    return lines


# the dispatch thresholds the sweep can move: (setting, its value now, op(s), the path taken up to the
# threshold, the path above it). Each threshold is "the path for small M up to and including this M".
SWITCHES = (
    ("ternary_decode.MAX_M", ("w2a8",), "dp4a", "gemm"),
    ("ternary_prefill.MIN_M", ("w2a8",), "gemm", "wide"),
    ("ternary_prefill.MIN_M", ("w2a16",), "gemm", "wide"),
    ("lowbit_decode.MAX_M", ("w2a16",), "decode", "gemv"),
    ("lowbit_decode.MAX_M", ("binary", "dual"), "decode", "gemm"),
    ("binary_prefill.MIN_M", ("binary",), "gemm", "wide"),
)


def _setting(name: str) -> int:
    from bitserve.kernels import binary_prefill, lowbit_decode, ternary_decode, ternary_prefill

    mod, attr = name.split(".")
    return getattr({"ternary_decode": ternary_decode, "ternary_prefill": ternary_prefill,
                    "lowbit_decode": lowbit_decode, "binary_prefill": binary_prefill}[mod], attr)


def switch_points(result: dict) -> list[dict]:
    """What the sweep says about each dispatch threshold: at every M where both paths were timed on
    the same shapes, on how many the small-M path was faster; the suggested threshold is the largest
    M of the unbroken run of wins (at least half the shapes) from the smallest M up."""
    out = []
    for setting, ops, small, large in SWITCHES:
        times: dict[tuple[int, str], dict[str, float]] = {}
        for r in result["records"]:
            if r["op"] in ops and r["path"] in (small, large):
                times.setdefault((r["M"], f"{r['op']}:{r['shape']}"), {})[r["path"]] = r["us"]
        per_m: dict[int, list[int]] = {}
        for (m, _), t in times.items():
            if small in t and large in t:
                wins, total = per_m.setdefault(m, [0, 0])
                per_m[m] = [wins + (t[small] < t[large]), total + 1]
        if not per_m:
            continue
        suggested = None
        for m in sorted(per_m):
            wins, total = per_m[m]
            if 2 * wins < total:
                break
            suggested = m
        out.append({"setting": setting, "ops": list(ops), "small_path": small, "large_path": large,
                    "now": _setting(setting), "wins": {m: per_m[m] for m in sorted(per_m)}, "suggested": suggested})
    return out


def switch_lines(points: list[dict]) -> list[str]:
    lines = []
    for p in points:
        wins = ", ".join(f"M={m} {w}/{t}" for m, (w, t) in p["wins"].items())
        first = min(p["wins"])
        suggested = p["suggested"] if p["suggested"] is not None else f"below {first} (lost at M={first})"
        lines.append(f"{p['setting']} = {p['now']} now; {'/'.join(p['ops'])} {p['small_path']} faster than "
                     f"{p['large_path']} on: {wins} -> suggests {suggested}")
    return lines


def table(result: dict) -> str:
    head = f"{'op':8s} {'shape':13s} {'path':18s} {'M':>4s} {'us':>9s} {'bf16 us':>9s} {'speedup':>7s} {'GB/s':>7s} {'%copy':>6s} {'relerr':>8s}"
    rows = [head, "-" * len(head)]
    for r in result["records"]:
        rows.append(f"{r['op']:8s} {r['shape']:13s} {r['path']:18s} {r['M']:4d} {r['us']:9.2f} {r['bf16_us']:9.2f} "
                    f"{r['speedup']:7.2f} {r['GBps']:7.0f} {r['pct_copy']:6.1f} {r['rel_err']:8.1e}")
    return "\n".join(rows)


def write_png(result: dict, path: str) -> bool:
    try:  # not bitserve.plotting: kernels import nothing from the server package
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    auto = [r for r in result["records"] if r["op"] == "w2a8" and r["path"] == "auto"]
    shapes = list(dict.fromkeys(r["shape"] for r in auto))
    ms = sorted({r["M"] for r in auto})
    pointwise = result.get("pointwise") or []
    fig, axes = plt.subplots(1, 3 if pointwise else 2, figsize=(21 if pointwise else 14, 5))
    width = 0.8 / max(1, len(ms))
    for i, m in enumerate(ms):
        vals = {r["shape"]: r for r in auto if r["M"] == m}
        xs = [j + i * width for j in range(len(shapes))]
        axes[0].bar(xs, [vals[s]["speedup"] if s in vals else 0 for s in shapes], width, label=f"M={m}")
        axes[1].bar(xs, [vals[s]["pct_copy"] if s in vals else 0 for s in shapes], width, label=f"M={m}")
    for ax, title, line in ((axes[0], "W2A8 speedup over torch bf16", 1.0),
                            (axes[1], "W2A8 achieved bandwidth, % of D2D copy", 70.0)):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right")
        ax.axhline(line, color="k", lw=0.8, ls="--")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if pointwise:  # the element-wise kernels against the eager torch ops they replace
        ax = axes[2]
        names = list(dict.fromkeys(r["op"] for r in pointwise))
        pms = sorted({r["M"] for r in pointwise})
        w = 0.8 / len(pms)
        for i, m in enumerate(pms):
            vals = {r["op"]: r["speedup"] for r in pointwise if r["M"] == m}
            ax.bar([j + i * w for j in range(len(names))], [vals.get(nm, 0) for nm in names], w, label=f"M={m}")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title("element-wise kernels: speedup over the eager torch ops")
        ax.legend(fontsize=8)
    fig.suptitle(f"bitserve ternary kernels on {result['device']} (copy {result['copy_GBps']:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench-results"),
                   help="where bench.json / bench.png go (default: $OUT, else bench-results/)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list (default: all)")
    p.add_argument("--quick", action="store_true", help="2B4T shapes, M in {1, 32, 512}, no forced paths")
    p.add_argument("--sweep", action="store_true", help="with --quick: add the GEMV config / GEMV-vs-GEMM sweep")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    unknown = sorted(set(args.ops.split(",")) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {', '.join(repr(u) for u in unknown)}; choose from {', '.join(OPS)}")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if not torch.cuda.is_available():
        print("bench needs a CUDA device", file=sys.stderr)
        return 2
    result = run(args)
    result["switch_points"] = switch_points(result)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        png = write_png(result, os.path.join(args.out_dir, "bench.png"))
    except Exception as exc:  # the numbers are in bench.json already
        print(f"no PNG: {type(exc).__name__}: {exc}", file=sys.stderr)
        png = False
    print()
    print(table(result))
    print()
    print("TARGETS (reported, not asserted)")
    for line in targets(result):
        print("  " + line)
    if result.get("switch_points"):
        print("DISPATCH THRESHOLDS (from the sweep; move a setting only if the suggestion holds on every shape you serve)")
        for line in switch_lines(result["switch_points"]):
            print("  " + line)
    print(f"wrote {os.path.join(args.out_dir, 'bench.json')}" + (" and bench.png" if png else " (no matplotlib: no PNG)"))
    if result.get("pointwise"):
        print("element-wise kernels vs the eager torch ops they replace (both in CUDA graphs):")
        for r in result["pointwise"]:
            print(f"  {r['op']:14s} M={r['M']:3d}  {r['triton_us']:7.2f} us vs {r['torch_us']:7.2f} us  x{r['speedup']:.2f}")
    bad = [r for r in result["records"] + result.get("pointwise", []) if not (r["rel_err"] < 2e-2)]
    if bad:
        print(f"{len(bad)} measurements disagree with their twin (rel_err >= 2e-2)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
