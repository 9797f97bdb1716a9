"""Decode steps replayed from CUDA graphs.

A decode step of a low-bit model is hundreds of small kernels (per layer: norm and int8
quantization, four GEMVs, RoPE, the KV write, attention, activations); launched one at a time
from Python, the launches -- not the GPU -- set the pace at small batch sizes. As vLLM and SGLang
do, the engine captures the whole decode forward (embedding to logits) once per batch-size bucket
at start-up and replays it: one graph launch per step.

What makes a step replayable: every input lives in one static device buffer (token ids,
positions, KV slots, context lengths, block tables), and every launch depends on shapes only,
never on this step's values -- the attention's decode launch is fixed by ``decode_seqs`` and
``max_seq_len`` (:class:`bitserve.kernels.kv_reference.AttnMeta`), and the weight kernels pick
their launch by M. A batch of ``n`` sequences runs in the smallest captured size ``>= n``; the
padding rows decode token 0 at position 0 into a scratch KV block that the block manager never
hands out, so they cannot touch a request's cache.

Steps in which every sequence decodes one token and samples it take the graphs; prefill and
mixed steps run eagerly. ``--enforce-eager`` turns the graphs off. The int4/int2 cache still plans
each step on the host (staging slots, blocks that fill), into fixed-size tensors the graph reads
(:meth:`bitserve.engine.kv_cache.PagedKVCache.prepare_graph_step`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from bitserve.engine.kv_cache import PagedKVCache
from bitserve.engine.kv_layouts import StepBatch
from bitserve.engine.model_runner import PagedAttention
from bitserve.engine.scheduler import ScheduledChunk
from bitserve.model import LlamaForCausalLM

log = logging.getLogger(__name__)

# decode batches above this run eagerly: each size is one more graph to capture at start-up, and
# big batches are dominated by the kernels' own time, not by their launches
MAX_CAPTURED_BATCH = 256


class GraphCapture(Protocol):
    """How a forward is recorded and replayed (the seam between CUDA graphs and the CPU tests)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm ``fn`` up and record it; return ``(replay, out)``: ``replay()`` recomputes ``out``
        in place from the current contents of the buffers ``fn`` reads."""
        ...


class CudaGraphCapture:
    """``torch.cuda.CUDAGraph`` per call, all sharing one memory pool (graphs never run at once,
    so the intermediate tensors of one can reuse the memory of another; capture the largest first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn):
        # warm-up on a side stream, as torch.cuda.graph asks (lazily created handles and workspaces
        # must not be created during the capture); it also compiles this size's Triton kernels
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's calls may not break the capture (a server has others)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


