"""Prometheus metrics: the one module that imports ``prometheus_client``.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (no global state) and can serve
it on its own HTTP port. Names, meanings and histogram buckets mirror vLLM's V1 set
(``vllm:<x>`` becomes ``bitserve_<x>``); the gRPC series follow grpc-prometheus
(``grpc_server_*``, prefixed ``bitserve_``). Every series carries ``model_name``.

Engine state, read from ``stats_fn()`` at scrape time (so the values are exact):

==========================================  =======  ==========================================
bitserve_num_requests_running               gauge    requests in the running batch
bitserve_num_requests_waiting               gauge    requests queued
bitserve_requests_awaiting_replica          gauge    requests waiting for a ready engine replica (Ray
                                                     replicas restarting; 0 with one local engine;
                                                     one series, never per replica)
bitserve_kv_cache_usage_perc                gauge    fraction of KV blocks in use (0..1)
bitserve_kv_cache_num_blocks                gauge    KV blocks in the pool
bitserve_kv_cache_free_blocks               gauge    KV blocks free
bitserve_kv_cache_capacity_tokens           gauge    tokens the KV pool holds
bitserve_prompt_tokens_total                counter  prompt tokens prefilled (engine cumulative)
bitserve_generation_tokens_total            counter  tokens generated (engine cumulative)
bitserve_num_preemptions_total              counter  preemptions
bitserve_prefix_cache_queries_total         counter  prefix-cache queries (as the engine counts)
bitserve_prefix_cache_hits_total            counter  prefix-cache hits
bitserve_engine_steps_total                 counter  engine steps
bitserve_cuda_graph_steps_total             counter  of those, steps replayed from CUDA graphs
bitserve_piecewise_graph_steps_total        counter  of those, mixed/prefill steps (piecewise graphs)
==========================================  =======  ==========================================

With ``replica_label_fn`` (a callable returning ``{replica_name: EngineStats}``) the series
above are emitted once per replica with an extra ``replica`` label, instead of once from
``stats_fn``. With ``replica_health_fn`` (``{replica_name: ReplicaHealth}``, Ray replicas;
:meth:`Metrics.for_replica` wires both for a ``ReplicaSet``) these are added, label ``replica``:

==========================================  =======  ==========================================
bitserve_replica_ready                      gauge    1 when the router may send to the replica
bitserve_replica_restarts_total             counter  times a replaced process of the replica came back ready
bitserve_replica_outstanding_requests       gauge    requests routed to it and not finished
bitserve_replica_outstanding_tokens         gauge    their prompt + remaining max_tokens
bitserve_replica_requests_total             counter  requests routed to it
bitserve_replica_failovers_total            counter  requests moved elsewhere: it failed before
                                                     their first token
==========================================  =======  ==========================================

Model (static): ``bitserve_model_info`` gauge = 1 with labels model_name, architecture,
format, kv_cache_dtype, max_context, vocab_size, num_layers, hidden_size; gauges
``bitserve_model_bits_per_weight``, ``bitserve_model_weight_bytes``,
``bitserve_kv_cache_bytes_per_token``.

Per finished choice of a client's request (:meth:`Metrics.observe_finished`; the server's start-up
warm-up is not observed here, but its few tokens are in the engine's token and step counters):

==========================================  =========  =====================================
bitserve_request_success_total              counter    label finished_reason (stop, eos,
                                                       length, abort, error)
bitserve_request_prompt_tokens              histogram  prompt tokens; 1-2-5 buckets to max_context
bitserve_request_generation_tokens          histogram  output tokens; same buckets
bitserve_time_to_first_token_seconds        histogram  first_token - arrival
bitserve_inter_token_latency_seconds        histogram  gaps between output tokens (see below)
bitserve_request_time_per_output_token_seconds  histogram  per request: decode / (n_out - 1)
bitserve_e2e_request_latency_seconds        histogram  finished (else last_token) - arrival
bitserve_request_queue_time_seconds         histogram  first_scheduled - arrival
bitserve_request_inference_time_seconds     histogram  last_token - first_scheduled
bitserve_request_prefill_time_seconds       histogram  first_token - first_scheduled
bitserve_request_decode_time_seconds        histogram  last_token - first_token
==========================================  =========  =====================================

Inter-token latency: vLLM observes every gap. A finished choice only carries its first and
last token times, so ``observe_finished`` observes the mean gap (last - first) / (n_out - 1)
n_out - 1 times (same count and sum as the exact gaps). Once :meth:`Metrics.observe_token_gaps`
has been called, exact gaps are the source and ``observe_finished`` stops synthesizing them.
Timing histograms whose timestamps are missing (e.g. aborted before scheduling) are skipped;
the request is still counted in ``request_success_total`` and the token histograms.

gRPC (:meth:`Metrics.observe_rpc_started`, :meth:`Metrics.observe_rpc`), labels grpc_service
and grpc_method split from ``/package.Service/Method`` (grpc_service is empty for a bare name):
``bitserve_grpc_server_started_total`` counter, ``bitserve_grpc_server_handled_total`` counter
(+ grpc_code), ``bitserve_grpc_server_handling_seconds`` histogram (Prometheus default buckets).
"""

