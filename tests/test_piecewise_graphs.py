"""Mixed and prefill steps replayed from piecewise graphs (bitserve.engine.piecewise_graphs).

On a CPU the pieces are emulated (``EagerPiecewiseCapture``: the forward re-runs over the same
static buffers with an attention that attends over the real rows, copies into the static buffer
and hands the whole padded buffer on), which checks the padding, the buffers and the engine
wiring against the same engine without graphs. The split of a real capture into CUDA graphs is
checked with a recording stand-in for ``torch.cuda.CUDAGraph``; the ``gpu`` test records real
ones.
"""

import contextlib
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

from bitserve import LLM, SamplingParams  # noqa: E402
from bitserve.config import EngineConfig  # noqa: E402
from bitserve.engine.cuda_graphs import EagerCapture  # noqa: E402
from bitserve.engine.request import RequestStatus  # noqa: E402
from bitserve.engine.piecewise_graphs import (CudaPiecewiseCapture, EagerPiecewiseCapture,  # noqa: E402
                                              piecewise_sizes)
from graph_helpers import KV_OPTIONS, host_reads, make_llm, staggered  # noqa: E402
from tiny_checkpoints import write_tiny_bitnet_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_bitnet_model(tmp_path_factory.mktemp("piecewise") / "tiny", seed=13)


def workload(n, seed):
    """Prompts of 3..40 tokens with different max_tokens and top-2 logprobs."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, 95, (int(torch.randint(3, 41, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + (3 * i) % 8, ignore_eos=True, logprobs=2)
              for i in range(n)]
    return prompts, params


def staggered_logprobs(llm, prompts, params, every=2):
    return staggered(llm, prompts, params, every, logprobs=True)


def test_piecewise_sizes():
    assert piecewise_sizes(1) == [1]
    assert piecewise_sizes(8) == [4, 8]
    assert piecewise_sizes(20) == [4, 8, 16, 20]
    assert piecewise_sizes(512) == [4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    sizes = piecewise_sizes(1000)
    assert sizes[-1] == 1000 and all(b <= 2 * a for a, b in zip(sizes[1:], sizes[2:]))  # pads by at most half


def test_config_rejects_negative_token_counts():
    with pytest.raises(ValueError, match="piecewise_graph_tokens must be >= 0"):
        EngineConfig(piecewise_graph_tokens=-1)


@pytest.mark.parametrize("kv", list(KV_OPTIONS))
@pytest.mark.parametrize("decode_graphs", [False, True])
def test_piecewise_steps_match_eager(tiny_model, kv, decode_graphs):
    """Requests arriving while others decode, through a 16-token step budget: most steps carry a
    prefill chunk next to decodes. With the pieces (and, in one variant, the decode graphs) the
    tokens are the eager engine's and the logprobs agree to rounding, for every KV layout."""
    prompts, params = workload(9, seed=4)
    opts = dict(max_num_seqs=6, max_num_batched_tokens=16, **KV_OPTIONS[kv])
    want_ids, want_lp = staggered_logprobs(make_llm(tiny_model, **opts), prompts, params)
    llm = make_llm(tiny_model, EagerCapture() if decode_graphs else None, EagerPiecewiseCapture(),
                   piecewise_graph_tokens=16, **opts)
    pieces = llm.core.runner.piecewise
    assert pieces is not None and sorted(pieces.graphs) == [4, 8, 16]
    assert (llm.core.runner.graphs is not None) == decode_graphs
    used = []
    size_for = pieces.size_for
    pieces.size_for = lambda n: used.append((n, size_for(n))) or size_for(n)
    got_ids, got_lp = staggered_logprobs(llm, prompts, params)
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    stats = llm.core.stats()
    assert stats.piecewise_graph_steps == pieces.num_replays == len(used) > 5
    assert any(n < t for n, t in used), used  # some steps were padded
    assert stats.cuda_graph_steps == pieces.num_replays + (llm.core.runner.graphs.num_replays if decode_graphs else 0)
    if decode_graphs:
        assert llm.core.runner.graphs.num_replays > 0
    else:  # every step (decode-only ones too) fits 16 tokens
        assert pieces.num_replays == stats.steps
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)


