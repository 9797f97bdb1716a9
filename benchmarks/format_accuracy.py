#!/usr/bin/env python
"""The demo model converted to every format: does it load, serve, and still answer?

    python benchmarks/format_accuracy.py                 # 200 held-out questions per format
    python benchmarks/format_accuracy.py --n 600 --out /tmp/formats

The bundled demo model is trained quantization-aware as a BitNet b1.58 ternary model. Each row
converts it (``bitserve.converters`` / the GGUF writer), loads the result with bitserve's format
detection (or the named format), and measures greedy accuracy through ``LLM.chat`` on the held-out
questions of ``bitserve.demo.task``, plus the largest logit difference from the original on a few
prompts. Lossless conversions must match the original; post-training conversions from the
dequantized weights show what a format costs a model that was not trained for it. Writes
``format_accuracy.json`` and ``format_accuracy.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bitserve import LLM, SamplingParams
from bitserve.cli_args import positive_int
from bitserve.converters import convert_checkpoint
from bitserve.demo import DEMO_MODEL_PATH
from bitserve.demo.task import check, make_questions
from bitserve.plugins.base import QuantLinear


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "original", "lossless" or "post-training"
    build: str  # how the checkpoint is made (for the table)
    fmt: str | None = None  # format to force (None: detection)


ROWS = [
    Row("bitnet (QAT, shipped)", "original", "as shipped"),
    Row("gguf TQ2_0", "lossless", "convert --to gguf-tq2_0"),
    Row("gguf TQ1_0", "lossless", "convert --to gguf-tq1_0"),
    Row("gguf I2_S", "lossless", "convert --to gguf-i2_s"),
    Row("dual_binary (from ternary)", "lossless", "convert --to dual_binary"),
    Row("fakequant (dense file of ternary values)", "lossless weights", "convert --to dense, detected"),
    # the file holds bf16; this CPU run holds every model in fp32, so its bits per weight read 32
    Row("dense (bf16 file, fp32 here; no int8 activations)", "dequantized", "convert --to dense", "dense"),
    Row("bitnet PTQ (absmean of dequantized)", "post-training", "dense -> convert --to bitnet"),
    Row("dual_binary PTQ (DB-LLM FDB)", "post-training", "dense -> convert --to dual_binary"),
    Row("onebit PTQ (SVID)", "post-training", "dense -> convert --to onebit"),
    Row("fbi PTQ (column alpha/beta)", "post-training", "dense -> convert --to fbi"),
]
PROBES = [[{"role": "user", "content": q}] for q in ("What is 47+89?", "Reverse the word 'stone'.",
                                                    "Sort the letters of 'dbca'.")]


def build(row: Row, work: Path, dense: Path) -> Path:
    """The checkpoint of one row (files under ``work``)."""
    if row.kind == "original":
        return DEMO_MODEL_PATH
    if row.build.startswith("convert --to gguf-"):
        from bitserve.convert_gguf import write_gguf

        return write_gguf(DEMO_MODEL_PATH, work / f"{row.build.rsplit('-', 1)[1]}.gguf", progress=False,
                          linear_type=row.build.split("gguf-")[1])
    if row.build == "convert --to dual_binary":
        dst = work / "dual_binary_lossless"
        convert_checkpoint(DEMO_MODEL_PATH, dst, "dual_binary", progress=False, overwrite=True, group_size=64)
        return dst
    if row.build.startswith("convert --to dense"):
        return dense
    target = row.build.rsplit(" ", 1)[1]
    dst = work / f"{target}_ptq"
    opts = {"group_size": 64} if target == "dual_binary" else {}
    convert_checkpoint(dense, dst, target, progress=False, overwrite=True, **opts)
    return dst


def bits_per_weight(llm: LLM) -> float:
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    nbytes = sum(m.nbytes for m in layers)
    return 8.0 * nbytes / sum(m.in_features * m.out_features for m in layers)


def probe_logits(llm: LLM) -> list[torch.Tensor]:
    out = []
    for conv in PROBES:
        text = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
        out.append(llm.logits(llm.tokenizer.encode(text, add_special_tokens=False)))
    return out


def accuracy(llm: LLM, questions, batch: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    correct = 0
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        outs = llm.chat([q.messages for q in chunk], params, use_tqdm=False)
        correct += sum(check(q, o.text) for q, o in zip(chunk, outs))
    return correct / len(questions)


def write_png(records: list[dict], path: Path) -> bool:
    from bitserve.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in records if r.get("accuracy") is not None]
    colors = {"original": "tab:green", "lossless": "tab:blue", "lossless weights": "tab:blue",
              "dequantized": "tab:gray", "post-training": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh([r["label"] for r in ok][::-1], [r["accuracy"] for r in ok][::-1],
            color=[colors.get(r["kind"], "k") for r in ok][::-1])
    for i, r in enumerate(ok[::-1]):
        ax.text(r["accuracy"] + 0.01, i, f"{r['accuracy']:.3f}  ({r['bits_per_weight']:.2f} bpw)", va="center",
                fontsize=8)
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("greedy accuracy on held-out demo questions")
    ax.set_title("demo model per format (green: shipped, blue: lossless, gray: dequantized, red: post-training)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=200, help="held-out questions per format (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--batch", type=positive_int, default=100)
    ap.add_argument("--out", default="bench-results/formats", help="where the JSON, PNG and checkpoints go")
    ap.add_argument("--only", default=None, help="comma list of row-label prefixes to run")
    args = ap.parse_args(argv)
    # every check before any work (the checkpoint folder under --out is emptied below)
    prefixes = [p.strip() for p in (args.only or "").split(",") if p.strip()]
    if args.only is not None and not prefixes:
        ap.error("--only: the list is empty")
    unmatched = [p for p in prefixes if not any(r.label.startswith(p) for r in ROWS)]
    if unmatched:
        ap.error(f"--only {', '.join(unmatched)}: no row label starts with it; the rows are: "
                 + "; ".join(r.label for r in ROWS))
    rows = [r for r in ROWS if not prefixes or any(r.label.startswith(p) for p in prefixes)]
    try:
        questions = make_questions(args.n, seed=args.seed, split="test")
    except ValueError as e:  # more questions than the test split holds
        ap.error(f"--n {args.n}: {e}")
    torch.set_num_threads(1)
    out = Path(args.out)
    work = out / "checkpoints"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dense = work / "dense"
    convert_checkpoint(DEMO_MODEL_PATH, dense, "dense", progress=False)

    records, reference = [], None
    for row in rows:
        t0 = time.time()
        rec = {"label": row.label, "kind": row.kind, "build": row.build}
        try:
            path = build(row, work, dense)
            llm = LLM(str(path), dtype="float32", device="cpu", **({"format": row.fmt} if row.fmt else {}))
            rec["format"] = llm.loaded.plugin.name
            rec["bits_per_weight"] = bits_per_weight(llm)
            logits = probe_logits(llm)
            if reference is None and row.kind == "original":
                reference = logits
            if reference is not None:
                rec["max_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(logits, reference))
            rec["accuracy"] = accuracy(llm, questions, args.batch)
            del llm
        except Exception as e:  # a row that fails is reported, not hidden
            rec["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        rec["seconds"] = round(time.time() - t0, 1)
        records.append(rec)
        acc = f"{rec['accuracy']:.3f}" if "accuracy" in rec else "-"
        print(f"{row.label:42s} {rec.get('format', '-'):12s} {acc:>6s}  {rec.get('bits_per_weight', 0):5.2f} bpw  "
              f"max|dlogit| {rec.get('max_logit_diff', float('nan')):.2e}  {rec.get('error', '')}", flush=True)

    print()
    print(f"| format | how | detected as | bits/weight (linears) | accuracy ({args.n} q) | max abs logit diff |")
    print("|---|---|---|---|---|---|")
    for r in records:
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else f"failed: {r.get('error', '')[:60]}"
        diff = f"{r['max_logit_diff']:.1e}" if "max_logit_diff" in r else "-"
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "-"
        print(f"| {r['label']} | {r['build']} | {r.get('format', '-')} | {bpw} | {acc} | {diff} |")
    (out / "format_accuracy.json").write_text(json.dumps({"n": args.n, "seed": args.seed, "records": records},
                                                          indent=1))
    png = write_png(records, out / "format_accuracy.png")
    print(f"wrote {out / 'format_accuracy.json'}" + (" and format_accuracy.png" if png else ""))
    return 1 if any("error" in r for r in records if r["kind"] in ("original", "lossless")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
