"""Engine replicas as Ray actors behind the gRPC front end.

One local Ray instance (num_cpus=2, loopback only, token auth) for the whole test run,
two CPU replicas of the bundled demo model. The tests share one server and run in file
order; the last one shuts everything down and checks that no Ray process is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import psutil
import pytest

from bitserve.app import build_app
from bitserve.config import EngineConfig, ModelLoadConfig, ReplicaConfig, ServerConfig
from bitserve.demo import DEMO_MODEL_PATH
from bitserve.metrics import Metrics
from bitserve.replica_ray_cluster import RaySession, replica_resources
from bitserve.replica_set import ReplicaSet, ReplicaStartError
from bitserve.rpc.server import RpcServer
from bitserve.sampling_params import SamplingParams
from bitserve.v1 import chat_pb2 as pb
from bitserve.v1 import chat_pb2_grpc

pytestmark = pytest.mark.timeout(180)

LOAD = ModelLoadConfig(model=str(DEMO_MODEL_PATH), dtype="float32", device="cpu")
# one running sequence per replica: a second request to a busy replica waits in its queue
ENGINE = EngineConfig(max_num_seqs=1)
RAY_PROCESS_NAMES = ("raylet", "gcs_server")


class RaySessionHolder:
    """The test run's Ray instance (started the way `bitserve serve --replicas N` starts one)."""

    def __init__(self):
        self.environ = dict(os.environ)
        self.session = RaySession.connect("local", num_cpus=2, object_store_memory=96 << 20)
        self.processes = [p for p in psutil.Process().children(recursive=True)]

    def close(self) -> list[psutil.Process]:
        """Shut Ray down; the processes it started that are still alive after 20 s."""
        self.session.close()
        _, alive = psutil.wait_procs(self.processes, timeout=20)
        os.environ.clear()
        os.environ.update(self.environ)  # the Ray settings RaySession put there
        return alive


@pytest.fixture(scope="session")
def ray_session():
    holder = RaySessionHolder()
    yield holder
    holder.close()