class EagerCapture:
    """Replays by running ``fn`` again and copying its result into the first output: the static
    buffer discipline of a CUDA graph on any device (the CPU tests check the batch logic with it)."""

    def capture(self, fn):
        out = fn()

        def replay() -> None:
            out.copy_(fn())

        return replay, out


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8, up to ``max_batch`` (included)."""
    top = min(max_batch, MAX_CAPTURED_BATCH)
    return sorted({s for s in (1, 2, 4) if s < top} | set(range(8, top, 8)) | {top})


class DecodeGraphs:
    """The captured decode forwards of one engine and their static input buffer.

    ``scratch_block``: a KV block no request owns (the padding rows write there).
    ``max_model_len`` bounds every context (it sizes the block tables and fixes the attention's
    split of the context across programs).
    """

    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, *, scratch_block: int, max_batch: int,
                 max_model_len: int, capture: GraphCapture):
        self.model = model
        self.kv_cache = kv_cache
        self.capture = capture
        self.block_size = bs = kv_cache.spec.block_size
        self.width = -(-max_model_len // bs)
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        self.max_batch = s = self.sizes[-1]
        self.scratch_block = scratch_block
        device = model.model.norm.weight.device
        with torch.inference_mode():
            # one buffer: ids, positions, slots, context lengths ([S] each), then block tables [S, W]
            self._buf = torch.zeros(4 * s + s * self.width, dtype=torch.long, device=device)
            self._host = torch.zeros_like(self._buf, device="cpu", pin_memory=device.type == "cuda")
            self.query_start_loc = torch.arange(s + 1, dtype=torch.long, device=device)
            self.decode_seqs = torch.arange(s, dtype=torch.int32, device=device)
        self._host_np = self._host.numpy()
        # the block ids each host table row holds (None: a padding row), so that only rows whose
        # blocks changed since the last step are written again
        self._table_rows: list[tuple[list[int], int] | None] = [None] * s  # (block list, length) each row holds
        # table rows written on the host since the last copy: only they go to the device (at a long
        # max_model_len the whole table is megabytes, and most steps change a few rows)
        self._dirty: set[int] = set()
        self._pad_rows(0, s)
        with torch.inference_mode():
            self._buf.copy_(self._host)
        self._dirty.clear()
        kv_cache.enable_graphs(s, scratch_block)
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self.num_replays = 0

    # -- the static buffer ---------------------------------------------------------------
    def _views(self, buf):
        s, w = self.max_batch, self.width
        return buf[:s], buf[s:2 * s], buf[2 * s:3 * s], buf[3 * s:4 * s], buf[4 * s:].reshape(s, w)

    def _pad_rows(self, lo: int, hi: int) -> None:
        """Host rows ``lo:hi`` decode token 0 at position 0 of the scratch block."""
        ids, pos, slots, lens, tables = self._views(self._host_np)
        ids[lo:hi] = 0
        pos[lo:hi] = 0
        slots[lo:hi] = self.scratch_block * self.block_size
        lens[lo:hi] = 1
        tables[lo:hi, 0] = self.scratch_block
        for i in range(lo, hi):
            if self._table_rows[i] is not None:
                self._dirty.add(i)
            self._table_rows[i] = None  # the row's table no longer holds any request's blocks

    def _copy_dirty_rows(self, max_copies: int = 4) -> None:
        """Copy the table rows written since the last step to the device: each run of consecutive
        rows as one copy, or the span from the first to the last when there are more runs than
        ``max_copies`` (rows in between are unchanged, so copying them again is harmless)."""
        if not self._dirty:
            return
        rows = sorted(self._dirty)
        self._dirty.clear()
        runs = [[rows[0], rows[0] + 1]]
        for r in rows[1:]:
            if r == runs[-1][1]:
                runs[-1][1] = r + 1
            else:
                runs.append([r, r + 1])
        if len(runs) > max_copies:
            runs = [[runs[0][0], runs[-1][1]]]
        base, w = 4 * self.max_batch, self.width
        for lo, hi in runs:
            self._buf[base + lo * w:base + hi * w].copy_(self._host[base + lo * w:base + hi * w], non_blocking=True)

    def _forward(self, b: int) -> torch.Tensor:
        """The decode forward of the first ``b`` rows of the static buffer: float32 logits ``[b, vocab]``."""
        ids, pos, slots, lens, tables = self._views(self._buf)
        batch = StepBatch(slots[:b], pos[:b], tables[:b], lens[:b], self.query_start_loc[:b + 1],
                          starts=[0] * b, seq_lens_host=[1] * b, query_start_host=list(range(b + 1)),
                          block_ids=[[self.scratch_block]] * b, decode_seqs=self.decode_seqs[:b],
                          max_seq_len=self.max_model_len)
        hidden = self.model(ids[:b], pos[:b], PagedAttention(self.kv_cache, batch))
        return self.model.compute_logits(hidden)

    # -- start-up ------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (the smaller ones then reuse its memory)."""
        t0 = time.monotonic()
        for b in tqdm(list(reversed(self.sizes)), desc="capturing decode CUDA graphs", unit="graph", leave=False,
                      disable=None):  # None: only on a terminal
            self.graphs[b] = self.capture.capture(lambda b=b: self._forward(b))
        log.info("decode steps of up to %d sequences run as CUDA graphs (%d sizes captured in %.1f s)",
                 self.max_batch, len(self.sizes), time.monotonic() - t0)

    # -- one step ------------------------------------------------------------------------
    def handles(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Whether this step is a pure decode step that fits a captured size."""
        return (0 < len(chunks) <= self.max_batch
                and all(c.num_new_tokens == 1 and c.samples and len(c.request.block_ids) <= self.width
                        for c in chunks))

    def size_for(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Replay the graph for this decode step; float32 logits ``[len(chunks), vocab]``: a view of
        the graph's output, valid until the next replay."""
        n = len(chunks)
        b = self.size_for(n)
        ids, pos, slots, lens, tables = self._views(self._host_np)
        bs = self.block_size
        reqs = [c.request for c in chunks]
        starts = [r.num_tokens - 1 for r in reqs]  # the one new token is each request's last
        block_ids = [r.block_ids for r in reqs]
        # whole-column writes from Python lists: one conversion each instead of one per element
        ids[:n] = [r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1] for r in reqs]
        pos[:n] = starts
        lens[:n] = [p + 1 for p in starts]
        slots[:n] = [blocks[p // bs] * bs + p % bs for blocks, p in zip(block_ids, starts)]
        written = self._table_rows
        for i, (req, blocks) in enumerate(zip(reqs, block_ids)):
            # a row changes when its request gets a block (its list grows: write the tail) or the row
            # another request or list (write it all); block lists only grow until they are replaced
            seen = written[i]
            if seen is not None and seen[0] is blocks:
                if seen[1] == len(blocks):
                    continue
                tables[i, seen[1]:len(blocks)] = req.block_row()[seen[1]:]
            else:
                tables[i, :len(blocks)] = req.block_row()
            written[i] = (blocks, len(blocks))
            self._dirty.add(i)
        self._pad_rows(n, b)  # rows a bigger earlier step left behind must not write their slots again
        self.kv_cache.prepare_graph_step(starts, block_ids, b)
        s = self.max_batch
        self._buf[:4 * s].copy_(self._host[:4 * s], non_blocking=True)
        self._copy_dirty_rows()
        replay, logits = self.graphs[b]
        replay()
        self.num_replays += 1
        return logits[:n]
