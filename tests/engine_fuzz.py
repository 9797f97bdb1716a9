"""Randomized differential workloads for the paged engine (server/engine/), and the checks run on them.

A workload is a JSON-able dict: engine options (KV dtype, block size, a KV cache so small that
requests get preempted, a step token budget so small that prompts are prefilled in chunks, prefix
caching on or off, fcfs or priority scheduling, emulated decode and piecewise graphs) and requests
that arrive at given steps, some sharing prompt prefixes or whole prompts, with cache salts,
priorities, greedy / seeded / unseeded sampling, penalties, n > 1, stop strings, stop token ids,
min_tokens, logprobs, and aborts at given steps.

Oracle (``RunAloneOracle``): every greedy or seeded choice of the workload gives the same tokens,
finish reason, stop reason, text and (within ``LOGPROB_TOLERANCE``) logprobs as the same request
run alone on an engine with ample resources and no prefix caching. With an int4/int2 cache tokens
may legitimately move (a partial block is exact, a full one quantized), so only invariants apply.

Invariants, after every step: block reference counts equal the references live requests hold, the
free list is the blocks with no reference, the prefix cache's two maps agree, running and waiting
requests have the right states and blocks, a step stays within the token budget and max_num_seqs,
and int4/int2 staging slots belong to live partial blocks only. At the end: every block and slot is
free and no request state is left anywhere, each choice got exactly one final output, usage counts
(prompt, generation, cached tokens) add up, and max_tokens, stop ids, eos, min_tokens and stop
strings (simulated independently on the char tokenizer) were honoured.

To replay a saved workload: ``run_workload(model, RunAloneOracle(model), workload_from_json(text))``
with ``model = load_tiny_model(folder)``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from bitserve.app import load_serving_model
from bitserve.config import EngineConfig, ModelLoadConfig
from bitserve.engine.core import EngineCore
from bitserve.engine.cuda_graphs import EagerCapture
from bitserve.engine.llm_engine import LLMEngine
from bitserve.engine.piecewise_graphs import EagerPiecewiseCapture
from bitserve.engine.request import FinishReason, RequestStatus
from bitserve.sampling_params import SamplingParams
from tiny_checkpoints import write_tiny_bitnet_model

# every KV-cache layout: the model's dtype (float32 for the tiny models), two other float dtypes,
# int8, int4/int2 with staging slots, int2 keeping the first tokens exact (attention sinks), and
# int4 storing keys before RoPE
KV_KINDS = ("auto", "bf16", "fp16", "int8", "int4", "int2", "int2+sinks", "int4+prerope")

# How far a logprob may move between a request in a workload and the same request alone, by the
# cache's dtype. W2A8 models quantize every activation row to int8: the reference attention takes
# different code paths for 1-row and n-row query chunks, and an ulp-level difference can flip one
# activation code and move a logprob by ~1e-3 even with a float32 cache (the fuzzing pass that set
# these saw at most 1.5e-3). int4/int2 caches are not compared (tokens may move).
LOGPROB_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 3e-2, "int8": 5e-2}

# what a workload can exercise (``run_workload`` returns the subset one run did)
FEATURES = frozenset({
    "preemption", "prefix-cache-hits", "prefix-caching-off", "chunked-prefill", "decode-graphs",
    "piecewise-graphs", "n>1", "stop-string", "stop-token-id", "eos", "abort", "priorities",
    "cache-salts", "logprobs", "min-tokens", "seeded", "unseeded",
})


def check(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def load_tiny_model(folder: Path, seed: int = 7):
    """The tiny BitNet model of tiny_checkpoints (char tokenizer), built in ``folder``, as float32."""
    if not (folder / "config.json").exists():
        write_tiny_bitnet_model(folder, seed=seed)
    return load_serving_model(ModelLoadConfig(model=str(folder), dtype="float32"))


# -- workloads ---------------------------------------------------------------------------------


def random_workload(rng: random.Random, vocab_size: int, max_model_len: int, kv: str) -> dict:
    """A random workload with a ``kv`` cache (one of ``KV_KINDS``). Stop strings and stop ids are
    drawn as positions in the request's own output ([fraction, length] / [fraction]) and made
    concrete by ``RunAloneOracle.resolve_stops``, so that they do trigger (across tokens, too)."""
    engine: dict = {}
    if kv.startswith(("int4", "int2")):
        engine["kv_cache_dtype"] = kv[:4]
        block_size = rng.choice([2, 4, 8, 16, 64])
        if kv.endswith("sinks"):
            engine["kv_sink_tokens"] = rng.randint(1, min(4, block_size))
        if kv.endswith("prerope"):
            engine["kv_pre_rope_keys"] = True
            if rng.random() < 0.3:
                engine["kv_sink_tokens"] = rng.randint(1, min(4, block_size))
    else:
        if kv != "auto":
            engine["kv_cache_dtype"] = kv
        block_size = rng.choice([1, 2, 3, 4, 4, 8, 16])
    engine["block_size"] = block_size
    engine["enable_prefix_caching"] = rng.random() < 0.65
    engine["max_num_seqs"] = rng.choice([1, 2, 3, 4, 6, 8, 16])
    engine["max_num_batched_tokens"] = rng.choice([1, 2, 3, 5, 8, 13, 16, 32, 64, 1024])
    engine["scheduling_policy"] = rng.choice(["fcfs", "fcfs", "priority"])
    graphs = rng.random() < 0.15
    if rng.random() < 0.15:  # mixed and prefill steps through (emulated) piecewise graphs
        engine["piecewise_graph_tokens"] = rng.choice([4, 8, 16, 24])

    prefixes = [[rng.randrange(5, vocab_size) for _ in range(rng.randint(0, 40))] for _ in range(2)]
    requests: list[dict] = []
    biggest = 0  # blocks of the longest single sequence
    for i in range(rng.randint(2, 9)):
        prefix = rng.choice(prefixes)[: rng.randint(0, 40)] if rng.random() < 0.6 else []
        # mostly ordinary tokens, a few special ones (ids 0-4: pad, bos, eos, ...)
        tail = [rng.randrange(5, vocab_size) if rng.random() > 0.03 else rng.randrange(0, 5)
                for _ in range(rng.randint(0 if prefix else 1, 40))]
        prompt = (prefix + tail) or [rng.randrange(5, vocab_size)]
        if rng.random() < 0.1 and requests:  # the exact prompt of an earlier request
            prompt = list(rng.choice(requests)["prompt"])
        prompt = prompt[: max_model_len - 2]
        params = random_params(rng, vocab_size, max_tokens_left=max_model_len - len(prompt))
        arrive = 0 if rng.random() < 0.5 else rng.randint(0, 25)
        abort_at = arrive + rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 30]) if rng.random() < 0.2 else None
        requests.append(dict(
            id=f"r{i}", prompt=prompt, params=params,
            priority=rng.randint(0, 2) if engine["scheduling_policy"] == "priority" else 0,
            salt=rng.choice([None] * 6 + ["a", "b"]), arrive=arrive, abort_at=abort_at))
        biggest = max(biggest, -(-(len(prompt) + params["max_tokens"]) // block_size))
    # a KV cache just big enough for the longest sequence (preemption), sometimes plenty; the
    # decode graphs take one block as their scratch block
    engine["num_kv_blocks"] = biggest + rng.choice([0, 0, 1, 2, 4, 10, 100]) + int(graphs)
    return dict(engine=engine, graphs=graphs, requests=requests)


def random_params(rng: random.Random, vocab_size: int, max_tokens_left: int) -> dict:
    """SamplingParams keywords of one request (stop strings / ids still as positions)."""
    params: dict = {}
    mode = rng.choices(["greedy", "seeded", "unseeded"], [45, 42, 13])[0]
    if mode == "greedy":
        params["temperature"] = 0.0
    else:
        params["temperature"] = rng.choice([0.3, 0.7, 1.0, 1.5, 3.0])
        if mode == "seeded":
            params["seed"] = rng.randrange(0, 2**31)
        if rng.random() < 0.3:
            params["top_p"] = rng.choice([0.5, 0.9, 0.99])
        if rng.random() < 0.3:
            params["top_k"] = rng.choice([1, 3, 10, 50])
        if rng.random() < 0.15:
            params["min_p"] = rng.choice([0.05, 0.2])
    if rng.random() < 0.15:
        params["repetition_penalty"] = rng.choice([0.8, 1.2, 2.0])
    if rng.random() < 0.1:
        params["presence_penalty"] = rng.choice([-1.0, 0.5, 1.5])
    if rng.random() < 0.1:
        params["frequency_penalty"] = rng.choice([-0.5, 0.5, 1.0])
    if rng.random() < 0.1:
        params["logit_bias"] = {rng.randrange(0, vocab_size): rng.choice([-5.0, 3.0, 8.0])}
    params["max_tokens"] = max(1, min(rng.choice([1, 2, 5, 10, 20, 30, 45]), max_tokens_left))
    params["ignore_eos"] = rng.random() < 0.5
    if rng.random() < 0.35:
        params["stop"] = [[rng.random(), rng.randint(1, 3)] for _ in range(rng.randint(1, 3))]
        params["include_stop_str_in_output"] = rng.random() < 0.4
    if rng.random() < 0.2:
        params["stop_token_ids"] = [[rng.random()] for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.25:
        params["min_tokens"] = rng.randint(0, params["max_tokens"])
    params["logprobs"] = rng.choice([None, None, 0, 1, 3, 5])
    if rng.random() < 0.2:
        params["n"] = rng.randint(2, 3)
    if rng.random() < 0.15:
        params["skip_special_tokens"] = False
    return params


def workload_from_json(text: str) -> dict:
    """A workload saved with ``json.dumps`` (logit_bias keys come back as strings)."""
    workload = json.loads(text)
    for r in workload["requests"]:
        if "logit_bias" in r["params"]:
            r["params"]["logit_bias"] = {int(k): v for k, v in r["params"]["logit_bias"].items()}
    return workload


def describe(workload: dict) -> str:
    """The workload's parameters, for an assertion message."""
    lines = [f"engine {json.dumps(workload['engine'], sort_keys=True)}, decode graphs: {workload['graphs']}"]
    for r in workload["requests"]:
        lines.append(f"  {r['id']}: prompt {r['prompt']}, arrive {r['arrive']}, abort_at {r['abort_at']}, "
                     f"priority {r['priority']}, salt {r['salt']!r}, params {json.dumps(r['params'], sort_keys=True)}")
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------


