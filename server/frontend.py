"""Text in, text deltas out, over a replica: prompts, ``n`` fan-out, stop strings, cancel.

Protocol-neutral (no grpc here): the gRPC servicer, the CLI and tests drive it.
Token ids cross to the replica; text stays here.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from bitserve.engine.core import EngineRequest, TokenDelta
from bitserve.engine.output_processor import CompletionDelta, RequestState
from bitserve.engine.request import FinishReason, RequestIdInUseError
from bitserve.replica import Replica
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer

# A prompt with more characters than this per token of context is refused before it is rendered or
# tokenized: it cannot fit, and tokenizing megabytes (a gRPC message may carry 16 MB) took 14-45 s of a 2-core
# VM. Prose averages 3-5 characters per token and long whitespace or punctuation runs in code seldom
# pass 16, so no prompt that fits comes near this.
MAX_PROMPT_CHARS_PER_TOKEN = 64


class PromptTooLongError(ValueError):
    """The prompt is longer than the model's context (found before it was tokenized)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    format: str
    bits_per_weight: float
    max_context: int
    kv_cache_dtype: str
    vocab_size: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int  # all replicas together
    num_layers: int
    hidden_size: int
    # prompt + output tokens one request can reach: the context, or less when one replica's KV
    # cache holds less (the default max_tokens stops there rather than refusing the request)
    max_request_tokens: int


class Frontend:
    def __init__(
        self,
        tokenizer: Tokenizer,
        replica: Replica,
        info: ModelInfo,
        on_finish: Callable[[CompletionDelta], None] | None = None,
    ):
        self.tokenizer = tokenizer
        self.replica = replica
        self.info = info
        self.on_finish = on_finish
        self._active: dict[str, RequestState] = {}
        self._core_ids: set[str] = set()  # engine request ids of the active requests' choices
        self._abort_requested: set[str] = set()  # active requests abort() was called for

    # -- prompts ------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation (ChatTemplateError for bad roles / empty messages,
        PromptTooLongError for a conversation far longer than the context)."""
        if len(messages) > self.info.max_context:  # the template adds at least a token per message
            raise PromptTooLongError(f"{len(messages)} messages cannot fit in this model's context of "
                                     f"{self.info.max_context} tokens")
        chars = sum(len(v) for m in messages if isinstance(m, dict) for v in m.values() if isinstance(v, str))
        self._check_chars(chars)
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    def text_prompt(self, text: str) -> list[int]:
        if not text:
            raise ValueError("prompt is empty")
        self._check_chars(len(text))
        return self.tokenizer.encode(text)

    def _check_chars(self, chars: int) -> None:
        limit = self.info.max_context * MAX_PROMPT_CHARS_PER_TOKEN
        if chars > limit:
            raise PromptTooLongError(
                f"prompt is too long: {chars} characters, and this model's context of {self.info.max_context} "
                f"tokens takes at most {limit} (refused before tokenizing)")

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- generation ---------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        observed: bool = True,
    ) -> AsyncIterator[CompletionDelta]:
        """Deltas of every choice, interleaved; each choice ends with one finished delta.

        ``observed=False`` (the server's own warm-up) keeps the request out of ``on_finish``, i.e.
        the request counters and latency histograms: its first-call compile time is not a client's.

        Raises ValueError for requests the engine cannot serve (before anything is
        queued) and QueueFullError when the engine refuses more work. Leaving the
        iterator early aborts every choice and frees their KV blocks.
        """
        if request_id in self._active:
            raise RequestIdInUseError(f"request_id '{request_id}' is already in use")
        # every choice has the same prompt and parameters: checking one checks all (before the
        # detokenizers decode the prompt's tail)
        self.replica.validate(EngineRequest(request_id, prompt_token_ids, params, priority, cache_salt))
        state = RequestState(request_id, prompt_token_ids, params, self.tokenizer)
        core_requests = state.core_requests(prompt_token_ids, priority, cache_salt)
        # the choices' engine ids ("ID#k" when n > 1) must not be another request's: refusing here
        # keeps a refused request from aborting what it does not own
        taken = [cid for cid in state.choices if cid in self._core_ids]
        if taken:
            raise RequestIdInUseError(f"request_id '{request_id}' is already in use (as '{taken[0]}')")
        self._active[request_id] = state
        self._core_ids.update(state.choices)
        tasks: list[asyncio.Task] = []
        if len(core_requests) == 1:  # one choice: read its stream directly (no task, no second queue)
            stream = self.replica.generate(core_requests[0])
        else:
            stream = self._merged(core_requests, tasks)
        refused = False
        on_finish = self.on_finish if observed else None
        try:
            async for item in stream:
                completion, abort_core = state.process(item)
                if abort_core:
                    self.replica.abort(item.request_id, FinishReason.STOP, completion.stop_reason)
                elif request_id in self._abort_requested and not item.finished:
                    # a choice the replica had not received yet when abort() ran (the n > 1 pumps
                    # start a turn of the loop later): its first output is the first chance
                    self.replica.abort(item.request_id)
                if completion is None:
                    continue
                if completion.finished and on_finish is not None:
                    on_finish(completion)
                yield completion
                if state.finished:
                    break
        except Exception:  # refused (queue full), engine gone, ...: no choice ran to an end to count
            refused = True
            raise
        finally:
            self._active.pop(request_id, None)
            self._abort_requested.discard(request_id)
            self._core_ids.difference_update(state.choices)
            if not refused and on_finish is not None:
                for final in state.abort_all():  # the client left (cancel, deadline, disconnect)
                    on_finish(final)
            for cid in state.choices:  # idempotent; frees blocks even if a pump is mid-await
                self.replica.abort(cid)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            close = getattr(stream, "aclose", None)  # async generators; a Replica may return any async iterator
            if close is not None:
                await close()

    async def _merged(self, core_requests, tasks: list[asyncio.Task]) -> AsyncIterator[TokenDelta]:
        """The deltas of several core requests (the ``n`` choices) as they come, through one queue
        filled by a task per choice (appended to ``tasks``); a choice's error is raised here."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(req):
            try:
                async for delta in self.replica.generate(req):
                    queue.put_nowait(delta)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # refused (queue full), engine died, ...
                queue.put_nowait(e)

        tasks.extend(asyncio.create_task(pump(r)) for r in core_requests)
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def abort_all(self) -> int:
        """Cancel every active request (each stream ends with finish reason ABORT); how many."""
        ids = list(self._active)
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    def abort(self, request_id: str) -> bool:
        """Cancel a request by id; its stream ends with finish reason ABORT. False if unknown."""
        state = self._active.get(request_id)
        if state is None:
            return False
        self._abort_requested.add(request_id)
        for cid in state.choices:
            self.replica.abort(cid)
        return True
