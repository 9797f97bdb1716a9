"""The only place threads meet asyncio: an engine thread with an inbox, and
per-request streams that carry its token deltas back to coroutines."""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from concurrent.futures import Future
from typing import AsyncIterator

from bitserve.engine.core import EngineCore, EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason, RequestIdInUseError

log = logging.getLogger(__name__)

# measured on a 2-core VM with the model taken out (benchmarks/host_overhead.py --serving, two runs):
# decode steps of 64 / 256 streams took 1.4-1.5 / 5.7-6.2 ms at Python's default 5 ms, 0.9-1.2 / 3.3
# ms at 0.2 ms
GIL_SWITCH_INTERVAL_S = 0.0002


class _DeltaStream:
    """One request's deltas on its client's event loop: appended as the engine delivers them, taken
    all at once by the request's coroutine. A list and a future per wait is lighter than an
    ``asyncio.Queue``, whose put/get machinery ran per item (the consumer took them one at a time):
    with 256 streams on a 2-core VM the consumers keep up better, 4.8 -> 3.7 tokens per delta
    (9.3 -> 8.6 at the engine's GIL switch interval) at the same step interval
    (``benchmarks/host_overhead.py --serving``)."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list[TokenDelta] = []
        self.waiter: asyncio.Future | None = None

    def put(self, item: TokenDelta) -> None:
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[TokenDelta]:
        """Everything delivered so far (waits for at least one item)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items = self.items, []
        return items


def _deliver(batch: list[tuple[_DeltaStream, TokenDelta]]) -> None:
    """On a client's event loop: put each delta into its request's stream."""
    for stream, delta in batch:
        stream.put(delta)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncEngine:
    """Run an :class:`EngineCore` on its own thread.

    ``generate()`` is an async iterator of a request's ``TokenDelta``s; leaving
    it early (client cancel, deadline, exception) aborts the request and frees
    its blocks. Deltas that queued up while the consumer was busy come as one
    (their tokens in order). ``abort()`` is safe from any thread or coroutine.
    """

    def __init__(self, core: EngineCore, name: str = "bitserve-engine",
                 gil_switch_interval_s: float | None = GIL_SWITCH_INTERVAL_S):
        """``gil_switch_interval_s``: lower the process's GIL switch interval to this (never raise
        it; None: leave it). The engine thread and the event loop share the GIL, and Python makes
        a thread that holds it let go only every 5 ms by default: an engine step whose GPU work
        just finished could wait that long behind an event loop busy streaming the previous
        step's tokens."""
        if gil_switch_interval_s is not None and sys.getswitchinterval() > gil_switch_interval_s:
            sys.setswitchinterval(gil_switch_interval_s)
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _DeltaStream]] = {}
        self._lock = threading.Lock()
        self._stats = core.stats()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API (any thread / coroutine) ---------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        if not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        self.core.validate(request)  # reads only configuration: safe off the engine thread
        loop = asyncio.get_running_loop()
        stream = _DeltaStream()
        with self._lock:
            if request.request_id in self._streams:
                raise RequestIdInUseError(f"request_id '{request.request_id}' is already in use")
            self._streams[request.request_id] = (loop, stream)
        finished = False
        try:
            accepted: Future = Future()
            self._inbox.put(("add", request, accepted))
            await asyncio.wrap_future(accepted)  # raises QueueFullError / ValueError from the engine thread
            items: list[TokenDelta] = []
            while True:
                if not items:
                    items = await stream.take()
                # a consumer that fell behind gets what queued up as one delta: one wake-up of it
                # per turn of its loop instead of one per token (vLLM v1 coalesces outputs too)
                n = 1
                while n < len(items) and not items[n - 1].finished:
                    n += 1
                item = items[0].followed_by(*items[1:n])
                del items[:n]
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None:
        """Finish a request and free its blocks (no-op for unknown or finished ones)."""
        self._inbox.put(("abort", (request_id, reason, stop_reason), None))

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; in-flight requests end with finish reason ABORT."""
        self._stopping.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)

    # -- engine thread ----------------------------------------------------------------------
    def _send(self, delta: TokenDelta, request_id: str) -> None:
        self._send_many([(request_id, delta)])

    def _send_many(self, items: list[tuple[str, TokenDelta]]) -> None:
        """Hand a step's deltas to their streams: one wake-up of each event loop per step, not one
        per delta (each wake-up is a write to the loop's self-pipe and a turn of the loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, delta in items:
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], delta))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the client's loop is closed
                pass

    def _handle(self, command: str, payload, future: Future | None) -> None:
        if command == "add":
            if not future.set_running_or_notify_cancel():
                return  # its caller left (cancelled, deadline) before the engine saw it: nothing to add
            try:
                self.core.add_request(payload)
            except Exception as e:  # refused: report to the waiting coroutine
                future.set_exception(e)
            else:
                future.set_result(None)
        elif command == "abort":
            request_id, reason, stop_reason = payload
            final = self.core.abort(request_id, reason, stop_reason)
            if final is not None:
                self._stats = self.core.stats()  # visible before the stream sees its end
                self._send(final, request_id)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._handle(*item)
            except Exception:  # noqa: BLE001 -- one bad command must not stop the engine thread
                log.exception("engine command %r failed", item[0])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not self.core.has_unfinished())
            if not self.core.has_unfinished():
                self._stats = self.core.stats()
                continue
            try:
                deltas = self.core.step()
            except Exception as e:  # a failed step must not strand requests: end them all with ERROR
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._stats = self.core.stats()
            if deltas:
                self._send_many([(delta.request_id, delta) for delta in deltas])
        self._fail_all(None)
        while True:  # refuse what arrived during shutdown
            try:
                command, _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "add" and future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError("the engine is shutting down"))

    def _fail_all(self, error: Exception | None) -> None:
        reason = FinishReason.ERROR if error is not None else FinishReason.ABORT
        for request_id in list(self.core.scheduler.requests):
            final = self.core.abort(request_id, reason, str(error) if error else None)
            if final is not None:
                self._send(final, request_id)
        self._stats = self.core.stats()
