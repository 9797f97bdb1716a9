#!/usr/bin/env python
"""GPU check of the KV-cache kernels on BitNet b1.58 2B4T attention shapes (20 heads, 5 KV heads,
head_dim 128, bf16), per KV dtype:

1. correctness: Triton vs the plain-torch twin (decode, chunked prefill) on these shapes;
2. kernels: paged decode attention at ``--seqs`` x ``--context`` (µs, GB/s of KV read, vs a
   device-to-device copy measured in the same run; layers rotate so L2 does not flatter),
   prefill attention of one ``--prefill`` chunk over a cached prefix, quantize-and-write of
   one decode step;
3. end to end: decode tok/s of the engine on a random 2B4T checkpoint
   (``benchmarks/bitnet_2b4t_memory.py`` writes it) with ``--seqs`` requests of
   ``--e2e-context`` prompt tokens, per KV dtype (same loaded model, a fresh engine each); then
   bf16 with ``--enforce-eager`` and both at one sequence, which shows what the decode CUDA graphs
   save (column ``graphs``: yes = replayed, off = eager by request, no = could not capture).

    python benchmarks/kv_gpu_check.py --out /tmp/kv_check            # ~4 minutes on an H100
    python benchmarks/kv_gpu_check.py --quick --skip-e2e              # kernels only, smaller

Exit status 0 when every correctness check passes. Writes ``kv_check.json`` under ``--out``.
CUDA events after warm-up, median of ``--iters`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from kv_cache_throughput import build_cache, make_batch  # noqa: E402

from bitserve.cli_args import positive_int  # noqa: E402
from bitserve.kernels import kv_attention, kv_dispatch, kv_reference  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 20, 5, 128
DTYPES = ("bf16", "int8", "int4", "int2")


def cuda_time(fn, iters: int) -> float:
    """Median microseconds of ``fn()`` over ``iters`` runs after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    if not torch.cuda.is_available():  # CPU smoke run of this script (TRITON_INTERPRET=1)
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def graph_time(fn, calls: int = 16, reps: int = 10) -> float | None:
    """Median GPU microseconds per call with launch overhead removed: ``calls`` calls captured in
    one CUDA graph, replayed ``reps`` times. None when the call cannot be captured (or no CUDA)."""
    if not torch.cuda.is_available():
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
        return statistics.median(times)
    except Exception as exc:  # host synchronisation inside the call, say
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def copy_bandwidth(iters: int, device: torch.device) -> float:
    src = torch.empty(1 << (30 if device.type == "cuda" else 24), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = cuda_time(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / us / 1e3  # GB/s, read + write


def layer_bytes(spec, tokens: int) -> int:
    return spec.layer_bytes_per_block * tokens // spec.block_size


def kernel_section(args, report: dict) -> bool:
    ok = True
    device = torch.device(args.device)
    cfg = argparse.Namespace(seqs=args.seqs, context=args.context, steps=2, layers=args.layers, heads=HEADS,
                             kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=None, fill_chunk=512)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for dtype in DTYPES:
        cache, tables = build_cache(dtype, cfg, device, torch.bfloat16)
        spec, layout = cache.spec, cache.layout
        bs = spec.block_size
        n = args.seqs
        q = torch.randn(n, HEADS, HEAD_DIM, generator=gen).bfloat16().to(device)
        k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).bfloat16().to(device)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).bfloat16().to(device)
        state = cache.begin_step(make_batch(tables, [args.context] * n, [1] * n, bs, device))
        meta = dataclasses.replace(state.meta, k_new=k)
        for layer in range(args.layers):
            cache.fill(layer, k, v, state)  # the decode token is in the cache (or staged)
        # correctness of decode on layer 0
        want = kv_reference.paged_attention(q, layout.layer(0), meta).float()
        got = kv_attention.paged_attention(q, layout.layer(0), meta).float()
        dec_err = ((got - want).abs().max() / want.abs().max()).item()  # relative to the largest output
        ok &= dec_err < 2e-2
        layers = [layout.layer(i) for i in range(args.layers)]
        it = iter(range(10**9))
        dec_us = cuda_time(lambda: kv_attention.paged_attention(q, layers[next(it) % args.layers], meta), args.iters)
        dec_graph_us = graph_time(lambda: kv_attention.paged_attention(q, layers[next(it) % args.layers], meta))
        read = layer_bytes(spec, n * (args.context + 1))
        # quantize-and-write of one decode step (all heads of the 32 new tokens, one layer)
        write_us = cuda_time(lambda: layout.fill(next(it) % args.layers, k, v, state), args.iters)
        write_graph_us = graph_time(lambda: layout.fill(next(it) % args.layers, k, v, state))
        # prefill: one chunk of args.prefill tokens over a cached prefix of context - prefill tokens
        start = args.context - args.prefill
        pbatch = make_batch(tables[:1], [start], [args.prefill], bs, device)
        pstate = cache.begin_step(pbatch)
        pq = torch.randn(args.prefill, HEADS, HEAD_DIM, generator=gen).bfloat16().to(device)
        pk = torch.randn(args.prefill, KV_HEADS, HEAD_DIM, generator=gen).bfloat16().to(device)
        pmeta = dataclasses.replace(pstate.meta, k_new=pk)
        want = kv_reference.paged_attention(pq, layout.layer(0), pmeta).float()
        got = kv_attention.paged_attention(pq, layout.layer(0), pmeta).float()
        pre_err = ((got - want).abs().max() / want.abs().max()).item()
        ok &= pre_err < 2e-2
        pre_us = cuda_time(lambda: kv_attention.paged_attention(pq, layers[next(it) % args.layers], pmeta),
                           args.iters)
        rows.append({"dtype": spec.dtype, "block_size": bs, "decode_us": dec_us, "decode_gb_s": read / dec_us / 1e3,
                     "decode_max_err": dec_err, "write_us": write_us, "prefill_us": pre_us,
                     "prefill_max_err": pre_err, "kv_bytes_read": read, "decode_graph_us": dec_graph_us,
                     "write_graph_us": write_graph_us})
        cache = layout = layers = None  # free before the next dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["decode_us"]
    print(f"decode attention, {args.seqs} seqs x {args.context} tokens, one layer (2B4T shapes); copy "
          f"{report['copy_gb_s']:.0f} GB/s")
    print("(us: CUDA events around one eager call, launch overhead included; graph: per call inside a "
          "CUDA graph, GB/s from it when there is one)")
    print(f"{'dtype':9s} {'decode us':>10s} {'graph':>7s} {'GB/s':>7s} {'% copy':>7s} {'speedup':>8s} {'err':>8s} "
          f"{'write us':>9s} {'graph':>7s} {'prefill us':>11s} {'err':>8s}")
    def fmt(v):
        return f"{v:7.1f}" if v is not None else "      -"

    base_graph = rows[0]["decode_graph_us"]
    for r in rows:
        r["decode_speedup_vs_bf16"] = base / r["decode_us"]
        if r["decode_graph_us"] and base_graph:
            r["decode_gb_s"] = r["kv_bytes_read"] / r["decode_graph_us"] / 1e3
            r["decode_speedup_vs_bf16"] = base_graph / r["decode_graph_us"]
        print(f"{r['dtype']:9s} {r['decode_us']:10.1f} {fmt(r['decode_graph_us'])} {r['decode_gb_s']:7.0f} "
              f"{100 * r['decode_gb_s'] / report['copy_gb_s']:6.0f}% {r['decode_speedup_vs_bf16']:8.2f} "
              f"{r['decode_max_err']:8.1e} {r['write_us']:9.1f} {fmt(r['write_graph_us'])} {r['prefill_us']:11.1f} "
              f"{r['prefill_max_err']:8.1e}")
    report["kernels"] = rows
    return ok