class RayServer:
    """The gRPC server of a 2-replica app on a loopback port; its event loop on a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        box = []
        self.app = build_app(LOAD, ENGINE, replica_cfg=ReplicaConfig(replicas=2),
                             on_finish=lambda final: box[0].observe_finished(final) if box else None)
        self.metrics = Metrics.for_replica(self.app.info, self.app.replica)
        box.append(self.metrics)
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=5.0)
        self.rpc = self.run(self._make(config))
        self.port = self.run(self.rpc.start())
        self.stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))

    async def _make(self, config):
        return RpcServer(self.app, config, self.metrics)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def replicas(self) -> ReplicaSet:
        return self.app.replica

    def routed(self) -> dict[str, int]:
        return {name: h.routed for name, h in self.replicas.replica_health().items()}

    def close(self) -> None:
        self.run(self.rpc.drain(grace=2.0))  # stops the server and shuts the app (actors) down
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server(ray_session):
    srv = RayServer()
    yield srv
    if not srv.rpc.draining:
        srv.close()


@pytest.fixture(scope="module")
def in_process():
    app = build_app(LOAD, ENGINE)
    yield app
    app.shutdown()


def complete(ids: list[int], max_tokens: int, request_id: str = "", **sampling) -> pb.CompletionRequest:
    return pb.CompletionRequest(token_ids=pb.TokenIds(ids=ids), request_id=request_id,
                                sampling=pb.SamplingOptions(max_tokens=max_tokens, **sampling))


def chat(text: str, **sampling) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=text)], sampling=pb.SamplingOptions(**sampling))


def reference(app, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    """Token ids of every choice from the in-process engine."""

    async def run():
        out = [[] for _ in range(params.n)]
        async for delta in app.frontend.generate(app.frontend.new_request_id(), prompt, params):
            out[delta.index] += delta.token_ids
        return out

    return asyncio.run(run())


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- tests --------------------------------------------------------------------------------------
def test_local_ray_is_loopback_only_with_token_auth(ray_session):
    import ray

    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    if "RAY_AUTH_MODE" not in ray_session.environ:  # token auth unless configured otherwise
        assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    cmdlines = [" ".join(p.cmdline()) for p in ray_session.processes if p.is_running()]
    assert any("raylet" in c for c in cmdlines)
    for c in cmdlines:  # Ray keeps a minimal head process for its internal APIs, without the web UI
        if "dashboard/dashboard.py" in c:
            assert "--minimal" in c and "--disable-frontend" in c, c


def test_twenty_requests_spread_and_equal_the_in_process_engine(server, in_process):
    questions = [f"What is {a}+{b}?" for a, b in zip(range(10, 30), range(40, 60))]
    samplings = [dict(temperature=0.0, max_tokens=24) if i % 2 == 0 else
                 dict(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=24, n=2 if i % 4 == 1 else 1)
                 for i in range(len(questions))]
    before = server.routed()
    results: dict[int, pb.ChatResponse] = {}

    def call(i):
        results[i] = server.stub.Chat(chat(questions[i], **samplings[i]), timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 20
    routed = {name: n - before[name] for name, n in server.routed().items()}
    assert sum(routed.values()) == 20 + 5  # five requests have n=2: one engine request per choice
    assert min(routed.values()) >= 5, routed  # both replicas served a fair share
    for i, response in results.items():
        prompt = in_process.frontend.chat_prompt([{"role": "user", "content": questions[i]}])
        params = SamplingParams(**samplings[i])
        assert [list(c.token_ids) for c in response.choices] == reference(in_process, prompt, params), i


def test_prefix_affinity_keeps_prefix_caching_working(server):
    shared = list(range(50, 82))  # two full blocks of 16 tokens
    before = server.routed()
    cached = []
    for i in range(4):
        response = server.stub.Complete(complete(shared + [200 + i, 201 + i], 4, temperature=0.0), timeout=30)
        cached.append(response.usage.cached_tokens)
    responses = [None] * 3

    def call(i):
        responses[i] = server.stub.Complete(complete(shared + [300 + i], 4, temperature=0.0), timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    routed = {name: n - before[name] for name, n in server.routed().items()}
    assert sorted(routed.values()) == [0, 7], routed  # all on one replica
    assert cached[0] == 0 and all(c == 32 for c in cached[1:]), cached
    assert all(r.usage.cached_tokens == 32 for r in responses)


def test_abort_through_the_front_end_frees_blocks_on_the_replica(server):
    request_id = "abort-me"
    stream = server.stub.CompleteStream(complete([7, 8, 9, 10], 200, request_id, temperature=0.0, ignore_eos=True),
                                        timeout=60)
    events = iter(stream)
    first = [next(events) for _ in range(3)]
    assert all(e.HasField("delta") for e in first)
    owner = server.replicas.owner(request_id)
    assert owner is not None
    assert server.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10).found
    rest = list(events)
    assert rest[-1].HasField("end") and rest[-1].end.finish_reason == pb.FINISH_REASON_ABORT
    assert sum(len(e.delta.token_ids) for e in first + rest if e.HasField("delta")) < 200

    def all_free():
        load = server.stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        stats = server.replicas.replica_stats()[owner]
        return (load.kv_blocks_free == load.kv_blocks_total and load.running == 0 and load.waiting == 0
                and stats.num_free_kv_blocks == stats.num_kv_blocks)

    wait_for(all_free, 10, "the aborted request's blocks to be freed")


def test_get_load_and_metrics_aggregate_across_replicas(server):
    load = server.stub.GetLoad(pb.GetLoadRequest(), timeout=5)
    per = server.replicas.replica_stats()
    assert load.replicas == 2 and set(per) == {"replica-0", "replica-1"}
    assert load.kv_blocks_total == sum(s.num_kv_blocks for s in per.values())
    assert load.kv_capacity_tokens == server.app.info.kv_capacity_tokens == sum(
        s.kv_capacity_tokens for s in per.values())
    text = server.metrics.render().decode()
    for name in per:
        assert f'bitserve_kv_cache_num_blocks{{model_name="bitserve-demo",replica="{name}"}}' in text
        assert f'bitserve_replica_ready{{model_name="bitserve-demo",replica="{name}"}} 1.0' in text
        assert f'bitserve_replica_restarts_total{{model_name="bitserve-demo",replica="{name}"}} 0.0' in text
    assert 'bitserve_request_success_total{finished_reason="abort",model_name="bitserve-demo"} 1.0' in text


def test_a_replica_that_cannot_start_is_a_clear_error(ray_session):
    bad = ModelLoadConfig(model=str(DEMO_MODEL_PATH), device="cpu", format="no-such-format")
    started = time.monotonic()
    with pytest.raises(ReplicaStartError, match="replica-0: .*no-such-format"):
        build_app(bad, ENGINE, replica_cfg=ReplicaConfig(replicas=1, ray_address="auto", cpus_per_replica=0))
    assert time.monotonic() - started < 60


def test_killed_replica(server, in_process):
    """Kill one replica's process while it streams one request and holds another in its queue:
    the streaming one ends UNAVAILABLE, the queued one finishes on the other replica, the
    killed replica restarts, rejoins and is counted; nothing hangs."""
    started = time.monotonic()
    prefix = list(range(20, 68))  # 3 blocks: the queued request follows the streaming one (affinity)
    streaming = server.stub.CompleteStream(complete(prefix + [1], 200, "victim", temperature=0.0, ignore_eos=True),
                                           timeout=60)
    victim = wait_for(lambda: server.replicas.owner("victim"), 10, "the streaming request to be routed", 0.001)
    queued_result = {}

    def queued():
        try:
            queued_result["response"] = server.stub.Complete(
                complete(prefix + [2], 16, "queued", temperature=0.0, ignore_eos=True), timeout=60)
        except grpc.RpcError as e:
            queued_result["error"] = e

    thread = threading.Thread(target=queued)
    thread.start()
    # routed behind 'victim', which runs first (max_num_seqs=1): 'queued' waits in that replica's queue
    assert wait_for(lambda: server.replicas.owner("queued"), 10, "the queued request to be routed", 0.001) == victim
    events = iter(streaming)
    assert next(events).delta.token_ids  # 'victim' has streamed tokens
    os.kill(server.replicas.members[victim].boot.pid, signal.SIGKILL)

    with pytest.raises(grpc.RpcError) as error:
        for _ in events:
            pass
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"replica '{victim}' was lost while streaming request 'victim'" in error.value.details()
    assert "retry the request" in error.value.details()

    thread.join(60)
    assert "error" not in queued_result, queued_result.get("error")
    response = queued_result["response"]
    assert list(response.choices[0].token_ids) == reference(
        in_process, prefix + [2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    health = server.replicas.replica_health()
    assert health[victim].failovers == 1
    assert time.monotonic() - started < 30, "fail-over took too long"

    wait_for(lambda: server.replicas.replica_health()[victim].ready, 90, "the killed replica to rejoin")
    assert server.replicas.replica_health()[victim].restarts == 1
    assert server.stub.GetLoad(pb.GetLoadRequest(), timeout=5).replicas == 2
    text = server.metrics.render().decode()
    assert f'bitserve_replica_restarts_total{{model_name="bitserve-demo",replica="{victim}"}} 1.0' in text
    # the restarted replica serves again
    before = server.routed()[victim]
    for i in range(4):
        server.stub.Complete(complete([5 + i] * 3, 4, temperature=0.0), timeout=30)
    assert server.routed()[victim] > before


def test_hung_replica_is_taken_out_and_comes_back(server):
    """A replica whose process stops answering (SIGSTOP) sends no heartbeat: after the stall timeout it
    is not ready (requests go to the other one); when it wakes up it rejoins without a restart."""
    name = "replica-0"
    member = server.replicas.members[name]
    wait_for(lambda: member.ready, 90, "replica-0 to be ready")
    restarts = member.restarts
    member.stall_timeout_s = 2.0
    time.sleep(1.5)  # the monitor's current wait (30 s) ends at the next heartbeat
    pid = member.boot.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not member.ready, 10, "the stopped replica to be taken out")
        assert server.stub.GetLoad(pb.GetLoadRequest(), timeout=5).replicas == 1
        response = server.stub.Complete(complete([7, 8, 9], 4, temperature=0.0, ignore_eos=True), timeout=20)
        assert len(response.choices[0].token_ids) == 4  # served by the other replica
    finally:
        os.kill(pid, signal.SIGCONT)
        member.stall_timeout_s = 30.0
    wait_for(lambda: member.ready, 30, "the replica to rejoin after SIGCONT")
    assert member.restarts == restarts and member.boot.pid == pid


def test_shutdown_leaves_no_ray_process_behind(server, ray_session):
    workers = [psutil.Process(m.boot.pid) for m in server.replicas.members.values()]
    server.close()
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"replica processes still running: {alive}"
    alive = ray_session.close()
    assert not alive, f"Ray processes still running: {alive}"
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.name() in RAY_PROCESS_NAMES]
    assert not leftovers


def test_replica_resources():
    cfg = ReplicaConfig(replicas=2)
    assert replica_resources(cfg, "cpu", 8, joining=True) == (1.0, 0.0)
    assert replica_resources(cfg, "auto", 0, joining=False) == (1.0, 0.0)  # a CPU-only machine
    assert replica_resources(cfg, "auto", 4, joining=False) == (1.0, 1.0)
    assert replica_resources(cfg, "auto", 0, joining=True) == (1.0, 1.0)  # GPU workers may join later
    assert replica_resources(ReplicaConfig(2, gpus_per_replica=0.5, cpus_per_replica=2), "cuda", 1, False) == (2, 0.5)
    with pytest.raises(ValueError, match="needs GPUs"):
        replica_resources(ReplicaConfig(2, gpus_per_replica=0), "cuda", 1, joining=False)
    with pytest.raises(ValueError, match="reserve GPUs no replica uses"):
        replica_resources(ReplicaConfig(2, gpus_per_replica=1), "cpu", 1, joining=False)


def test_serve_flags_make_a_replica_config():
    from bitserve.cli import _build_parser
    from bitserve.cli_args import dataclass_from_args

    args = _build_parser().parse_args(["serve", "--replicas", "4", "--ray-address", "auto", "--gpus-per-replica",
                                       "0.5", "--cpus-per-replica", "2"])
    assert dataclass_from_args(ReplicaConfig, args) == ReplicaConfig(4, "auto", 0.5, 2.0)
    default = dataclass_from_args(ReplicaConfig, _build_parser().parse_args(["serve"]))
    assert default == ReplicaConfig() and not default.uses_ray
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ReplicaConfig(replicas=0)
    with pytest.raises(ValueError, match="Ray Client"):
        ReplicaConfig(replicas=2, ray_address="ray://head:10001")
