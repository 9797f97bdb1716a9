"""A simple one-sequence-at-a-time generation loop over a contiguous KV cache.

Used by the offline API until the paged engine serves it; the sampling and
stop handling here are shared semantics the engine keeps.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bitserve.model import LlamaForCausalLM
from bitserve.model.attention import ContiguousKVCache
from bitserve.outputs import CompletionOutput
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from float32 ``[vocab]`` logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: Sequence[str], search_from: int) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string that ends after ``search_from``."""
    best = None
    for stop in stops:
        idx = text.find(stop, max(0, search_from - len(stop) + 1))
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, token_ids: Sequence[int], capacity: int | None = None) -> torch.Tensor:
    """float32 logits ``[len, vocab]`` for every position of one sequence."""
    cfg = model.config
    device = model.model.norm.weight.device
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity or len(token_ids), model.dtype, device)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)
    cache.set_positions(positions)
    return model.compute_logits(model(ids, positions, cache))


@torch.inference_mode()
def generate_one(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    eos_token_ids: Sequence[int],
    generator: torch.Generator | None,
) -> CompletionOutput:
    cfg = model.config
    device = model.model.norm.weight.device
    budget = min(params.max_tokens, max_model_len - len(prompt_ids))
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(prompt_ids) + budget,
                              model.dtype, device)
    eos = set() if params.ignore_eos else set(eos_token_ids)
    stop_ids = set(params.stop_token_ids)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    out_ids: list[int] = []
    text, finish, stop_reason = "", "length", None
    while True:
        cache.set_positions(positions)
        logits = model.compute_logits(model(ids, positions, cache)[-1:])[0]
        token = sample_token(logits, params, generator)
        out_ids.append(token)
        if token in eos:
            finish = "stop"
            break
        if token in stop_ids:
            finish, stop_reason = "stop", token
            break
        if params.stop:
            new_text = tokenizer.decode(out_ids)
            hit = find_stop(new_text, params.stop, len(text))
            text = new_text
            if hit is not None:
                text, finish, stop_reason = text[: hit[0]], "stop", hit[1]
                return CompletionOutput(0, text, out_ids, finish, stop_reason)
        if len(out_ids) >= budget:
            break
        ids = torch.tensor([token], dtype=torch.long, device=device)
        positions = positions[-1:] + 1
    return CompletionOutput(0, tokenizer.decode(out_ids), out_ids, finish, stop_reason)
