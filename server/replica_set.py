"""Many engine replicas behind one :class:`~bitserve.replica.Replica`: routing, fail-over, aggregation.

Knows nothing about Ray: members (``bitserve.replica_ray.RayReplica``, or fakes in tests)
stream token deltas, say whether they are ready, and raise :class:`ReplicaLostError` when
their process goes away. The set

- routes each engine request with :class:`~bitserve.router.Router` among *ready*
  members only, waiting up to ``RouterPolicy.ready_wait_s`` when none is ready;
- retries a request on another member when its member is lost before the request
  streamed anything (at most ``max_attempts`` members); once tokens were streamed the
  request ends with :class:`ReplicaLostError` (gRPC UNAVAILABLE), since a partial
  output cannot be resumed elsewhere;
- forwards aborts to the member that owns the request;
- sums the members' engine stats (``GetLoad``) and reports them per member (metrics).

All methods but :meth:`replica_stats` / :meth:`replica_health` / :meth:`stats` run on the
serving event loop; members may change readiness from any thread (``subscribe``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Sequence

from bitserve.engine.async_engine import EngineDeadError
from bitserve.engine.core import EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason, RequestIdInUseError
from bitserve.engine.limits import EngineLimits
from bitserve.router import Router, RouterPolicy

log = logging.getLogger(__name__)


class ReplicaLostError(EngineDeadError):
    """A replica went away while it served a request (UNAVAILABLE: the client may retry)."""


class NoReadyReplicaError(EngineDeadError):
    """No replica became ready in time (UNAVAILABLE)."""


class ReplicaStartError(OSError):
    """A replica could not be started (bad checkpoint, no resources, ...)."""


class Member(Protocol):
    """One replica of a set."""

    name: str

    @property
    def ready(self) -> bool: ...

    @property
    def incarnation(self) -> str | None:
        """Changes whenever the replica's process is replaced (restart)."""
        ...

    @property
    def restarts(self) -> int: ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) when readiness or incarnation changes."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Token deltas; raises ReplicaLostError when the replica's process is lost."""
        ...

    def abort(self, request_id: str, reason: FinishReason, stop_reason) -> None: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class ReplicaHealth:
    ready: bool
    restarts: int
    outstanding_requests: int
    outstanding_tokens: int
    routed: int  # requests sent to it
    failovers: int  # requests moved to another replica because it failed before their first token


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """One engine's view of many: counts add up, KV usage is over all blocks."""
    total = EngineStats()
    for s in stats:
        for f in dataclasses.fields(EngineStats):
            if f.name not in ("kv_cache_usage", "kv_bytes_per_token"):
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        total.kv_bytes_per_token = max(total.kv_bytes_per_token, s.kv_bytes_per_token)
    if total.num_kv_blocks:
        total.kv_cache_usage = 1.0 - total.num_free_kv_blocks / total.num_kv_blocks
    return total


