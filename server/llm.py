"""The offline API: ``LLM(model).generate(...)`` / ``.chat(...)`` / ``.logits(...)``."""

from __future__ import annotations

import collections
import numbers

from dataclasses import fields
from typing import Sequence, Union

import torch
from tqdm.auto import tqdm

from bitserve.config import EngineConfig, ModelLoadConfig
from bitserve.demo import model_or_demo
from bitserve.app import build_core, load_serving_model
from bitserve.engine.core import EngineRequest, on_device
from bitserve.engine.llm_engine import LLMEngine
from bitserve.engine.output_processor import CompletionDelta
from bitserve.engine.request import FinishReason
from bitserve.loader import LoadedModel
from bitserve.model.prefill import prefill_logits
from bitserve.outputs import CompletionOutput, RequestOutput
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
_LOAD_FIELDS = {f.name for f in fields(ModelLoadConfig)}
_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}


class LLM:
    """Load a model once and generate from it in-process, through the paged engine.

    ``LLM()`` loads the bundled demo model. Options are the fields of
    :class:`bitserve.config.ModelLoadConfig` (``format``, ``dtype``, ``device``,
    ``max_model_len``, ``seed``, ...) and :class:`bitserve.config.EngineConfig`
    (``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``kv_cache_dtype``, ...).
    """

    def __init__(self, model: str | None = None, **options):
        unknown = set(options) - _LOAD_FIELDS - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; "
                            f"known: {sorted((_LOAD_FIELDS | _ENGINE_FIELDS) - {'model'})}")
        self.load_config = ModelLoadConfig(model=model_or_demo(model),
                                           **{k: v for k, v in options.items() if k in _LOAD_FIELDS})
        self.engine_config = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_FIELDS})
        served = load_serving_model(self.load_config)
        self.tokenizer: Tokenizer = served.tokenizer
        self.loaded: LoadedModel = served.loaded
        self.model = self.loaded.model
        self.eos_token_ids = served.eos_token_ids
        self.max_model_len = served.max_model_len
        self.core = build_core(served, self.engine_config, self.load_config.seed)
        self.engine = LLMEngine(self.core, self.tokenizer)
        self._counter = 0

    # -- helpers ------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    @staticmethod
    def _as_batch(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if hasattr(prompts, "tolist") and not isinstance(prompts, list):  # numpy array / torch tensor
            prompts = prompts.tolist()
        if len(prompts) and isinstance(prompts[0], numbers.Integral):  # one prompt of token ids
            return [prompts]
        return list(prompts)

    @staticmethod
    def _per_prompt(value, count: int, what: str) -> list:
        """``value`` for each of ``count`` prompts: a list of that length, or one value for all."""
        values = list(value) if isinstance(value, (list, tuple)) else [value] * count
        if len(values) != count:
            raise ValueError(f"got {len(values)} {what} for {count} prompts")
        return values

    def _run(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams | list[SamplingParams],
             use_tqdm: bool, priority: int | list[int] = 0,
             cache_salt: str | None | list[str | None] = None) -> list[RequestOutput]:
        param_list = self._per_prompt(params, len(prompts), "SamplingParams")
        priorities = self._per_prompt(priority, len(prompts), "priorities")
        salts = self._per_prompt(cache_salt, len(prompts), "cache salts")
        ids = [str(self._counter + i) for i in range(len(prompts))]
        extra = {rid: (pr, salt) for rid, pr, salt in zip(ids, priorities, salts)}
        for rid, (_, prompt_ids), p in zip(ids, prompts, param_list):  # refuse a bad one before any runs
            self.core.validate(EngineRequest(rid, prompt_ids, p, *extra[rid]))
        self._counter += len(prompts)
        results = {rid: RequestOutput(text, prompt_ids, [CompletionOutput(i, "", [], "") for i in range(p.n)])
                   for rid, (text, prompt_ids), p in zip(ids, prompts, param_list)}
        # fed as the waiting queue (--max-queue) has room: a batch may be any size
        pending = collections.deque(zip(ids, prompts, param_list))
        max_queue = self.core.config.max_queue
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while pending or self.engine.has_unfinished():
                while pending and self.core.stats().num_waiting + pending[0][2].n <= max_queue:
                    rid, (_, prompt_ids), p = pending.popleft()
                    self.engine.add_request(rid, prompt_ids, p, *extra[rid])
                for delta in self.engine.step():
                    self._accumulate(results[delta.request_id], delta, bar)
        except BaseException:  # interrupted (Ctrl-C) or failed: nothing stays queued
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    @staticmethod
    def _accumulate(result: RequestOutput, delta: CompletionDelta, bar) -> None:
        out = result.outputs[delta.index]
        out.text += delta.text
        out.token_ids.extend(delta.token_ids)
        if delta.samples and delta.samples[0].top_logprobs is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.extend({**dict(s.top_logprobs), s.token_id: s.logprob} for s in delta.samples)
        if delta.finished:
            reason = delta.finish_reason
            # vLLM's vocabulary: eos, stop tokens and stop strings all finish with "stop"
            out.finish_reason = "stop" if reason in (FinishReason.EOS, FinishReason.STOP) else reason.value
            out.stop_reason = delta.stop_reason
            result.num_cached_tokens = delta.num_cached_tokens
            if all(o.finish_reason for o in result.outputs):
                bar.update(1)

    # -- API ----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: int | list[int] = 0,
                 cache_salt: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids), all batched through the engine. ``priority``
        (lower first, with ``scheduling_policy="priority"``) and ``cache_salt`` (prefix-cache
        tenant): one for all prompts or a list, one per prompt."""
        batch = self._as_batch(prompts)
        prepared = [(p if isinstance(p, str) else None, self._prompt_ids(p)) for p in batch]
        return self._run(prepared, params or SamplingParams(), use_tqdm, priority, cache_salt)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False, priority: int | list[int] = 0,
             cache_salt: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them
        (``priority`` and ``cache_salt`` as in :meth:`generate`)."""
        if isinstance(messages, (dict, str)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts (or a list of such lists), "
                            f"not {type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prepared = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            prepared.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
        return self._run(prepared, params or SamplingParams(), use_tqdm, priority, cache_salt)

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]`` next-token logits at every position of one sequence
        (computed outside the engine, through a contiguous KV cache)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("token_ids is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:  # (an embedding lookup out of range is an IndexError on the CPU, a device assert on CUDA)
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_model_len}")
        with on_device(self.core.runner.device):
            return prefill_logits(self.model, ids).cpu()
