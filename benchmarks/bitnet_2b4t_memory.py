#!/usr/bin/env python
"""Memory footprint and CPU decode latency of bitserve on a BitNet b1.58 2B4T-shaped checkpoint.

1. Writes a random-weight ternary checkpoint with the exact layout and shapes of
   ``microsoft/bitnet-b1.58-2B-4T`` (FORMATS.md §1.2-1.4: packed uint8 ``[N/4, K]``
   projections, bf16 ``weight_scale [1]``, bf16 embedding/norms, tied head) into
   ``--workdir`` (a temporary folder by default; ``--keep`` keeps it and reuses it
   on the next run).
2. Loads it with ``bitserve.loader.load_model`` in a fresh subprocess and measures
   process RSS (VmRSS) before/after, peak RSS during loading (VmHWM, reset before
   loading), the tensor bytes the model holds and the checkpoint's tensor bytes.
   Acceptance (foundation issue): model bytes / checkpoint bytes <= 1.15 and
   RSS growth / checkpoint bytes <= 1.15.
3. In the same subprocess: prefill ``--prompt-len`` random tokens, then time
   ``--decode-steps`` single-token decode steps (model forward + LM head + argmax)
   over a ContiguousKVCache with ``torch.set_num_threads(--threads)``.
4. Prints a table and writes JSON (``--out``).

This measures the plain-torch reference kernels (``bitserve.kernels.reference``);
the numbers are a baseline, not a performance claim.

    .venv/bin/python benchmarks/bitnet_2b4t_memory.py                  # real shapes, 30 layers
    .venv/bin/python benchmarks/bitnet_2b4t_memory.py --layers 2       # quick smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitserve.cli_args import positive_int

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-results" / "bitnet_2b4t_memory.json"

# microsoft/bitnet-b1.58-2B-4T (FORMATS.md §1.2)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 6912, 30, 20, 5, 128, 128256
# tensor bytes of the real packed repo (FORMATS.md §1.2; 30 layers)
REAL_2B4T_TENSOR_BYTES = 1_178_562_980
ACCEPT_RATIO = 1.15
# TARGETS.md, this 2-core machine
MACHINE_BW_GBS = (33.0, 38.0)
FLOOR_TOK_S = 47.0
LLAMA_CPP_TQ2_0_TOK_S = 24.0
MARKER = ".complete"


def hf_config(layers: int) -> dict:
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "hidden_act": "relu2",
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
    }


def projection_shapes() -> dict[str, tuple[str, int, int]]:
    """name -> (module, N, K) of the seven BitLinear projections of one layer."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        "q_proj": ("self_attn", q, HIDDEN),
        "k_proj": ("self_attn", kv, HIDDEN),
        "v_proj": ("self_attn", kv, HIDDEN),
        "o_proj": ("self_attn", HIDDEN, q),
        "gate_proj": ("mlp", INTERMEDIATE, HIDDEN),
        "up_proj": ("mlp", INTERMEDIATE, HIDDEN),
        "down_proj": ("mlp", HIDDEN, INTERMEDIATE),
    }


def expected_tensor_bytes(layers: int) -> int:
    per_layer = sum(n * k // 4 + 2 for _, n, k in projection_shapes().values())  # packed + bf16 scale
    per_layer += 2 * (3 * HIDDEN + INTERMEDIATE)  # input/post-attention/attn_sub norms + ffn_sub_norm
    return layers * per_layer + 2 * VOCAB * HIDDEN + 2 * HIDDEN  # embedding + final norm


# ---------------------------------------------------------------------------------------------
# 1. checkpoint generation
# ---------------------------------------------------------------------------------------------
def generate_checkpoint(folder: Path, layers: int, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from bitserve.kernels.packing import hf_pack_ternary, hf_unpack_ternary

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    g = torch.Generator().manual_seed(seed)
    # The 81 bytes whose four 2-bit codes are all in {0,1,2}: drawing one of them
    # uniformly is four i.i.d. uniform trits, already in the HF packed layout.
    valid = torch.tensor([b for b in range(256) if all((b >> (2 * s)) & 3 != 3 for s in range(4))], dtype=torch.uint8)

    def bf16_noise(shape, mean, std, rows_per_chunk=8192):
        out = torch.empty(shape, dtype=torch.bfloat16)
        flat = out.view(shape[0], -1)
        for start in range(0, shape[0], rows_per_chunk):
            part = flat[start:start + rows_per_chunk]
            part.copy_(torch.randn(part.shape, generator=g).mul_(std).add_(mean))
        return out

    tensors: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    with tqdm(total=layers + 1, desc="generating checkpoint", unit="layer") as bar:
        tensors["model.embed_tokens.weight"] = bf16_noise((VOCAB, HIDDEN), 0.0, 0.02)
        tensors["model.norm.weight"] = bf16_noise((HIDDEN,), 1.0, 0.05)
        bar.update(1)
        checked = False
        for i in range(layers):
            p = f"model.layers.{i}"
            for norm, width in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                                ("self_attn.attn_sub_norm", HIDDEN), ("mlp.ffn_sub_norm", INTERMEDIATE)):
                tensors[f"{p}.{norm}.weight"] = bf16_noise((width,), 1.0, 0.05)
            for proj, (module, n, k) in projection_shapes().items():
                idx = torch.randint(0, len(valid), (n // 4, k), generator=g, dtype=torch.int32)
                packed = valid[idx]
                del idx
                if not checked:  # the bytes are exactly what hf_pack_ternary writes for random trits
                    t = hf_unpack_ternary(packed)
                    assert t.shape == (n, k) and int(t.min()) >= -1 and int(t.max()) <= 1
                    assert torch.equal(hf_pack_ternary(t), packed)
                    del t
                    checked = True
                tensors[f"{p}.{module}.{proj}.weight"] = packed
                scale = 1.3 + 0.5 * torch.rand(1, generator=g)  # ~1.55 like the real model
                tensors[f"{p}.{module}.{proj}.weight_scale"] = scale.to(torch.bfloat16)
            bar.update(1)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    gen_s = time.perf_counter() - t0
    (folder / "config.json").write_text(json.dumps(hf_config(layers), indent=2))
    t1 = time.perf_counter()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_s = time.perf_counter() - t1
    del tensors
    (folder / MARKER).write_text(json.dumps({"layers": layers, "seed": seed, "tensor_bytes": nbytes}))
    return {"tensor_bytes": nbytes, "generate_s": gen_s, "write_s": write_s, "reused": False}


def prepare_checkpoint(args) -> tuple[Path, dict, Path | None]:
    """Returns (checkpoint folder, generation info, folder to delete afterwards or None)."""
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bitserve-2b4t-"))
    folder = root / f"bitnet-2b4t-random-L{args.layers}-s{args.seed}"
    marker = folder / MARKER
    cleanup = None if args.keep else (root if not args.workdir else folder)
    if args.keep and marker.exists() and (folder / "model.safetensors").exists():
        info = json.loads(marker.read_text())
        print(f"reusing {folder}")
        return folder, {"tensor_bytes": info["tensor_bytes"], "generate_s": 0.0, "write_s": 0.0, "reused": True}, cleanup
    return folder, generate_checkpoint(folder, args.layers, args.seed), cleanup


# ---------------------------------------------------------------------------------------------
# 2./3. measurement (fresh subprocess)
# ---------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def mappings_of(folder: Path) -> list[str]:
    folder = str(folder.resolve())
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if folder in line]


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from bitserve.loader import load_model
    from bitserve.model.attention import ContiguousKVCache
    from bitserve.plugins.bitnet import TernaryLinear

    folder = Path(args.child)
    res: dict = {"threads": torch.get_num_threads()}
    gc.collect()
    before = proc_status()
    res["peak_reset"] = reset_peak_rss()
    t0 = time.perf_counter()
    loaded = load_model(folder, dtype="auto", device="cpu", progress=True)
    res["load_s"] = time.perf_counter() - t0
    gc.collect()
    after = proc_status()
    res["rss_before"], res["rss_after"] = before["VmRSS"], after["VmRSS"]
    res["rss_anon_growth"] = after["RssAnon"] - before["RssAnon"]
    res["rss_file_growth"] = after["RssFile"] - before["RssFile"]
    res["peak_rss_load"] = after["VmHWM"]
    res["checkpoint_still_mapped"] = mappings_of(folder)
    res["weight_bytes"] = loaded.weight_bytes
    res["checkpoint_bytes"] = loaded.checkpoint_bytes
    res["model_dtype"] = str(loaded.model.dtype).replace("torch.", "")
    model, cfg = loaded.model, loaded.config
    res["packed_bytes"] = sum(m.packed.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    res["n_ternary_linears"] = sum(isinstance(m, TernaryLinear) for m in model.modules())
    head = model.lm_head_weight()
    res["lm_head_bytes"] = head.numel() * head.element_size()
    res["rss_after_trim"] = proc_status()["VmRSS"] if malloc_trim() else None

    # -- decode ---------------------------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g)
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                              args.prompt_len + args.decode_steps + 1, model.dtype, torch.device("cpu"))
    steps, tokens = [], []
    with torch.inference_mode():
        positions = torch.arange(args.prompt_len)
        cache.set_positions(positions)
        t0 = time.perf_counter()
        logits = model.compute_logits(model(prompt, positions, cache)[-1:])
        res["prefill_s"] = time.perf_counter() - t0
        token = int(torch.argmax(logits[0]))
        for _ in range(args.decode_steps):
            positions = positions[-1:] + 1
            cache.set_positions(positions)
            ids = torch.tensor([token])
            t0 = time.perf_counter()
            logits = model.compute_logits(model(ids, positions, cache))
            token = int(torch.argmax(logits[0]))
            steps.append(time.perf_counter() - t0)
            tokens.append(token)
            print(f"  decode step {len(steps)}/{args.decode_steps}: {steps[-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
        # the LM head alone (bf16 [vocab, hidden] matvec), a few repeats
        hidden = torch.randn(1, cfg.hidden_size).to(model.dtype)
        head_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.compute_logits(hidden)
            head_times.append(time.perf_counter() - t0)
        res["lm_head_ms"] = 1e3 * statistics.median(head_times)
        res["logits_finite"] = bool(torch.isfinite(logits).all())
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            positions = positions[-1:] + 1
            cache.set_positions(positions)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.compute_logits(model(torch.tensor([token]), positions, cache))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table, file=sys.stderr)
            res["profile_top"] = [
                {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            ]
    res["decode_step_ms"] = [1e3 * s for s in steps]
    res["decode_tokens"] = tokens
    res["rss_after_decode"] = proc_status()["VmRSS"]
    Path(args.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# 4. report
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(l for l in f if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "mem_total_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__}


def summarize(gen: dict, child: dict, args, total_s: float) -> dict:
    ckpt = child["checkpoint_bytes"]
    growth = child["rss_after"] - child["rss_before"]
    steps = child["decode_step_ms"]
    median_ms = statistics.median(steps) if steps else float("nan")
    bytes_per_token = child["packed_bytes"] + child["lm_head_bytes"]
    summary = {
        "layers": args.layers,
        "checkpoint_tensor_bytes": ckpt,
        "expected_tensor_bytes": expected_tensor_bytes(args.layers),
        "real_2b4t_tensor_bytes": REAL_2B4T_TENSOR_BYTES if args.layers == LAYERS else None,
        "model_tensor_bytes": child["weight_bytes"],
        "model_over_checkpoint": child["weight_bytes"] / ckpt,
        "rss_growth_bytes": growth,
        "rss_growth_over_checkpoint": growth / ckpt,
        "peak_rss_during_load_bytes": child["peak_rss_load"],
        "accept_ratio": ACCEPT_RATIO,
        "pass_model_bytes": child["weight_bytes"] / ckpt <= ACCEPT_RATIO,
        "pass_rss_growth": growth / ckpt <= ACCEPT_RATIO,
        "decode_ms_per_token_median": median_ms,
        "decode_tok_per_s": 1e3 / median_ms if steps else None,
        "effective_bytes_per_token": bytes_per_token,
        "effective_gb_per_s": bytes_per_token / (median_ms / 1e3) / 1e9 if steps else None,
        "kernel_path": "plain-torch reference (bitserve.kernels.reference)",
    }
    return {"summary": summary, "generation": gen, "child": child, "machine": machine_info(),
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
            "script_runtime_s": total_s}


def gb(x) -> str:
    return f"{x / 1e9:.3f} GB"


def print_report(report: dict) -> None:
    s, c, m = report["summary"], report["child"], report["machine"]
    rows = [
        ("layers", str(s["layers"])),
        ("checkpoint tensor bytes", f"{s['checkpoint_tensor_bytes']:,}  (expected {s['expected_tensor_bytes']:,}"
         + (f"; real 2B4T {REAL_2B4T_TENSOR_BYTES:,})" if s["real_2b4t_tensor_bytes"] else ")")),
        ("model tensor bytes", f"{s['model_tensor_bytes']:,}  (packed {c['packed_bytes']:,}, "
         f"lm head/embed {c['lm_head_bytes']:,}, dtype {c['model_dtype']})"),
        ("model / checkpoint", f"{s['model_over_checkpoint']:.4f}  ({'PASS' if s['pass_model_bytes'] else 'FAIL'} <= {ACCEPT_RATIO})"),
        ("RSS before -> after load", f"{gb(c['rss_before'])} -> {gb(c['rss_after'])}"),
        ("RSS growth", f"{gb(s['rss_growth_bytes'])}  (anon {gb(c['rss_anon_growth'])}, file {gb(c['rss_file_growth'])})"),
        ("RSS growth / checkpoint", f"{s['rss_growth_over_checkpoint']:.4f}  ({'PASS' if s['pass_rss_growth'] else 'FAIL'} <= {ACCEPT_RATIO})"),
        ("peak RSS during load (VmHWM)", gb(s["peak_rss_during_load_bytes"]) + ("" if c["peak_reset"] else "  (not reset: process peak)")),
        ("RSS after malloc_trim", gb(c["rss_after_trim"]) if c["rss_after_trim"] else "n/a"),
        ("checkpoint still mmapped", "yes: " + "; ".join(c["checkpoint_still_mapped"]) if c["checkpoint_still_mapped"] else "no"),
        ("load time", f"{c['load_s']:.1f} s"),
        ("threads", str(c["threads"])),
        (f"prefill {report['args']['prompt_len']} tokens", f"{c['prefill_s'] * 1e3:.0f} ms"),
        (f"decode ms/token (median of {len(c['decode_step_ms'])})", f"{s['decode_ms_per_token_median']:.0f} ms"
         f"  ({s['decode_tok_per_s']:.3f} tok/s; steps {', '.join(f'{x:.0f}' for x in c['decode_step_ms'])})"),
        ("  of which LM head (bf16 matvec)", f"{c['lm_head_ms']:.0f} ms"),
        ("effective bytes/s", f"{s['effective_gb_per_s']:.2f} GB/s  ({gb(s['effective_bytes_per_token'])}/token)"),
        ("machine", f"{m['cpu']}, {m['cpus_usable']} CPUs, {m['mem_total_bytes'] / 2**30:.0f} GiB, torch {m['torch']}"),
        ("script runtime", f"{report['script_runtime_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    bw = MACHINE_BW_GBS
    print(f"\ncontext: this machine reads memory at ~{bw[0]:.0f}-{bw[1]:.0f} GB/s, so the 2B4T floor is ~{FLOOR_TOK_S:.0f} tok/s "
          f"(TARGETS.md); llama.cpp TQ2_0 ~{LLAMA_CPP_TQ2_0_TOK_S:.0f} tok/s here. Measured: {s['effective_gb_per_s']:.2f} GB/s "
          f"= {100 * s['effective_gb_per_s'] / bw[0]:.1f}% of {bw[0]:.0f} GB/s, on the plain-torch reference path "
          "(not the optimised kernels).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, and reuse one already in --workdir")
    ap.add_argument("--layers", type=positive_int, default=LAYERS, help="number of decoder layers (30 = real 2B4T)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads in the measuring process")
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--decode-steps", type=positive_int, default=8)
    ap.add_argument("--profile", action="store_true", help="profile one extra decode step (torch profiler)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.layers < 1 or args.decode_steps < 1 or args.prompt_len < 1:
        ap.error("--layers, --decode-steps and --prompt-len must be >= 1")

    start = time.perf_counter()
    folder, gen, cleanup = prepare_checkpoint(args)
    expected = expected_tensor_bytes(args.layers)
    print(f"checkpoint: {folder}\n  tensor bytes {gen['tensor_bytes']:,} (expected {expected:,}"
          + (f", FORMATS.md §1.2 real 2B4T: {REAL_2B4T_TENSOR_BYTES:,}" if args.layers == LAYERS else "") + ")")
    if gen["tensor_bytes"] != expected:
        print("  WARNING: tensor bytes differ from the expected count", file=sys.stderr)
    try:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            result_path = Path(tmp.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--result", str(result_path),
               "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
               "--decode-steps", str(args.decode_steps), "--seed", str(args.seed)] + (["--profile"] if args.profile else [])
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            print(f"measuring subprocess failed with exit status {proc.returncode}", file=sys.stderr)
            return proc.returncode or 1
        child = json.loads(result_path.read_text())
        result_path.unlink(missing_ok=True)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    report = summarize(gen, child, args, time.perf_counter() - start)
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