class ReplicaSet:
    """A :class:`~bitserve.replica.Replica` over several members."""

    name = "replicas"

    def __init__(self, members: Sequence[Member], limits: EngineLimits, policy: RouterPolicy | None = None,
                 on_shutdown: Callable[[], None] | None = None):
        if not members:
            raise ValueError("a replica set needs at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique: {names}")
        self.members = {m.name: m for m in members}
        self.limits = limits
        self.policy = policy or RouterPolicy()
        self.router = Router(limits.block_size, self.policy)
        self._on_shutdown = on_shutdown
        self._owner: dict[str, Member] = {}
        self._waiting: dict[str, tuple[FinishReason, object] | None] = {}  # request -> abort while waiting
        self._aborted: dict[str, tuple[FinishReason, object]] = {}  # aborts of routed requests (no retry)
        self._incarnations = {m.name: m.incarnation for m in members}
        self._routed = dict.fromkeys(self.members, 0)
        self._failovers = dict.fromkeys(self.members, 0)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()
        self._closed = False
        for m in members:
            m.subscribe(self._wake)

    # -- Replica protocol ---------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> None:
        self.limits.validate(request)

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        if rid in self._owner or rid in self._waiting:
            raise RequestIdInUseError(f"request_id '{rid}' is already in use")
        failed: list[tuple[str, str | None]] = []
        try:
            while True:
                member, aborted = await self._route(request, failed)
                if member is None:  # aborted before it reached a replica
                    yield self._final(request, *aborted)
                    return
                incarnation, streamed = member.incarnation, 0
                self._owner[rid] = member
                self.router.start(request, member.name)
                self._routed[member.name] += 1
                try:
                    async with aclosing(member.generate(request)) as stream:
                        async for delta in stream:
                            streamed += 1
                            self.router.progress(rid, len(delta.token_ids))
                            yield delta
                    return
                except ReplicaLostError as e:
                    if streamed:
                        raise ReplicaLostError(
                            f"replica '{member.name}' was lost while streaming request '{rid}' ({e}); "
                            f"a partial output cannot be resumed: retry the request") from None
                    failed.append((member.name, incarnation))
                    self._failovers[member.name] += 1
                    if rid in self._aborted:  # the client gave up meanwhile: no retry
                        yield self._final(request, *self._aborted[rid])
                        return
                    log.warning("request %s: replica %s lost before the first token (%s); %s", rid, member.name,
                                e, "retrying" if len(failed) < self.policy.max_attempts else "giving up")
                    if len(failed) >= self.policy.max_attempts:
                        raise ReplicaLostError(
                            f"request '{rid}' could not be started: replica(s) {', '.join(n for n, _ in failed)} "
                            f"failed before its first token; retry the request") from None
                finally:
                    self._owner.pop(rid, None)
                    self.router.finish(rid)
        finally:
            self._aborted.pop(rid, None)

    @staticmethod
    def _final(request: EngineRequest, reason: FinishReason, stop_reason) -> TokenDelta:
        """The last delta of a request that ended without reaching (or after losing) an engine."""
        return TokenDelta(request.request_id, [], finish_reason=reason, stop_reason=stop_reason,
                          num_prompt_tokens=len(request.prompt_token_ids))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None:
        member = self._owner.get(request_id)
        if member is not None:
            self._aborted.setdefault(request_id, (reason, stop_reason))
            member.abort(request_id, reason, stop_reason)
        elif request_id in self._waiting and self._waiting[request_id] is None:
            self._waiting[request_id] = (reason, stop_reason)
            self._wake()

    def stats(self) -> EngineStats:
        """The ready replicas' stats summed; waiting includes the requests that wait for a ready replica."""
        total = sum_stats(list(self.replica_stats().values()))
        return dataclasses.replace(total, num_waiting=total.num_waiting + self.num_awaiting_replica())

    def num_awaiting_replica(self) -> int:
        """Requests routed while no replica was ready, waiting (up to ``ready_wait_s``) for one."""
        return len(self._waiting)

    @property
    def num_ready(self) -> int:
        return sum(1 for m in self.members.values() if m.ready)

    def shutdown(self) -> None:
        """Stop every member (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        try:
            for m in self.members.values():
                m.shutdown()
        finally:
            if self._on_shutdown is not None:
                self._on_shutdown()

    # -- per replica (metrics; any thread) ------------------------------------------------------
    def replica_stats(self) -> dict[str, EngineStats]:
        """Latest engine stats of every ready member."""
        return {name: m.stats() for name, m in self.members.items() if m.ready}

    def replica_health(self) -> dict[str, ReplicaHealth]:
        out = {}
        for name, m in self.members.items():
            load = self.router.load(name)
            out[name] = ReplicaHealth(m.ready, m.restarts, load.requests, load.tokens, self._routed[name],
                                      self._failovers[name])
        return out

    def owner(self, request_id: str) -> str | None:
        """Name of the member serving ``request_id`` now (None when not routed)."""
        member = self._owner.get(request_id)
        return member.name if member is not None else None

    # -- routing --------------------------------------------------------------------------------
    def _ready_names(self, failed: list[tuple[str, str | None]]) -> list[str]:
        names = []
        for name, m in self.members.items():
            if m.incarnation != self._incarnations[name]:  # restarted: its prefix cache is empty
                self._incarnations[name] = m.incarnation
                self.router.forget(name)
            if m.ready and (name, m.incarnation) not in failed:
                names.append(name)
        return names

    async def _route(self, request: EngineRequest, failed: list[tuple[str, str | None]]
                     ) -> tuple[Member | None, tuple[FinishReason, object] | None]:
        """(a ready member for ``request``, None) or, when it was aborted meanwhile, (None, (reason,
        stop_reason)). Waits at most ``ready_wait_s`` for a member to become ready."""
        rid = request.request_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.ready_wait_s
        self._waiting[rid] = None
        try:
            while True:
                if self._waiting[rid] is not None:
                    return None, self._waiting[rid]
                if self._closed:
                    raise EngineDeadError("the server is shutting down")
                ready = self._ready_names(failed)
                if ready:
                    return self.members[self.router.choose(request, ready)], None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    states = ", ".join(f"{n}: {'ready' if m.ready else 'not ready'}"
                                       for n, m in self.members.items())
                    raise NoReadyReplicaError(f"no engine replica became ready within {self.policy.ready_wait_s:g}s "
                                              f"({states}); retry later")
                await self._wait_change(remaining)
        finally:
            self._waiting.pop(rid, None)

    async def _wait_change(self, timeout: float) -> None:
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.remove(entry)

    def _wake(self) -> None:
        """Readiness changed somewhere (any thread): let waiting requests look again."""
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass
