"""Decode steps replayed from captured graphs (bitserve.engine.cuda_graphs).

On a CPU the graphs are emulated (``EagerCapture``: the captured function re-runs over the same
static buffers and writes into the captured output), which checks everything but the CUDA
recording itself: the static batch, padding into the scratch block, stale rows of bigger earlier
steps, the fixed attention launch. Oracle: the same engine without graphs. The ``gpu`` test
records real CUDA graphs.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

from bitserve import LLM, SamplingParams  # noqa: E402
from bitserve.engine.cuda_graphs import MAX_CAPTURED_BATCH, EagerCapture, capture_sizes  # noqa: E402
from graph_helpers import KV_OPTIONS, generate, host_reads, make_llm, staggered  # noqa: E402
from tiny_checkpoints import write_tiny_bitnet_model  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_bitnet_model(tmp_path_factory.mktemp("graphs") / "tiny", seed=11)


def prompts_and_params(n, seed):
    """Prompts of different lengths with different max_tokens: the decode batch shrinks as requests
    finish, so steps move down through the captured sizes and leave stale rows behind."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, 95, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True, logprobs=2) for i in range(n)]
    return prompts, params


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(10_000)[-1] == MAX_CAPTURED_BATCH


@pytest.mark.parametrize("kv", list(KV_OPTIONS))
def test_graph_decode_matches_eager(tiny_model, kv):
    prompts, params = prompts_and_params(11, seed=3)
    eager = make_llm(tiny_model, max_num_seqs=11, **KV_OPTIONS[kv])
    graphs = make_llm(tiny_model, EagerCapture(), max_num_seqs=11, **KV_OPTIONS[kv])
    runner = graphs.core.runner
    assert runner.graphs is not None and sorted(runner.graphs.graphs) == [1, 2, 4, 8, 11]
    # the scratch block is the last one and the block manager does not know it
    assert graphs.core.blocks.num_blocks == eager.core.blocks.num_blocks - 1 == runner.graphs.scratch_block

    want_ids, want_lp = generate(eager, prompts, params)
    used = []
    size_for = runner.graphs.size_for
    runner.graphs.size_for = lambda n: used.append(size_for(n)) or size_for(n)
    # only the table rows written since the last step are copied: the device table must still
    # mirror the host's after every step, and most steps copy a few rows, not all of them
    g, copied, mirrored = runner.graphs, [], []
    copy_rows, base = g._copy_dirty_rows, 4 * g.max_batch

    def checked():
        copied.append(len(g._dirty))
        copy_rows()
        mirrored.append(torch.equal(g._buf[base:], g._host[base:]))

    g._copy_dirty_rows = checked
    got_ids, got_lp = generate(graphs, prompts, params)
    assert mirrored and all(mirrored)
    assert sum(copied) < len(copied) * max(used) / 2, copied
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(set(used)) >= 4, used  # 11 -> 8 -> 4 -> 2 -> 1 as the requests finish
    assert runner.graphs.num_replays == len(used) == graphs.core.stats().cuda_graph_steps > 0
    blocks = graphs.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)


def test_shared_prefixes_and_seeded_sampling(tiny_model):
    """Prompts sharing a prefix (prefix-cache hits: the graphs read shared blocks and write only
    their own tails), n=3 seeded samples per prompt: the same tokens with and without graphs."""
    g = torch.Generator().manual_seed(12)
    prefix = torch.randint(6, 95, (13,), generator=g).tolist()
    prompts = [prefix + torch.randint(6, 95, (k,), generator=g).tolist() for k in (1, 4, 9)]
    params = SamplingParams(n=3, temperature=1.5, top_p=0.9, top_k=40, max_tokens=7, seed=3, ignore_eos=True,
                            repetition_penalty=1.2)
    eager = make_llm(tiny_model, max_num_seqs=9)
    graphs = make_llm(tiny_model, EagerCapture(), max_num_seqs=9)
    for llm in (eager, graphs):  # the first prompt's blocks are then in the prefix cache
        llm.generate(prompts[:1], params)
    want = [[o.token_ids for o in r.outputs] for r in eager.generate(prompts, params)]
    got = [[o.token_ids for o in r.outputs] for r in graphs.generate(prompts, params)]
    assert got == want
    assert graphs.core.stats().prefix_cache_hits > 0 and graphs.core.runner.graphs.num_replays > 0


