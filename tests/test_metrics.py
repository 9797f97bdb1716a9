"""bitserve.metrics: exact engine counters, per-request histograms, gRPC series, HTTP exposition."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bitserve.engine.core import EngineStats
from bitserve.engine.output_processor import CompletionDelta
from bitserve.engine.request import FinishReason, Timings
from bitserve.frontend import ModelInfo
from bitserve.metrics import (
    REQUEST_LATENCY_BUCKETS,
    TOKEN_STEP_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    Metrics,
    build_1_2_5_buckets,
)

MODEL = "tiny-bitnet"


def make_info(name: str = MODEL) -> ModelInfo:
    return ModelInfo(
        name=name, architecture="LlamaForCausalLM", format="bitnet", bits_per_weight=1.58, max_context=2048,
        kv_cache_dtype="int8", vocab_size=32000, weight_bytes=123456, kv_bytes_per_token=96,
        kv_capacity_tokens=4096, num_layers=2, hidden_size=64, max_request_tokens=2048,
    )


def parse(text: bytes | str) -> tuple[dict, dict]:
    """(samples keyed by (sample name, sorted label items), family name -> type)."""
    if isinstance(text, bytes):
        text = text.decode()
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, key
            samples[key] = s.value
    return samples, types


def val(samples: dict, name: str, **labels) -> float:
    labels.setdefault("model_name", MODEL)
    return samples[(name, tuple(sorted(labels.items())))]


def bucket(samples: dict, name: str, le: str) -> float:
    return val(samples, name + "_bucket", le=le)


def delta(reason, n_prompt, n_out, timings, n_cached=0) -> CompletionDelta:
    return CompletionDelta("req", 0, "", [], finish_reason=reason, num_prompt_tokens=n_prompt,
                           num_cached_tokens=n_cached, num_output_tokens=n_out, timings=timings)


@pytest.fixture
def stats() -> EngineStats:
    return EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.375, num_kv_blocks=256, num_free_kv_blocks=160,
                       kv_bytes_per_token=96, kv_capacity_tokens=4096, prefix_cache_queries=40, prefix_cache_hits=16,
                       num_preemptions=1, prompt_tokens=70, generation_tokens=21, steps=12, cuda_graph_steps=9,
                       piecewise_graph_steps=4)


@pytest.fixture
def metrics(stats):
    m = Metrics(make_info(), lambda: stats)
    yield m
    m.close()


def test_bucket_lists_mirror_vllm():
    assert build_1_2_5_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert TOKEN_STEP_LATENCY_BUCKETS[0] == 0.01 and TOKEN_STEP_LATENCY_BUCKETS[-1] == 80.0
    assert len(TOKEN_STEP_LATENCY_BUCKETS) == 19
    assert REQUEST_LATENCY_BUCKETS[:3] == (0.1, 0.2, 0.3) and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    assert len(REQUEST_LATENCY_BUCKETS) == 23


def test_engine_series_are_exact_and_read_at_scrape_time(metrics, stats):
    samples, types = parse(metrics.render())
    expected = {
        "bitserve_num_requests_running": ("gauge", 3), "bitserve_num_requests_waiting": ("gauge", 2),
        "bitserve_kv_cache_usage_perc": ("gauge", 0.375), "bitserve_kv_cache_num_blocks": ("gauge", 256),
        "bitserve_kv_cache_free_blocks": ("gauge", 160), "bitserve_kv_cache_capacity_tokens": ("gauge", 4096),
    }
    for name, (kind, value) in expected.items():
        assert types[name] == kind
        assert val(samples, name) == value, name
    counters = {"bitserve_prompt_tokens": 70, "bitserve_generation_tokens": 21, "bitserve_num_preemptions": 1,
                "bitserve_prefix_cache_queries": 40, "bitserve_prefix_cache_hits": 16, "bitserve_engine_steps": 12,
                "bitserve_cuda_graph_steps": 9, "bitserve_piecewise_graph_steps": 4}
    for name, value in counters.items():
        assert types[name] == "counter"
        assert val(samples, name + "_total") == value, name

    stats.prompt_tokens += 30
    stats.generation_tokens += 9
    stats.num_running = 0
    stats.kv_cache_usage = 0.0
    samples, _ = parse(metrics.render())
    assert val(samples, "bitserve_prompt_tokens_total") == 100
    assert val(samples, "bitserve_generation_tokens_total") == 30
    assert val(samples, "bitserve_num_requests_running") == 0
    assert val(samples, "bitserve_kv_cache_usage_perc") == 0.0


def test_model_info(metrics):
    samples, types = parse(metrics.render())
    assert types["bitserve_model_info"] == "gauge"
    assert val(samples, "bitserve_model_info", architecture="LlamaForCausalLM", format="bitnet",
               kv_cache_dtype="int8", max_context="2048", vocab_size="32000", num_layers="2", hidden_size="64") == 1
    assert val(samples, "bitserve_model_bits_per_weight") == pytest.approx(1.58)
    assert val(samples, "bitserve_model_weight_bytes") == 123456
    assert val(samples, "bitserve_kv_cache_bytes_per_token") == 96


def test_finished_requests_fill_counters_and_histograms(metrics):
    # (reason, prompt, out, arrival, scheduled, first_token, last_token, finished)
    reqs = [
        (FinishReason.EOS, 7, 5, 100.0, 100.25, 100.5, 101.5, 101.75),
        (FinishReason.LENGTH, 30, 16, 200.0, 200.0, 200.125, 203.875, 204.0),
        (FinishReason.LENGTH, 3, 1, 300.0, 302.0, 302.5, 302.5, 302.5),
        (FinishReason.STOP, 12, 2, 400.0, 400.5, 401.0, 451.0, 451.0),
    ]
    for reason, p, n, a, s, ft, lt, f in reqs:
        metrics.observe_finished(delta(reason, p, n, Timings(a, s, ft, lt, f)))
    # a streaming (unfinished) delta is ignored
    metrics.observe_finished(delta(None, 99, 99, Timings(0.0, 1.0, 2.0, 3.0, 4.0)))
    samples, types = parse(metrics.render())

    success = {r.value: val(samples, "bitserve_request_success_total", finished_reason=r.value) for r in FinishReason}
    assert success == {"stop": 1, "eos": 1, "length": 2, "abort": 0, "error": 0}
    assert types["bitserve_request_success"] == "counter"

    def check(name, values):
        assert types[name] == "histogram"
        assert val(samples, name + "_count") == len(values), name
        assert val(samples, name + "_sum") == pytest.approx(sum(values)), name

    check("bitserve_request_prompt_tokens", [7, 30, 3, 12])
    check("bitserve_request_generation_tokens", [5, 16, 1, 2])
    check("bitserve_e2e_request_latency_seconds", [1.75, 4.0, 2.5, 51.0])
    check("bitserve_request_queue_time_seconds", [0.25, 0.0, 2.0, 0.5])
    check("bitserve_request_prefill_time_seconds", [0.25, 0.125, 0.5, 0.5])
    check("bitserve_request_decode_time_seconds", [1.0, 3.75, 0.0, 50.0])
    check("bitserve_request_inference_time_seconds", [1.25, 3.875, 0.5, 50.5])
    check("bitserve_time_to_first_token_seconds", [0.5, 0.125, 2.5, 1.0])
    check("bitserve_request_time_per_output_token_seconds", [0.25, 0.25, 50.0])  # n_out == 1 has no gap
    # mean gap observed n_out - 1 times: 4 x 0.25, 15 x 0.25, 1 x 50
    check("bitserve_inter_token_latency_seconds", [0.25] * 19 + [50.0])

    # bucket placement (cumulative, le is inclusive)
    e2e = "bitserve_e2e_request_latency_seconds"
    assert bucket(samples, e2e, "1.5") == 0 and bucket(samples, e2e, "2.0") == 1
    assert bucket(samples, e2e, "2.5") == 2 and bucket(samples, e2e, "5.0") == 3
    assert bucket(samples, e2e, "50.0") == 3 and bucket(samples, e2e, "60.0") == 4
    assert bucket(samples, e2e, "+Inf") == 4
    ttft = "bitserve_time_to_first_token_seconds"
    assert bucket(samples, ttft, "0.1") == 0 and bucket(samples, ttft, "0.25") == 1
    assert bucket(samples, ttft, "0.5") == 2 and bucket(samples, ttft, "1.0") == 3
    assert bucket(samples, ttft, "2.5") == 4
    itl = "bitserve_inter_token_latency_seconds"
    assert bucket(samples, itl, "0.2") == 0 and bucket(samples, itl, "0.3") == 19
    assert bucket(samples, itl, "40.0") == 19 and bucket(samples, itl, "80.0") == 20
    gen = "bitserve_request_generation_tokens"
    assert bucket(samples, gen, "1.0") == 1 and bucket(samples, gen, "2.0") == 2
    assert bucket(samples, gen, "5.0") == 3 and bucket(samples, gen, "10.0") == 3 and bucket(samples, gen, "20.0") == 4
    assert bucket(samples, gen, "2000.0") == 4
    assert (("bitserve_request_generation_tokens_bucket", (("le", "5000.0"), ("model_name", MODEL)))
            not in samples)  # 1-2-5 buckets stop at max_context


def test_missing_timings_count_the_request_but_skip_timing_histograms(metrics):
    metrics.observe_finished(delta(FinishReason.ABORT, 4, 0, None))
    # aborted while waiting: never scheduled, but it did finish
    metrics.observe_finished(delta(FinishReason.ABORT, 6, 0, Timings(10.0, None, None, None, 13.0)))
    # engine error after scheduling, before any token
    metrics.observe_finished(delta("error", 2, 0, Timings(20.0, 20.5, None, None, None)))
    samples, _ = parse(metrics.render())
    assert val(samples, "bitserve_request_success_total", finished_reason="abort") == 2
    assert val(samples, "bitserve_request_success_total", finished_reason="error") == 1
    assert val(samples, "bitserve_request_prompt_tokens_count") == 3
    assert val(samples, "bitserve_request_prompt_tokens_sum") == 12
    assert val(samples, "bitserve_request_generation_tokens_count") == 3
    assert val(samples, "bitserve_e2e_request_latency_seconds_count") == 1
    assert val(samples, "bitserve_e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    assert val(samples, "bitserve_request_queue_time_seconds_count") == 1
    assert val(samples, "bitserve_request_queue_time_seconds_sum") == pytest.approx(0.5)
    for name in ("time_to_first_token_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "inter_token_latency_seconds",
                 "request_time_per_output_token_seconds"):
        assert val(samples, f"bitserve_{name}_count") == 0, name


def test_exact_token_gaps_replace_the_estimate(metrics):
    metrics.observe_token_gaps([0.02, 0.03, 0.5])
    metrics.observe_finished(delta(FinishReason.EOS, 3, 4, Timings(0.0, 0.0, 1.0, 4.0, 4.0)))
    samples, _ = parse(metrics.render())
    itl = "bitserve_inter_token_latency_seconds"
    assert val(samples, itl + "_count") == 3
    assert val(samples, itl + "_sum") == pytest.approx(0.55)
    assert bucket(samples, itl, "0.01") == 0 and bucket(samples, itl, "0.025") == 1
    assert bucket(samples, itl, "0.05") == 2 and bucket(samples, itl, "0.5") == 3
    # the per-request mean is still recorded
    assert val(samples, "bitserve_request_time_per_output_token_seconds_sum") == pytest.approx(1.0)


class _Code:  # stands in for grpc.StatusCode (this test must not import grpc)
    name = "RESOURCE_EXHAUSTED"


def test_grpc_series(metrics):
    method = "/bitserve.v1.ChatService/Chat"
    for _ in range(3):
        metrics.observe_rpc_started(method)
    metrics.observe_rpc(method, "OK", 0.02)
    metrics.observe_rpc(method, "OK", 0.3)
    metrics.observe_rpc(method, _Code(), 12.0)
    metrics.observe_rpc("Health", "UNAVAILABLE", 0.001)
    samples, types = parse(metrics.render())
    chat = dict(grpc_service="bitserve.v1.ChatService", grpc_method="Chat")
    assert types["bitserve_grpc_server_started"] == "counter"
    assert val(samples, "bitserve_grpc_server_started_total", **chat) == 3
    assert val(samples, "bitserve_grpc_server_handled_total", grpc_code="OK", **chat) == 2
    assert val(samples, "bitserve_grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **chat) == 1
    assert val(samples, "bitserve_grpc_server_handled_total", grpc_code="UNAVAILABLE",
               grpc_service="", grpc_method="Health") == 1
    h = "bitserve_grpc_server_handling_seconds"
    assert types[h] == "histogram"
    assert val(samples, h + "_count", **chat) == 3
    assert val(samples, h + "_sum", **chat) == pytest.approx(12.32)
    assert val(samples, h + "_bucket", le="0.025", **chat) == 1
    assert val(samples, h + "_bucket", le="0.5", **chat) == 2
    assert val(samples, h + "_bucket", le="10.0", **chat) == 2
    assert val(samples, h + "_bucket", le="+Inf", **chat) == 3


def test_serve_http_and_close(metrics, stats):
    port = metrics.serve_http("127.0.0.1", 0)
    assert port > 0
    metrics.observe_finished(delta(FinishReason.STOP, 5, 3, Timings(0.0, 0.1, 0.2, 0.4, 0.4)))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        samples, _ = parse(resp.read())
    assert val(samples, "bitserve_prompt_tokens_total") == stats.prompt_tokens
    assert val(samples, "bitserve_request_success_total", finished_reason="stop") == 1
    assert val(samples, "bitserve_time_to_first_token_seconds_count") == 1
    with pytest.raises(RuntimeError):
        metrics.serve_http("127.0.0.1", 0)
    thread = metrics._thread
    metrics.close()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # idempotent


def test_idle_connections_are_bounded_and_time_out(metrics, stats, monkeypatch):
    """Idle connections neither pile up threads nor keep the endpoint from scrapers for long."""
    import socket
    import threading
    import time

    import bitserve.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "METRICS_MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 0.5)
    port = metrics.serve_http("127.0.0.1", 0)
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    try:
        time.sleep(0.2)
        assert threading.active_count() - threads_before <= 4  # one thread per admitted connection
        closed = 0
        for sock in idle[4:]:  # the ones past the limit were closed unanswered
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == 8
        time.sleep(0.8)  # past the idle timeout: the four admitted ones were closed too
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            samples, _ = parse(resp.read())
        assert val(samples, "bitserve_prompt_tokens_total") == stats.prompt_tokens
        assert threading.active_count() - threads_before <= 1
    finally:
        for sock in idle:
            sock.close()
        metrics.close()


def test_instances_do_not_share_state(stats):
    a = Metrics(make_info("a"), lambda: stats)
    b = Metrics(make_info("b"), lambda: EngineStats(prompt_tokens=1))
    assert a.registry is not b.registry
    a.observe_finished(delta(FinishReason.EOS, 5, 2, Timings(0.0, 0.0, 0.1, 0.2, 0.2)))
    a.observe_token_gaps([0.1])
    sa, _ = parse(a.render())
    sb, _ = parse(b.render())
    assert val(sa, "bitserve_request_success_total", model_name="a", finished_reason="eos") == 1
    assert val(sb, "bitserve_request_success_total", model_name="b", finished_reason="eos") == 0
    assert val(sb, "bitserve_inter_token_latency_seconds_count", model_name="b") == 0
    assert val(sa, "bitserve_prompt_tokens_total", model_name="a") == 70
    assert val(sb, "bitserve_prompt_tokens_total", model_name="b") == 1
    assert all(dict(labels)["model_name"] == "b" for _, labels in sb)

    reg = CollectorRegistry()
    c = Metrics(make_info("c"), lambda: stats, registry=reg)
    assert c.registry is reg
    assert reg.get_sample_value("bitserve_prompt_tokens_total", {"model_name": "c"}) == 70


def test_replica_labels_and_failing_stats():
    per = {"local-0": EngineStats(prompt_tokens=5, num_running=1), "local-1": EngineStats(prompt_tokens=7)}

    def broken():
        raise RuntimeError("engine gone")

    m = Metrics(make_info(), broken, replica_label_fn=lambda: per)
    samples, _ = parse(m.render())
    assert val(samples, "bitserve_prompt_tokens_total", replica="local-0") == 5
    assert val(samples, "bitserve_prompt_tokens_total", replica="local-1") == 7
    assert val(samples, "bitserve_num_requests_running", replica="local-0") == 1

    m = Metrics(make_info(), broken)
    m.observe_finished(delta(FinishReason.EOS, 1, 1, None))
    samples, types = parse(m.render())  # the scrape survives; engine series are absent
    assert "bitserve_prompt_tokens" not in types
    assert val(samples, "bitserve_request_success_total", finished_reason="eos") == 1
    assert val(samples, "bitserve_model_info", architecture="LlamaForCausalLM", format="bitnet",
               kv_cache_dtype="int8", max_context="2048", vocab_size="32000", num_layers="2", hidden_size="64") == 1
