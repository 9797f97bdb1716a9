#!/usr/bin/env python
"""Engine steps under steady arrivals: what CUDA graphs save on decode steps and on mixed steps
(a prefill chunk next to decodes), side by side in one run.

Closed loop: ``--seqs`` requests run at once; each has a ``--prompt``-token random prompt and
between ``--output``/2 and ``--output`` tokens to generate, and whenever one finishes a new one
arrives. With chunked prefill (``--chunk`` tokens per step) many steps then carry a prefill chunk
next to the decodes. Each mode runs the same workload on the same loaded model with a fresh engine:

- ``eager``: ``--enforce-eager``, every kernel launched from Python;
- ``decode``: the default engine (decode steps replay CUDA graphs, other steps eager);
- ``piecewise``: also ``--piecewise-graph-tokens`` (mixed and prefill steps of up to that many
  tokens replay piecewise graphs around an eager attention).

Per mode: output tok/s over ``--steps`` timed steps (after ``--warmup``), mean ms of decode-only
steps and of steps with a prefill chunk, how many steps each graph kind replayed. Every step ends
with the sampled ids on the host, so wall time per step is device time plus host time.

    python benchmarks/mixed_steps.py --out /tmp/mixed            # random 2B4T (30 layers), CUDA
    python benchmarks/mixed_steps.py --model demo --device cpu --emulate --steps 20 --seqs 4  # CPU smoke

``--emulate`` captures with the CPU stand-ins (``EagerCapture``, ``EagerPiecewiseCapture``): the
same code paths, no speed-up -- for checking the script without a GPU. Writes ``mixed_steps.json``
and ``mixed_steps.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bitserve.cli_args import non_negative_int, positive_int

REPO = Path(__file__).resolve().parent.parent
MODES = ("eager", "decode", "piecewise")


def load(args):
    from bitserve.loader import load_model

    if args.model == "demo":
        from bitserve.demo import DEMO_MODEL_PATH

        folder = Path(DEMO_MODEL_PATH)
    elif args.model:
        folder = Path(args.model)
    else:  # a random BitNet b1.58 2B4T checkpoint, shared with kv_gpu_check.py's default workdir
        spec = importlib.util.spec_from_file_location("bitnet_2b4t_memory", REPO / "benchmarks" / "bitnet_2b4t_memory.py")
        mem = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mem)
        folder = Path(args.workdir) / f"bitnet-2b4t-random-L{args.layers}"
        if not (folder / mem.MARKER).exists():
            mem.generate_checkpoint(folder, args.layers, seed=0)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    t0 = time.time()
    loaded = load_model(folder, dtype=dtype, device=args.device)
    print(f"loaded {folder.name} ({loaded.config.num_layers} layers) in {time.time() - t0:.0f} s", file=sys.stderr)
    return folder, loaded


def make_core(loaded, args, mode: str):
    from bitserve.config import EngineConfig
    from bitserve.engine.core import EngineCore

    cfg = EngineConfig(max_num_seqs=args.seqs, max_num_batched_tokens=args.chunk, enforce_eager=mode == "eager",
                       piecewise_graph_tokens=args.piecewise_tokens if mode == "piecewise" else 0,
                       kv_cache_memory_mb=args.kv_mb, enable_prefix_caching=False)
    captures = {}
    if args.emulate and mode != "eager":
        from bitserve.engine.cuda_graphs import EagerCapture
        from bitserve.engine.piecewise_graphs import EagerPiecewiseCapture

        captures = {"graph_capture": EagerCapture(),
                    "piecewise_capture": EagerPiecewiseCapture() if mode == "piecewise" else None}
    t0 = time.time()
    core = EngineCore(loaded.model, cfg, max_model_len=args.prompt + args.output + 8, **captures)
    return core, time.time() - t0


def run_mode(loaded, args, mode: str) -> dict:
    from bitserve.engine.core import EngineRequest
    from bitserve.sampling_params import SamplingParams

    core, start_s = make_core(loaded, args, mode)
    gen = torch.Generator().manual_seed(1)  # the same arrivals and lengths in every mode
    vocab = loaded.config.vocab_size
    counter = [0]

    def arrive():
        n_out = int(torch.randint(max(1, args.output // 2), args.output + 1, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (args.prompt,), generator=gen).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        core.add_request(EngineRequest(f"r{counter[0]}", prompt, params))
        counter[0] += 1

    last = {}
    schedule = core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        last["prefill"] = any(c.request.num_computed_tokens < c.request.num_prompt_tokens for c in out.chunks)
        last["tokens"] = sum(c.num_new_tokens for c in out.chunks)
        return out

    core.scheduler.schedule = recording_schedule
    for _ in range(args.seqs):
        arrive()
    decode_ms, mixed_ms, generated = [], [], 0
    t_all, replays0 = None, (0, 0)

    def replays():
        return (core.runner.graphs.num_replays if core.runner.graphs is not None else 0,
                core.stats().piecewise_graph_steps)

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t_all, replays0 = time.perf_counter(), replays()
        t0 = time.perf_counter()
        deltas = core.step()
        dt = 1000 * (time.perf_counter() - t0)
        finished = sum(d.finished for d in deltas)
        for _ in range(finished):
            arrive()
        if i >= args.warmup:
            generated += sum(len(d.token_ids) for d in deltas)
            (mixed_ms if last["prefill"] else decode_ms).append(dt)
    wall = time.perf_counter() - t_all
    decode_replays, piecewise_replays = (a - b for a, b in zip(replays(), replays0))
    row = {
        "mode": mode, "tok_s": generated / wall, "steps": args.steps,
        "decode_steps": len(decode_ms), "mixed_steps": len(mixed_ms),
        "decode_ms": statistics.mean(decode_ms) if decode_ms else None,
        "mixed_ms": statistics.mean(mixed_ms) if mixed_ms else None,
        "decode_graph_replays": decode_replays, "piecewise_replays": piecewise_replays, "engine_start_s": start_s,
        "graphs_captured": core.runner.graphs is not None, "piecewise_captured": core.runner.piecewise is not None,
    }
    return row


def plot(report: dict, path: Path) -> None:
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    rows = report["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    ax1.bar(x, [r["tok_s"] for r in rows], color="tab:blue")
    ax1.set_xticks(list(x), [r["mode"] for r in rows])
    ax1.set_ylabel("output tokens/s")
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [r["decode_ms"] or 0 for r in rows], w, label="decode-only steps")
    ax2.bar([i + w / 2 for i in x], [r["mixed_ms"] or 0 for r in rows], w, label="steps with a prefill chunk")
    ax2.set_xticks(list(x), [r["mode"] for r in rows])
    ax2.set_ylabel("ms per step")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device']}: {report['seqs']} seqs, prompt {report['prompt']}, "
                 f"chunk {report['chunk']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="checkpoint folder, 'demo', or empty: a random 2B4T")
    ap.add_argument("--layers", type=positive_int, default=30, help="layers of the random 2B4T")
    ap.add_argument("--workdir", default="/tmp/bitserve_kv_check_ckpt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=positive_int, default=32)
    ap.add_argument("--prompt", type=positive_int, default=200)
    ap.add_argument("--output", type=positive_int, default=64)
    ap.add_argument("--chunk", type=positive_int, default=256, help="max_num_batched_tokens")
    ap.add_argument("--piecewise-tokens", type=positive_int, default=256)
    ap.add_argument("--steps", type=positive_int, default=200)
    ap.add_argument("--warmup", type=non_negative_int, default=20)
    ap.add_argument("--kv-mb", type=positive_int, default=4096, help="KV-cache budget of each engine (MiB)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--emulate", action="store_true", help="CPU stand-ins for the graph captures")
    ap.add_argument("--out", default="/tmp/bitserve_mixed_steps")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if not modes:
        ap.error(f"--modes: the list is empty; choose from {', '.join(MODES)}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device; use --device cpu --emulate")
    folder, loaded = load(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        rows.append(run_mode(loaded, args, mode))
        gc.collect()  # free that engine (KV cache, graphs) before the next one allocates its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["mode"] == "eager"), rows[0])
    print(f"{folder.name} on {device_name}: {args.seqs} seqs, prompt {args.prompt}, output <= {args.output}, "
          f"chunk {args.chunk}, {args.steps} steps")
    print(f"{'mode':10s} {'tok/s':>8s} {'vs eager':>8s} {'decode ms':>10s} {'mixed ms':>9s} {'mixed':>6s} "
          f"{'graph/pw replays':>17s} {'start s':>8s}")
    for r in rows:
        r["speedup_vs_eager"] = r["tok_s"] / base["tok_s"]
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{r['mode']:10s} {r['tok_s']:8.1f} {r['speedup_vs_eager']:8.2f} {fmt(r['decode_ms']):>10s} "
              f"{fmt(r['mixed_ms']):>9s} {r['mixed_steps']:6d} "
              f"{r['decode_graph_replays']:>8d}/{r['piecewise_replays']:<8d} {r['engine_start_s']:8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": folder.name, "device": device_name, "seqs": args.seqs, "prompt": args.prompt,
              "output": args.output, "chunk": args.chunk, "piecewise_tokens": args.piecewise_tokens,
              "emulated": args.emulate, "rows": rows}
    (out / "mixed_steps.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "mixed_steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
