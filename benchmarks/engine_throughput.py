#!/usr/bin/env python
"""Offline throughput (output tok/s) of the bitserve engine vs transformers' ``generate``.

For each model and each concurrency C, C requests are submitted at once to
``bitserve.LLM.generate`` (greedy, ``ignore_eos``, a fixed ``max_tokens``) and
output tok/s = generated tokens / wall time of that call (prefill included).
The baseline is transformers' ``BitNetForCausalLM.generate`` on the same
checkpoint, run one request at a time (what a plain transformers user gets);
its tok/s does not depend on how many requests are timed (``--hf-requests``).

Models (``--models``):

- ``demo``: the bundled demo model (``bitserve.demo.DEMO_MODEL_PATH``, or
  ``--demo-path``); prompts are chat-formatted questions of its task
  (``bitserve.demo.task``, test split). Skipped with a message if absent.
- ``random1024``: a random BitNet b1.58 checkpoint (hidden 1024, 8 layers,
  16 heads / 4 KV heads of 64, intermediate 2816, vocab 8192 (a 32k/128k
  vocabulary would make the LM head dominate on CPU), tied embeddings, 256
  positions) written in the transformers "bitnet" layout (packed uint8, bf16
  scales/embedding) into ``--workdir`` (a temporary folder unless given);
  prompts are random token ids of 32..64 tokens.

Also checks correctness: the engine's greedy completion of one prompt must
equal transformers' (both forced to generate ``max_tokens`` tokens: engine
``min_tokens``, transformers ``min_new_tokens``) -> OK / MISMATCH.

Notes printed with the results: transformers unpacks the packed ternary
weights once at load into dense float matrices (``AutoBitLinear``), so its
decode is a dense GEMV; bitserve keeps them packed (2 bits/weight) and runs
the plain-torch reference kernel (``bitserve.kernels.reference``) on CPU.

    .venv/bin/python benchmarks/engine_throughput.py               # full run
    .venv/bin/python benchmarks/engine_throughput.py --quick       # smaller run
    .venv/bin/python benchmarks/engine_throughput.py --models random1024 --concurrency 1,32

Writes a table to stdout, JSON (``--out``) and a PNG plot (``--plot``).
Goal (engine issue): >= 10x transformers at concurrency 32 on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bitserve.cli_args import int_list, positive_int

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet helpers are torch.compile-decorated

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-results" / "engine_throughput.json"
DEFAULT_PLOT = REPO / "bench-results" / "engine_throughput.png"
GOAL_RATIO, GOAL_CONCURRENCY = 10.0, 32

RANDOM1024 = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
RANDOM_MARKER = ".complete-random1024-v1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- models ---------------------------------------------------------------------------


def make_random1024(workdir: Path) -> Path:
    """Write (or reuse) the random hidden-1024 BitNet checkpoint under ``workdir``."""
    folder = workdir / "random1024"
    if (folder / RANDOM_MARKER).exists():
        log(f"[random1024] reusing checkpoint {folder}")
        return folder
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_checkpoints import bitnet_config, random_bitnet_state, write_bitnet_checkpoint, write_char_tokenizer

    log(f"[random1024] writing random checkpoint to {folder} ...")
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    config = bitnet_config(**RANDOM1024)
    state = random_bitnet_state(config, seed=1024)
    # a realistic embedding scale (N(0, 1) entries with tied weights make every logit row a spike)
    state["model.embed_tokens.weight"] *= 0.05
    write_bitnet_checkpoint(folder, config, state, dtype=torch.bfloat16)
    write_char_tokenizer(folder, 100)  # only for the LLM's tokenizer object; prompts are token ids
    (folder / RANDOM_MARKER).write_text("ok\n")
    log(f"[random1024] written in {time.perf_counter() - t0:.1f} s")
    return folder


def demo_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    from bitserve.demo.task import make_questions

    qs = make_questions(n, seed=seed, split="test")
    return [tokenizer.encode(tokenizer.apply_chat_template(q.messages, add_generation_prompt=True),
                             add_special_tokens=False) for q in qs]


def longest_demo_prompt(path: Path) -> int:
    """Tokens of the longest prompt :func:`demo_prompts` makes: the longest of the whole test split
    (1082 questions, among them the longest phrasing: a count question of 8 letters)."""
    from bitserve.tokenizer import Tokenizer

    return max(map(len, demo_prompts(Tokenizer(path), 1082, seed=0)))


RANDOM_PROMPT_LEN = (32, 64)  # tokens of random1024's prompts (min, max)


def random_prompts(vocab: int, n: int, seed: int, lo: int = RANDOM_PROMPT_LEN[0],
                   hi: int = RANDOM_PROMPT_LEN[1]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -- measurements -----------------------------------------------------------------------


def run_engine(llm, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from bitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs), wall


def engine_greedy(llm, prompt: list[int], max_tokens: int) -> list[int]:
    from bitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    return list(llm.generate([prompt], params)[0].outputs[0].token_ids)


def hf_generate(model, prompt: list[int], max_tokens: int, pad_id: int) -> list[int]:
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    return out[0, len(prompt):].tolist()


def classify_divergence(model, prompt: list[int], ours: list[int], theirs: list[int], d: int) -> tuple[str, dict]:
    """Where the greedy sequences first differ (same prefix before ``d``): is it a near-tie?

    Int8 activation quantization makes a deep model's logits jump by whole quantization steps
    when a rounding flips, so two correct implementations (or transformers in float32 and float64)
    differ by more than float noise. "NEAR-TIE" means transformers' own float32 preference for its
    token over ours, at that step, is smaller than the largest change of its logits (over that
    sequence) when the same model runs in float64. Leaves ``model`` in float64.
    """
    ids = torch.tensor([prompt + ours[:d]])
    pos = ids.shape[1] - 1
    with torch.inference_mode():
        fp32 = model(ids).logits[0].float()
        model.double()
        fp64 = model(ids).logits[0].float()
    noise = (fp32 - fp64).abs().max().item()
    gap = (fp32[pos, theirs[d]] - fp32[pos, ours[d]]).item()
    info = dict(transformers_gap=round(gap, 4), transformers_fp64_noise=round(noise, 4))
    return ("NEAR-TIE" if gap <= noise else "MISMATCH"), info


def load_transformers(path: Path):
    from transformers import BitNetForCausalLM

    model = BitNetForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # transformers (5.x) keeps the non-quantized tensors of a bf16 bitnet checkpoint (embedding,
    # norms) in bf16 despite dtype=float32, and then fails on fp32 x bf16; cast them up.
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    gcfg = model.generation_config
    eos = gcfg.eos_token_id
    pad_id = gcfg.pad_token_id if gcfg.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return model, pad_id


def bench_model(name: str, path: Path, args, concurrencies: list[int], max_tokens: int) -> dict:
    """Engine runs at each concurrency, with the transformers requests interleaved between them
    (so both see the same machine load on average when the machine is shared)."""
    from bitserve import LLM

    log(f"[{name}] loading bitserve engine from {path} (dtype={args.dtype}) ...")
    llm = LLM(str(path), dtype=args.dtype, device="cpu", max_num_seqs=max(max(concurrencies), 1),
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True)
    cfg = llm.loaded.config
    vocab = cfg.vocab_size
    tokenizer = llm.tokenizer
    log(f"[{name}] loading transformers BitNetForCausalLM (dtype=float32) ...")
    model, pad_id = load_transformers(path)

    def prompts_for(n: int, seed: int) -> list[list[int]]:
        return demo_prompts(tokenizer, n, seed) if name == "demo" else random_prompts(vocab, n, seed)

    log(f"[{name}] warm-up ...")
    run_engine(llm, prompts_for(2, 999), 4)
    hf_generate(model, prompts_for(1, 999)[0], 4, pad_id)

    check_prompt = prompts_for(1, 7)[0]
    hf_prompts = [check_prompt] + (prompts_for(args.hf_requests - 1, 4242) if args.hf_requests > 1 else [])
    hf = dict(tokens=0, wall=0.0, outputs=[], loadavg=[])

    def hf_request() -> None:
        i = len(hf["outputs"])
        if i >= len(hf_prompts):
            return
        hf["loadavg"].append(loadavg())
        t0 = time.perf_counter()
        out = hf_generate(model, hf_prompts[i], max_tokens, pad_id)
        dt = time.perf_counter() - t0
        hf["tokens"] += len(out)
        hf["wall"] += dt
        hf["outputs"].append(out)
        log(f"[{name}] transformers request {i + 1}/{len(hf_prompts)}: {len(out)} tokens in {dt:.2f} s "
            f"= {len(out) / dt:.1f} tok/s")

    runs = []
    for c in concurrencies:
        hf_request()
        best = None
        for rep in range(args.repeats):
            prompts = prompts_for(c, 1000 * c + rep)  # fresh prompts: no prefix-cache hits across runs
            la = loadavg()
            log(f"[{name}] engine C={c} rep {rep + 1}/{args.repeats}: {c} requests x {max_tokens} tokens "
                f"(prompt tokens {sum(map(len, prompts))}) ...")
            tokens, wall = run_engine(llm, prompts, max_tokens)
            log(f"[{name}]   {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s (loadavg {la})")
            if best is None or wall < best["wall_s"]:
                best = dict(concurrency=c, requests=c, gen_tokens=tokens,
                            prompt_tokens=sum(map(len, prompts)), wall_s=wall, tok_s=tokens / wall, loadavg=la)
        runs.append(best)
    while len(hf["outputs"]) < len(hf_prompts):
        hf_request()

    ours = engine_greedy(llm, check_prompt, max_tokens)
    theirs = hf["outputs"][0]
    del llm
    gc.collect()
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first_diff is None and len(ours) != len(theirs):
        first_diff = min(len(ours), len(theirs))
    check, detail = "OK", {}
    if first_diff is not None:
        check, detail = classify_divergence(model, check_prompt, ours, theirs, first_diff)
    model = None  # free it before the next model (hf_request above closes over it)
    gc.collect()
    log(f"[{name}] greedy check vs transformers ({len(ours)} tokens): {check}"
        + ("" if first_diff is None else f" (first difference at token {first_diff}: {detail})"))

    hf_tok_s = hf["tokens"] / hf["wall"]
    base = runs[0]["tok_s"] if runs and runs[0]["concurrency"] == 1 else None
    for r in runs:
        r["ratio_vs_engine_c1"] = r["tok_s"] / base if base else None
        r["ratio_vs_transformers"] = r["tok_s"] / hf_tok_s
    return dict(
        model=name, path=str(path),
        config=dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                    intermediate_size=cfg.intermediate_size, vocab_size=vocab),
        max_tokens=max_tokens, runs=runs,
        transformers=dict(requests=len(hf_prompts), gen_tokens=hf["tokens"], wall_s=hf["wall"], tok_s=hf_tok_s,
                          loadavg=hf["loadavg"]),
        greedy_check=dict(result=check, tokens=len(ours), first_difference=first_diff, **detail),
    )


# -- output -----------------------------------------------------------------------------


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(results: list[dict]) -> None:
    head = ("model", "concurrency", "requests", "gen tokens", "wall s", "tok/s", "vs engine C=1", "vs transformers")
    rows = []
    for m in results:
        for r in m["runs"]:
            rows.append((m["model"], str(r["concurrency"]), str(r["requests"]), str(r["gen_tokens"]),
                         f"{r['wall_s']:.2f}", f"{r['tok_s']:.1f}", fmt_ratio(r["ratio_vs_engine_c1"]),
                         fmt_ratio(r["ratio_vs_transformers"])))
        t = m["transformers"]
        rows.append((m["model"], "transformers", str(t["requests"]), str(t["gen_tokens"]), f"{t['wall_s']:.2f}",
                     f"{t['tok_s']:.1f}", "-", "1.00x"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    for m in results:
        at_goal = [r for r in m["runs"] if r["concurrency"] == GOAL_CONCURRENCY]
        verdict = ""
        if at_goal:
            ratio = at_goal[0]["ratio_vs_transformers"]
            verdict = (f"; C={GOAL_CONCURRENCY}: {ratio:.2f}x transformers -> goal >= {GOAL_RATIO:.0f}x "
                       f"{'MET' if ratio >= GOAL_RATIO else 'MISSED'}")
        g = m["greedy_check"]
        extra = ""
        if g["first_difference"] is not None:
            extra = (f" (first difference at token {g['first_difference']}; transformers prefers its token by "
                     f"{g.get('transformers_gap')}; its float32 logits differ from its float64 ones by up to "
                     f"{g.get('transformers_fp64_noise')})")
        print(f"{m['model']}: greedy output == transformers ({g['tokens']} tokens): {g['result']}{extra}{verdict}")


def plot(results: list[dict], path: Path) -> None:
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        raise ImportError("plotting needs matplotlib")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(results):
        color = f"C{i}"
        xs = [r["concurrency"] for r in m["runs"]]
        ys = [r["tok_s"] for r in m["runs"]]
        ax.plot(xs, ys, "o-", color=color, label=f"bitserve engine: {m['model']}")
        for r in m["runs"]:
            ax.annotate(f"{r['ratio_vs_transformers']:.1f}x", (r["concurrency"], r["tok_s"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
        ax.axhline(m["transformers"]["tok_s"], color=color, linestyle="--", linewidth=1,
                   label=f"transformers generate (1 at a time): {m['model']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_x = sorted({r["concurrency"] for m in results for r in m["runs"]})
    ax.set_xticks(all_x)
    ax.set_xticklabels([str(x) for x in all_x])
    ax.set_xlabel("concurrency (requests submitted at once)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"bitserve offline throughput on CPU (torch threads={torch.get_num_threads()}; "
                 f"labels: x transformers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,random1024", help="comma list of: demo, random1024")
    ap.add_argument("--concurrency", type=int_list, default=None,
                    help="comma list (default 1,8,32,64; --quick: 1,8,32)")
    ap.add_argument("--quick", action="store_true", help="smaller run: C in 1,8,32, half the tokens, 2 HF requests")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="bitserve dtype")
    ap.add_argument("--demo-max-tokens", type=positive_int, default=64)
    ap.add_argument("--random-max-tokens", type=positive_int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    ap.add_argument("--hf-requests", type=positive_int, default=4,
                    help="transformers requests timed (one at a time, interleaved with the engine runs)")
    ap.add_argument("--repeats", type=positive_int, default=1, help="engine runs per concurrency (best kept)")
    ap.add_argument("--demo-path", default=None, help="demo model folder (default: bitserve.demo.DEMO_MODEL_PATH)")
    ap.add_argument("--workdir", default=None, help="where the random checkpoint goes (reused if complete); "
                                                     "default: a temporary folder removed at exit")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    ap.add_argument("--plot", default=str(DEFAULT_PLOT), help="PNG plot path")
    args = ap.parse_args(argv)

    concurrencies = args.concurrency or ([1, 8, 32] if args.quick else [1, 8, 32, 64])
    if args.quick:
        args.demo_max_tokens = max(1, args.demo_max_tokens // 2)
        args.random_max_tokens = max(1, args.random_max_tokens // 2)
        args.hf_requests = min(args.hf_requests, 2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"demo", "random1024"}
    if unknown or not models:
        ap.error(f"--models: unknown {', '.join(sorted(unknown))}; valid: demo, random1024" if unknown
                 else "--models: the list is empty; valid: demo, random1024")

    from bitserve.demo import DEMO_MODEL_PATH

    # prompt + max_tokens must fit the model's context (the engine refuses the request otherwise)
    halved = " after --quick halves it" if args.quick else ""
    longest, context = RANDOM_PROMPT_LEN[1], RANDOM1024["max_position_embeddings"]
    if "random1024" in models and longest + args.random_max_tokens > context:
        ap.error(f"--random-max-tokens: at most {context - longest} (prompts of up to {longest} tokens, "
                 f"{context} positions){halved}")
    demo_path = Path(args.demo_path) if args.demo_path else DEMO_MODEL_PATH
    if "demo" in models and (demo_path / "config.json").exists():
        if max(concurrencies + [args.hf_requests - 1]) > 1082:
            ap.error("--concurrency/--hf-requests: the demo's test split holds 1082 questions")
        context = json.loads((demo_path / "config.json").read_text()).get("max_position_embeddings")
        longest = longest_demo_prompt(demo_path) if context else 0
        if context and longest + args.demo_max_tokens > context:
            ap.error(f"--demo-max-tokens: at most {context - longest} (prompts of up to {longest} tokens, "
                     f"{context} positions){halved}")
    torch.set_num_threads(args.threads)

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bitserve-bench-")
        workdir = Path(tmp)

    results, skipped = [], []
    try:
        for name in models:
            if name == "demo":
                path = demo_path
                if not (path / "config.json").exists():
                    msg = f"demo model not found ({path / 'config.json'} does not exist): skipped"
                    log(f"[demo] {msg}")
                    skipped.append(dict(model="demo", reason=msg))
                    continue
                results.append(bench_model("demo", path, args, concurrencies, args.demo_max_tokens))
            else:
                path = make_random1024(workdir)
                results.append(bench_model("random1024", path, args, concurrencies, args.random_max_tokens))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"bitserve engine_throughput: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, bitserve dtype {args.dtype}, transformers dtype float32, "
          f"loadavg now {loadavg()}")
    print("transformers unpacks the packed ternary weights once at load into dense float32 matrices "
          "(AutoBitLinear; a dense GEMV per token); bitserve keeps them packed (2 bits/weight) and runs "
          "the plain-torch reference kernel.")
    for s in skipped:
        print(f"{s['model']}: {s['reason']}")
    if results:
        print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        benchmark="engine_throughput",
        machine=dict(cpu=cpu_model(), cpus=os.cpu_count(), platform=platform.platform(),
                     python=platform.python_version(), torch=torch.__version__, loadavg_end=loadavg()),
        settings=dict(threads=args.threads, dtype=args.dtype, transformers_dtype="float32",
                      concurrency=concurrencies, max_num_batched_tokens=args.max_num_batched_tokens,
                      repeats=args.repeats, quick=args.quick, sampling="greedy, ignore_eos"),
        goal=dict(ratio_vs_transformers=GOAL_RATIO, concurrency=GOAL_CONCURRENCY),
        results=results, skipped=skipped,
    ), indent=2))
    print(f"wrote {out}")
    if results:
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
