"""What an engine accepts, known without the engine: the checks behind ``EngineCore.validate``.

The front end of remote (Ray) replicas runs the same checks before anything is queued, so a bad
request fails with the same message whether the engine is in this process or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # core imports this module
    from bitserve.engine.core import EngineCore, EngineRequest


@dataclass(frozen=True)
class EngineLimits:
    """The limits of one engine (vocabulary, context, KV blocks)."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_queue: int | None = None  # waiting requests it holds: a request's n choices must fit

    @classmethod
    def of(cls, core: EngineCore) -> EngineLimits:
        return cls(core.vocab_size, core.max_model_len, core.blocks.block_size, core.blocks.num_blocks,
                   core.config.max_queue)

    def validate(self, req: EngineRequest) -> None:
        """Raise ValueError (naming the problem) for a request this engine can never serve."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        ids = req.prompt_token_ids
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # (two C scans; the list only when one is bad)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if n + 1 > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; the context is {self.max_model_len} tokens, "
                             f"leaving no room to generate")
        if n + req.params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) exceeds the context "
                             f"of {self.max_model_len} tokens")
        needed = -(-(n + req.params.max_tokens) // self.block_size)
        if needed > self.num_kv_blocks:
            raise ValueError(f"prompt + max_tokens need {needed} KV blocks but the cache holds "
                             f"{self.num_kv_blocks}")
        if self.max_queue is not None and req.params.n > self.max_queue:
            raise ValueError(f"n={req.params.n} choices can never be queued at once: the engine's queue holds "
                             f"{self.max_queue} requests (--max-queue)")
        req.params.validate_for_vocab(self.vocab_size)