def build_engine(model, engine_options: dict, graphs: bool) -> tuple[EngineCore, LLMEngine]:
    """An engine on the CPU; ``graphs`` and ``piecewise_graph_tokens`` run the decode / piecewise
    graph code paths with eager 'captures' (the same bookkeeping as CUDA graphs)."""
    core = EngineCore(
        model.loaded.model, EngineConfig(**engine_options), max_model_len=model.max_model_len,
        eos_token_ids=model.eos_token_ids, default_seed=0,
        graph_capture=EagerCapture() if graphs else None,
        piecewise_capture=EagerPiecewiseCapture() if engine_options.get("piecewise_graph_tokens") else None)
    return core, LLMEngine(core, model.tokenizer)


def check_block_state(core: EngineCore, where: str) -> None:
    """Reference counts, free list, prefix-cache maps, request states and staging slots agree."""
    blocks, sched = core.blocks, core.scheduler
    live = list(sched.requests.values())
    held = [0] * blocks.num_blocks
    for r in live:
        check(len(set(r.block_ids)) == len(r.block_ids), f"{where}: {r.request_id} holds a block twice {r.block_ids}")
        for b in r.block_ids:
            held[b] += 1
    check(held == blocks.ref_counts, f"{where}: ref counts {blocks.ref_counts} != references held {held}")
    check(set(blocks.free) == {b for b in range(blocks.num_blocks) if held[b] == 0},
          f"{where}: free list {list(blocks.free)} disagrees with the references held {held}")
    for h, b in blocks.cached.items():
        check(blocks.block_hash[b] == h, f"{where}: prefix cache maps a hash to block {b}, which has another hash")
    for r in sched.running:
        check(r.status == RequestStatus.RUNNING, f"{where}: {r.request_id} in running with {r.status}")
        check(len(r.block_ids) >= blocks.blocks_needed(r.num_computed_tokens),
              f"{where}: {r.request_id} computed {r.num_computed_tokens} tokens in {len(r.block_ids)} blocks")
    waiting = list(sched.waiting)
    check(len(waiting) == len(sched.waiting), f"{where}: waiting queue of {len(sched.waiting)} lists {len(waiting)}")
    for r in waiting:
        check(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED),
              f"{where}: {r.request_id} waiting with {r.status}")
        check(not r.block_ids, f"{where}: waiting {r.request_id} holds blocks {r.block_ids}")
    check(len(sched.running) + len(waiting) == len(live),
          f"{where}: {len(live)} requests known, {len(sched.running)} running + {len(waiting)} waiting")
    check(len(sched.running) <= sched.max_num_seqs, f"{where}: {len(sched.running)} running > max_num_seqs")
    layout = core.kv_cache.layout
    if hasattr(layout, "_slot_of"):  # int4/int2: staging slots of partially filled blocks
        for b in layout._slot_of:
            check(held[b] > 0, f"{where}: staging slot held by free block {b}")
        total = core.spec.num_stage_slots - (1 if layout._graph is not None else 0)
        check(len(layout._slot_of) + len(layout._free_slots) == total,
              f"{where}: staging slots {len(layout._slot_of)} used + {len(layout._free_slots)} free != {total}")
        check(len(set(layout._slot_of.values())) == len(layout._slot_of), f"{where}: a staging slot is shared")


