"""Token counts for the sampler's penalties, kept on the logits' device and updated incrementally.

Repetition, frequency and presence penalties read, per sequence, which tokens its prompt holds and
how often each token occurs in its output. Rebuilding both from the token lists at every step costs
O(context) host work per sequence per step (at 256 sequences of 8k tokens: ~130 ms a step, and a
16 MB host-to-device copy on a GPU). Here every sequence that uses a penalty owns a row of two
``[rows, vocab]`` tables -- output counts (int32) and prompt presence (bool) -- filled once when the
sequence first needs it; each step then adds only the tokens sampled since, for the whole batch in
one ``index_put_``.

Rows belong to :class:`~bitserve.engine.sampler.SamplingState` objects (``state.penalty_row``) and go
back to the free list through :meth:`PenaltyTable.release` (the engine calls it when a sequence
finishes or is aborted). The tables grow by doubling. A call with another vocabulary size or device
starts a new generation: rows of the old one are rebuilt from the token lists on their next use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIRST_ROWS = 8


@dataclass(eq=False)
class PenaltyRow:
    """A sequence's place in the tables: which generation, which row, and which output list (the
    engine's, append-only) it counted how far."""

    generation: int
    row: int
    output: list[int] | None = None
    counted: int = 0


class PenaltyTable:
    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # int32 [capacity, V]: output token counts
        self.prompt: torch.Tensor | None = None  # bool [capacity, V]: token occurs in the prompt
        self.generation = 0
        self._free: list[int] = []
        self._used = 0

    @property
    def rows_in_use(self) -> int:
        return self._used

    def gather(self, states, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output counts int32 [B, V], prompt presence bool [B, V])`` of ``states``, up to date
        with each state's ``output_token_ids`` (only the tokens not yet counted are added)."""
        if self.counts is None or self.counts.shape[1] != vocab or self.counts.device != torch.device(device):
            self._reset(vocab, device)
        rows, new_rows, new_tokens = [], [], []
        for s in states:
            slot = s.penalty_row
            out = s.output_token_ids
            if slot is None or slot.generation != self.generation:
                slot = s.penalty_row = PenaltyRow(self.generation, self._take())
                self._fill_prompt(slot.row, s.prompt_token_ids)
            if slot.output is not out or slot.counted > len(out):  # another list, or cut back: count anew
                self.counts[slot.row].zero_()
                slot.output, slot.counted = out, 0
            if slot.counted < len(out):
                fresh = out[slot.counted:]
                new_rows.extend([slot.row] * len(fresh))
                new_tokens.extend(fresh)
                slot.counted = len(out)
            rows.append(slot.row)
        if new_tokens:
            self._add(new_rows, new_tokens)
        index = torch.tensor(rows, dtype=torch.long, device=self.counts.device)
        return self.counts[index], self.prompt[index]

    def release(self, state) -> None:
        """Give the state's row back (no-op for a state without one, or with one of an old generation)."""
        slot = state.penalty_row
        state.penalty_row = None
        if slot is not None and slot.generation == self.generation:
            self._free.append(slot.row)
            self._used -= 1

    # -- internals ------------------------------------------------------------------------
    def _reset(self, vocab: int, device) -> None:
        self.generation += 1
        self.counts = torch.zeros(FIRST_ROWS, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(FIRST_ROWS, vocab, dtype=torch.bool, device=device)
        self._free = list(range(FIRST_ROWS - 1, -1, -1))
        self._used = 0

    def _take(self) -> int:
        if not self._free:
            capacity = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
            self._free = list(range(2 * capacity - 1, capacity - 1, -1))
        self._used += 1
        return self._free.pop()  # (its counts are zeroed by gather(): a new row has counted no list yet)

    def _fill_prompt(self, row: int, prompt: list[int]) -> None:
        vocab = self.prompt.shape[1]
        mask = self.prompt[row]
        mask.zero_()
        ids = [t for t in prompt if 0 <= t < vocab]
        if ids:
            mask[torch.tensor(ids, dtype=torch.long, device=mask.device)] = True

    def _add(self, rows: list[int], tokens: list[int]) -> None:
        vocab = self.counts.shape[1]
        keep = [(r, t) for r, t in zip(rows, tokens) if 0 <= t < vocab]
        if not keep:
            return
        device = self.counts.device
        r = torch.tensor([k[0] for k in keep], dtype=torch.long, device=device)
        t = torch.tensor([k[1] for k in keep], dtype=torch.long, device=device)
        self.counts.index_put_((r, t), torch.ones(len(keep), dtype=torch.int32, device=device), accumulate=True)
