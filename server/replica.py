"""Where engine work runs. A replica streams token deltas for engine requests.

``LocalReplica`` wraps an in-process :class:`AsyncEngine` (the embedded
default). Ray replicas (scale-out, :mod:`bitserve.replica_set` over
:mod:`bitserve.replica_ray`) implement the same protocol.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from bitserve.engine.async_engine import AsyncEngine
from bitserve.engine.core import EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason


class Replica(Protocol):
    name: str

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Token deltas of one engine request; closing the iterator early aborts it."""
        ...

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None: ...

    def validate(self, request: EngineRequest) -> None:
        """Raise ValueError for a request this replica can never serve."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def num_ready(self) -> int:
        """Engines ready to take requests."""
        ...

    def shutdown(self) -> None: ...


class LocalReplica:
    """An engine thread in this process."""

    def __init__(self, engine: AsyncEngine, name: str = "local-0"):
        self.engine = engine
        self.name = name

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        return self.engine.generate(request)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None) -> None:
        self.engine.abort(request_id, reason, stop_reason)

    def validate(self, request: EngineRequest) -> None:
        self.engine.core.validate(request)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_ready(self) -> int:
        return 1 if self.engine.is_running else 0

    def shutdown(self) -> None:
        self.engine.shutdown()
