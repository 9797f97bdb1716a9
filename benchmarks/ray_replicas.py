#!/usr/bin/env python
"""Ray engine replicas on one machine: throughput of 1 vs 2 CPU replicas, and the TTFT of the Ray hop.

One local Ray instance (``--num-cpus``, default 2) serves every configuration in turn; each
replica reserves one CPU and runs torch on one thread (``OMP_NUM_THREADS=1``), as does the
in-process engine. Requests go through the protocol-neutral ``Frontend`` in this process
(tokenizer, detokenizer, fan-out: what ``bitserve serve`` runs), not through gRPC.

- throughput: ``--requests`` prompts of random token ids (``--prompt-len`` range), greedy,
  ``ignore_eos``, ``--max-tokens`` each, all submitted at once; output tok/s = generated
  tokens / wall time. Configurations: in-process engine, 1 Ray replica, 2 Ray replicas;
  the headline is the 2-vs-1 replica ratio (one run each).
- TTFT: ``--ttft-requests`` requests one at a time (``max_tokens`` 1), time from
  ``Frontend.generate()`` to the first delta, for the in-process engine and 1 Ray replica;
  the difference of the medians is what the Ray hop adds.

Models (``--model``): ``demo`` (the bundled 3M-parameter demo model, where per-token overheads
dominate) or ``random1024`` (the random hidden-1024 BitNet checkpoint of
``engine_throughput.py``, where the engine's compute dominates; written to ``--workdir``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_replicas.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_replicas.py --model random1024 --max-tokens 32

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bitserve.cli_args import int_list, positive_int

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-results" / "ray_replicas.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def _generate(frontend, prompt: list[int], params) -> tuple[int, float | None]:
    """(generated tokens, seconds to the first token)."""
    started, first, tokens = time.perf_counter(), None, 0
    async for delta in frontend.generate(frontend.new_request_id(), prompt, params):
        if delta.token_ids and first is None:
            first = time.perf_counter() - started
        tokens += len(delta.token_ids)
    return tokens, first


def throughput(app, prompts: list[list[int]], max_tokens: int) -> dict:
    from bitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def run():
        await _generate(app.frontend, prompts[0][:4], SamplingParams(temperature=0.0, max_tokens=2))  # warm
        started = time.perf_counter()
        results = await asyncio.gather(*[_generate(app.frontend, p, params) for p in prompts])
        return sum(t for t, _ in results), time.perf_counter() - started

    tokens, wall = asyncio.run(run())
    return {"tokens": tokens, "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 1)}


def ttft(app, prompts: list[list[int]]) -> dict:
    from bitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1)

    async def run():
        for p in prompts[:3]:  # warm
            await _generate(app.frontend, p, params)
        return [(await _generate(app.frontend, p, params))[1] for p in prompts]

    times = sorted(asyncio.run(run()))
    return {"median_ms": round(1000 * statistics.median(times), 2),
            "p90_ms": round(1000 * times[int(0.9 * (len(times) - 1))], 2), "n": len(times)}


def measure(args, path, vocab: int, lo: int, hi: int) -> int:
    """The three configurations on the model at ``path``; prints the table, writes the JSON."""
    from bitserve.app import build_app
    from bitserve.config import EngineConfig, ModelLoadConfig, ReplicaConfig
    from bitserve.replica_ray_cluster import RaySession

    prompts = random_prompts(vocab, args.requests, lo, hi, seed=0)
    ttft_prompts = random_prompts(vocab, args.ttft_requests, lo, hi, seed=1)
    load = ModelLoadConfig(model=str(path), device="cpu")
    engine = EngineConfig(max_num_seqs=64)

    log(f"starting a local Ray instance with {args.num_cpus} CPUs ...")
    session = RaySession.connect("local", num_cpus=args.num_cpus)
    results: dict = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
                     "prompt_len": [lo, hi], "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    try:
        configs = (("in-process", ReplicaConfig()), ("1 Ray replica", ReplicaConfig(1, "local", 0, 1)),
                   ("2 Ray replicas", ReplicaConfig(2, "local", 0, 1)))
        for name, replica_cfg in configs:
            log(f"[{name}] starting ...")
            app = build_app(load, engine, replica_cfg=replica_cfg)
            try:
                entry = {"throughput": throughput(app, prompts, args.max_tokens)}
                if replica_cfg.replicas == 1:
                    entry["ttft"] = ttft(app, ttft_prompts)
            finally:
                app.shutdown()
            log(f"[{name}] {entry}")
            results[name] = entry
    finally:
        session.close()
    one, two = results["1 Ray replica"]["throughput"], results["2 Ray replicas"]["throughput"]
    results["ratio_2_vs_1"] = round(two["tok_per_s"] / one["tok_per_s"], 2)
    results["ray_hop_ttft_ms"] = round(results["1 Ray replica"]["ttft"]["median_ms"]
                                       - results["in-process"]["ttft"]["median_ms"], 2)
    results["loadavg_after"] = os.getloadavg()

    print(f"model {args.model}, {args.requests} requests x {args.max_tokens} tokens, prompts {lo}-{hi} tokens, "
          f"Ray with {args.num_cpus} CPUs, 1 CPU per replica")
    print(f"{'configuration':<16} {'tok/s':>8} {'wall s':>7} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12}")
    for name, _ in configs:
        r = results[name]
        t = r.get("ttft", {})
        print(f"{name:<16} {r['throughput']['tok_per_s']:>8} {r['throughput']['wall_s']:>7} "
              f"{t.get('median_ms', ''):>12} {t.get('p90_ms', ''):>12}")
    print(f"2 vs 1 replica throughput: {results['ratio_2_vs_1']}x; "
          f"Ray hop adds {results['ray_hop_ttft_ms']} ms to the median TTFT")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("demo", "random1024"), default="demo")
    parser.add_argument("--workdir", help="where random1024 is written (default: a temporary folder, removed at exit)")
    parser.add_argument("--num-cpus", type=positive_int, default=2,
                        help="CPUs of the local Ray instance (at least 2: each of the 2 replicas reserves one)")
    parser.add_argument("--requests", type=positive_int, default=64)
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--prompt-len", type=int_list, default="16,48", help="min,max prompt tokens")
    parser.add_argument("--ttft-requests", type=positive_int, default=40)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if len(args.prompt_len) != 2:
        parser.error(f"--prompt-len must be 'min,max' prompt tokens, got {len(args.prompt_len)} number(s)")
    lo, hi = args.prompt_len
    if lo > hi:
        parser.error(f"--prompt-len: min {lo} is above max {hi}")
    if args.num_cpus < 2:  # the 2-replica configuration would wait for a second CPU forever
        parser.error(f"--num-cpus {args.num_cpus}: at least 2 (each of the 2 Ray replicas reserves one CPU)")

    from bitserve.demo import DEMO_MODEL_PATH

    sys.path.insert(0, str(REPO / "benchmarks"))
    from engine_throughput import RANDOM1024, make_random1024

    if args.model == "demo":
        context = json.loads((Path(DEMO_MODEL_PATH) / "config.json").read_text())["max_position_embeddings"]
    else:
        context = RANDOM1024["max_position_embeddings"]
    if hi + args.max_tokens > context:  # the engine refuses such a request
        parser.error(f"--prompt-len max {hi} + --max-tokens {args.max_tokens} exceed the {args.model} model's "
                     f"context of {context} tokens")

    if args.model == "demo":
        return measure(args, DEMO_MODEL_PATH, 384, lo, hi)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bitserve-ray-bench-")
    try:
        path = make_random1024(Path(args.workdir or tmp))
        return measure(args, path, RANDOM1024["vocab_size"], lo, hi)
    finally:
        if tmp is not None:  # the checkpoint written for this run only
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
