"""ChatService: validate, convert, delegate to the Frontend, stream back."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from bitserve.frontend import Frontend
from bitserve.rpc import convert
from bitserve.v1 import chat_pb2 as pb
from bitserve.v1 import chat_pb2_grpc


class ModelNotFoundError(LookupError):
    """The request names a model this server does not serve."""


class RequestFailedError(RuntimeError):
    """The engine failed a unary request (a step raised): the call ends with INTERNAL and this
    message, not OK with a half-made answer. Streams report it in the choice's end event."""


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, frontend: Frontend, default_max_tokens: int = 256):
        self.frontend = frontend
        self.default_max_tokens = default_max_tokens

    @property
    def model_name(self) -> str:
        return self.frontend.info.name

    def _check_model(self, name: str) -> None:
        if name and name != self.model_name:
            raise ModelNotFoundError(f"model '{name}' is not served here; available: '{self.model_name}'")

    def _params(self, sampling: pb.SamplingOptions, prompt_len: int):
        default = max(1, min(self.default_max_tokens, self.frontend.info.max_request_tokens - prompt_len))
        return convert.sampling_params(sampling, default)

    def _chat_prompt(self, request: pb.ChatRequest) -> list[int]:
        self._check_model(request.model)
        add_gen = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        return self.frontend.chat_prompt(convert.messages(request), add_generation_prompt=add_gen)

    def _completion_prompt(self, request: pb.CompletionRequest) -> list[int]:
        self._check_model(request.model)
        which = request.WhichOneof("prompt")
        if which == "text":
            return self.frontend.text_prompt(request.text)
        if which == "token_ids" and request.token_ids.ids:
            return list(request.token_ids.ids)
        raise ValueError("prompt is empty: set text or token_ids")

    async def _stream(self, request, prompt: list[int]) -> AsyncIterator[pb.StreamEvent]:
        params = self._params(request.sampling, len(prompt))
        request_id = request.request_id or self.frontend.new_request_id()
        tokenizer = self.frontend.tokenizer
        async for delta in self.frontend.generate(request_id, prompt, params, request.priority,
                                                  request.cache_salt or None):
            for event in convert.stream_events(delta, self.model_name, tokenizer):
                yield event

    async def _unary(self, request, prompt: list[int]) -> pb.ChatResponse:
        params = self._params(request.sampling, len(prompt))
        request_id = request.request_id or self.frontend.new_request_id()
        builder = convert.ResponseBuilder(request_id, self.model_name)
        async for delta in self.frontend.generate(request_id, prompt, params, request.priority,
                                                  request.cache_salt or None):
            builder.add(delta, self.frontend.tokenizer)
        if builder.error is not None:
            raise RequestFailedError(f"the engine failed this request: {builder.error}")
        return builder.build()

    # -- RPCs ------------------------------------------------------------------------------
    # Rendering and tokenizing run on a worker thread: a long prompt takes a while, and the event
    # loop meanwhile serves every other call (streams, health checks).
    async def Chat(self, request: pb.ChatRequest, context) -> pb.ChatResponse:
        return await self._unary(request, await asyncio.to_thread(self._chat_prompt, request))

    async def ChatStream(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.StreamEvent]:
        async for event in self._stream(request, await asyncio.to_thread(self._chat_prompt, request)):
            yield event

    async def Complete(self, request: pb.CompletionRequest, context) -> pb.ChatResponse:
        return await self._unary(request, await asyncio.to_thread(self._completion_prompt, request))

    async def CompleteStream(self, request: pb.CompletionRequest, context) -> AsyncIterator[pb.StreamEvent]:
        async for event in self._stream(request, await asyncio.to_thread(self._completion_prompt, request)):
            yield event

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.frontend.abort(request.request_id))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(self.frontend.info)])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        self._check_model(request.model)
        return convert.model_info(self.frontend.info)

    async def GetLoad(self, request, context) -> pb.Load:
        replica = self.frontend.replica
        s = replica.stats()  # summed over the ready replicas
        return pb.Load(running=s.num_running, waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
                       kv_blocks_total=s.num_kv_blocks, kv_blocks_free=s.num_free_kv_blocks,
                       kv_capacity_tokens=s.kv_capacity_tokens, replicas=replica.num_ready)