def check_nothing_left(core: EngineCore, engine: LLMEngine) -> None:
    """After the last request finished: every block and staging slot free, no request state anywhere."""
    blocks = core.blocks
    check(blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts),
          f"leak: {blocks.num_blocks - blocks.num_free_blocks} blocks not free, refs={sum(blocks.ref_counts)}")
    sched = core.scheduler
    check(not sched.requests and not sched.running and len(sched.waiting) == 0, "leak: scheduler still holds requests")
    check(not core._states, f"leak: sampling states left {list(core._states)}")
    check(core.sampler.penalties.rows_in_use == 0,
          f"leak: {core.sampler.penalties.rows_in_use} penalty rows held after every request ended")
    check(not engine._requests and not engine._owner,
          f"leak: LLMEngine keeps {list(engine._requests)} {list(engine._owner)}")
    layout = core.kv_cache.layout
    if hasattr(layout, "_slot_of"):
        check(not layout._slot_of, f"leak: staging slots held {layout._slot_of}")


def drive(core: EngineCore, engine: LLMEngine, requests: list[dict], step_checks: bool = True,
          max_steps: int = 20000) -> tuple[dict, set[str]]:
    """Run requests through LLMEngine, adding and aborting them at their steps. Returns
    ``{request id: {choice index: record}}`` (tokens, text, logprobs, final output) and the
    scheduling features seen (chunked prefill)."""
    results: dict = {}
    seen: set[str] = set()
    sched = core.scheduler
    schedule = sched.schedule
    budget, max_seqs = sched.max_num_batched_tokens, sched.max_num_seqs
    scheduled = [0]

    def checked_schedule():
        out = schedule()
        scheduled[0] = len(out.chunks)
        check(out.num_tokens <= budget, f"a step schedules {out.num_tokens} tokens > budget {budget}")
        check(len(out.chunks) <= max_seqs, f"a step schedules {len(out.chunks)} chunks > max_num_seqs {max_seqs}")
        check(len({id(c.request) for c in out.chunks}) == len(out.chunks), "a request scheduled twice in a step")
        for c in out.chunks:
            check(c.num_new_tokens >= 1, "an empty chunk")
            check(c.request.num_computed_tokens + c.num_new_tokens <= c.request.num_tokens, "a chunk past known tokens")
            if not c.samples:
                seen.add("chunked-prefill")
        return out

    def record(deltas, where):
        for d in deltas:
            rec = results[d.request_id][d.index]
            check(rec["final"] is None, f"{where}: {d.request_id}[{d.index}] got a delta after its final one")
            check(len(d.samples) in (0, len(d.token_ids)), f"{where}: samples/token_ids length mismatch")
            check(all(s.token_id == t for s, t in zip(d.samples, d.token_ids)), f"{where}: sample ids != token ids")
            rec["tokens"].extend(d.token_ids)
            rec["text"] += d.text
            rec["logprobs"].extend((s.token_id, s.logprob, s.top_logprobs) for s in d.samples)
            if d.finished:
                rec["final"] = dict(reason=d.finish_reason, stop_reason=d.stop_reason, prompt=d.num_prompt_tokens,
                                    cached=d.num_cached_tokens, output=d.num_output_tokens)

    sched.schedule = checked_schedule
    try:
        pending = sorted(requests, key=lambda r: r["arrive"])
        added: set[str] = set()
        step = idle = 0
        while True:
            while pending and pending[0]["arrive"] <= step:
                r = pending.pop(0)
                params = SamplingParams(**r["params"])
                results[r["id"]] = {i: dict(tokens=[], text="", logprobs=[], final=None) for i in range(params.n)}
                engine.add_request(r["id"], r["prompt"], params, priority=r["priority"], cache_salt=r["salt"])
                added.add(r["id"])
            for r in requests:
                if r.get("abort_at") == step and r["id"] in added:
                    record(engine.abort(r["id"]), f"abort of {r['id']} at step {step}")
            if not pending and not engine.has_unfinished():
                return results, seen
            scheduled[0] = 0
            record(engine.step(), f"step {step}")
            if step_checks:
                check_block_state(core, f"after step {step}")
            if not scheduled[0] and not pending:
                idle += 1
                check(idle < 5 or any(r.get("abort_at") is not None and r["abort_at"] > step for r in requests),
                      f"hang: {idle} steps without work, running={len(sched.running)} waiting={len(sched.waiting)}")
            else:
                idle = 0
            step += 1
            check(step < max_steps, "hang: too many steps")
    finally:
        sched.schedule = schedule


