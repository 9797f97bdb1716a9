"""Continuous batching in the style of vLLM v1: one ``schedule()`` per step.

Each step spends a token budget (``max_num_batched_tokens``) on running
requests first (decodes and unfinished prefill chunks), then on prefill chunks
of waiting requests, so chunked prefill mixes with decode. When blocks run
out, the lowest-priority running request (latest arrival on ties) is preempted
and later recomputed from its tokens.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from bitserve.engine.block_manager import BlockManager, extend_block_hashes
from bitserve.engine.request import FinishReason, Request, RequestIdInUseError, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue``; the request was not accepted."""


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_new_tokens: int
    # True when this chunk reaches the end of the request's known tokens (a token is sampled);
    # fixed when the chunk is made (before the step advances the request)
    samples: bool = field(init=False)

    def __post_init__(self):
        self.samples = self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class WaitingQueue:
    """FCFS deque, or a heap ordered by (priority, arrival) for the priority policy."""

    def __init__(self, policy: str):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {policy!r}")
        self.policy = policy
        self._fcfs: deque[Request] = deque()
        self._heap: list[tuple[tuple[int, int], int, Request]] = []
        self._removed: set[int] = set()  # lazy heap deletion, by id(request)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, req: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            self._fcfs.appendleft(req) if front else self._fcfs.append(req)
        else:
            heapq.heappush(self._heap, (req.sort_key, id(req), req))
            self._removed.discard(id(req))
        self._size += 1

    def _clean(self) -> None:
        while self._heap and id(self._heap[0][2]) in self._removed:
            self._removed.discard(id(heapq.heappop(self._heap)[2]))

    def peek(self) -> Request | None:
        if self.policy == "fcfs":
            return self._fcfs[0] if self._fcfs else None
        self._clean()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Request:
        self._size -= 1
        if self.policy == "fcfs":
            return self._fcfs.popleft()
        self._clean()
        return heapq.heappop(self._heap)[2]

    def remove(self, req: Request) -> None:
        self._size -= 1
        if self.policy == "fcfs":
            self._fcfs.remove(req)
        else:
            self._removed.add(id(req))

    def __iter__(self):
        if self.policy == "fcfs":
            return iter(list(self._fcfs))
        return iter([r for _, _, r in sorted(self._heap) if id(r) not in self._removed])


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_queue: int,
        max_model_len: int,
        policy: str = "fcfs",
    ):
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.policy = policy
        self.waiting = WaitingQueue(policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._arrivals = 0
        # full blocks a running request is computing (hash -> (request, block index)) until they are
        # cached: a waiting request whose next block is one of them waits for it instead of computing
        # it a second time (the n choices of one request, a burst with one long system prompt)
        self._computing: dict[bytes, tuple[Request, int]] = {}

    # -- admission / removal --------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise RequestIdInUseError(f"request_id '{req.request_id}' is already in use")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests); retry later")
        req.arrival_order = self._arrivals
        self._arrivals += 1
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request with reason ABORT and free its blocks now, whatever its state."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.finish(req, FinishReason.ABORT)
        return req

    def finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if req.status == RequestStatus.RUNNING and req in self.running:
            self.running.remove(req)
        self._unclaim(req, req.num_cached_blocks, len(req.block_hashes))
        self.blocks.release(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.timings.finished = time.monotonic()
        self.requests.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # -- blocks being computed ----------------------------------------------------------
    def _claim(self, req: Request) -> None:
        """``req`` (just admitted) computes its full blocks past the cached ones: note them."""
        if self.blocks.enable_prefix_caching:
            for i in range(req.num_cached_blocks, len(req.block_hashes)):
                self._computing.setdefault(req.block_hashes[i], (req, i))

    def _unclaim(self, req: Request, start: int, end: int) -> None:
        """Forget ``req``'s claims on its blocks ``start..end-1`` (cached now, or never to be)."""
        computing = self._computing
        if not computing:
            return
        for h in req.block_hashes[start:end]:
            entry = computing.get(h)
            if entry is not None and entry[0] is req:
                del computing[h]

    def _computed_elsewhere(self, req: Request, block: int, queried: int) -> bool:
        """Whether another running request is computing ``req``'s block ``block``, which the prefix
        cache would serve (it lies within the ``queried`` tokens) once that request cached it."""
        if block >= len(req.block_hashes) or (block + 1) * self.block_size > queried:
            return False
        entry = self._computing.get(req.block_hashes[block])
        if entry is None:
            return False
        owner, index = entry
        if owner is req or owner.status is not RequestStatus.RUNNING or owner.num_cached_blocks > index:
            del self._computing[req.block_hashes[block]]  # stale (the owner moved on): not waiting for it
            return False
        return True

    # -- scheduling -----------------------------------------------------------------
    def _allocate(self, req: Request, num_new_tokens: int) -> bool:
        needed = self.blocks.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if needed <= 0:
            return True
        if not self.blocks.can_allocate(needed):
            return False
        req.block_ids.extend(self.blocks.allocate(needed))
        return True

    def _preempt(self, victim: Request, out: SchedulerOutput, budget: list[int]) -> None:
        self.running.remove(victim)
        for i, chunk in enumerate(out.chunks):
            if chunk.request is victim:
                budget[0] += chunk.num_new_tokens
                del out.chunks[i]
                break
        self._unclaim(victim, victim.num_cached_blocks, len(victim.block_hashes))
        self.blocks.release(victim.block_ids)
        victim.block_ids = []  # (its block hashes stay: they hash tokens, which it keeps)
        victim.num_cached_blocks = 0
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(victim, front=True)
        out.preempted.append(victim)

    def _victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=lambda r: r.sort_key)
        return self.running[-1]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = [self.max_num_batched_tokens]

        # 1. running requests: decodes and unfinished prefill chunks
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:  # preempted while making room for an earlier one
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget[0])
            if num_new <= 0:
                continue
            while not self._allocate(req, num_new):
                victim = self._victim()
                self._preempt(victim, out, budget)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, num_new))
                budget[0] -= num_new

        # 2. waiting requests (not in a step that had to preempt)
        while not out.preempted and budget[0] > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.peek()
            if req is None:
                break
            hit_blocks: list[int] = []
            queried = 0
            if req.num_computed_tokens == 0 and not req.block_ids and self.blocks.enable_prefix_caching:
                # hashes of every full block; kept from an earlier try or run (the tokens only grow)
                extend_block_hashes(req.block_hashes, req.token_ids, req.num_tokens // self.block_size,
                                    self.block_size, req.cache_salt)
                queried = req.num_tokens - 1
                hit_blocks = self.blocks.lookup_prefix(req.block_hashes, queried)
                if self._computed_elsewhere(req, len(hit_blocks), queried):
                    break  # its next blocks are being computed this step: take them from the cache next time
                self.blocks.take(hit_blocks)
                req.block_ids = list(hit_blocks)
                req.num_computed_tokens = len(hit_blocks) * self.block_size
                req.num_cached_blocks = len(hit_blocks)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget[0])
            if not self._allocate(req, num_new):
                self.blocks.release(req.block_ids)  # give back prefix-cache references
                req.block_ids, req.num_computed_tokens, req.num_cached_blocks = [], 0, 0
                break
            self.waiting.pop()
            if queried:
                self.blocks.count_prefix_lookup(queried, len(hit_blocks))
            if req.timings.first_scheduled is None:
                req.timings.first_scheduled = time.monotonic()
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._claim(req)
            out.chunks.append(ScheduledChunk(req, num_new))
            budget[0] -= num_new
        return out

    # -- after the model ran ----------------------------------------------------------
    def advance(self, chunk: ScheduledChunk) -> None:
        """Mark a chunk's tokens computed and register newly full blocks in the prefix cache."""
        req = chunk.request
        req.num_computed_tokens += chunk.num_new_tokens
        full = req.num_computed_tokens // self.block_size
        if full > req.num_cached_blocks and self.blocks.enable_prefix_caching:
            # hash only the blocks that filled up (the prefix's hashes stay)
            extend_block_hashes(req.block_hashes, req.token_ids, full, self.block_size, req.cache_salt)
            self.blocks.cache_blocks(req.block_ids, req.block_hashes, req.num_cached_blocks, full)
            self._unclaim(req, req.num_cached_blocks, full)
            req.num_cached_blocks = full

    def check_stop(self, req: Request, token: int) -> tuple[FinishReason, int | None] | None:
        """Token-level stop conditions after ``token`` was appended (stop strings are the detokenizer's)."""
        params = req.params
        n_out = len(req.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
            if not params.ignore_eos and token in req.eos_token_ids:
                return FinishReason.EOS, None
        if n_out >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None
