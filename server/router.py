"""Which replica serves a request: least outstanding work, with prefix affinity.

Pure bookkeeping (no Ray, no asyncio, no clocks), so the policy is unit-testable.

*Outstanding work* of a replica is counted in tokens, not requests: every
request routed to it adds ``prompt tokens + max_tokens``; its prompt part is
done at its first token, and each streamed token takes one off the rest.

*Prefix affinity*: the router remembers, for the hash of each full leading
block of a prompt (the block manager's chained hashes, salted per tenant, up
to ``affinity_depth_blocks`` deep), which replica last received it. A request
goes to the replica holding its deepest remembered block, where the prefix
cache most likely still has those blocks, unless that replica is overloaded:
it may carry at most ``affinity_slack_tokens`` + (tokens it would find cached)
more outstanding work than the least-loaded ready replica. A short shared
header (one block of a chat template) therefore buys little stickiness, a
long shared document a lot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from bitserve.engine.block_manager import block_hashes
from bitserve.engine.core import EngineRequest


@dataclass(frozen=True)
class RouterPolicy:
    """Routing and fail-over knobs (library settings, not CLI flags)."""

    affinity_slack_tokens: int = 256
    affinity_depth_blocks: int = 64
    affinity_entries: int = 65536
    max_attempts: int = 3  # replicas a request may try before its first token
    ready_wait_s: float = 30.0  # how long a request waits for a ready replica

    def __post_init__(self):
        lowest = {"affinity_slack_tokens": 0, "affinity_depth_blocks": 1, "affinity_entries": 1,
                  "max_attempts": 1, "ready_wait_s": 0}
        for name, low in lowest.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class _Work:
    replica: str
    prompt_tokens: int  # still to prefill (0 once the first token arrived)
    decode_tokens: int  # still to generate, at most

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.decode_tokens


@dataclass(frozen=True)
class Load:
    requests: int = 0
    tokens: int = 0


class Router:
    """Tracks outstanding work per replica and prefix affinity; picks among ready replicas."""

    def __init__(self, block_size: int, policy: RouterPolicy | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.policy = policy or RouterPolicy()
        self._work: dict[str, _Work] = {}
        self._tokens: dict[str, int] = {}
        self._requests: dict[str, int] = {}
        self._affinity: OrderedDict[bytes, str] = OrderedDict()
        self._picks = 0
        self._last_pick: dict[str, int] = {}

    # -- queries ----------------------------------------------------------------------------
    def load(self, replica: str) -> Load:
        return Load(self._requests.get(replica, 0), self._tokens.get(replica, 0))

    def prefix_hashes(self, request: EngineRequest) -> list[bytes]:
        """Hashes of the prompt's full leading blocks, at most ``affinity_depth_blocks`` of them."""
        depth = self.policy.affinity_depth_blocks * self.block_size
        return block_hashes(request.prompt_token_ids[:depth], self.block_size, request.cache_salt)

    def affine(self, hashes: Sequence[bytes], ready: Sequence[str]) -> tuple[str | None, int]:
        """(replica holding the deepest remembered block among ``ready``, prompt tokens it covers)."""
        for depth in range(len(hashes), 0, -1):
            replica = self._affinity.get(hashes[depth - 1])
            if replica is not None and replica in ready:
                return replica, depth * self.block_size
        return None, 0

    # -- decisions --------------------------------------------------------------------------
    def choose(self, request: EngineRequest, ready: Sequence[str]) -> str:
        """The replica for ``request`` among ``ready`` (non-empty); remembers its prefix there."""
        if not ready:
            raise ValueError("no ready replica to choose from")
        least = min(ready, key=lambda r: (self._tokens.get(r, 0), self._requests.get(r, 0),
                                          self._last_pick.get(r, -1)))
        hashes = self.prefix_hashes(request)
        replica, cached = self.affine(hashes, ready)
        slack = self.policy.affinity_slack_tokens + cached
        if replica is None or self._tokens.get(replica, 0) - self._tokens.get(least, 0) > slack:
            replica = least
        for h in hashes:
            self._affinity[h] = replica
            self._affinity.move_to_end(h)
        while len(self._affinity) > self.policy.affinity_entries:
            self._affinity.popitem(last=False)
        self._picks += 1
        self._last_pick[replica] = self._picks
        return replica

    def start(self, request: EngineRequest, replica: str) -> None:
        """Count ``request`` as outstanding work of ``replica``."""
        if request.request_id in self._work:
            raise ValueError(f"request '{request.request_id}' is already routed")
        work = _Work(replica, len(request.prompt_token_ids), request.params.max_tokens)
        self._work[request.request_id] = work
        self._tokens[replica] = self._tokens.get(replica, 0) + work.tokens
        self._requests[replica] = self._requests.get(replica, 0) + 1

    def progress(self, request_id: str, num_tokens: int) -> None:
        """``num_tokens`` new tokens of a request arrived (its prompt is then done)."""
        work = self._work.get(request_id)
        if work is None:
            return
        before = work.tokens
        work.prompt_tokens = 0
        work.decode_tokens = max(0, work.decode_tokens - num_tokens)
        self._tokens[work.replica] -= before - work.tokens

    def finish(self, request_id: str) -> None:
        """The request ended (finished, aborted or failed): its work is no longer outstanding."""
        work = self._work.pop(request_id, None)
        if work is None:
            return
        self._tokens[work.replica] -= work.tokens
        self._requests[work.replica] -= 1

    def forget(self, replica: str) -> None:
        """Drop the prefix affinity of a replica whose cache was lost (it restarted)."""
        for h in [h for h, r in self._affinity.items() if r == replica]:
            del self._affinity[h]
