"""Front-end side of a request: ``n`` fan-out, incremental detokenizing, stop strings.

The engine core speaks token ids; this turns its ``TokenDelta``s into text
deltas per choice. When a stop string appears, the choice finishes here with
reason STOP and the caller aborts the core request (its later tokens are dropped).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from bitserve.engine.core import EngineRequest, TokenDelta
from bitserve.engine.detokenizer import IncrementalDetokenizer
from bitserve.engine.request import FinishReason, Timings
from bitserve.engine.sampler import SampleResult
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer


def child_id(request_id: str, index: int, n: int) -> str:
    """Core request id of choice ``index`` (the request id itself when n == 1)."""
    return request_id if n == 1 else f"{request_id}#{index}"


@dataclass
class CompletionDelta:
    """What a client sees: new text/tokens of one choice; the final one carries reason and usage."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    samples: list[SampleResult] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    timings: Timings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Choice:
    index: int
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0
    finished: bool = False
    timings: Timings | None = None  # the newest the engine sent


def _ended(timings: Timings | None) -> Timings | None:
    """A copy of ``timings`` finished now (the engine's own object goes on changing until the abort
    reaches it, in this process; its ``finished`` is set only when the engine ends the request)."""
    if timings is None:
        return None
    return dataclasses.replace(timings, finished=time.monotonic())


class RequestState:
    """Per user request: its choices, keyed by core request id."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer: Tokenizer):
        self.request_id = request_id
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.choices: dict[str, _Choice] = {
            child_id(request_id, i, params.n): _Choice(i, IncrementalDetokenizer(tokenizer, params, prompt_token_ids))
            for i in range(params.n)
        }

    def core_requests(self, prompt_token_ids: list[int], priority: int, cache_salt: str | None) -> list[EngineRequest]:
        return [EngineRequest(cid, prompt_token_ids, self.params, priority, cache_salt, choice.index)
                for cid, choice in self.choices.items()]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices.values())

    def process(self, delta: TokenDelta) -> tuple[CompletionDelta | None, bool]:
        """Convert one core delta. Returns (client delta or None, whether the core request must be aborted)."""
        choice = self.choices.get(delta.request_id)
        if choice is None or choice.finished:
            return None, False
        # eos / stop-token ids end the text without appearing in it (vLLM v1)
        ends_on_token = delta.finish_reason == FinishReason.EOS or (
            delta.finish_reason == FinishReason.STOP and isinstance(delta.stop_reason, int))
        update = choice.detokenizer.add_tokens(delta.token_ids, stop_terminated=ends_on_token)
        token_ids, samples = delta.token_ids, delta.samples
        if update.num_tokens < len(token_ids):  # a stop string ended inside a coalesced delta
            token_ids, samples = token_ids[:update.num_tokens], samples[:update.num_tokens]
        choice.num_tokens += len(token_ids)
        text = update.text_delta
        reason, stop_reason, abort_core = delta.finish_reason, delta.stop_reason, False
        if update.stop is not None:
            reason, stop_reason, abort_core = FinishReason.STOP, update.stop, not delta.finished
        elif delta.finished:
            text += choice.detokenizer.finish()
            if choice.detokenizer.stop_reason is not None:  # completed by the held-back text
                reason, stop_reason = FinishReason.STOP, choice.detokenizer.stop_reason
        if delta.timings is not None:
            choice.timings = delta.timings
        timings = choice.timings
        if reason is not None:
            choice.finished = True
            if not delta.finished:  # ended here (stop string), not by the engine: a snapshot, ended now
                timings = _ended(timings)
        return CompletionDelta(
            self.request_id, choice.index, text, list(token_ids), list(samples), reason, stop_reason,
            delta.num_prompt_tokens, delta.num_cached_tokens, choice.num_tokens, timings,
        ), abort_core

    def abort_all(self, reason: FinishReason = FinishReason.ABORT) -> list[CompletionDelta]:
        """Final deltas for every unfinished choice (client went away, error, shutdown)."""
        out = []
        for choice in self.choices.values():
            if not choice.finished:
                choice.finished = True
                out.append(CompletionDelta(self.request_id, choice.index, "", [], finish_reason=reason,
                                           num_prompt_tokens=self.num_prompt_tokens,
                                           num_output_tokens=choice.num_tokens, timings=_ended(choice.timings)))
        return out
