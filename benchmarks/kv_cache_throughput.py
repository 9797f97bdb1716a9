#!/usr/bin/env python
"""Decode throughput of the paged KV cache per dtype, as a ratio to bf16 (one run, one process).

The workload is the KV side of batched decode: ``--seqs`` sequences holding ``--context``
tokens each; every step writes one new token per sequence and runs paged attention in
every layer, through the engine's own ``PagedKVCache`` (``begin_step`` + ``forward``, the
exact per-step work the model runner does, minus the linear layers). Shapes default to
BitNet b1.58 2B4T attention (20 heads, 5 KV heads, head_dim 128, bf16); ``--layers``
keeps memory small (tok/s scale as 1/layers; the ratios do not).

    .venv/bin/python benchmarks/kv_cache_throughput.py                    # 32 x 2048, 2 layers
    .venv/bin/python benchmarks/kv_cache_throughput.py --seqs 8 --context 512 --steps 4   # quick
    .venv/bin/python benchmarks/kv_cache_throughput.py --device cuda --layers 30          # GPU (Triton)

On CPU the ops are the plain-torch twins (dequantize, then attention in float32); on
CUDA they are the Triton kernels. Output: a table and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bitserve.cli_args import positive_int
from bitserve.engine.kv_cache import QUANT_BITS, KVCacheSpec, PagedKVCache, canonical_kv_dtype, default_block_size
from bitserve.engine.kv_layouts import StepBatch

DTYPES = ("bf16", "int8", "int4", "int2")


def make_batch(seq_tables: list[list[int]], starts: list[int], counts: list[int], block_size: int,
               device: torch.device) -> StepBatch:
    """The StepBatch of one step where sequence ``s`` computes ``counts[s]`` tokens from ``starts[s]``."""
    slots, positions, qsl = [], [], [0]
    for blocks, start, count in zip(seq_tables, starts, counts):
        for p in range(start, start + count):
            slots.append(blocks[p // block_size] * block_size + p % block_size)
            positions.append(p)
        qsl.append(qsl[-1] + count)
    ends = [s + c for s, c in zip(starts, counts)]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return StepBatch(as_long(slots), as_long(positions), as_long(seq_tables), as_long(ends), as_long(qsl),
                     list(starts), ends, qsl, seq_tables)


def build_cache(dtype: str, args, device: torch.device, model_dtype: torch.dtype):
    """A cache holding ``args.seqs`` random contexts of ``args.context`` tokens; returns (cache, tables)."""
    kv = canonical_kv_dtype(dtype, model_dtype)
    bs = args.block_size or default_block_size(kv)
    quant = kv in ("int4", "int2")
    spec = KVCacheSpec(args.layers, args.kv_heads, args.head_dim, bs, kv, str(model_dtype).replace("torch.", ""),
                       args.seqs if quant else 0)
    per_seq = -(-(args.context + args.steps + 1) // bs)
    cache = PagedKVCache(spec, args.seqs * per_seq, device)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(args.seqs)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    chunk = args.fill_chunk
    for start in range(0, args.context, chunk):
        count = min(chunk, args.context - start)
        batch = make_batch(tables, [start] * args.seqs, [count] * args.seqs, bs, device)
        state = cache.begin_step(batch)
        t = args.seqs * count
        k = torch.randn(t, args.kv_heads, args.head_dim, generator=gen).to(model_dtype).to(device)
        v = torch.randn(t, args.kv_heads, args.head_dim, generator=gen).to(model_dtype).to(device)
        for layer in range(args.layers):
            cache.fill(layer, k, v, state)
    return cache, tables


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(cache: PagedKVCache, tables, args, device, model_dtype) -> list[float]:
    """Seconds per decode step (one token per sequence, all layers)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    bs = cache.spec.block_size
    times = []
    for step in range(args.steps + 1):  # step 0 warms up
        n = args.seqs
        q = torch.randn(n, args.heads, args.head_dim, generator=gen).to(model_dtype).to(device)
        k = torch.randn(n, args.kv_heads, args.head_dim, generator=gen).to(model_dtype).to(device)
        v = torch.randn(n, args.kv_heads, args.head_dim, generator=gen).to(model_dtype).to(device)
        sync(device)
        t0 = time.perf_counter()
        state = cache.begin_step(make_batch(tables, [args.context + step] * n, [1] * n, bs, device))
        for layer in range(args.layers):
            cache.forward(layer, q, k, v, state)
        sync(device)
        if step:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=positive_int, default=32)
    ap.add_argument("--context", type=positive_int, default=2048, help="tokens already cached per sequence")
    ap.add_argument("--steps", type=positive_int, default=6, help="timed decode steps (after one warm-up)")
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--heads", type=positive_int, default=20)
    ap.add_argument("--kv-heads", type=positive_int, default=5)
    ap.add_argument("--head-dim", type=positive_int, default=128)
    ap.add_argument("--block-size", type=positive_int, default=None, help="default: 16 (bf16/int8), 64 (int4/int2)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--model-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--fill-chunk", type=positive_int, default=256, help="tokens per sequence per fill step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no CUDA device")
    model_dtype = getattr(torch, args.model_dtype)
    if args.heads % args.kv_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes:
        ap.error("--dtypes: the list is empty")
    for dtype in dtypes:
        try:
            kv = canonical_kv_dtype(dtype, model_dtype)
        except ValueError as e:
            ap.error(f"--dtypes: {e}")
        if kv in QUANT_BITS and args.head_dim % (8 // QUANT_BITS[kv]):
            ap.error(f"--head-dim {args.head_dim}: {kv} packs {8 // QUANT_BITS[kv]} values per byte, so it must "
                     f"be a multiple of {8 // QUANT_BITS[kv]}")

    rows = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        cache, tables = build_cache(dtype, args, device, model_dtype)
        fill_s = time.perf_counter() - t0
        times = decode_steps(cache, tables, args, device, model_dtype)
        step = statistics.median(times)
        spec = cache.spec
        rows.append({
            "dtype": spec.dtype, "block_size": spec.block_size, "kv_bytes_per_token": spec.bytes_per_token,
            "kv_bytes_read_per_step": spec.bytes_per_token * args.seqs * (args.context + 1),
            "step_ms": 1e3 * step, "tok_s": args.seqs / step, "fill_s": fill_s, "cache_bytes": cache.nbytes,
        })
        del cache
    base = next((r for r in rows if r["dtype"] == "bfloat16"), rows[0])
    print(f"KV decode: {args.seqs} seqs x {args.context} context, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads x {args.head_dim}, {device}, {torch.get_num_threads()} threads")
    print(f"{'dtype':9s} {'block':>5s} {'B/token':>8s} {'ms/step':>9s} {'tok/s':>9s} {'vs bf16':>8s}")
    for r in rows:
        r["ratio_vs_bf16"] = r["tok_s"] / base["tok_s"]
        print(f"{r['dtype']:9s} {r['block_size']:5d} {r['kv_bytes_per_token']:8d} {r['step_ms']:9.2f} "
              f"{r['tok_s']:9.1f} {r['ratio_vs_bf16']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
