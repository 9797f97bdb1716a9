"""Synchronous engine with text in and out: what the offline ``LLM`` API drives."""

from __future__ import annotations

from bitserve.engine.core import EngineCore, EngineRequest, EngineStats
from bitserve.engine.output_processor import CompletionDelta, RequestState
from bitserve.engine.request import FinishReason, RequestIdInUseError
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, core: EngineCore, tokenizer: Tokenizer):
        self.core = core
        self.tokenizer = tokenizer
        self._requests: dict[str, RequestState] = {}
        self._owner: dict[str, RequestState] = {}  # core request id -> its user request

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str | None = None) -> None:
        if request_id in self._requests:
            raise RequestIdInUseError(f"request_id '{request_id}' is already in use")
        # validate before RequestState: its detokenizer decodes the prompt and would fail on bad ids
        self.core.validate(EngineRequest(request_id, prompt_token_ids, params, priority, cache_salt))
        state = RequestState(request_id, prompt_token_ids, params, self.tokenizer)
        core_requests = state.core_requests(prompt_token_ids, priority, cache_salt)
        for req in core_requests:  # validate everything before admitting anything
            self.core.validate(req)
        added = []
        try:
            for req in core_requests:
                self.core.add_request(req)
                added.append(req.request_id)
        except Exception:
            for rid in added:
                self.core.abort(rid)
            raise
        self._requests[request_id] = state
        for rid in added:
            self._owner[rid] = state

    def abort(self, request_id: str) -> list[CompletionDelta]:
        state = self._requests.pop(request_id, None)
        if state is None:
            return []
        for cid in state.choices:
            self.core.abort(cid)
            self._owner.pop(cid, None)
        return state.abort_all(FinishReason.ABORT)

    def step(self) -> list[CompletionDelta]:
        out = []
        for delta in self.core.step():
            state = self._owner.get(delta.request_id)
            if state is None:
                continue
            completion, abort_core = state.process(delta)
            if abort_core:
                self.core.abort(delta.request_id, FinishReason.STOP, completion.stop_reason)
            if completion is not None:
                out.append(completion)
                if completion.finished:
                    self._owner.pop(delta.request_id, None)
            if state.finished:
                self._requests.pop(state.request_id, None)
        return out

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        return self.core.stats()
