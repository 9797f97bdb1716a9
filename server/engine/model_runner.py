"""Turn a scheduled step into one flat forward pass over the paged KV cache."""

from __future__ import annotations

import numpy as np
import torch

from bitserve.engine.host_staging import HostStaging
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
        self.staging = HostStaging(self.device)  # the eager step's integer inputs: one pinned copy

    def _batch(self, chunks: list[ScheduledChunk]):
        """The step's flat inputs: token ids, positions, the attention's ``StepBatch`` and the rows
        whose logits are sampled (device tensors, valid until the next step). Positions and KV
        slots are computed with numpy over the whole step (a long prefill chunk is one vectorized
        gather, not a Python loop per token); everything reaches the device in one copy."""
        bs = self.block_size
        reqs = [c.request for c in chunks]
        starts = [r.num_computed_tokens for r in reqs]
        counts = [c.num_new_tokens for c in chunks]
        seq_lens = [s + k for s, k in zip(starts, counts)]
        tables = [r.block_ids for r in reqs]
        qsl = [0]
        ids: list[int] = []
        sample_rows: list[int] = []
        for chunk, req, start, end in zip(chunks, reqs, starts, seq_lens):
            ids.extend(req.token_ids(start, end))
            qsl.append(qsl[-1] + chunk.num_new_tokens)
            if chunk.samples:
                sample_rows.append(qsl[-1] - 1)
        table = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
        for i, req in enumerate(reqs):  # numpy rows kept by the requests: a copy each, not a conversion per block
            row = req.block_row()
            table[i, :row.size] = row
        counts_np = np.asarray(counts, dtype=np.int64)
        seq_of_row = np.repeat(np.arange(len(chunks)), counts_np)
        # row r of sequence s is position starts[s] + (r - qsl[s])
        positions = np.arange(qsl[-1], dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64)
                                                                   - np.asarray(qsl[:-1], dtype=np.int64), counts_np)
        slots = table[seq_of_row, positions // bs] * bs + positions % bs
        host = [np.asarray(ids, dtype=np.int64), positions, slots, table, np.asarray(seq_lens, dtype=np.int64),
                np.asarray(qsl, dtype=np.int64), np.asarray(sample_rows, dtype=np.int64)]
        ids_d, pos, slots_d, table_d, lens_d, qsl_d, rows_d = self.staging.stage(host)
        batch = StepBatch(slots_d, pos, table_d, lens_d, qsl_d, starts, seq_lens, qsl, tables)
        return ids_d, pos, batch, rows_d

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; return float32 logits ``[num_sampling_chunks, vocab]`` in chunk order, on the
        model's device (the sampler runs there: only the sampled ids come back to the host, not
        batch x vocab floats), valid until the next step."""
        if self.graphs is not None and self.graphs.handles(chunks):
            return self.graphs.run(chunks)
        ids, positions, batch, rows = self._batch(chunks)
        attn = PagedAttention(self.kv_cache, batch)
        if self.piecewise is not None and self.piecewise.handles(ids.shape[0]):
            hidden = self.piecewise.run(ids, positions, attn)
        else:
            hidden = self.model(ids, positions, attn)
        if not rows.numel():
            return torch.empty((0, self.model.config.vocab_size), dtype=torch.float32, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))