# -- per-choice checks -------------------------------------------------------------------------


def expected_text(tokenizer, tokens: list[int], params: SamplingParams, ends_on_token: bool):
    """An independent model of the text and the stop-string cut (exact for the char tokenizer):
    returns (text, stop string found or None, number of tokens when it completed)."""
    include = params.include_stop_str_in_output
    ids = tokens[:-1] if ends_on_token and not include and tokens else list(tokens)

    def decode(x):
        return tokenizer.decode(x, skip_special_tokens=params.skip_special_tokens)

    previous = ""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if params.stop and k > params.min_tokens and len(text) > len(previous):
            best = None
            for s in params.stop:  # a stop string that ends in the text new with token k
                i = text.find(s, max(0, len(previous) - len(s) + 1))
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                return text[: best[0] + (len(best[1]) if include else 0)], best[1], k
        previous = text
    return decode(ids), None, None


def check_choice(model, request: dict, params: SamplingParams, index: int, rec: dict, block_size: int,
                 caching: bool) -> None:
    """One choice's final output, counts, logprobs and stop semantics."""
    name = f"{request['id']}[{index}]"
    final, tokens = rec["final"], rec["tokens"]
    check(final is not None, f"{name}: no final output")
    reason, stop_reason = final["reason"], final["stop_reason"]
    prompt_len = len(request["prompt"])
    check(final["output"] == len(tokens), f"{name}: num_output_tokens {final['output']} != {len(tokens)} tokens")
    check(final["prompt"] == prompt_len, f"{name}: num_prompt_tokens {final['prompt']} != {prompt_len}")
    check(final["cached"] % block_size == 0 and final["cached"] <= max(0, prompt_len - 1),
          f"{name}: num_cached_tokens {final['cached']} (prompt {prompt_len}, block size {block_size})")
    check(caching or final["cached"] == 0, f"{name}: {final['cached']} cached tokens with prefix caching off")
    check(len(tokens) <= params.max_tokens, f"{name}: {len(tokens)} tokens > max_tokens {params.max_tokens}")
    check(reason != FinishReason.ABORT or request.get("abort_at") is not None, f"{name}: ABORT without an abort")
    if params.logprobs is not None:
        check(len(rec["logprobs"]) == len(tokens), f"{name}: {len(rec['logprobs'])} logprobs for {len(tokens)} tokens")
        for t, lp, top in rec["logprobs"]:
            check(lp is not None and lp <= 1e-6 and top is not None and len(top) == params.logprobs,
                  f"{name}: bad logprob entry {t} {lp} {top}")
            check(all(a[1] >= b[1] for a, b in zip(top, top[1:])), f"{name}: top logprobs not descending")
    else:
        check(all(lp is None for _, lp, _ in rec["logprobs"]), f"{name}: logprobs without asking")
    if reason == FinishReason.LENGTH:
        check(len(tokens) == params.max_tokens or prompt_len + len(tokens) >= model.max_model_len,
              f"{name}: LENGTH after {len(tokens)} of {params.max_tokens} tokens")
    eos = frozenset(model.eos_token_ids)
    if reason == FinishReason.EOS:
        check(not params.ignore_eos and tokens and tokens[-1] in eos, f"{name}: EOS finish on {tokens[-1:]}")
    stopped_by_id = reason == FinishReason.STOP and isinstance(stop_reason, int)
    if stopped_by_id:
        check(tokens and tokens[-1] == stop_reason and stop_reason in params.stop_token_ids,
              f"{name}: stop token finish {stop_reason} on {tokens[-1:]}")
    # tokens 1..min_tokens are never stop ids or eos; a later one ends the request
    stopping = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
    for k, t in enumerate(tokens, start=1):
        check(k > params.min_tokens or t not in stopping,
              f"{name}: token {k} = {t} is a stop/eos id within min_tokens={params.min_tokens}")
        check(k == len(tokens) or k <= params.min_tokens or t not in stopping,
              f"{name}: token {k} = {t} should have stopped the request ({len(tokens)} tokens)")
    text, stop, k = expected_text(model.tokenizer, tokens, params, reason == FinishReason.EOS or stopped_by_id)
    if reason == FinishReason.STOP and isinstance(stop_reason, str):
        check(stop == stop_reason and k == len(tokens) and rec["text"] == text,
              f"{name}: stop string {stop_reason!r} after {len(tokens)} tokens, text {rec['text']!r}; "
              f"expected {stop!r} after {k}, text {text!r}")
    elif reason != FinishReason.ABORT:
        check(stop is None, f"{name}: stop string {stop!r} completed at token {k} was missed (finish {reason})")
        check(rec["text"] == text, f"{name}: text {rec['text']!r} != expected {text!r}")
    else:
        check(text.startswith(rec["text"]) or stop is not None, f"{name}: aborted text {rec['text']!r} not in {text!r}")


