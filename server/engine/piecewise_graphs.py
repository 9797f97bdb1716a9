"""Mixed and prefill steps replayed from piecewise CUDA graphs.

The decode graphs (:mod:`bitserve.engine.cuda_graphs`) cover steps in which every sequence decodes
one token. A step that also carries a prefill chunk -- under steady arrivals, with chunked prefill,
a good share of all steps -- launches the same few hundred kernels one by one from Python. Its
attention cannot be captured the same way (how the chunk attends over its context depends on this
step's lengths, and the int4/int2 cache plans its writes on the host), but everything else in
the forward works row by row on a flat token batch: embedding, RoPE, norms, the quantized linears,
activations. As vLLM v1 does, the forward is captured once per padded token count as
``num_layers + 1`` graphs split at the attention calls: graph ``i`` runs from layer ``i - 1``'s
attention output to layer ``i``'s q/k/v, the attention runs eagerly between two replays on the real
rows, and its result is copied into the static buffer the next graph reads.

The split needs no change to the model: during capture the attention backend handed to the
forward ends the current graph, records the q/k/v it was given (tensors the replays rewrite in
place) and starts the next graph. A step of ``n`` tokens replays the smallest captured count
``>= n``; its padding rows compute garbage that no real row ever reads (every captured op works
row by row -- a contract of :class:`bitserve.plugins.base.QuantLinear` -- and attention only sees
the real rows). Steps of more tokens run eagerly: there the kernels' own time dominates.

Opt-in (``--piecewise-graph-tokens N``) until it has been timed on a GPU; ``--enforce-eager`` turns
it off with the decode graphs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from bitserve.model import LlamaForCausalLM
from bitserve.model.attention import AttentionBackend

log = logging.getLogger(__name__)

# the attention of one layer on the real rows: (layer, q, k, v) -> [n, heads * head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# the forward over the static buffers, with the attention it is given
Forward = Callable[[AttentionBackend], torch.Tensor]
# replay(attend, n): recompute the captured output in place for the first n rows
PiecewiseReplay = Callable[[Attend, int], None]


class PiecewiseCapture(Protocol):
    """How a forward is recorded in pieces split at its attention calls and replayed."""

    def capture_pieces(self, forward: Forward, attn_out: torch.Tensor) -> tuple[PiecewiseReplay, torch.Tensor]:
        """Warm ``forward`` up and record it; return ``(replay, out)``. Each attention call of the
        recorded forward returns ``attn_out`` (a static buffer, all padded rows); ``replay(attend, n)``
        recomputes ``out`` in place from the current contents of the buffers ``forward`` reads,
        calling ``attend(layer, q[:n], k[:n], v[:n])`` at each attention and copying its result into
        ``attn_out[:n]`` before the rest of the forward reads it."""
        ...


class CudaPiecewiseCapture:
    """One ``torch.cuda.CUDAGraph`` per piece, every graph of every size in one memory pool: pieces
    and sizes never run at once, and the tensors that cross from one piece to the next (q/k/v, the
    residual stream) stay referenced, so the pool does not hand their memory out again."""

    def __init__(self, device: torch.device, pool=None):
        self.device = device
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    def _begin(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's calls may not break the capture (a server has others)
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        return graph

    def capture_pieces(self, forward, attn_out):
        device = self.device
        stream = torch.cuda.Stream(device)
        # warm-up on the side stream (compiles this size's Triton kernels, creates workspaces)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward(lambda layer, q, k, v: attn_out)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graphs: list[torch.cuda.CUDAGraph] = []
        calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def split(layer, q, k, v):
            graphs[-1].capture_end()
            calls.append((layer, q, k, v))
            graphs.append(self._begin())
            return attn_out

        with torch.cuda.stream(stream):
            graphs.append(self._begin())
            try:
                out = forward(split)
            finally:
                graphs[-1].capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)

        def replay(attend: Attend, n: int) -> None:
            for graph, (layer, q, k, v) in zip(graphs, calls):
                graph.replay()
                attn_out[:n].copy_(attend(layer, q[:n], k[:n], v[:n]))
            graphs[-1].replay()

        return replay, out


class EagerPiecewiseCapture:
    """Replays by running the forward again with an attention that does what a piecewise replay
    does -- attend over the first ``n`` rows, copy into the static buffer, hand the whole buffer
    on -- so the CPU tests check the padding and buffer logic on any device."""

    def capture_pieces(self, forward, attn_out):
        out = forward(lambda layer, q, k, v: attn_out)

        def replay(attend: Attend, n: int) -> None:
            def backend(layer, q, k, v):
                attn_out[:n].copy_(attend(layer, q[:n], k[:n], v[:n]))
                return attn_out

            out.copy_(forward(backend))

        return replay, out


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture: 4, 8, then powers of two and the points halfway between them
    (16, 24, 32, 48, 64, 96, ...), up to ``max_tokens`` (included): a step pads by at most half."""
    sizes = {4, 8}
    p = 16
    while p < max_tokens:
        sizes |= {p, p + p // 2}
        p *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class PiecewiseGraphs:
    """The piecewise-captured forwards of one engine and their static input buffers."""

    def __init__(self, model: LlamaForCausalLM, *, max_tokens: int, capture: PiecewiseCapture):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.capture = capture
        self.sizes = piecewise_sizes(max_tokens)
        self.max_tokens = s = self.sizes[-1]
        cfg = model.config
        device = model.model.norm.weight.device
        with torch.inference_mode():
            self._ids = torch.zeros(s, dtype=torch.long, device=device)
            self._positions = torch.zeros(s, dtype=torch.long, device=device)
            self._attn_out = torch.zeros(s, cfg.num_heads * cfg.head_dim, dtype=model.dtype, device=device)
        self.graphs: dict[int, tuple[PiecewiseReplay, torch.Tensor]] = {}
        self.num_replays = 0

    def _forward(self, t: int, attn: AttentionBackend) -> torch.Tensor:
        """The forward of the first ``t`` rows of the static buffers: hidden states ``[t, hidden]``."""
        return self.model(self._ids[:t], self._positions[:t], attn)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (the smaller ones then reuse its memory)."""
        t0 = time.monotonic()
        for t in tqdm(list(reversed(self.sizes)), desc="capturing piecewise CUDA graphs", unit="size", leave=False,
                      disable=None):  # None: only on a terminal
            self.graphs[t] = self.capture.capture_pieces(lambda attn, t=t: self._forward(t, attn), self._attn_out[:t])
        log.info("mixed and prefill steps of up to %d tokens run as piecewise CUDA graphs (%d sizes captured in "
                 "%.1f s)", self.max_tokens, len(self.sizes), time.monotonic() - t0)

    def handles(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def size_for(self, n: int) -> int:
        return next(t for t in self.sizes if t >= n)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """The forward of this step's ``n`` tokens (``ids``/``positions`` ``[n]``, ``attn`` the step's
        attention): hidden states ``[n, hidden]``, a view of the graphs' output valid until the next
        replay. The padding rows keep whatever ids and positions an earlier step left (any valid
        pair will do: no real row reads their results)."""
        n = ids.shape[0]
        t = self.size_for(n)
        self._ids[:n].copy_(ids, non_blocking=True)
        self._positions[:n].copy_(positions, non_blocking=True)
        replay, out = self.graphs[t]
        replay(attn, n)
        self.num_replays += 1
        return out[:n]
