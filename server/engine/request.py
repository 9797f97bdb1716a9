"""One sequence being generated: its tokens, blocks, progress and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from bitserve.sampling_params import SamplingParams


class RequestIdInUseError(ValueError):
    """A new request reuses the id of one still in flight (gRPC: ALREADY_EXISTS)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # stop token id or stop string (stop_reason says which)
    EOS = "eos"  # an end-of-sequence token of the model
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"


@dataclass
class Timings:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)
class Request:
    """The engine's state for one sequence (one of the ``n`` samples of a user request)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    cache_salt: str | None = None
    arrival_order: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_cached_blocks: int = 0  # how many of block_ids are registered in the prefix cache
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    timings: Timings = field(default_factory=Timings)
    # block_ids as int64 numpy (see block_row): (the list it mirrors, the array, how many it holds)
    _block_mirror: tuple[list[int], np.ndarray, int] | None = field(default=None, repr=False)

    def block_row(self) -> np.ndarray:
        """``block_ids`` as an int64 array (a view; valid until the list changes). The scheduler only
        appends to ``block_ids`` or replaces the list, so each call converts only the blocks added
        since the last one: a step's block table costs a copy per row, not a conversion per block."""
        blocks = self.block_ids
        mirror = self._block_mirror
        if mirror is None or mirror[0] is not blocks or mirror[2] > len(blocks):
            arr = np.empty(max(16, 2 * len(blocks)), dtype=np.int64)
            arr[:len(blocks)] = blocks
        else:
            _, arr, have = mirror
            if have < len(blocks):
                if len(blocks) > arr.size:
                    grown = np.empty(2 * len(blocks), dtype=np.int64)
                    grown[:have] = arr[:have]
                    arr = grown
                arr[have:len(blocks)] = blocks[have:]
        self._block_mirror = (blocks, arr, len(blocks))
        return arr[:len(blocks)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without joining the two lists first."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Priority order: lower value first, then arrival (FCFS)."""
        return (self.priority, self.arrival_order)