def compare_with_alone(name: str, got: dict, alone: dict, params: SamplingParams, tolerance: float) -> list[str]:
    """Differences between a choice in the workload and the same choice run alone (empty: none).
    A greedy choice may take the other token of a near-tie (top-2 gap < 2 * tolerance)."""
    got_tokens, want_tokens = got["tokens"], alone["tokens"]
    if got_tokens != want_tokens:
        j = next((i for i, (a, b) in enumerate(zip(got_tokens, want_tokens)) if a != b),
                 min(len(got_tokens), len(want_tokens)))
        top = alone["logprobs"][j][2] if j < len(alone["logprobs"]) else []
        if params.greedy and len(top) >= 2 and top[0][1] - top[1][1] < 2 * tolerance:
            return []
        return [f"{name}: tokens differ at {j}: got {got_tokens[j:j + 5]}, alone {want_tokens[j:j + 5]} "
                f"(lengths {len(got_tokens)} and {len(want_tokens)})"]
    problems = []
    finish = (got["final"]["reason"], got["final"]["stop_reason"])
    alone_finish = (alone["final"]["reason"], alone["final"]["stop_reason"])
    if finish != alone_finish:
        problems.append(f"{name}: finish {finish[0]}/{finish[1]!r}, alone {alone_finish[0]}/{alone_finish[1]!r}")
    if got["text"] != alone["text"]:
        problems.append(f"{name}: text {got['text']!r}, alone {alone['text']!r}")
    if params.logprobs is not None:
        for i, ((_, lp, top), (_, want_lp, want_top)) in enumerate(zip(got["logprobs"], alone["logprobs"])):
            if abs(lp - want_lp) > tolerance:
                problems.append(f"{name}: logprob of token {i} {lp:.6f}, alone {want_lp:.6f}")
                break
            want = dict(want_top)
            off = [(t, v) for t, v in top if t in want and abs(v - want[t]) > tolerance]
            near_tie = any(abs(a[1] - b[1]) <= 2 * tolerance for a, b in zip(want_top, want_top[1:]))
            if off or ([t for t, _ in top] != [t for t, _ in want_top[: len(top)]] and not near_tie):
                problems.append(f"{name}: top logprobs at {i}: {top}, alone {want_top[: len(top)]}")
                break
    return problems


