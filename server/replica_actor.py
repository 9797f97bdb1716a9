"""The body of one engine replica as a Ray actor (``ray.remote(EngineActor)``, see
:mod:`bitserve.replica_ray`). Runs in a Ray worker process; imports no Ray itself.

The constructor loads the model, sizes the KV cache and runs one warm-up generation
before it returns, so an actor that answers :meth:`EngineActor.ready` is warm.

A front end opens one :meth:`EngineActor.connect` stream (a Ray streaming generator)
and then submits requests (:meth:`EngineActor.submit`) under that connection. The stream
carries :class:`ReplicaEvents`: the token deltas of all of the connection's requests,
batched as they pile up (one engine step's deltas usually travel as one object),
requests the engine refused, and the engine stats whenever they change. Token ids
cross the process boundary; text never does. Every method is a coroutine on the
actor's event loop; the engine steps on the :class:`AsyncEngine` thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator

from bitserve.config import EngineConfig, ModelLoadConfig
from bitserve.engine.async_engine import AsyncEngine
from bitserve.engine.core import EngineCore, EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason, RequestIdInUseError
from bitserve.frontend import ModelInfo
from bitserve.engine.limits import EngineLimits
from bitserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_MAX_REMEMBERED_ABORTS = 4096


@dataclass(frozen=True)
class ReplicaBoot:
    """What one incarnation of a replica reports once it is ready."""

    incarnation: str  # new for every process (a restart changes it)
    pid: int
    node: str
    info: ModelInfo
    limits: EngineLimits
    stats: EngineStats


@dataclass
class ReplicaEvents:
    """One item of a connection's stream."""

    deltas: list[TokenDelta] = field(default_factory=list)
    errors: list[tuple[str, Exception]] = field(default_factory=list)  # (request id, why it was refused)
    stats: EngineStats | None = None  # set when the stats changed


def warm_up(core: EngineCore, prompt: list[int]) -> None:
    """One tiny greedy generation through the whole engine, before it serves anyone."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    core.add_request(EngineRequest("warmup-" + uuid.uuid4().hex, prompt or [0], params))
    while core.has_unfinished():
        core.step()


class EngineActor:
    """One engine replica. Ray restarts the process when it dies; each start is a new incarnation."""

    def __init__(self, load_cfg: ModelLoadConfig, engine_cfg: EngineConfig):
        from bitserve.app import build_core, load_serving_model, model_info
        from bitserve.engine.sampler import derive_seed
        from bitserve.heap import freeze_startup_heap

        started = time.monotonic()
        model = load_serving_model(load_cfg, progress=False)
        incarnation = uuid.uuid4()
        # each replica (and each restart of one) draws other seeds for unseeded requests than its peers
        core = build_core(model, engine_cfg, derive_seed(load_cfg.seed, 0, incarnation.int))
        warm_up(core, model.tokenizer.encode("warm up"))
        self._engine = AsyncEngine(core)
        self._boot = dict(incarnation=incarnation.hex, pid=os.getpid(), node=socket.gethostname(),
                          info=model_info(model, core, ""), limits=EngineLimits.of(core))
        self._outboxes: dict[str, asyncio.Queue] = {}  # connection -> its events
        self._live: dict[str, tuple[str, asyncio.Task]] = {}  # request id -> (connection, task moving its deltas)
        self._aborted: OrderedDict[str, tuple[FinishReason, object]] = OrderedDict()
        freeze_startup_heap()  # the actor's process is ours: the model and engine live as long as it does
        log.info("engine replica ready in %.1fs (pid %d, device %s)", time.monotonic() - started, os.getpid(),
                 load_cfg.device)

    async def ready(self) -> ReplicaBoot:
        return ReplicaBoot(**self._boot, stats=self._engine.stats())

    async def connect(self, connection: str, stats_interval_s: float = 0.1,
                      heartbeat_s: float = 1.0) -> AsyncIterator[ReplicaEvents]:
        """Streaming generator of a connection's events. The first item comes at once (the current
        stats): once it arrived, :meth:`submit` under ``connection`` is accepted. Stats are sampled
        every ``stats_interval_s`` and sent when they changed; an item goes out at least every
        ``heartbeat_s``. If the engine thread has died the process exits, so that Ray restarts
        the replica."""
        outbox: asyncio.Queue = asyncio.Queue()
        self._outboxes[connection] = outbox
        tick = asyncio.create_task(self._tick(outbox, stats_interval_s))
        last = self._engine.stats()
        sent = time.monotonic()
        try:
            yield ReplicaEvents(stats=last)
            while True:
                items = [await outbox.get()]
                await asyncio.sleep(0)  # let the other deltas of this engine step arrive
                while not outbox.empty():
                    items.append(outbox.get_nowait())
                if not self._engine.is_running:
                    log.error("the engine thread stopped; exiting so that Ray restarts this replica")
                    os._exit(70)
                events = ReplicaEvents(deltas=[i for i in items if isinstance(i, TokenDelta)],
                                       errors=[i for i in items if isinstance(i, tuple)])
                stats = self._engine.stats()
                if stats != last:
                    events.stats = last = stats
                if events.deltas or events.errors or events.stats is not None or \
                        time.monotonic() - sent >= heartbeat_s:
                    sent = time.monotonic()
                    yield events
        finally:  # the front end went away: nobody reads these requests any more
            tick.cancel()
            if self._outboxes.get(connection) is outbox:
                del self._outboxes[connection]
            for rid, (owner, _) in list(self._live.items()):
                if owner == connection:
                    self._engine.abort(rid)

    async def submit(self, connection: str, request: EngineRequest) -> None:
        """Start a request; its deltas (or why it was refused) arrive on the connection's stream."""
        outbox = self._outboxes.get(connection)
        if outbox is None:
            raise ConnectionError(f"connection '{connection}' is not open on this replica (it restarted?)")
        rid = request.request_id
        if rid in self._live:
            raise RequestIdInUseError(f"request_id '{rid}' is already in use")
        early = self._aborted.pop(rid, None)
        if early is not None:  # the abort overtook the request
            outbox.put_nowait(TokenDelta(rid, [], finish_reason=early[0], stop_reason=early[1],
                                         num_prompt_tokens=len(request.prompt_token_ids)))
            return
        self._live[rid] = (connection, asyncio.create_task(self._forward(request, outbox)))

    async def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None:
        """Finish a request and free its blocks (it ends with a final delta on its stream)."""
        self._aborted[request_id] = (reason, stop_reason)
        while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)
        if request_id in self._live:
            self._engine.abort(request_id, reason, stop_reason)

    async def _forward(self, request: EngineRequest, outbox: asyncio.Queue) -> None:
        rid = request.request_id
        try:
            async for delta in self._engine.generate(request):
                late = self._aborted.get(rid)
                if late is not None and not delta.finished:
                    # the abort reached the engine before the request did: repeat it
                    self._engine.abort(rid, *late)
                outbox.put_nowait(delta)
        except Exception as e:  # refused (queue full, invalid) or the engine died
            outbox.put_nowait((rid, e))
        finally:
            self._live.pop(rid, None)
            self._aborted.pop(rid, None)

    async def _tick(self, outbox: asyncio.Queue, interval_s: float) -> None:
        """Wake the connection's stream now and then, so that it notices changed stats."""
        while True:
            await asyncio.sleep(interval_s)
            if outbox.empty():
                outbox.put_nowait(None)