from __future__ import annotations

import logging
import threading
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest,
                               make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from bitserve.engine.core import EngineStats
from bitserve.engine.output_processor import CompletionDelta
from bitserve.engine.request import FinishReason
from bitserve.frontend import ModelInfo
from bitserve.replica import Replica
from bitserve.replica_set import ReplicaHealth, ReplicaSet

logger = logging.getLogger(__name__)

# Like vLLM: no ``*_created`` series (a process-wide prometheus_client switch; this module is its only user).
disable_created_metrics()

# vLLM's bucket sets (vllm/v1/metrics: TOKEN_STEP_LATENCY, PREFILL_LATENCY, ACCUMULATED_PHASE_LATENCY).
TOKEN_STEP_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# The /metrics endpoint serves each connection on a thread: an idle connection is closed after this
# long, and connections past this many at once are closed unanswered (a scraper needs one or two).
METRICS_IDLE_TIMEOUT_S = 10.0
METRICS_MAX_CONNECTIONS = 32

# Prometheus' default buckets, which grpc-prometheus uses for handling time.
GRPC_HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including ``max_value`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while scale <= max_value:
        out.extend(m * scale for m in (1, 2, 5) if m * scale <= max_value)
        scale *= 10
    return out or [1]


def _split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``); a bare name has no service."""
    service, _, name = method.strip("/").rpartition("/")
    return service, name


class _WeightedHistogram:
    """A histogram that accepts one value observed ``count`` times in O(buckets)."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, acc = [], 0
        for bound, c in zip([*map(floatToGoString, self.bounds), "+Inf"], counts):
            acc += c
            buckets.append((bound, acc))
        return buckets, total


class Metrics:
    """All of a server's metrics in one registry; see the module docstring for the list."""

    def __init__(
        self,
        info: ModelInfo,
        stats_fn: Callable[[], EngineStats],
        *,
        registry: CollectorRegistry | None = None,
        replica_label_fn: Callable[[], Mapping[str, EngineStats]] | None = None,
        replica_health_fn: Callable[[], Mapping[str, ReplicaHealth]] | None = None,
        awaiting_replica_fn: Callable[[], int] | None = None,
    ):
        self.info = info
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._stats_fn = stats_fn
        self._replica_fn = replica_label_fn
        self._health_fn = replica_health_fn
        self._awaiting_fn = awaiting_replica_fn
        self._fine_itl = False
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        name = info.name
        reg = self.registry

        def hist(metric: str, doc: str, buckets) -> Histogram:
            return Histogram(metric, doc, ["model_name"], buckets=buckets, registry=reg).labels(name)

        success = Counter("bitserve_request_success", "Count of finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=reg)
        self._success = {r: success.labels(name, r.value) for r in FinishReason}
        token_buckets = build_1_2_5_buckets(info.max_context)
        self._prompt_tokens = hist("bitserve_request_prompt_tokens", "Number of prefill tokens processed.",
                                   token_buckets)
        self._gen_tokens = hist("bitserve_request_generation_tokens", "Number of generation tokens processed.",
                                token_buckets)
        self._ttft = hist("bitserve_time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                          TTFT_BUCKETS)
        self._tpot = hist("bitserve_request_time_per_output_token_seconds",
                          "Histogram of time_per_output_token_seconds per request.", TOKEN_STEP_LATENCY_BUCKETS)
        self._e2e = hist("bitserve_e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                         REQUEST_LATENCY_BUCKETS)
        self._queue = hist("bitserve_request_queue_time_seconds",
                           "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self._inference = hist("bitserve_request_inference_time_seconds",
                               "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self._prefill = hist("bitserve_request_prefill_time_seconds",
                             "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self._decode = hist("bitserve_request_decode_time_seconds",
                            "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self._itl = _WeightedHistogram(TOKEN_STEP_LATENCY_BUCKETS)

        rpc_labels = ["model_name", "grpc_service", "grpc_method"]
        self._rpc_started = Counter("bitserve_grpc_server_started", "Total number of RPCs started on the server.",
                                    rpc_labels, registry=reg)
        self._rpc_handled = Counter("bitserve_grpc_server_handled",
                                    "Total number of RPCs completed on the server, regardless of success or failure.",
                                    [*rpc_labels, "grpc_code"], registry=reg)
        self._rpc_seconds = Histogram("bitserve_grpc_server_handling_seconds",
                                      "Histogram of response latency (seconds) of gRPC handled by the server.",
                                      rpc_labels, buckets=GRPC_HANDLING_BUCKETS, registry=reg)
        reg.register(_ScrapeCollector(self))

    @classmethod
    def for_replica(cls, info: ModelInfo, replica: Replica, *, registry: CollectorRegistry | None = None) -> Metrics:
        """Metrics of a server over ``replica``; per-replica series when it is a ReplicaSet."""
        if isinstance(replica, ReplicaSet):
            return cls(info, replica.stats, registry=registry, replica_label_fn=replica.replica_stats,
                       replica_health_fn=replica.replica_health, awaiting_replica_fn=replica.num_awaiting_replica)
        return cls(info, replica.stats, registry=registry)

    # -- observations -------------------------------------------------------------------
    def observe_finished(self, final: CompletionDelta) -> None:
        """Record one finished choice (the ``Frontend(on_finish=...)`` hook)."""
        if final.finish_reason is None:
            return
        try:
            reason = FinishReason(final.finish_reason)
        except ValueError:  # never let an unknown reason break the caller's stream
            reason = FinishReason.ERROR
        self._success[reason].inc()
        n_out = final.num_output_tokens
        self._prompt_tokens.observe(final.num_prompt_tokens)
        self._gen_tokens.observe(n_out)
        t = final.timings
        if t is None:
            return
        end = t.finished if t.finished is not None else t.last_token
        if end is not None:
            self._e2e.observe(end - t.arrival)
        if t.first_scheduled is not None:
            self._queue.observe(t.first_scheduled - t.arrival)
            if t.first_token is not None:
                self._prefill.observe(t.first_token - t.first_scheduled)
            if t.last_token is not None:
                self._inference.observe(t.last_token - t.first_scheduled)
        if t.first_token is not None:
            self._ttft.observe(t.first_token - t.arrival)
            if t.last_token is not None:
                decode = t.last_token - t.first_token
                self._decode.observe(decode)
                if n_out > 1:
                    gap = decode / (n_out - 1)
                    self._tpot.observe(gap)
                    if not self._fine_itl:
                        self._itl.observe(gap, n_out - 1)

    def observe_token_gaps(self, gaps_s: list[float]) -> None:
        """Exact inter-token gaps; from the first call on, ``observe_finished`` stops estimating them."""
        self._fine_itl = True
        for gap in gaps_s:
            self._itl.observe(gap)

    def observe_rpc_started(self, method: str) -> None:
        self._rpc_started.labels(self.info.name, *_split_method(method)).inc()

    def observe_rpc(self, method: str, code, seconds: float) -> None:
        """One handled RPC; ``code`` is a status name such as ``"OK"`` (or anything with ``.name``)."""
        service, name = _split_method(method)
        code = getattr(code, "name", code)
        self._rpc_handled.labels(self.info.name, service, name, str(code)).inc()
        self._rpc_seconds.labels(self.info.name, service, name).observe(seconds)

    # -- exposition ---------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> int:
        """Serve this registry on ``host:port`` (0 = any free port) from a daemon thread; returns the port."""
        if self._httpd is not None:
            raise RuntimeError("metrics HTTP server already running")
        try:
            self._httpd = make_server(host, port, make_wsgi_app(self.registry), _ThreadingServer, _QuietHandler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bitserve-metrics", daemon=True)
        self._thread.start()
        return self._httpd.server_address[1]

    def close(self) -> None:
        """Stop the HTTP server (if any) and release its port."""
        httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most METRICS_MAX_CONNECTIONS of them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close it rather than start one more thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_IDLE_TIMEOUT_S  # a connection that sends nothing this long is closed

    def log_message(self, format, *args):  # noqa: A002 - base-class signature
        pass


class _ScrapeCollector:
    """Produces the engine and model series at scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []  # unchecked collector: names are only known at collect time

    def collect(self):
        info, name = self.m.info, self.m.info.name
        yield from self._engine(name, info)
        yield from self._replicas(name)
        g = GaugeMetricFamily("bitserve_model_info", "Static information about the served model.",
                              labels=["model_name", "architecture", "format", "kv_cache_dtype", "max_context",
                                      "vocab_size", "num_layers", "hidden_size"])
        g.add_metric([name, info.architecture, info.format, str(info.kv_cache_dtype), str(info.max_context),
                      str(info.vocab_size), str(info.num_layers), str(info.hidden_size)], 1)
        yield g
        for metric, doc, value in (
            ("bitserve_model_bits_per_weight", "Stored bits per weight of the quantized linear layers.",
             info.bits_per_weight),
            ("bitserve_model_weight_bytes", "Bytes of model weights.", info.weight_bytes),
            ("bitserve_kv_cache_bytes_per_token", "KV-cache bytes per token.", info.kv_bytes_per_token),
        ):
            fam = GaugeMetricFamily(metric, doc, labels=["model_name"])
            fam.add_metric([name], value)
            yield fam
        buckets, total = self.m._itl.snapshot()
        h = HistogramMetricFamily("bitserve_inter_token_latency_seconds",
                                  "Histogram of inter-token latency in seconds.", labels=["model_name"])
        h.add_metric([name], buckets, total)
        yield h

    def _replicas(self, name: str):
        if self.m._health_fn is None:
            return
        try:
            health = dict(self.m._health_fn())
        except Exception:  # a scrape must not fail because a replica is gone
            logger.exception("reading replica health for metrics failed")
            return
        specs = (
            (GaugeMetricFamily, "bitserve_replica_ready", "1 when the replica is ready to take requests.",
             lambda h: 1 if h.ready else 0),
            (CounterMetricFamily, "bitserve_replica_restarts", "Times a replaced process of the replica came back ready.",
             lambda h: h.restarts),
            (GaugeMetricFamily, "bitserve_replica_outstanding_requests", "Requests routed to the replica, unfinished.",
             lambda h: h.outstanding_requests),
            (GaugeMetricFamily, "bitserve_replica_outstanding_tokens",
             "Prompt tokens + remaining max_tokens of the replica's unfinished requests.",
             lambda h: h.outstanding_tokens),
            (CounterMetricFamily, "bitserve_replica_requests", "Requests routed to the replica.", lambda h: h.routed),
            (CounterMetricFamily, "bitserve_replica_failovers",
             "Requests moved to another replica because this one failed before their first token.",
             lambda h: h.failovers),
        )
        for cls, metric, doc, get in specs:
            fam = cls(metric, doc, labels=["model_name", "replica"])
            for replica, h in health.items():
                fam.add_metric([name, replica], get(h))
            yield fam

    def _engine(self, name: str, info: ModelInfo):
        try:
            if self.m._replica_fn is not None:
                per = [([name, r], s) for r, s in self.m._replica_fn().items()]
                labels = ["model_name", "replica"]
            else:
                per, labels = [([name], self.m._stats_fn())], ["model_name"]
        except Exception:  # a scrape must not fail because the engine is gone
            logger.exception("reading engine stats for metrics failed")
            return
        specs = (
            (GaugeMetricFamily, "bitserve_num_requests_running", "Number of requests in model execution batches.",
             lambda s: s.num_running),
            (GaugeMetricFamily, "bitserve_num_requests_waiting", "Number of requests waiting to be processed.",
             lambda s: s.num_waiting),
            (GaugeMetricFamily, "bitserve_kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             lambda s: s.kv_cache_usage),
            (GaugeMetricFamily, "bitserve_kv_cache_num_blocks", "KV-cache blocks in the pool.",
             lambda s: s.num_kv_blocks),
            (GaugeMetricFamily, "bitserve_kv_cache_free_blocks", "Free KV-cache blocks.",
             lambda s: s.num_free_kv_blocks),
            (GaugeMetricFamily, "bitserve_kv_cache_capacity_tokens", "Tokens the KV cache holds.",
             lambda s: s.kv_capacity_tokens or info.kv_capacity_tokens),
            (CounterMetricFamily, "bitserve_prompt_tokens", "Number of prefill tokens processed.",
             lambda s: s.prompt_tokens),
            (CounterMetricFamily, "bitserve_generation_tokens", "Number of generation tokens processed.",
             lambda s: s.generation_tokens),
            (CounterMetricFamily, "bitserve_num_preemptions", "Cumulative number of preemptions from the engine.",
             lambda s: s.num_preemptions),
            (CounterMetricFamily, "bitserve_prefix_cache_queries", "Prefix-cache queries.",
             lambda s: s.prefix_cache_queries),
            (CounterMetricFamily, "bitserve_prefix_cache_hits", "Prefix-cache hits.",
             lambda s: s.prefix_cache_hits),
            (CounterMetricFamily, "bitserve_engine_steps", "Engine steps run.", lambda s: s.steps),
            (CounterMetricFamily, "bitserve_cuda_graph_steps", "Engine steps replayed from a captured CUDA graph.",
             lambda s: s.cuda_graph_steps),
            (CounterMetricFamily, "bitserve_piecewise_graph_steps",
             "Mixed and prefill engine steps replayed from piecewise CUDA graphs.", lambda s: s.piecewise_graph_steps),
        )
        for cls, metric, doc, get in specs:
            fam = cls(metric, doc, labels=labels)
            for values, stats in per:
                fam.add_metric(values, get(stats))
            yield fam
        awaiting = GaugeMetricFamily("bitserve_requests_awaiting_replica",
                                     "Requests waiting for an engine replica to become ready (not yet in any "
                                     "replica's queue).", labels=["model_name"])
        awaiting.add_metric([name], self.m._awaiting_fn() if self.m._awaiting_fn is not None else 0)
        yield awaiting
