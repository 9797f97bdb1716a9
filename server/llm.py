"""The offline API: ``LLM(model).generate(...)`` / ``.chat(...)`` / ``.logits(...)``."""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence, Union

import torch

from bitserve.config import ModelLoadConfig
from bitserve.demo import DEMO_MODEL_PATH
from bitserve.generate import generate_one, prefill_logits
from bitserve.loader import LoadedModel, load_model, resolve_model_path
from bitserve.outputs import RequestOutput
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


class LLM:
    """Load a model once and generate from it in-process.

    ``LLM()`` loads the bundled demo model; options are the fields of
    :class:`bitserve.config.ModelLoadConfig` (``format``, ``dtype``, ``device``,
    ``max_model_len``, ``seed``, ``revision``).
    """

    def __init__(self, model: str | None = None, **options):
        known = {f.name for f in fields(ModelLoadConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; known: {sorted(known - {'model'})}")
        self.load_config = ModelLoadConfig(model=str(model or DEMO_MODEL_PATH), **options)
        path = resolve_model_path(self.load_config.model, self.load_config.revision)
        self.tokenizer = Tokenizer(path)
        self.loaded: LoadedModel = load_model(
            path, format=self.load_config.format, dtype=self.load_config.dtype, device=self.load_config.device
        )
        self.model = self.loaded.model
        cfg = self.loaded.config
        self.eos_token_ids = tuple(dict.fromkeys(cfg.eos_token_ids + self.tokenizer.eos_token_ids))
        self.max_model_len = min(self.load_config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self._requests = 0

    # -- helpers ------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = self.loaded.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens, leaving no room to generate"
            )
        return ids

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.greedy:
            return None
        seed = params.seed if params.seed is not None else self.load_config.seed + self._requests
        return torch.Generator(device=self.model.model.norm.weight.device).manual_seed(seed)

    @staticmethod
    def _as_batch(prompts) -> tuple[list, bool]:
        if isinstance(prompts, str):
            return [prompts], True
        if len(prompts) and isinstance(prompts[0], int):
            return [prompts], True
        return list(prompts), False

    # -- API ----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids). Returns one RequestOutput per prompt."""
        params = params or SamplingParams()
        batch, _ = self._as_batch(prompts)
        prepared = [(p if isinstance(p, str) else None, self._prompt_ids(p)) for p in batch]
        results = []
        for text, ids in prepared:
            completion = generate_one(
                self.model, self.tokenizer, ids, params, max_model_len=self.max_model_len,
                eos_token_ids=self.eos_token_ids, generator=self._generator(params),
            )
            self._requests += 1
            results.append(RequestOutput(text, ids, [completion]))
        return results

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt) for c in conversations]
        outputs = self.generate(prompts, params)
        for out, conv in zip(outputs, conversations):
            out.prompt = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        return outputs

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]`` next-token logits at every position of one sequence."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_model_len}")
        return prefill_logits(self.model, ids).cpu()
