"""Engine replicas as Ray actors, seen from the serving process.

- :class:`RayReplica`: one :class:`~bitserve.replica_actor.EngineActor`. Carries the token
  deltas of all its requests over one Ray streaming generator (``connect()``); knows
  whether its actor is ready (warm, and that stream is open) and counts restarts (a new
  incarnation after a ready one).
- :class:`RayReplicaGroup`: creates the actors (joining Ray through
  :class:`~bitserve.replica_ray_cluster.RaySession`) and runs every replica's monitor on
  one background event loop, independent of the serving loop.

``ray`` is imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Callable

from bitserve.config import EngineConfig, ModelLoadConfig, ReplicaConfig
from bitserve.engine.core import EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason
from bitserve.replica_actor import EngineActor, ReplicaBoot, ReplicaEvents
from bitserve.replica_ray_cluster import RaySession, replica_resources
from bitserve.replica_set import ReplicaLostError, ReplicaStartError

log = logging.getLogger(__name__)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _short(error: BaseException, limit: int = 400) -> str:
    """One line of a Ray error (its messages carry whole tracebacks): the exception raised in
    an actor's constructor when that is what failed, else the first line."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if getattr(error, "actor_init_failed", False) else lines[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


# a replica's stream sends an item at least every heartbeat (1 s); one silent this long is hung (e.g. a
# stopped process). Generous: a Triton compile of a new shape can hold the actor's GIL for seconds.
STALL_TIMEOUT_S = 30.0


def _cancel(stream) -> None:
    import ray

    try:
        ray.cancel(stream)
    except Exception as e:  # noqa: BLE001 - best effort: the actor may be gone
        log.debug("cancelling a stalled stream: %s", e)


