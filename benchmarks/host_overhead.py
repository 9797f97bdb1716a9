#!/usr/bin/env python
"""Host (Python) time of one engine decode step, without the model: what the CPU adds to every
step on a GPU server, next to what the GPU needs for the same step.

The decode forward is captured with a stand-in that replays nothing (its logits stay as the
capture left them), so a step costs only what runs on the host: scheduling, the decode graphs'
static-buffer fill, the sampler's bookkeeping (greedy here: one argmax over small logits),
advancing requests and building token deltas -- ``core.step`` -- and, for the offline API,
detokenizing and stop-string checks as well (``engine.step``). Uses the bundled demo model.

The last columns put the host time next to the H100 bandwidth floor of the same step of BitNet
b1.58 2B4T (TARGETS.md: 1.18 GB of weights with a bf16 head plus 76.8 KB of bf16 KV per token of
context, at 3.35 TB/s): the share of a step the host would take if it did not overlap the GPU.

    python benchmarks/host_overhead.py                       # batches 1..256
    python benchmarks/host_overhead.py --batches 8,64 --steps 20

Writes ``host_overhead.json`` and ``host_overhead.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

WEIGHT_BYTES = 1.18e9  # 2B4T, ternary at 2 bits + bf16 LM head (TARGETS.md)
KV_BYTES_PER_TOKEN = 76.8e3  # bf16 KV of 2B4T
H100_BYTES_PER_S = 3.35e12


class NoReplayCapture:
    """Captures by running the forward once; replays nothing."""

    def capture(self, fn):
        out = fn()
        return (lambda: None), out


def floor_ms(batch: int, context: int) -> float:
    return 1e3 * (WEIGHT_BYTES + batch * context * KV_BYTES_PER_TOKEN) / H100_BYTES_PER_S


def measure(llm_cls, batch: int, steps: int, reps: int) -> dict:
    from bitserve.engine.core import EngineCore
    from bitserve.engine.llm_engine import LLMEngine
    from bitserve.sampling_params import SamplingParams

    llm = llm_cls(max_num_seqs=batch, max_num_batched_tokens=max(1024, 32 * batch), num_kv_blocks=batch * 20 + 8)
    core = EngineCore(llm.core.runner.model, llm.engine_config, max_model_len=llm.max_model_len,
                      eos_token_ids=tuple(llm.eos_token_ids), graph_capture=NoReplayCapture())
    engine = LLMEngine(core, llm.tokenizer)
    prompt = llm.tokenizer.encode("Q: reverse 'stone'\nA:")
    budget = llm.max_model_len - len(prompt) - 1
    params = SamplingParams(max_tokens=budget, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        engine.add_request(str(i), prompt, params)
    while core.stats().num_running < batch or core.runner.graphs.num_replays == 0:  # prefill (real model)
        engine.step()
    if (1 + 2 * reps) * steps > budget - 4:
        raise SystemExit(f"--steps {steps} x {1 + 2 * reps} passes needs a longer context than the demo "
                         f"model's {llm.max_model_len} tokens")
    row = {"batch": batch}
    for label, fn in (("core_ms", core.step), ("engine_ms", engine.step)):
        for _ in range(steps // 4 + 1):
            fn()  # warm
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            best = min(best, (time.perf_counter() - t0) / steps)
        row[label] = 1e3 * best
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--steps", type=int, default=25, help="timed steps per pass (the best of --reps passes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024, help="context per sequence for the GPU floor column")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        ap.error("--batches needs at least one batch size >= 1")
    torch.set_num_threads(1)
    from bitserve import LLM

    rows = []
    for b in batches:
        print(f"batch {b} ...", file=sys.stderr, flush=True)
        row = measure(LLM, b, args.steps, args.reps)
        row["floor_ms"] = floor_ms(b, args.context)
        row["host_share"] = row["core_ms"] / (row["core_ms"] + row["floor_ms"])
        rows.append(row)
    print(f"host time per decode step (no model), this machine; GPU floor: 2B4T on an H100 at {args.context} "
          f"tokens of bf16 KV context")
    print(f"{'batch':>6s} {'core ms':>8s} {'us/seq':>7s} {'+detok ms':>10s} {'us/seq':>7s} {'floor ms':>9s} "
          f"{'host share':>10s}")
    for r in rows:
        b = r["batch"]
        print(f"{b:6d} {r['core_ms']:8.3f} {1e3 * r['core_ms'] / b:7.1f} {r['engine_ms']:10.3f} "
              f"{1e3 * r['engine_ms'] / b:7.1f} {r['floor_ms']:9.3f} {100 * r['host_share']:9.0f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps({"context": args.context, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["batch"] for r in rows]
        ax.plot(xs, [r["core_ms"] for r in rows], "o-", label="engine core step (host)")
        ax.plot(xs, [r["engine_ms"] for r in rows], "s-", label="+ detokenizing (offline API)")
        ax.plot(xs, [r["floor_ms"] for r in rows], "k--", label=f"2B4T H100 floor, {args.context} ctx")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch")
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "host_overhead.png", dpi=110)
        print(f"plot: {out / 'host_overhead.png'}")
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