# -- the oracle and a whole run ----------------------------------------------------------------


class RunAloneOracle:
    """Each request run alone (arriving at step 0, never aborted, no salt, priority 0, always with
    5 logprobs, which never change sampling) on an engine with the workload's KV layout, ample
    blocks and token budget and no prefix caching. Engines and outputs are cached across workloads."""

    LAYOUT_OPTIONS = ("kv_cache_dtype", "block_size", "kv_sink_tokens", "kv_pre_rope_keys")

    def __init__(self, model):
        self.model = model
        self._engines: dict = {}
        self._outputs: dict = {}

    def choices(self, workload: dict, request: dict) -> dict:
        """``{choice index: record}`` of ``request`` run alone."""
        layout = {k: v for k, v in workload["engine"].items() if k in self.LAYOUT_OPTIONS}
        engine_key = json.dumps(layout, sort_keys=True)
        params = dict(request["params"], logprobs=5)
        key = (engine_key, tuple(request["prompt"]), json.dumps(params, sort_keys=True))
        if key not in self._outputs:
            if engine_key not in self._engines:
                blocks_per_seq = -(-self.model.max_model_len // layout["block_size"])
                options = dict(layout, enable_prefix_caching=False, max_num_batched_tokens=4096, max_num_seqs=8,
                               num_kv_blocks=4 * blocks_per_seq + 4)
                self._engines[engine_key] = build_engine(self.model, options, graphs=False)
            core, engine = self._engines[engine_key]
            alone = dict(request, params=params, arrive=0, abort_at=None, id="alone", salt=None, priority=0)
            results, _ = drive(core, engine, [alone], step_checks=False)
            check_nothing_left(core, engine)
            self._outputs[key] = results["alone"]
        return self._outputs[key]

    def resolve_stops(self, workload: dict) -> dict:
        """A copy of ``workload`` whose stop strings / ids given as positions ([fraction, length] /
        [fraction]) are substrings / tokens of the request's output run alone without them."""
        workload = copy.deepcopy(workload)
        for r in workload["requests"]:
            p = r["params"]
            if not any(isinstance(x, list) for x in p.get("stop", []) + p.get("stop_token_ids", [])):
                continue
            bare = dict(r, params={k: v for k, v in p.items() if k not in ("stop", "stop_token_ids")})
            first = self.choices(workload, bare)[0]
            text, tokens = first["text"], first["tokens"]
            if "stop" in p:
                p["stop"] = [(text[int(f * len(text)): int(f * len(text)) + n] or text[-1]) if text else "zq"
                             for f, n in p["stop"]]
            if "stop_token_ids" in p:
                p["stop_token_ids"] = [tokens[int(f * len(tokens))] if tokens else 7 for (f,) in p["stop_token_ids"]]
        return workload


def run_workload(model, oracle: RunAloneOracle, workload: dict) -> set[str]:
    """Run a workload (stops already resolved) with every check; returns the ``FEATURES`` it
    exercised. Raises AssertionError on the first broken invariant or on differences from the oracle."""
    core, engine = build_engine(model, workload["engine"], workload["graphs"])
    results, seen = drive(core, engine, workload["requests"])
    check_nothing_left(core, engine)
    stats = core.stats()
    block_size = core.spec.block_size
    caching = workload["engine"]["enable_prefix_caching"]
    generation_tokens = prompt_tokens = 0
    for r in workload["requests"]:
        params = SamplingParams(**r["params"])
        for index, rec in results[r["id"]].items():
            check_choice(model, r, params, index, rec, block_size, caching)
            generation_tokens += len(rec["tokens"])
            prompt_tokens += len(r["prompt"]) if rec["tokens"] else 0
    check(stats.generation_tokens == generation_tokens,
          f"stats.generation_tokens {stats.generation_tokens} != {generation_tokens} tokens received")
    check(stats.prompt_tokens == prompt_tokens, f"stats.prompt_tokens {stats.prompt_tokens} != {prompt_tokens}")
    check(stats.prefix_cache_hits <= stats.prefix_cache_queries, "prefix-cache hits > queries")

    tolerance = LOGPROB_TOLERANCE.get(core.spec.dtype)
    problems = []
    if tolerance is not None:  # int4/int2: invariants only
        for r in workload["requests"]:
            params = SamplingParams(**r["params"])
            if r.get("abort_at") is not None or (not params.greedy and params.seed is None):
                continue
            alone = oracle.choices(workload, r)
            for index, rec in results[r["id"]].items():
                problems += compare_with_alone(f"{r['id']}[{index}]", rec, alone[index], params, tolerance)
    check(not problems, f"{core.spec.dtype} KV, differences from the requests run alone:\n" + "\n".join(problems))
    return seen | features_of(workload, results, stats)


def features_of(workload: dict, results: dict, stats) -> set[str]:
    """What a finished run exercised, from its configuration, outputs and engine stats."""
    engine, requests = workload["engine"], workload["requests"]
    params = [r["params"] for r in requests]
    finals = [rec["final"] for choices in results.values() for rec in choices.values()]
    seen = {
        "preemption": stats.num_preemptions > 0,
        "prefix-cache-hits": stats.prefix_cache_hits > 0,
        "prefix-caching-off": not engine["enable_prefix_caching"],
        "decode-graphs": stats.cuda_graph_steps > stats.piecewise_graph_steps,
        "piecewise-graphs": stats.piecewise_graph_steps > 0,
        "n>1": any(p.get("n", 1) > 1 for p in params),
        "stop-string": any(f["reason"] == FinishReason.STOP and isinstance(f["stop_reason"], str) for f in finals),
        "stop-token-id": any(f["reason"] == FinishReason.STOP and isinstance(f["stop_reason"], int) for f in finals),
        "eos": any(f["reason"] == FinishReason.EOS for f in finals),
        "abort": any(f["reason"] == FinishReason.ABORT for f in finals),
        "priorities": engine["scheduling_policy"] == "priority" and len({r["priority"] for r in requests}) > 1,
        "cache-salts": any(r["salt"] for r in requests),
        "logprobs": any(p.get("logprobs") is not None for p in params),
        "min-tokens": any(p.get("min_tokens") for p in params),
        "seeded": any(p.get("seed") is not None for p in params),
        "unseeded": any(p["temperature"] > 0 and p.get("seed") is None for p in params),
    }
    return {name for name, happened in seen.items() if happened}


def check_workload(model, oracle: RunAloneOracle, workload: dict, save_to: Path | None = None) -> set[str]:
    """``run_workload`` after resolving stops; a failure (or crash) is re-raised as an AssertionError
    naming every parameter of the workload, which is also saved as JSON to ``save_to`` if given."""
    try:
        workload = oracle.resolve_stops(workload)
        return run_workload(model, oracle, workload)
    except Exception as exc:
        saved = ""
        if save_to is not None:
            save_to.write_text(json.dumps(workload))
            saved = f"\n(saved to {save_to}; replay with run_workload(model, oracle, workload_from_json(text)))"
        raise AssertionError(f"{type(exc).__name__}: {exc}\nworkload:\n{describe(workload)}{saved}") from exc