class _Connection:
    """One open ``connect()`` stream of an actor: which request's deltas go to which asyncio queue.
    Deliveries happen on the monitor thread; each request's queue belongs to its own event loop."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def register(self, request_id: str, queue: asyncio.Queue, error: Callable[[], Exception]) -> None:
        with self._lock:
            if self._closed:
                raise error()
            self._routes[request_id] = (asyncio.get_running_loop(), queue)

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def deliver(self, events: ReplicaEvents) -> None:
        items = [(d.request_id, d) for d in events.deltas] + list(events.errors)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                route = self._routes.get(request_id)
                if route is not None:
                    by_loop.setdefault(route[0], []).append((route[1], item))
        _post(by_loop)

    def close(self, error: Callable[[], Exception]) -> None:
        """The stream ended: every request still on it gets an ``error()``; later ones are refused."""
        with self._lock:
            self._closed = True
            routes, self._routes = self._routes, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, queue in routes.values():
            by_loop.setdefault(loop, []).append((queue, error()))
        _post(by_loop)


def _post(by_loop: dict) -> None:
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that request's loop is closed
            pass


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class RayReplica:
    """One engine actor, from the serving process: a member of a :class:`~bitserve.replica_set.ReplicaSet`.

    Its monitor (on the group's background loop) waits until the actor is warm, opens one
    ``connect()`` stream and hands each arriving delta to the queue of its request; requests are
    submitted under that connection from the serving loop. The replica is *ready* while the
    stream is open; when it breaks (the process died) every request on it fails with
    :class:`ReplicaLostError` and the monitor waits for Ray to restart the actor.
    """

    def __init__(self, name: str, actor, stats_interval_s: float = 0.1, heartbeat_s: float = 1.0,
                 stall_timeout_s: float = STALL_TIMEOUT_S):
        self.name = name
        self.actor = actor
        self.stats_interval_s = stats_interval_s
        self.heartbeat_s = heartbeat_s
        self.stall_timeout_s = stall_timeout_s  # silence on the stream this long: the replica is hung
        self.boot: ReplicaBoot | None = None
        self.start_error: str | None = None  # the first incarnation failed to start
        self._connection: _Connection | None = None
        self._ready = False
        self._restarts = 0
        self._stats = EngineStats()
        self._callbacks: list[Callable[[], None]] = []
        self._closed = False

    # -- state (any thread) ---------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def incarnation(self) -> str | None:
        return self.boot.incarnation if self.boot is not None else None

    @property
    def restarts(self) -> int:
        return self._restarts

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def stats(self) -> EngineStats:
        return self._stats

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._notify()

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            callback()

    # -- serving loop ---------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        from ray.exceptions import RayError, RayTaskError

        conn = self._connection
        if conn is None:
            raise ReplicaLostError(f"replica '{self.name}' is not connected")
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        conn.register(rid, queue, lambda: ReplicaLostError(f"replica '{self.name}' is not connected"))
        done = lost = False
        try:
            try:
                await self.actor.submit.remote(conn.id, request)
            except RayTaskError as e:  # the actor refused: hand its own error on
                cause = getattr(e, "cause", None)
                lost = not isinstance(cause, Exception) or isinstance(cause, (ConnectionError, RayError))
                if lost:
                    raise ReplicaLostError(f"replica '{self.name}' cannot take requests: {_short(e)}") from None
                raise cause from None
            except RayError as e:  # the actor's process died or cannot be reached
                lost = True
                if self._connection is conn:
                    self._set_ready(False)  # until the monitor hears from it again
                raise ReplicaLostError(f"replica '{self.name}' is gone: {_short(e)}") from None
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    lost = isinstance(item, ReplicaLostError)
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            conn.unregister(rid)
            if not done and not lost:
                self.abort(rid)  # the caller left early: free the request's blocks on the replica

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None:
        try:
            self.actor.abort.remote(request_id, reason, stop_reason)
        except Exception as e:  # noqa: BLE001 - a dead actor has nothing to abort
            log.debug("abort %s on %s: %s", request_id, self.name, e)

    def shutdown(self) -> None:
        import ray

        self._closed = True
        self._set_ready(False)
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("killing %s: %s", self.name, e)

    # -- monitor loop ---------------------------------------------------------------------
    async def monitor(self) -> None:
        """Forever: wait until the actor (re)started and is warm, then carry its connection stream
        until it breaks. Runs on the group's background event loop."""
        from ray.exceptions import ActorDiedError, RayError

        backoff, last_error = 0.2, None
        while not self._closed:
            try:
                boot: ReplicaBoot = await self.actor.ready.remote()
            except RayError as e:
                if self._closed:
                    return
                if self.boot is None and isinstance(e, ActorDiedError):
                    self.start_error = _short(e, 2000)
                    self._notify()
                    return
                if _short(e) != last_error:
                    last_error = _short(e)
                    log.warning("replica %s is not available: %s", self.name, last_error)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff, last_error = 0.2, None
            conn = _Connection()
            reason = "its stream ended"
            stream = self.actor.connect.remote(conn.id, self.stats_interval_s, self.heartbeat_s)
            try:
                while True:
                    try:  # an item comes at least every heartbeat: a silent stream is a hung process
                        ref = await asyncio.wait_for(stream.__anext__(), self.stall_timeout_s)
                        events: ReplicaEvents = await asyncio.wait_for(ref, self.stall_timeout_s)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        reason = f"no word from it for {self.stall_timeout_s:g} s (hung?)"
                        log.warning("replica %s lost: %s", self.name, reason)
                        _cancel(stream)  # if it wakes up, it aborts this connection's requests
                        break
                    if events.stats is not None:
                        self._stats = events.stats
                    if self._connection is not conn:  # the first item: the connection is open
                        self._open(conn, boot)
                    conn.deliver(events)
                    self._set_ready(True)
            except RayError as e:
                reason = _short(e)
                if not self._closed:
                    log.warning("replica %s lost: %s", self.name, reason)
            finally:
                if self._connection is conn:
                    self._connection = None
                self._set_ready(False)
                conn.close(lambda: ReplicaLostError(f"replica '{self.name}' is gone: {reason}"))

    def _open(self, conn: _Connection, boot: ReplicaBoot) -> None:
        if self.boot is not None and boot.incarnation != self.boot.incarnation:
            self._restarts += 1
            log.warning("replica %s restarted (pid %d on %s, restart #%d) and is ready again", self.name,
                        boot.pid, boot.node, self._restarts)
        self.boot = boot
        self._connection = conn


class RayReplicaGroup:
    """The actors of one server and the background loop that monitors them."""

    def __init__(self, session: RaySession, members: list[RayReplica], resources: tuple[float, float]):
        self.session = session
        self.members = members
        self.resources = resources
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bitserve-ray-monitor", daemon=True)
        self._thread.start()
        for m in members:
            asyncio.run_coroutine_threadsafe(m.monitor(), self._loop)

    @classmethod
    def start(cls, load_cfg: ModelLoadConfig, engine_cfg: EngineConfig, cfg: ReplicaConfig,
              session: RaySession | None = None) -> RayReplicaGroup:
        """Create ``cfg.replicas`` engine actors (returns at once; see :meth:`wait_ready`)."""
        joining = not RaySession.is_local(cfg.ray_address)
        session = session or RaySession.connect(cfg.ray_address)
        import ray

        try:
            cpus, gpus = replica_resources(cfg, load_cfg.device, ray.cluster_resources().get("GPU", 0), joining)
            device = load_cfg.device if load_cfg.device != "auto" else ("cuda" if gpus > 0 else "cpu")
            options = dict(
                num_cpus=cpus, num_gpus=gpus, scheduling_strategy="SPREAD",
                max_restarts=-1, max_task_retries=0,  # restart the process; never re-run a request
                # every request an engine can hold (running + queued) plus ready/watch/abort calls
                max_concurrency=engine_cfg.max_num_seqs + engine_cfg.max_queue + 64,
            )
            actor_cls = ray.remote(EngineActor)
            members = [RayReplica(f"replica-{i}", actor_cls.options(**options).remote(
                replace(load_cfg, device=device), engine_cfg)) for i in range(cfg.replicas)]
        except BaseException:
            session.close()
            raise
        return cls(session, members, (cpus, gpus))

    def wait_ready(self, log_every_s: float = 30.0) -> list[ReplicaBoot]:
        """Block until every replica is warm; raise ReplicaStartError if one failed to start."""
        import ray

        changed = threading.Event()
        for m in self.members:
            m.subscribe(changed.set)
        started = time.monotonic()
        next_log = started + log_every_s
        while True:
            errors = [f"{m.name}: {m.start_error}" for m in self.members if m.start_error]
            if errors:
                raise ReplicaStartError("engine replica(s) failed to start: " + "; ".join(errors))
            if all(m.ready for m in self.members):
                log.info("%d engine replica(s) ready in %.1fs", len(self.members), time.monotonic() - started)
                return [m.boot for m in self.members]
            changed.wait(timeout=1.0)
            changed.clear()
            if time.monotonic() >= next_log:
                next_log += log_every_s
                cpus, gpus = self.resources
                log.warning("waiting for engine replicas: %d of %d ready; each needs %g CPU and %g GPU, the cluster "
                            "has %s available", sum(m.ready for m in self.members), len(self.members), cpus, gpus,
                            ray.available_resources())

    def close(self) -> None:
        """Stop the monitors (after the members were shut down) and leave Ray."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(10)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("stopping replica monitors: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        self.session.close()
