#!/usr/bin/env python
"""Train bitserve's bundled demo model: a tiny BitNet b1.58 chat model (QAT, CPU, fixed seed).

    python scripts/train_demo.py                       # reproduces server/demo/model/
    python scripts/train_demo.py --out /tmp/demo --steps 300   # quick try

What it does, all in this file:
  1. builds a character-level tokenizer (printable ASCII + UTF-8 byte fallback, so any text
     encodes; Llama-3 style special tokens; single tokens for the role names, the blank line
     after a header and the task's four question openings, which keeps prompts ~20 tokens)
     and a Llama-3 style chat template (optional system message);
  2. streams training questions of ``bitserve.demo.task`` (train split only);
  3. trains a BitNet b1.58 decoder identical in math to transformers' ``BitNetForCausalLM``
     (RMSNorm, rotate-half RoPE, GQA, attn_sub_norm / ffn_sub_norm, relu² gated MLP, tied
     embeddings) with every q/k/v/o/gate/up/down a BitLinear: absmean ternary weights and
     per-token absmax int8 activations, straight-through estimator for both. The parameters
     the exporter rounds to bf16 (embedding, norms, per-tensor weight scale γ) are rounded to
     bf16 in every forward too (again with a straight-through estimator), so the exported
     checkpoint computes exactly what was trained and evaluated;
  4. exports Microsoft's bitnet-b1.58-2B-4T layout (FORMATS.md §1.2-1.4): uint8 (N/4, K)
     weights packed in four contiguous output-row slabs + bf16 ``weight_scale`` (multiply
     convention), bf16 embedding/norms, no lm_head; then re-reads the export, checks it
     decodes to the trained ternary weights, and measures held-out accuracy on it.

Loss is on the assistant answer (+ <|eot_id|>) tokens only. Defaults (5000 steps, batch 64)
take about 24 minutes on 2 otherwise idle CPU cores (~0.27 s/step), longer when shared. Needs torch, tokenizers,
safetensors, jinja2. Imports nothing from bitserve except the task module, which it
loads from its file path (server/demo/task.py), so it runs without installing the package.
Same seed + same thread count on the same machine -> the same weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "server" / "demo" / "model"


def _load_task():
    spec = importlib.util.spec_from_file_location("bitserve_demo_task", REPO / "server" / "demo" / "task.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses needs the module registered
    spec.loader.exec_module(mod)
    return mod


task = _load_task()

# --------------------------------------------------------------------------------------
# tokenizer + chat template
# --------------------------------------------------------------------------------------
BOS, EOT_TEXT, SH, EH, EOT = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
SPECIALS = [BOS, EOT_TEXT, SH, EH, EOT]
# multi-character non-special tokens (they keep the rendered prompt short): the role names,
# the blank line after a header, and the openings of the task's questions
WORD_TOKENS = ["user", "assistant", "system", "\n\n", *task.PHRASES]
VOCAB_SIZE = 384  # padded with <|reserved_special_token_i|>

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def build_tokenizer():
    """Character-level BPE (no merges) over printable ASCII, UTF-8 byte fallback for the rest."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab: dict[str, int] = {}
    for b in range(256):  # <0x00>..<0xFF> byte-fallback pieces
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in range(0x20, 0x7F):  # printable ASCII characters, space included
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    n_reserved = VOCAB_SIZE - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens(
        [AddedToken(f"<|reserved_special_token_{i}|>", special=True, normalized=False) for i in range(n_reserved)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    bos_id = tok.token_to_id(BOS)
    # plain encode(text) gets a bos like Llama 3; chat prompts are encoded without it
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def render_chat(messages, add_generation_prompt=True) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # HF's settings
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOT
    )


class Encoder:
    """Fast path for the training loop: prompt ids for a single user message."""

    def __init__(self, tok):
        self.tok = tok
        ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        self.head = ids(f"{BOS}{SH}user{EH}\n\n")
        self.sys_head = ids(f"{BOS}{SH}system{EH}\n\n")
        self.tail = ids(f"{EOT}{SH}assistant{EH}\n\n")
        self.user_head = ids(f"{EOT}{SH}user{EH}\n\n")
        self.eot = tok.token_to_id(EOT)
        # sanity: identical to the jinja template
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
        assert self.prompt("What is 2+3?", "Be brief.") == ids(render_chat(msgs)), "template mismatch"
        assert self.prompt("What is 2+3?") == ids(render_chat(msgs[1:])), "template mismatch"

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids

    def prompt(self, question: str, system: str | None = None) -> list[int]:
        if system is None:
            return self.head + self.text(question) + self.tail
        return self.sys_head + self.text(system) + self.user_head + self.text(question) + self.tail


SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are bitserve's demo model."]

# --------------------------------------------------------------------------------------
# model (training-time BitLinear with straight-through estimators)
# --------------------------------------------------------------------------------------


class _RoundBF16(torch.autograd.Function):
    """Value rounded to bf16 (what the export stores), gradient straight through."""

    @staticmethod
    def forward(ctx, t):
        return t.to(torch.bfloat16).to(t.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def ste_bf16(t: torch.Tensor) -> torch.Tensor:
    return _RoundBF16.apply(t)


def ternarize(w: torch.Tensor):
    """(T, gamma_bf16): T = clamp(round(W/γ), -1, 1) with γ = mean|W| (≥1e-5); scale stored in bf16."""
    gamma = w.abs().mean().clamp(min=1e-5)
    t = (w / gamma).round().clamp(-1, 1)
    return t, gamma.to(torch.bfloat16).to(w.dtype)


class _WeightQuant(torch.autograd.Function):
    """Absmean ternary weight T·γ (γ rounded to bf16); straight-through gradient."""

    @staticmethod
    def forward(ctx, w):
        t, g = ternarize(w)
        return t.mul_(g)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ActQuant(torch.autograd.Function):
    """Per-token absmax int8 fake quantization; straight-through gradient."""

    @staticmethod
    def forward(ctx, x):
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
        return (x * s).round_().clamp_(-128, 127).div_(s)

    @staticmethod
    def backward(ctx, grad):
        return grad


class BitLinear(nn.Linear):
    quantize = True  # class-wide switch: False = full-precision warm-up phase

    def __init__(self, k: int, n: int):
        super().__init__(k, n, bias=False)
        self.frozen = None  # (T, weight_scale) when rebuilt from an export

    def forward(self, x):
        if self.frozen is not None:  # offline checkpoint: W_hat = T · weight_scale
            w_q = self.frozen[0] * self.frozen[1]
        elif not BitLinear.quantize:
            return F.linear(x, self.weight)
        else:
            w_q = _WeightQuant.apply(self.weight)
        return F.linear(_ActQuant.apply(x), w_q)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return _RMSNormFn.apply(x, ste_bf16(self.weight), self.eps)


class _RMSNormFn(torch.autograd.Function):
    """y = w · x · rsqrt(mean(x²) + eps), with a hand-written backward (less memory traffic)."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        xhat = x * r
        ctx.save_for_backward(xhat, w, r)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, w, r = ctx.saved_tensors
        gw = g * w
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(r)
        dw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        return dx, dw, None


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        eps = c["rms_norm_eps"]
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.q_proj = BitLinear(d, self.nh * hd)
        self.k_proj = BitLinear(d, self.nkv * hd)
        self.v_proj = BitLinear(d, self.nkv * hd)
        self.o_proj = BitLinear(self.nh * hd, d)
        self.attn_sub_norm = RMSNorm(self.nh * hd, eps)
        i = c["intermediate_size"]
        self.gate_proj = BitLinear(d, i)
        self.up_proj = BitLinear(d, i)
        self.down_proj = BitLinear(i, d)
        self.ffn_sub_norm = RMSNorm(i, eps)

    def forward(self, x, cos, sin):
        b, L, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, L, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, L, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, L, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv  # HF repeat_kv: kv head j serves query heads j*rep .. j*rep+rep-1
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale head_dim**-0.5
        a = a.transpose(1, 2).reshape(b, L, self.nh * self.hd)
        x = x + self.o_proj(self.attn_sub_norm(a))
        h = self.post_attention_layernorm(x)
        m = F.relu(self.gate_proj(h)).square() * self.up_proj(h)
        return x + self.down_proj(self.ffn_sub_norm(m))


class BitNetLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=c.get("init_std", 0.02))
        # o_proj/down_proj see unit-RMS inputs (the sub-norms); start their residual writes small
        # so the token embeddings are not swamped
        for layer in self.layers:
            for m in (layer.o_proj, layer.down_proj):
                m.weight.data.mul_(c.get("out_init_scale", 1.0))

    def forward(self, ids):
        L = ids.shape[1]
        f = torch.arange(L, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        e = ste_bf16(self.embed_tokens.weight)
        x = F.embedding(ids, e)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ e.t()  # tied, unquantized lm_head


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


class Stream:
    """Endless training batches from the train split (fresh questions every step)."""

    def __init__(self, enc: Encoder, seed: int, weights: dict[str, float], sys_frac: float):
        self.enc, self.rng = enc, random.Random(f"train-stream/{seed}")
        self.skills = list(weights)
        self.w = [weights[s] for s in self.skills]
        self.sys_frac = sys_frac

    def question(self):
        skill = self.rng.choices(self.skills, self.w)[0]
        while True:
            text, ans = task.make_question(skill, self.rng)
            if task.split_of(text) == "train":
                return text, ans

    def example(self, system: str | None):
        text, ans = self.question()
        p = self.enc.prompt(text, system)
        return p + self.enc.text(ans) + [self.enc.eot], len(p)

    def batch(self, bsz: int, pad_id: int):
        # now and then a whole batch gets system prompts (mixed in, they would pad every batch)
        system = SYSTEM_PROMPTS if self.rng.random() < self.sys_frac else None
        examples = [self.example(self.rng.choice(system) if system else None) for _ in range(bsz)]
        L = max(len(s) for s, _ in examples)
        ids = torch.full((bsz, L), pad_id, dtype=torch.long)
        tgt = torch.full((bsz, L), -100, dtype=torch.long)
        for i, (s, p) in enumerate(examples):
            ids[i, : len(s)] = torch.tensor(s)
            tgt[i, p - 1 : len(s) - 1] = torch.tensor(s[p:])  # predict answer + eot only
        return ids, tgt


@torch.no_grad()
def greedy(model, prompts: list[list[int]], eot: int, stop_ids, max_new=10, bsz=256):
    """Greedy decode (no KV cache; prompts grouped by length so no padding is needed)."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idxs in by_len.values():
        for j in range(0, len(idxs), bsz):
            chunk = idxs[j : j + bsz]
            x = torch.tensor([prompts[i] for i in chunk])
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for _ in range(max_new):
                nxt = model(x)[:, -1].argmax(-1)
                for r, i in enumerate(chunk):
                    if not done[r]:
                        if int(nxt[r]) in stop_ids:
                            done[r] = True
                        else:
                            out[i].append(int(nxt[r]))
                if bool(done.all()):
                    break
                x = torch.cat([x, nxt[:, None]], dim=1)
    model.train()
    return out


def evaluate(model, enc, questions, stop_ids):
    outs = greedy(model, [enc.prompt(q.text) for q in questions], enc.eot, stop_ids)
    per: dict[str, list[int]] = {}
    for q, o in zip(questions, outs):
        per.setdefault(q.skill, []).append(task.check(q, enc.tok.decode(o, skip_special_tokens=True)))
    acc = {s: sum(v) / len(v) for s, v in per.items()}
    overall = sum(sum(v) for v in per.values()) / len(questions)
    return overall, acc


def fmt_acc(overall, acc):
    return f"acc {overall:.3f} | " + " ".join(f"{s} {a:.2f}" for s, a in acc.items())


# --------------------------------------------------------------------------------------
# export (Microsoft 2B-4T layout)
# --------------------------------------------------------------------------------------
PROJ = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
NORMS = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(N, K) ternary -> uint8 (N/4, K): byte[r,k] = sum_s (T[s*R + r, k] + 1) << 2s, R = N/4."""
    n = t.shape[0]
    assert n % 4 == 0, f"packed rows must be a multiple of 4, got {n}"
    r = n // 4
    code = (t.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((r, t.shape[1]), dtype=torch.uint8)
    for s in range(4):
        packed |= code[s * r : (s + 1) * r] << (2 * s)
    return packed


def unpack_ternary(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([((p >> (2 * s)) & 3).to(torch.int8) - 1 for s in range(4)], dim=0)


def export(model: BitNetLM, tok, out: pathlib.Path, meta: dict):
    from safetensors.torch import save_file

    c = model.c
    out.mkdir(parents=True, exist_ok=True)
    sd: dict[str, torch.Tensor] = {}
    bf = lambda t: t.detach().to(torch.bfloat16).contiguous()  # noqa: E731
    sd["model.embed_tokens.weight"] = bf(model.embed_tokens.weight)
    sd["model.norm.weight"] = bf(model.norm.weight)
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        for attr, name in NORMS.items():
            sd[pre + name + ".weight"] = bf(getattr(layer, attr).weight)
        for attr, name in PROJ.items():
            t, g = ternarize(getattr(layer, attr).weight.detach())
            sd[pre + name + ".weight"] = pack_ternary(t)
            sd[pre + name + ".weight_scale"] = g.reshape(1).to(torch.bfloat16)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    eot, eot_text, bos = tok.token_to_id(EOT), tok.token_to_id(EOT_TEXT), tok.token_to_id(BOS)
    config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_act": "relu2",
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"],
        "head_dim": c["head_dim"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"],
        "max_position_embeddings": c["max_position_embeddings"],
        "vocab_size": c["vocab_size"],
        "bos_token_id": bos,
        "eos_token_id": [eot, eot_text],
        "pad_token_id": eot_text,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
        "bitserve_demo": meta,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": [eot, eot_text], "pad_token_id": eot_text, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOT_TEXT,
        "model_max_length": c["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    for f in out.iterdir():  # safetensors writes 0600; the files ship inside the package
        f.chmod(0o644)


def load_export(out: pathlib.Path) -> BitNetLM:
    """Rebuild a float model from the exported folder (W = T·weight_scale) for verification."""
    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())
    m = BitNetLM(cfg)
    sd = load_file(str(out / "model.safetensors"))
    with torch.no_grad():
        m.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"].float())
        m.norm.weight.copy_(sd["model.norm.weight"].float())
        for i, layer in enumerate(m.layers):
            pre = f"model.layers.{i}."
            for attr, name in NORMS.items():
                getattr(layer, attr).weight.copy_(sd[pre + name + ".weight"].float())
            for attr, name in PROJ.items():
                t = unpack_ternary(sd[pre + name + ".weight"]).float()
                getattr(layer, attr).frozen = (t, sd[pre + name + ".weight_scale"].float())
    return m


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    vocab_size=VOCAB_SIZE,
)
SKILL_WEIGHTS = {"add": 2.0, "sub": 2.5, "mul": 5.0, "reverse": 0.5, "sort": 1.5, "count": 0.5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=300, help="held-out questions per periodic eval")
    ap.add_argument("--final-n", type=int, default=600, help="held-out questions for the final eval")
    ap.add_argument("--fp-steps", type=int, default=0, help="full-precision warm-up steps before QAT")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--out-init-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()

    tok = build_tokenizer()
    enc = Encoder(tok)
    stop_ids = {tok.token_to_id(EOT), tok.token_to_id(EOT_TEXT)}
    pad_id = tok.token_to_id(EOT_TEXT)
    model = BitNetLM({**MODEL, "init_std": args.init_std, "out_init_scale": args.out_init_scale})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, config {MODEL}", flush=True)
    ex = task.make_questions(1, seed=args.seed, split="train")[0]
    print(f"example prompt: {render_chat(ex.messages)!r} -> {ex.answer!r} "
          f"({len(enc.prompt(ex.text))} prompt tokens)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    stream = Stream(enc, args.seed, SKILL_WEIGHTS, sys_frac=0.05)
    eval_qs = task.make_questions(args.eval_n, seed=1000 + args.seed, split="test")
    run_loss, t_last = 0.0, time.time()
    for step in range(args.steps):
        BitLinear.quantize = step >= args.fp_steps
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, tgt = stream.batch(args.batch, pad_id)
        logits = model(ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        if (step + 1) % args.log_every == 0:
            dt = (time.time() - t_last) / args.log_every
            print(f"step {step + 1:5d}/{args.steps} loss {run_loss / args.log_every:.4f} "
                  f"lr {lr_at(step):.2e} {dt * 1000:.0f} ms/step elapsed {time.time() - t0:.0f}s", flush=True)
            run_loss, t_last = 0.0, time.time()
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            te = time.time()
            overall, acc = evaluate(model, enc, eval_qs, stop_ids)
            print(f"  eval@{step + 1} ({len(eval_qs)} held-out) {fmt_acc(overall, acc)} [{time.time() - te:.0f}s]",
                  flush=True)
            t_last += time.time() - te

    train_s = time.time() - t0
    meta = {
        "trained_by": "scripts/train_demo.py",
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "task": "bitserve.demo.task",
        "params": n_params,
    }
    export(model, tok, args.out, meta)
    print(f"exported to {args.out} after {train_s:.0f}s of training", flush=True)

    # verify the export: packed weights decode to the trained ternary weights, and the
    # reloaded model answers the held-out questions
    m2 = load_export(args.out)
    with torch.no_grad():
        for (n1, m_a), (n2, m_b) in zip(model.named_modules(), m2.named_modules()):
            if isinstance(m_a, BitLinear):
                t1, g1 = ternarize(m_a.weight)
                assert torch.equal(t1, m_b.frozen[0]) and torch.equal(g1.reshape(1), m_b.frozen[1]), f"export mismatch in {n1}"
        ids = torch.tensor([enc.prompt(q.text) for q in eval_qs[:1]])
        diff = (model.eval()(ids) - m2.eval()(ids)).abs().max().item()
    print(f"export check: ternary weights and scales identical; max logit diff {diff:.2e}", flush=True)
    final_qs = task.make_questions(args.final_n, seed=12345, split="test")
    overall, acc = evaluate(m2, enc, final_qs, stop_ids)
    print(f"final held-out ({len(final_qs)} questions, exported weights): {fmt_acc(overall, acc)}", flush=True)
    for f in sorted(args.out.iterdir()):
        print(f"  {f.name:26s} {f.stat().st_size:>10,d} bytes")
    print(f"total wall time {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
