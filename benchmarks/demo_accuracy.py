#!/usr/bin/env python
"""Greedy accuracy of the bundled demo model on held-out questions, through the offline API.

    python benchmarks/demo_accuracy.py            # 600 held-out questions (100 per skill)
    python benchmarks/demo_accuracy.py --n 900 --json /tmp/demo_acc.json

The questions come from the test split of :mod:`bitserve.demo.task`, which never
overlaps the questions ``scripts/train_demo.py`` trains on.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from tqdm.auto import tqdm

from bitserve import LLM, SamplingParams
from bitserve.cli_args import non_negative_int, positive_int
from bitserve.demo import DEMO_MODEL_PATH
from bitserve.demo.task import check, make_questions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=600,
                    help="held-out questions, at most 1080 (the mul skill has 180 distinct ones; default: %(default)s)")
    ap.add_argument("--seed", type=int, default=2024, help="question seed (default: %(default)s)")
    ap.add_argument("--model", default=str(DEMO_MODEL_PATH), help="model folder (default: the bundled demo model)")
    ap.add_argument("--batch", type=positive_int, default=100, help="questions per LLM.chat call (default: %(default)s)")
    ap.add_argument("--show-errors", type=non_negative_int, default=10, help="print this many wrong answers")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (to compare)")
    args = ap.parse_args(argv)

    try:
        questions = make_questions(args.n, seed=args.seed, split="test")
    except ValueError as e:  # more questions than the test split holds
        ap.error(f"--n {args.n}: {e}")
    t0 = time.time()
    llm = LLM(args.model, enforce_eager=args.enforce_eager)
    load_s = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=16)

    per_skill: dict[str, list[bool]] = collections.defaultdict(list)
    errors = []
    t1 = time.time()
    with tqdm(total=len(questions), desc="demo accuracy", unit="q") as bar:
        for i in range(0, len(questions), args.batch):
            chunk = questions[i : i + args.batch]
            outs = llm.chat([q.messages for q in chunk], params)
            for q, o in zip(chunk, outs):
                ok = check(q, o.text)
                per_skill[q.skill].append(ok)
                if not ok:
                    errors.append((q.text, q.answer, o.text))
            bar.update(len(chunk))
    gen_s = time.time() - t1

    total = sum(len(v) for v in per_skill.values())
    correct = sum(sum(v) for v in per_skill.values())
    print(f"model: {args.model} (loaded in {load_s:.1f}s)")
    print(f"{'skill':10s} {'n':>5s} {'accuracy':>9s}")
    for skill, v in per_skill.items():
        print(f"{skill:10s} {len(v):5d} {sum(v) / len(v):9.3f}")
    stats = llm.core.stats()
    print(f"{'overall':10s} {total:5d} {correct / total:9.3f}   ({gen_s:.1f}s, {total / gen_s:.1f} questions/s; "
          f"{stats.cuda_graph_steps} of {stats.steps} engine steps from CUDA graphs)")
    for text, answer, got in errors[: args.show_errors]:
        print(f"  wrong: {text!r} expected {answer!r} got {got!r}")
    if args.json:
        result = {
            "model": args.model,
            "n": total,
            "seed": args.seed,
            "overall": correct / total,
            "per_skill": {s: sum(v) / len(v) for s, v in per_skill.items()},
            "seconds": gen_s,
            "engine_steps": stats.steps,
            "cuda_graph_steps": stats.cuda_graph_steps,
            "errors": errors,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
