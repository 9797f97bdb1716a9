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
    python benchmarks/host_overhead.py --batches 64,256 --serving   # + the streaming path

``--serving`` also streams every sequence through the serving path (an ``AsyncEngine`` thread and
one ``Frontend`` coroutine per stream, detokenizing; no gRPC) and prints the decode step time at
Python's default GIL switch interval (5 ms) next to the engine's (``AsyncEngine`` lowers it: the
engine thread otherwise waits behind the event loop), with how many tokens each delta carried
(more than one when a consumer fell behind and its deltas were coalesced).

Writes ``host_overhead.json`` and ``host_overhead.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bitserve.cli_args import int_list, non_negative_int, positive_int

WEIGHT_BYTES = 1.18e9  # 2B4T, ternary at 2 bits + bf16 LM head (TARGETS.md)
KV_BYTES_PER_TOKEN = 76.8e3  # bf16 KV of 2B4T
H100_BYTES_PER_S = 3.35e12


class NoReplayCapture:
    """Captures by running the forward once; replays nothing."""

    def capture(self, fn):
        out = fn()
        return (lambda: None), out


class ContextTooShort(ValueError):
    """--steps x --reps decode steps do not fit the demo model's context."""


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
        raise ContextTooShort(f"--steps {steps} x {1 + 2 * reps} passes (--reps {reps}) needs a longer context "
                              f"than the demo model's {llm.max_model_len} tokens: at most "
                              f"{(budget - 4) // (1 + 2 * reps)} steps")
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


def measure_serving(llm_cls, batch: int, switch_s: float | None) -> dict:
    """The serving path without gRPC: ``batch`` coroutines stream completions through the
    ``Frontend`` (detokenizing) from an ``AsyncEngine`` thread. ``switch_s`` None: the engine sets
    its own GIL switch interval; else Python's interval is set to it and left alone."""
    import asyncio

    from bitserve.engine.async_engine import AsyncEngine
    from bitserve.engine.core import EngineCore
    from bitserve.frontend import Frontend
    from bitserve.replica import LocalReplica
    from bitserve.sampling_params import SamplingParams

    llm = llm_cls(max_num_seqs=batch, max_num_batched_tokens=max(1024, 32 * batch), num_kv_blocks=batch * 20 + 8)
    core = EngineCore(llm.core.runner.model, llm.engine_config, max_model_len=llm.max_model_len,
                      eos_token_ids=tuple(llm.eos_token_ids), graph_capture=NoReplayCapture())
    marks = []
    step = core.step

    def timed_step():
        replays = core.runner.graphs.num_replays
        out = step()
        if core.runner.graphs.num_replays > replays:  # a decode step (prefill steps run the model)
            marks.append(time.perf_counter())
        return out

    core.step = timed_step
    before = sys.getswitchinterval()
    if switch_s is not None:
        sys.setswitchinterval(switch_s)
        engine = AsyncEngine(core, gil_switch_interval_s=None)
    else:
        engine = AsyncEngine(core)
    switch_ms = 1e3 * sys.getswitchinterval()  # what the run uses
    frontend = Frontend(llm.tokenizer, LocalReplica(engine), None)
    prompt = llm.tokenizer.encode("Q: reverse 'stone'\nA:")
    params = SamplingParams(max_tokens=llm.max_model_len - len(prompt) - 1, ignore_eos=True, temperature=0.0)
    counts = {"tokens": 0, "deltas": 0}

    async def one(i):
        async for delta in frontend.generate(f"r{i}", prompt, params):
            counts["tokens"] += len(delta.token_ids)
            counts["deltas"] += 1

    async def run():
        await asyncio.gather(*(one(i) for i in range(batch)))

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
        sys.setswitchinterval(before)
    skip = max(2, len(marks) // 10)
    window = marks[skip:-skip]
    return {"batch": batch, "switch_ms": switch_ms,
            "step_ms": 1e3 * (window[-1] - window[0]) / max(1, len(window) - 1),
            "tokens_per_delta": counts["tokens"] / max(1, counts["deltas"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int_list, default="1,8,32,64,128,256", help="comma list of batch sizes")
    ap.add_argument("--steps", type=positive_int, default=25, help="timed steps per pass (the best of --reps passes)")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--context", type=non_negative_int, default=1024, help="context per sequence for the GPU floor column")
    ap.add_argument("--serving", action="store_true",
                    help="also time the serving path (AsyncEngine + Frontend, one coroutine per stream) at "
                         "Python's default GIL switch interval and at the engine's")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    batches = args.batches
    torch.set_num_threads(1)
    from bitserve import LLM

    rows = []
    for b in batches:
        print(f"batch {b} ...", file=sys.stderr, flush=True)
        try:
            row = measure(LLM, b, args.steps, args.reps)
        except ContextTooShort as e:  # raised before any timing (the first batch)
            ap.error(str(e))
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
    serving = []
    if args.serving:
        from bitserve.engine.async_engine import GIL_SWITCH_INTERVAL_S

        for b in batches:
            print(f"serving path, batch {b} ...", file=sys.stderr, flush=True)
            default = measure_serving(LLM, b, 0.005)
            lowered = measure_serving(LLM, b, None)
            serving.append({"batch": b, "default": default, "engine": lowered,
                            "speedup": default["step_ms"] / lowered["step_ms"]})
        print(f"serving path (AsyncEngine thread + Frontend coroutines, no gRPC): decode step, ms; GIL switch "
              f"interval 5 ms (Python's default) vs {1e3 * GIL_SWITCH_INTERVAL_S:g} ms (the engine's)")
        print(f"{'batch':>6s} {'5 ms':>8s} {'tok/delta':>9s} {'engine':>8s} {'tok/delta':>9s} {'speedup':>8s}")
        for r in serving:
            d, e = r["default"], r["engine"]
            print(f"{r['batch']:6d} {d['step_ms']:8.3f} {d['tokens_per_delta']:9.2f} {e['step_ms']:8.3f} "
                  f"{e['tokens_per_delta']:9.2f} {r['speedup']:8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps({"context": args.context, "rows": rows, "serving": serving},
                                                       indent=2))
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        print("no matplotlib: no plot", file=sys.stderr)
    else:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