def e2e_section(args, report: dict) -> None:
    spec = importlib.util.spec_from_file_location("bitnet_2b4t_memory", REPO / "benchmarks" / "bitnet_2b4t_memory.py")
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    from bitserve.config import EngineConfig
    from bitserve.engine.core import EngineCore, EngineRequest
    from bitserve.loader import load_model
    from bitserve.sampling_params import SamplingParams

    if args.e2e_model:
        folder = Path(args.e2e_model)
    else:
        folder = Path(args.workdir) / f"bitnet-2b4t-random-L{args.e2e_layers}"
        if not (folder / mem.MARKER).exists():
            mem.generate_checkpoint(folder, args.e2e_layers, seed=0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    loaded = load_model(folder, dtype="bfloat16", device=args.device)
    load_s = time.time() - t0
    rows = []
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.config.vocab_size
    max_len = args.e2e_context + args.e2e_steps + 8
    # every KV dtype at --seqs (CUDA graphs where the layout allows them), then bf16 without graphs,
    # and one sequence with and without: what the graphs save per decode step
    runs = [(d, args.seqs, False) for d in DTYPES] + [("bf16", args.seqs, True), ("bf16", 1, False), ("bf16", 1, True)]
    for dtype, seqs, eager in runs:
        core = EngineCore(loaded.model, EngineConfig(kv_cache_dtype=dtype, max_num_seqs=seqs,
                                                     max_num_batched_tokens=args.e2e_chunk, enforce_eager=eager,
                                                     kv_cache_memory_mb=args.e2e_kv_mb, enable_prefix_caching=False),
                          max_model_len=max_len)
        params = SamplingParams(temperature=0.0, max_tokens=args.e2e_steps + 2, ignore_eos=True)
        for i in range(seqs):
            prompt = torch.randint(0, vocab, (args.e2e_context,), generator=gen).tolist()
            core.add_request(EngineRequest(f"r{i}", prompt, params))
        t1 = time.time()
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in list(core.scheduler.requests.values())):
            core.step()
        sync()
        prefill_s = time.time() - t1
        core.step()  # warm-up decode
        sync()
        t2 = time.time()
        for _ in range(args.e2e_steps):
            core.step()
        sync()
        decode_s = time.time() - t2
        stats = core.stats()
        rows.append({"dtype": core.spec.dtype, "seqs": seqs, "enforce_eager": eager,
                     "cuda_graphs": core.runner.graphs is not None,
                     "graph_steps": stats.cuda_graph_steps, "decode_tok_s": seqs * args.e2e_steps / decode_s,
                     "ms_per_step": 1000 * decode_s / args.e2e_steps, "prefill_s": prefill_s,
                     "kv_capacity_tokens": stats.kv_capacity_tokens})
        del core
        gc.collect()  # free this engine (KV cache, CUDA graphs) before the next one allocates its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"end to end, {folder.name} ({loaded.config.num_layers} layers, loaded in {load_s:.0f} s): "
          f"seqs x {args.e2e_context} prompt tokens, {args.e2e_steps} decode steps")
    print(f"{'dtype':9s} {'seqs':>5s} {'graphs':>6s} {'tok/s':>9s} {'ms/step':>8s} {'vs bf16':>8s} {'prefill s':>10s}")
    for r in rows:
        # against bf16 at the same batch, default engine (CUDA graphs unless they could not be captured)
        base = next(b for b in rows if b["dtype"] == rows[0]["dtype"] and b["seqs"] == r["seqs"]
                    and not b["enforce_eager"])
        r["ratio_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
        print(f"{r['dtype']:9s} {r['seqs']:5d} {'off' if r['enforce_eager'] else 'yes' if r['cuda_graphs'] else 'no':>6s} {r['decode_tok_s']:9.1f} "
              f"{r['ms_per_step']:8.2f} {r['ratio_vs_bf16']:8.2f} {r['prefill_s']:10.1f}")
    report["e2e"] = rows


def plot_e2e(report: dict, path: Path) -> None:
    """Bar chart of the end-to-end decode tok/s rows (skipped without matplotlib)."""
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        print("no matplotlib: no kv_check.png", file=sys.stderr)
        return
    rows = report["e2e"]
    how = ["eager" if r["enforce_eager"] else "graphs" if r.get("cuda_graphs", True) else "no graphs" for r in rows]
    labels = [f"{r['dtype']}\n{r['seqs']} seqs\n{h}" for r, h in zip(rows, how)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r["decode_tok_s"] for r in rows],
           color=["tab:gray" if r["enforce_eager"] else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"engine decode on {report['device']}: KV dtypes, CUDA graphs vs eager")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bitserve_kv_check")
    ap.add_argument("--seqs", type=positive_int, default=32)
    ap.add_argument("--context", type=positive_int, default=2048)
    ap.add_argument("--prefill", type=positive_int, default=512)
    ap.add_argument("--layers", type=positive_int, default=8, help="layers to rotate over in kernel timings")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--e2e-layers", type=positive_int, default=30)
    ap.add_argument("--e2e-context", type=positive_int, default=1024)
    ap.add_argument("--e2e-steps", type=positive_int, default=32)
    ap.add_argument("--e2e-chunk", type=positive_int, default=4096)
    ap.add_argument("--e2e-kv-mb", type=positive_int, default=16384)
    ap.add_argument("--workdir", default="/tmp/bitserve_kv_check_ckpt")
    ap.add_argument("--e2e-model", help="use this checkpoint instead of a random 2B4T one")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script (needs TRITON_INTERPRET=1 and BITSERVE_KV_TRITON=1)")
    ap.add_argument("--quick", action="store_true", help="8 seqs x 1024, 10 iters, 4 e2e layers")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs, args.context, args.iters, args.e2e_layers, args.e2e_context = 8, 1024, 10, 4, 512
    if args.prefill > args.context:  # the prefill chunk ends the cached context
        ap.error(f"--prefill {args.prefill} must be at most --context {args.context}"
                 + (" (--quick sets --context 1024)" if args.quick else ""))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kv_gpu_check: no CUDA device", file=sys.stderr)
        return 2
    if not kv_dispatch.use_triton(torch.empty(1, device=args.device)):
        print("kv_gpu_check: the Triton path is off (BITSERVE_KV_TRITON)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter smoke run)"
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "args": vars(args), "copy_gb_s": copy_bandwidth(args.iters, torch.device(args.device))}
    ok = True if args.skip_kernels else kernel_section(args, report)
    if not args.skip_e2e:
        e2e_section(args, report)
    report["ok"] = ok
    (out / "kv_check.json").write_text(json.dumps(report, indent=2))
    if report.get("e2e"):
        plot_e2e(report, out / "kv_check.png")
    print(f"kv check: {'OK' if ok else 'MISMATCH'}; results in {out / 'kv_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
