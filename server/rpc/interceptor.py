"""One interceptor around every call: draining, auth, error -> status code, RPC metrics.

Errors never leak a traceback to the client: known errors map to their codes
with their message (cut to :data:`MAX_MESSAGE_CHARS`: it may quote the request, and a status
message travels in a header); anything else is INTERNAL ("see server log") and logged. A request
that does not parse (bad protobuf bytes, invalid UTF-8 in a string field) is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from typing import Callable

import grpc

from bitserve.engine.async_engine import EngineDeadError
from bitserve.engine.request import RequestIdInUseError
from bitserve.engine.scheduler import QueueFullError
from bitserve.rpc.servicer import ModelNotFoundError, RequestFailedError

log = logging.getLogger(__name__)

# Health checks and reflection stay open without a token and while draining.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The calls --max-concurrent-streams counts and a draining server refuses: the ones that generate.
# Abort, GetLoad and the others stay open on a full or draining server (a client can still cancel
# during the grace period), under gRPC's own, higher cap.
GENERATION_METHODS = frozenset(f"/bitserve.v1.ChatService/{name}"
                               for name in ("Chat", "ChatStream", "Complete", "CompleteStream"))
DEADLINE_SLACK_S = 0.1  # a cancel this close to the deadline is the deadline (the client timed out first)
# status messages longer than this are cut: even 4-byte characters, percent-encoded in the
# grpc-message header, then stay under gRPC's 8 KiB soft limit on metadata
MAX_MESSAGE_CHARS = 600

ERROR_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (RequestIdInUseError, grpc.StatusCode.ALREADY_EXISTS),  # before ValueError, its base
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # also ChatTemplateError
    (RequestFailedError, grpc.StatusCode.INTERNAL),  # the engine's reason (already logged by the engine)
]


def short_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message``, or its start and end around a note of how much was cut."""
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    head = limit * 2 // 3
    return f"{message[:head]} ...[{cut} characters cut]... {message[head - limit:]}"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in ERROR_CODES:
        if isinstance(error, cls):
            return code, short_message(str(error))
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"


class MalformedRequest:
    """What a request that did not parse deserializes to: the call answers INVALID_ARGUMENT."""

    def __init__(self, error: BaseException):
        self.error = error

    def message(self, method: str) -> str:
        name = method.rsplit("/", 1)[-1]
        return short_message(f"malformed {name} request: it does not parse as the method's message ({self.error})")


def tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """``deserializer`` returning :class:`MalformedRequest` instead of raising (gRPC would answer
    UNKNOWN with the exception's text, before any interceptor code runs)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...: all a bad request
            return MalformedRequest(e)

    return deserialize


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        is_draining: Callable[[], bool],
        api_token: str | None = None,
        observe: Callable[[str, str, float], None] | None = None,
        observe_started: Callable[[str], None] | None = None,
        max_calls: int | None = None,
    ):
        """``max_calls``: generation calls (:data:`GENERATION_METHODS`) in flight at once; more get
        RESOURCE_EXHAUSTED. Health probes, reflection, Abort and GetLoad are not counted."""
        self.is_draining = is_draining
        self.api_token = api_token
        self.observe = observe
        self.observe_started = observe_started
        self.max_calls = max_calls
        self.calls_in_flight = 0  # only the event loop's thread touches it

    def _refusal(self, method: str, context) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(OPEN_SERVICES):
            return None
        if self.is_draining() and method in GENERATION_METHODS:
            return grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another instance"
        if self.api_token:
            metadata = dict(context.invocation_metadata() or ())
            given = metadata.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else metadata.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_token.encode()):
                return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API token (metadata 'authorization: Bearer <token>')"
        if self.max_calls is not None and method in GENERATION_METHODS and self.calls_in_flight >= self.max_calls:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is at its limit of {self.max_calls} concurrent calls (--max-concurrent-streams); "
                    "retry later or on another instance")
        return None

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self.observe is not None:
            self.observe(method, code.name, time.monotonic() - started)

    @staticmethod
    def _cancel_code(context) -> grpc.StatusCode:
        """DEADLINE_EXCEEDED for a call cancelled at (or just before: the client's timer fires first
        and its cancel arrives ahead of the server's copy of the deadline) its deadline."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    async def _admit(self, method: str, request, context) -> float:
        """Count the call, refuse it (draining, auth, too many calls, a request that did not parse)
        or return its start time; an admitted generation call holds a slot until :meth:`_release`."""
        started = time.monotonic()
        if self.observe_started:
            self.observe_started(method)
        refusal = self._refusal(method, context)
        if refusal is None and isinstance(request, MalformedRequest):
            refusal = grpc.StatusCode.INVALID_ARGUMENT, request.message(method)
        if refusal:
            self._record(method, refusal[0], started)
            await context.abort(*refusal)
        if method in GENERATION_METHODS:
            self.calls_in_flight += 1
        return started

    def _release(self, method: str) -> None:
        if method in GENERATION_METHODS:
            self.calls_in_flight -= 1

    async def _fail(self, method: str, context, started: float, error: BaseException) -> None:
        """Record how a call ended with ``error`` and turn the error into its status code."""
        if isinstance(error, asyncio.CancelledError):
            self._record(method, self._cancel_code(context), started)
            raise error
        if isinstance(error, grpc.aio.AbortError):
            raise error
        code, message = status_for(error)
        if code == grpc.StatusCode.INTERNAL and not isinstance(error, RequestFailedError):
            log.error("%s failed", method, exc_info=error)
        if context.done():  # the client left (deadline, cancel) as the error came: nobody gets a status
            self._record(method, self._cancel_code(context), started)
            raise asyncio.CancelledError()
        self._record(method, code, started)
        await context.abort(code, message)

    def _wrap_call(self, method: str, inner):
        """A coroutine handler (unary, or a stream that writes with ``context.write``) with
        admission, error mapping and metrics around it."""

        async def call(request, context):
            started = await self._admit(method, request, context)
            try:
                response = await inner(request, context)
            except (asyncio.CancelledError, Exception) as e:  # noqa: BLE001 - mapped in _fail
                await self._fail(method, context, started, e)
            finally:
                self._release(method)
            self._record(method, grpc.StatusCode.OK, started)
            return response

        return call

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_call(method, handler.unary_unary),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
            # a coroutine that writes with context.write (grpc's health Watch): wrapped like a unary call
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_call(method, handler.unary_stream),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                started = await self._admit(method, request, context)
                responses = inner_stream(request, context)
                try:
                    async for item in responses:
                        yield item
                except GeneratorExit:  # the call ended while its handler waited at a yield (client cancel)
                    self._record(method, self._cancel_code(context), started)
                    await responses.aclose()  # abort the request now, not when the generator is collected
                    raise
                except (asyncio.CancelledError, Exception) as e:  # noqa: BLE001 - mapped in _fail
                    await self._fail(method, context, started, e)
                finally:
                    self._release(method)
                self._record(method, grpc.StatusCode.OK, started)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler  # stream-unary / stream-stream (reflection): untouched