@pytest.mark.parametrize("kv", ["auto", "int4"])
def test_padding_rows_never_write_reused_blocks(tiny_model, kv):
    """Requests arrive while others finish, through a small cache: blocks are freed and handed to
    new requests while the decode batch is below its captured size. A padding row that still held
    a finished request's slot would write into a block that now belongs to someone else."""
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(6, 95, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + (5 * i) % 7, ignore_eos=True) for i in range(16)]
    opts = dict(max_num_seqs=6, num_kv_blocks=16, enable_prefix_caching=False, **KV_OPTIONS[kv])
    want = staggered(make_llm(tiny_model, **opts), prompts, params)
    llm = make_llm(tiny_model, EagerCapture(), num_kv_blocks=17, **{k: v for k, v in opts.items() if k != "num_kv_blocks"})
    graphs = llm.core.runner.graphs
    run, padded = graphs.run, []

    def checked_run(chunks):
        logits = run(chunks)
        n, b = len(chunks), graphs.size_for(len(chunks))
        ids, pos, slots, lens, tables = graphs._views(graphs._buf)  # what the replay read
        assert (slots[n:b] == graphs.scratch_block * graphs.block_size).all() and (lens[n:b] == 1).all()
        assert (tables[n:b, 0] == graphs.scratch_block).all() and (pos[n:b] == 0).all()
        padded.append(b - n)
        return logits

    graphs.run = checked_run
    got = staggered(llm, prompts, params)
    assert got == want
    assert graphs.num_replays > 10 and sum(padded) > 0


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_graph_decode_with_triton_kv_kernels(tiny_model, monkeypatch, kv_dtype):
    """The Triton KV kernels under a fixed launch, interpreted: the attention's decode split
    (``decode_seqs``/``max_seq_len``: more programs than the context has blocks), padding rows,
    and for int4 the key-finalizing kernel over padded entries."""
    pytest.importorskip("triton")
    monkeypatch.setenv("BITSERVE_KV_TRITON", "1")
    prompts, params = prompts_and_params(3, seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (2, 4, 5)]
    want = [o.token_ids for o in make_llm(tiny_model, kv_cache_dtype=kv_dtype).generate(prompts, params)]
    llm = make_llm(tiny_model, EagerCapture(), kv_cache_dtype=kv_dtype, max_num_seqs=4)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.core.runner.graphs.num_replays > 0


def test_mixed_and_prefill_steps_run_eagerly(tiny_model):
    llm = make_llm(tiny_model, EagerCapture(), max_num_seqs=4, max_num_batched_tokens=8)
    prompts, _ = prompts_and_params(3, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    eager = make_llm(tiny_model, max_num_seqs=4, max_num_batched_tokens=8)
    assert [o.token_ids for o in llm.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
    graphs = llm.core.runner.graphs
    # 3 requests x 4 tokens: the first token of each comes from a prefill step
    assert 0 < graphs.num_replays < llm.core.stats().steps


def test_enforce_eager_captures_nothing(tiny_model):
    llm = make_llm(tiny_model, EagerCapture(), enforce_eager=True)
    assert llm.core.runner.graphs is None
    assert llm.core.blocks.num_blocks == llm.core.kv_cache.num_blocks  # no scratch block taken


class FailingCapture(EagerCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_failed_capture_falls_back_to_eager(tiny_model, caplog):
    prompts, _ = prompts_and_params(2, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="bitserve.engine.core"):
        llm = make_llm(tiny_model, FailingCapture())
    assert llm.core.runner.graphs is None
    assert "capturing them as CUDA graphs failed: RuntimeError: operation not permitted" in caplog.text
    assert llm.core.blocks.num_blocks == llm.core.kv_cache.num_blocks
    want = make_llm(tiny_model).generate(prompts, params)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in want]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_cuda_graph_decode_matches_eager_on_gpu(tmp_path, kv_dtype):
    """Real CUDA graphs (the default on CUDA) against --enforce-eager, float32 so that both agree
    to rounding; block size and head_dim 16+ so the Triton attention runs."""
    path = write_tiny_bitnet_model(tmp_path / "tiny", seed=11, hidden_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=256)
    prompts, params = prompts_and_params(11, seed=3)
    opts = dict(dtype="float32", block_size=16, kv_cache_dtype=kv_dtype, max_num_seqs=11, device="cuda",
                kv_cache_memory_mb=256)  # not 90% of the GPU per engine: two engines per test
    eager = LLM(str(path), enforce_eager=True, **opts)
    graphs = LLM(str(path), **opts)
    assert graphs.core.runner.graphs is not None and eager.core.runner.graphs is None
    want_ids, want_lp = generate(eager, prompts, params)
    got_ids, got_lp = generate(graphs, prompts, params)
    assert graphs.core.runner.graphs.num_replays > 0
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kv,size", [(kv, 4) for kv in KV_OPTIONS] + [("auto", 16)])
def test_captured_decode_forward_never_reads_the_device(tiny_model, monkeypatch, kv, size):
    """What a CUDA graph replays -- the decode forward over the static buffer, on the Triton path
    a GPU takes (kernels interpreted on a CPU-only host) -- reads no tensor value back to the host and builds no
    tensor from Python data, for every KV layout: either would fail the capture on a GPU (which
    the engine would survive, but then decode eagerly)."""
    pytest.importorskip("triton")
    from bitserve.kernels import dispatch

    monkeypatch.setenv("BITSERVE_KV_TRITON", "1")
    llm = make_llm(tiny_model, EagerCapture(), max_num_seqs=size, **KV_OPTIONS[kv])
    graphs = llm.core.runner.graphs
    with torch.inference_mode(), dispatch.use_triton(True):  # 4 rows: dp4a GEMVs; 16: tensor-core GEMMs
        graphs._forward(size)  # compile/warm outside the check
        with host_reads() as found:
            graphs._forward(size)
    assert not found, found
