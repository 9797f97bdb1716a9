"""Turn a scheduled step into one flat forward pass over the paged KV cache."""

from __future__ import annotations

import torch

from bitserve.engine.kv_cache import PagedKVCache
from bitserve.engine.kv_layouts import StepBatch
from bitserve.engine.scheduler import ScheduledChunk
from bitserve.model import LlamaForCausalLM


class PagedAttention:
    """Attention backend of one step: the cache's layout writes new K/V to their slots and attends."""

    def __init__(self, cache: PagedKVCache, batch: StepBatch):
        self.cache = cache
        self.state = cache.begin_step(batch)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache.forward(layer, q, k, v, self.state)


class ModelRunner:
    """Runs each step eagerly, or -- pure decode steps, once ``graphs`` is set -- by replaying a
    captured CUDA graph (:class:`bitserve.engine.cuda_graphs.DecodeGraphs`), or -- other steps of
    few enough tokens, once ``piecewise`` is set -- by replaying piecewise graphs around an eager
    attention (:class:`bitserve.engine.piecewise_graphs.PiecewiseGraphs`)."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.spec.block_size
        self.device = model.model.norm.weight.device
        self.graphs = None  # a DecodeGraphs
        self.piecewise = None  # a PiecewiseGraphs

    def _batch(self, chunks: list[ScheduledChunk]):
        ids, positions, slots, qsl, seq_lens, tables, starts = [], [], [], [0], [], [], []
        sample_rows: list[int] = []
        for chunk in chunks:
            req = chunk.request
            start = req.num_computed_tokens
            end = start + chunk.num_new_tokens
            ids.extend(req.all_token_ids[start:end])
            for p in range(start, end):
                positions.append(p)
                slots.append(req.block_ids[p // self.block_size] * self.block_size + p % self.block_size)
            qsl.append(qsl[-1] + chunk.num_new_tokens)
            starts.append(start)
            seq_lens.append(end)
            tables.append(req.block_ids)
            if chunk.samples:
                sample_rows.append(qsl[-1] - 1)
        width = max(len(t) for t in tables)
        table = torch.zeros((len(tables), width), dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        pos = as_long(positions)
        batch = StepBatch(as_long(slots), pos, table.to(self.device), as_long(seq_lens), as_long(qsl), starts,
                          seq_lens, qsl, tables)
        return as_long(ids), pos, batch, sample_rows

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; return float32 logits ``[num_sampling_chunks, vocab]`` in chunk order, on the
        model's device (the sampler runs there: only the sampled ids come back to the host, not
        batch x vocab floats), valid until the next step."""
        if self.graphs is not None and self.graphs.handles(chunks):
            return self.graphs.run(chunks)
        ids, positions, batch, sample_rows = self._batch(chunks)
        attn = PagedAttention(self.kv_cache, batch)
        if self.piecewise is not None and self.piecewise.handles(ids.shape[0]):
            hidden = self.piecewise.run(ids, positions, attn)
        else:
            hidden = self.model(ids, positions, attn)
        if not sample_rows:
            return torch.empty((0, self.model.config.vocab_size), dtype=torch.float32, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows))