def test_padding_rows_never_reach_real_rows(tiny_model):
    """The rows of the static attention buffer beyond this step's tokens hold NaN before every
    replay: no real row may read them (every captured op works row by row)."""
    prompts, params = workload(6, seed=5)
    opts = dict(max_num_seqs=4, max_num_batched_tokens=24)
    want_ids, want_lp = staggered_logprobs(make_llm(tiny_model, **opts), prompts, params, every=3)
    llm = make_llm(tiny_model, None, EagerPiecewiseCapture(), piecewise_graph_tokens=24, **opts)
    pieces = llm.core.runner.piecewise
    run, padded = pieces.run, []

    def poisoned_run(ids, positions, attn):
        pieces._attn_out.fill_(float("nan"))
        hidden = run(ids, positions, attn)
        t = pieces.size_for(ids.shape[0])
        padded.append(t - ids.shape[0])
        assert torch.isfinite(hidden).all()
        assert torch.isnan(pieces.graphs[t][1][ids.shape[0]:]).all()  # the padding rows did see the NaN
        return hidden

    pieces.run = poisoned_run
    got_ids, got_lp = staggered_logprobs(llm, prompts, params, every=3)
    assert got_ids == want_ids and sum(padded) > 0
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_steps_above_the_largest_size_run_eagerly(tiny_model):
    prompts, params = workload(4, seed=6)
    llm = make_llm(tiny_model, None, EagerPiecewiseCapture(), piecewise_graph_tokens=8, max_num_seqs=4,
                   max_num_batched_tokens=32)
    pieces = llm.core.runner.piecewise
    assert pieces.max_tokens == 8 and sorted(pieces.graphs) == [4, 8]
    sizes = []
    run = pieces.run
    pieces.run = lambda ids, pos, attn: sizes.append(ids.shape[0]) or run(ids, pos, attn)
    want = [o.token_ids for o in make_llm(tiny_model, max_num_seqs=4, max_num_batched_tokens=32).generate(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert sizes and max(sizes) <= 8
    assert 0 < pieces.num_replays < llm.core.stats().steps  # the 32-token prefill steps ran eagerly


def test_largest_size_is_capped_by_the_step_budget(tiny_model):
    llm = make_llm(tiny_model, None, EagerPiecewiseCapture(), piecewise_graph_tokens=512, max_num_batched_tokens=12)
    assert llm.core.runner.piecewise.sizes == [4, 8, 12]


def test_off_by_default_and_with_enforce_eager(tiny_model):
    assert make_llm(tiny_model, EagerCapture(), EagerPiecewiseCapture()).core.runner.piecewise is None
    llm = make_llm(tiny_model, EagerCapture(), EagerPiecewiseCapture(), piecewise_graph_tokens=16, enforce_eager=True)
    assert llm.core.runner.piecewise is None and llm.core.runner.graphs is None


class FailingPieces(EagerPiecewiseCapture):
    def capture_pieces(self, forward, attn_out):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_failed_capture_falls_back_to_eager(tiny_model, caplog):
    prompts, params = workload(3, seed=7)
    with caplog.at_level(logging.WARNING, logger="bitserve.engine.core"):
        llm = make_llm(tiny_model, EagerCapture(), FailingPieces(), piecewise_graph_tokens=16)
    assert llm.core.runner.piecewise is None and llm.core.runner.graphs is not None
    assert "capturing them as piecewise CUDA graphs failed: RuntimeError: operation not permitted" in caplog.text
    want = [o.token_ids for o in make_llm(tiny_model).generate(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


@pytest.mark.parametrize("tokens", [16, 48])
def test_captured_pieces_never_read_the_device(tiny_model, tokens):
    """What the pieces record -- the forward outside attention, on the Triton path a GPU takes
    (interpreted on a CPU-only host) -- reads no tensor value back to the host and builds no tensor
    from Python data: 16 tokens take the four-dot GEMMs, 48 the one-dot prefill GEMMs."""
    pytest.importorskip("triton")
    from bitserve.kernels import dispatch

    llm = make_llm(tiny_model, None, EagerPiecewiseCapture(), piecewise_graph_tokens=tokens,
                   max_num_batched_tokens=tokens)
    pieces = llm.core.runner.piecewise
    static = pieces._attn_out[:tokens]
    with torch.inference_mode(), dispatch.use_triton(True):
        pieces._forward(tokens, lambda layer, q, k, v: static)  # compile/warm outside the check
        with host_reads() as found:
            pieces._forward(tokens, lambda layer, q, k, v: static)
    assert not found, found


class RecordingGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: records begin/end/replay in one shared log."""

    log: list = []
    count = 0
    on_replay = None

    def __init__(self):
        self.id = RecordingGraph.count
        RecordingGraph.count += 1

    def capture_begin(self, pool=None, capture_error_mode="global"):
        assert not any(e[0] == "begin" for e in self.log if e[1] == self.id)
        assert capture_error_mode == "thread_local" and pool == "pool"
        self.log.append(("begin", self.id))

    def capture_end(self):
        assert self.log[-1] == ("begin", self.id) or self.log[-1][0] == "op", self.log[-3:]
        self.log.append(("end", self.id))

    def replay(self):
        self.log.append(("replay", self.id))
        if RecordingGraph.on_replay is not None:
            RecordingGraph.on_replay(self.id)


class FakeStream:
    def wait_stream(self, other):
        pass


def test_cuda_capture_splits_at_every_attention(monkeypatch):
    """The CUDA path's control flow, with the CUDA calls replaced by recorders: a warm-up outside
    any capture, one graph per piece (begun after the previous one ended, all in the shared pool),
    and on replay each piece's graph, then that layer's attention on the real rows of the tensors
    the capture saw, copied into the static buffer before the next graph runs."""
    RecordingGraph.log, RecordingGraph.count = [], 0
    log = RecordingGraph.log
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordingGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    layers, t, n = 3, 8, 5
    attn_out = torch.zeros(t, 4)
    x = torch.randn(t, 4)
    seen = []

    def forward(attn):
        h = x.clone()
        for layer in range(layers):
            log.append(("op", layer))
            q, k, v = h * 2, h * 3, h * 4
            seen.append((layer, q, k, v))
            h = h + attn(layer, q, k, v)
        log.append(("op", "final"))
        return h

    replay, out = CudaPiecewiseCapture("cuda", pool="pool").capture_pieces(forward, attn_out)
    warm, captured = seen[:layers], seen[layers:]
    assert log[:layers + 1] == [("op", 0), ("op", 1), ("op", 2), ("op", "final")]  # warm-up, no graph
    assert log[layers + 1:] == [("begin", 0), ("op", 0), ("end", 0), ("begin", 1), ("op", 1), ("end", 1),
                                ("begin", 2), ("op", 2), ("end", 2), ("begin", 3), ("op", "final"), ("end", 3)]
    del log[:]
    calls = []

    def attend(layer, q, k, v):
        calls.append(layer)
        _, cq, ck, cv = captured[layer]
        assert q.shape[0] == k.shape[0] == v.shape[0] == n
        assert q.data_ptr() == cq.data_ptr() and k.data_ptr() == ck.data_ptr() and v.data_ptr() == cv.data_ptr()
        assert log[-1] == ("replay", layer)  # the piece that computes q/k/v ran first
        return torch.full((n, 4), float(layer + 1))

    seen_by_graph = []
    monkeypatch.setattr(RecordingGraph, "on_replay", lambda gid: seen_by_graph.append(float(attn_out[0, 0])))
    replay(attend, n)
    assert seen_by_graph == [0.0, 1.0, 2.0, 3.0]  # each graph reads the previous layer's attention output
    assert calls == [0, 1, 2] and log == [("replay", 0), ("replay", 1), ("replay", 2), ("replay", 3)]
    assert (attn_out[:n] == 3).all() and (attn_out[n:] == 0).all()  # the last layer's output, real rows only
    assert len(warm) == layers


def test_cuda_capture_ends_the_open_graph_when_the_forward_fails(monkeypatch):
    RecordingGraph.log, RecordingGraph.count = [], 0
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordingGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []

    def forward(attn):
        calls.append(1)
        if len(calls) == 2:  # fails while capturing, not in the warm-up
            attn(0, torch.zeros(2), torch.zeros(2), torch.zeros(2))
            raise RuntimeError("a host sync")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match="a host sync"):
        CudaPiecewiseCapture("cuda", pool="pool").capture_pieces(forward, torch.zeros(2))
    assert RecordingGraph.log == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1)]


def test_engine_shares_the_decode_graphs_pool(monkeypatch, tiny_model):
    """On CUDA the pieces are captured into the decode graphs' memory pool (one pool for all)."""
    from bitserve.engine import core as core_module

    made = []

    class Recording(EagerPiecewiseCapture):
        def __init__(self, device, pool=None):
            made.append(pool)

    class PooledCapture(EagerCapture):
        pool = "decode-pool"

    monkeypatch.setattr(core_module, "CudaPiecewiseCapture", Recording)
    llm = make_llm(tiny_model, PooledCapture(), None, piecewise_graph_tokens=16, max_num_batched_tokens=16)
    assert made == [] and llm.core.runner.piecewise is None  # on a CPU only an explicit capture is used
    llm.core._capture_piecewise(llm.core.runner.model, None)  # what a CUDA device does
    assert made == ["decode-pool"] and llm.core.runner.piecewise.sizes == [4, 8, 16]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_piecewise_graphs_match_eager_on_gpu(tmp_path, kv_dtype):
    """Real piecewise CUDA graphs (next to the decode graphs) against --enforce-eager, float32;
    requests arriving while others decode so that steps mix prefill chunks and decodes."""
    path = write_tiny_bitnet_model(tmp_path / "tiny", seed=13, hidden_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=256)
    prompts, params = workload(9, seed=4)
    opts = dict(dtype="float32", block_size=16, kv_cache_dtype=kv_dtype, max_num_seqs=6, max_num_batched_tokens=48,
                device="cuda", kv_cache_memory_mb=256)
    eager = LLM(str(path), enforce_eager=True, **opts)
    graphs = LLM(str(path), piecewise_graph_tokens=48, **opts)
    assert graphs.core.runner.piecewise is not None and graphs.core.runner.graphs is not None
    want_ids, want_lp = staggered_logprobs(eager, prompts, params)
    got_ids, got_lp = staggered_logprobs(graphs, prompts, params)
    assert graphs.core.runner.piecewise.num_replays > 0 and graphs.core.runner.graphs.num_replays > 0
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_mixed_steps_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/mixed_steps.py with the CPU stand-ins: every mode runs the same closed-loop
    workload, steps with prefill chunks are counted apart, and only the graph modes replay."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mixed_steps.py"
    spec = importlib.util.spec_from_file_location("mixed_steps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "demo", "--device", "cpu", "--emulate", "--steps", "12", "--warmup", "2",
                       "--seqs", "4", "--prompt", "24", "--output", "6", "--chunk", "32", "--piecewise-tokens", "32",
                       "--kv-mb", "16", "--out", str(tmp_path)]) == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "mixed_steps.json").read_text())["rows"]}
    assert list(rows) == ["eager", "decode", "piecewise"]
    for r in rows.values():
        assert r["tok_s"] > 0 and r["decode_steps"] + r["mixed_steps"] == 12 and r["mixed_steps"] > 0
    assert rows["eager"]["decode_graph_replays"] == rows["eager"]["piecewise_replays"] == 0
    assert rows["decode"]["decode_graph_replays"] == rows["decode"]["decode_steps"] and rows["decode"]["piecewise_replays"] == 0
    assert rows["piecewise"]["piecewise_replays"] == rows["piecewise"]["mixed_steps"]


