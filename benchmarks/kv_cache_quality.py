#!/usr/bin/env python
"""Quality of the quantized KV cache per dtype on the demo model: greedy accuracy and perplexity.

    .venv/bin/python benchmarks/kv_cache_quality.py                       # 600 questions, 300 for perplexity
    .venv/bin/python benchmarks/kv_cache_quality.py --n 120 --ppl-n 60    # quick
    .venv/bin/python benchmarks/kv_cache_quality.py --block-size 16       # stress: 16-token key groups

* Accuracy: greedy answers to held-out questions of :mod:`bitserve.demo.task` through
  the offline API (the paged engine, so decode reads the quantized cache).
* Perplexity: teacher-forced on held-out synthetic text: the chat-templated answer
  (+ end-of-turn) of held-out questions given their prompt, through the engine's own
  paged cache (``PagedKVCache`` + ``PagedAttention``), one prefill per batch. The
  quantized layouts give the same numbers for any prefill chunking (see
  ``docs/kv_cache.md``), so this is also what token-by-token decode sees.

Every dtype is compared with the model-dtype cache (``auto``) in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from bitserve import LLM, SamplingParams
from bitserve.cli_args import non_negative_int, positive_int
from bitserve.demo import DEMO_MODEL_PATH
from bitserve.demo.task import check, make_questions
from bitserve.engine.kv_cache import canonical_kv_dtype, default_block_size
from bitserve.engine.kv_layouts import StepBatch
from bitserve.engine.model_runner import PagedAttention


def accuracy(llm: LLM, questions, batch: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    correct = 0
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        outs = llm.chat([q.messages for q in chunk], params)
        correct += sum(check(q, o.text) for q, o in zip(chunk, outs))
    return correct / len(questions)


def answer_sequences(llm: LLM, questions) -> list[tuple[list[int], int]]:
    """(prompt + answer + end-of-turn token ids, number of prompt tokens) per question."""
    out = []
    for q in questions:
        prompt = llm.tokenizer.encode_chat(q.messages, add_generation_prompt=True)
        full = llm.tokenizer.encode_chat(q.messages + [{"role": "assistant", "content": q.answer}],
                                         add_generation_prompt=False)
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            raise ValueError("the chat template does not extend the prompt with the answer")
        out.append((full, len(prompt)))
    return out


@torch.inference_mode()
def score(llm: LLM, seqs: list[tuple[list[int], int]], batch: int) -> tuple[float, int]:
    """Sum of negative log-likelihoods of the non-prompt tokens and their count."""
    core, model = llm.core, llm.model
    bs = core.spec.block_size
    device = model.model.norm.weight.device
    nll, count = 0.0, 0
    batch = min(batch, core.config.max_num_seqs)  # one staging slot per sequence (int4/int2)
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        tables = [core.blocks.allocate(-(-len(ids) // bs)) for ids, _ in chunk]
        try:
            ids, slots, positions, qsl = [], [], [], [0]
            for (toks, _), blocks in zip(chunk, tables):
                ids.extend(toks)
                for p in range(len(toks)):
                    slots.append(blocks[p // bs] * bs + p % bs)
                    positions.append(p)
                qsl.append(qsl[-1] + len(toks))
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
            lens = [len(t) for t, _ in chunk]
            as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
            batch_ = StepBatch(as_long(slots), as_long(positions), table, as_long(lens), as_long(qsl), [0] * len(chunk),
                               lens, qsl, tables)
            hidden = model(as_long(ids), as_long(positions), PagedAttention(core.kv_cache, batch_))
            logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)
            for (toks, n_prompt), q0 in zip(chunk, qsl):
                rows = torch.arange(q0 + n_prompt - 1, q0 + len(toks) - 1, device=device)
                targets = torch.tensor(toks[n_prompt:], device=device)
                nll -= logprobs[rows, targets].sum().item()
                count += len(targets)
        finally:
            for blocks in tables:
                core.blocks.release(blocks)
    return nll, count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL_PATH))
    ap.add_argument("--dtypes", default="auto,int8,int4,int2")
    ap.add_argument("--n", type=positive_int, default=600, help="held-out questions for accuracy")
    ap.add_argument("--ppl-n", type=positive_int, default=300, help="held-out questions for perplexity")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--block-size", type=positive_int, default=None, help="override the per-dtype default block size")
    ap.add_argument("--pre-rope-keys", action="store_true", help="int4/int2: quantize keys before RoPE")
    ap.add_argument("--sink-tokens", type=non_negative_int, default=0, help="int4/int2: first tokens kept in full precision")
    ap.add_argument("--batch", type=positive_int, default=100)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes:
        ap.error("--dtypes: the list is empty")
    for dtype in dtypes:
        try:
            canonical_kv_dtype(dtype, torch.float32)
        except ValueError as e:
            ap.error(f"--dtypes: {e}")
    for dtype in ("int4", "int2"):  # their sink tokens live in each block (KVCacheSpec)
        block = args.block_size or default_block_size(dtype)
        if dtype in dtypes and args.sink_tokens > block:
            ap.error(f"--sink-tokens {args.sink_tokens}: at most the {dtype} block size ({block}, --block-size)")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        questions = make_questions(args.n, seed=args.seed, split="test")
    except ValueError as e:  # more questions than the test split holds
        ap.error(f"--n {args.n}: {e}")
    try:
        ppl_questions = make_questions(args.ppl_n, seed=args.seed + 1, split="test")
    except ValueError as e:
        ap.error(f"--ppl-n {args.ppl_n}: {e}")
    rows = []
    for dtype in dtypes:
        t0 = time.time()
        extra = {}
        if dtype in ("int4", "int2"):
            extra = {"kv_pre_rope_keys": args.pre_rope_keys, "kv_sink_tokens": args.sink_tokens}
        llm = LLM(args.model, kv_cache_dtype=dtype, block_size=args.block_size, **extra)
        acc = accuracy(llm, questions, args.batch)
        nll, count = score(llm, answer_sequences(llm, ppl_questions), args.batch)
        rows.append({"kv_cache_dtype": llm.core.spec.dtype, "requested": dtype, "block_size": llm.core.spec.block_size,
                     "accuracy": acc, "perplexity": math.exp(nll / count), "answer_tokens": count,
                     "kv_bytes_per_token": llm.core.spec.bytes_per_token, "seconds": time.time() - t0})
        del llm
    base = rows[0]
    print(f"model: {args.model}; {args.n} questions (accuracy), {args.ppl_n} answers (perplexity)")
    print(f"{'kv dtype':10s} {'block':>5s} {'B/token':>8s} {'accuracy':>9s} {'delta':>7s} {'ppl':>8s} {'delta':>8s}")
    for r in rows:
        r["accuracy_delta_points"] = 100 * (r["accuracy"] - base["accuracy"])
        r["perplexity_delta"] = r["perplexity"] - base["perplexity"]
        print(f"{r['kv_cache_dtype']:10s} {r['block_size']:5d} {r['kv_bytes_per_token']:8d} {r['accuracy']:9.3f} "
              f"{r['accuracy_delta_points']:+7.1f} {r['perplexity']:8.4f} {r['perplexity_delta']:+8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
