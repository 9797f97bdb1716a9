"""Shared by the CUDA-graph tests (decode and piecewise): engines with emulated graph captures,
runs that collect tokens and logprobs, and a detector of host reads in captured code."""

import contextlib
import os
import sys
from pathlib import Path

import torch

from bitserve import LLM
from bitserve.engine.core import EngineCore
from bitserve.engine.llm_engine import LLMEngine

REPO = Path(__file__).resolve().parents[1]

# every KV layout: float, int8, int4 (staging slots planned on the host), int2 with pre-RoPE keys
# and attention sinks (written without asking the host which rows are sinks)
KV_OPTIONS = {"auto": {}, "int8": {"kv_cache_dtype": "int8"}, "int4": {"kv_cache_dtype": "int4"},
              "int2+prerope+sinks": {"kv_cache_dtype": "int2", "kv_pre_rope_keys": True, "kv_sink_tokens": 3}}


def make_llm(path, capture=None, piecewise=None, **options):
    """An LLM whose engine captures its decode steps with ``capture`` and its other steps with
    ``piecewise`` (both None: the default engine)."""
    options = {"dtype": "float32", "block_size": 4, **options}
    llm = LLM(str(path), **options)
    if capture is not None or piecewise is not None:
        old = llm.core
        llm.core = EngineCore(old.runner.model, llm.engine_config, max_model_len=old.max_model_len,
                              eos_token_ids=tuple(old.eos_token_ids), default_seed=old.default_seed,
                              graph_capture=capture, piecewise_capture=piecewise)
        llm.engine = LLMEngine(llm.core, llm.tokenizer)
    return llm


def generate(llm, prompts, params):
    """Token ids and per-step logprobs (``[steps, k]``, sorted by token id) of each request."""
    ids, logprobs = [], []
    for out in llm.generate(prompts, params):
        ids.append(out.token_ids)
        logprobs.append(torch.tensor([[lp for _, lp in sorted(step.items())] for step in out.outputs[0].logprobs]))
    return ids, logprobs


def staggered(llm, prompts, params, every=2, logprobs=False):
    """Run the requests arriving one every ``every`` steps (so prefill chunks share steps with
    decodes); token ids per request, and with ``logprobs`` also each request's ``[steps, 1 + k]``
    sampled and top-k logprobs (top-k sorted by token id)."""
    engine, ids, lps, i, step = llm.engine, {}, {}, 0, 0
    while i < len(prompts) or engine.has_unfinished():
        if i < len(prompts) and step % every == 0:
            engine.add_request(f"r{i}", prompts[i], params[i])
            i += 1
        for delta in engine.step():
            ids.setdefault(delta.request_id, []).extend(delta.token_ids)
            if logprobs:
                lps.setdefault(delta.request_id, []).extend(
                    [s.logprob] + [lp for _, lp in sorted(s.top_logprobs)] for s in delta.samples)
        step += 1
    keys = [f"r{k}" for k in range(len(prompts))]
    if logprobs:
        return [ids[k] for k in keys], [torch.tensor(lps[k]) for k in keys]
    return [ids[k] for k in keys]


@contextlib.contextmanager
def host_reads():
    """Record every read of tensor values back to the host (``item``, ``tolist``, ``bool(t)``, ...)
    and every tensor built from Python data (``torch.tensor``: a host-to-device copy on a GPU) made
    directly by bitserve's code: a CUDA graph cannot capture either."""
    roots = tuple(str(REPO / d) + os.sep for d in ("server", "kernels", "plugins"))
    found: list[str] = []

    def watch(owner, name):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(roots):
                found.append(f"{name} in {caller.co_name} ({os.path.relpath(caller.co_filename, REPO)})")
            return orig(*args, **kwargs)

        setattr(owner, name, wrapper)
        return owner, name, orig

    patched = [watch(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                                 "numpy", "cpu")]
    patched += [watch(torch, n) for n in ("tensor", "as_tensor")]
    try:
        yield found
    finally:
        for owner, name, orig in patched:
            setattr(owner, name, orig)