@pytest.mark.parametrize("kv", ["auto", "int4"])
def test_everything_at_once_matches_a_roomy_eager_engine(tiny_model, kv):
    """Staggered arrivals of greedy and seeded top-p requests (some n=2, some sharing a prefix)
    through a small cache (preemption), a 12-token step budget (chunked prefill), prefix caching,
    and both kinds of graphs: every request's tokens equal those of an eager engine with room for
    everything (sampling is batch invariant; a preempted request recomputes the same tokens), and
    every block comes back."""
    rng = torch.Generator().manual_seed(31)
    shared = torch.randint(6, 95, (9,), generator=rng).tolist()
    prompts, params = [], []
    for i in range(14):
        tail = torch.randint(6, 95, (int(torch.randint(2, 20, (1,), generator=rng)),), generator=rng).tolist()
        prompts.append(shared + tail if i % 3 == 0 else tail)
        if i % 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=3 + i % 7, ignore_eos=True))
        else:
            params.append(SamplingParams(n=1 + (i % 4 == 0), temperature=1.3, top_p=0.9, seed=i,
                                         max_tokens=4 + i % 5, ignore_eos=True))
    roomy = make_llm(tiny_model, max_num_seqs=32, max_num_batched_tokens=2048, **KV_OPTIONS[kv])
    want = [[o.token_ids for o in r.outputs] for r in roomy.generate(prompts, params)]
    blocks = 14  # 56 tokens (+ the scratch block): the longest request needs 9 blocks, five at once ~40
    llm = make_llm(tiny_model, EagerCapture(), EagerPiecewiseCapture(), piecewise_graph_tokens=12, max_num_seqs=5,
                   max_num_batched_tokens=12, num_kv_blocks=blocks, **KV_OPTIONS[kv])
    engine = llm.engine
    out: dict[str, list] = {}
    i = step = 0
    while i < len(prompts) or engine.has_unfinished():
        if i < len(prompts) and step % 2 == 0:
            engine.add_request(f"r{i}", prompts[i], params[i])
            i += 1
        for delta in engine.step():
            out.setdefault(delta.request_id, {}).setdefault(delta.index, []).extend(delta.token_ids)
        step += 1
        # what stats() counts as running: the scheduler's running list holds RUNNING requests only
        assert all(r.status is RequestStatus.RUNNING for r in llm.core.scheduler.running)
    got = [[out[f"r{k}"][j] for j in sorted(out[f"r{k}"])] for k in range(len(prompts))]
    assert got == want
    stats = llm.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert llm.core.runner.graphs.num_replays > 0 and llm.core.runner.piecewise.num_replays > 0
    b = llm.core.blocks
    assert b.num_free_blocks == b.num_blocks and not any(b.ref_counts)
