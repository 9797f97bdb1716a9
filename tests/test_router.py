"""Routing policy and the replica set's fail-over, without Ray (fake members)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bitserve.engine.async_engine import EngineDeadError
from bitserve.engine.core import EngineRequest, EngineStats, TokenDelta
from bitserve.engine.request import FinishReason
from bitserve.engine.limits import EngineLimits
from bitserve.frontend import ModelInfo
from bitserve.metrics import Metrics
from bitserve.replica_set import NoReadyReplicaError, ReplicaLostError, ReplicaSet, sum_stats
from bitserve.router import Router, RouterPolicy
from bitserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, prompt: list[int], max_tokens: int = 8, salt: str | None = None) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), cache_salt=salt)


# -- Router -----------------------------------------------------------------------------------
def test_least_outstanding_tokens_not_requests():
    r = Router(BS)
    r.start(req("big", list(range(40)), max_tokens=60), "a")  # 100 tokens, one request
    r.start(req("s1", [1, 2], max_tokens=3), "b")  # 2 small requests, 10 tokens
    r.start(req("s2", [3, 4], max_tokens=3), "b")
    assert r.load("a").tokens == 100 and r.load("b").requests == 2
    assert r.choose(req("x", [9]), ["a", "b"]) == "b"


def test_progress_and_finish_release_work():
    r = Router(BS)
    r.start(req("q", list(range(10)), max_tokens=5), "a")
    assert r.load("a").tokens == 15
    r.progress("q", 1)  # first token: the prompt is done
    assert r.load("a").tokens == 4
    r.progress("q", 10)  # never below zero
    assert r.load("a").tokens == 0
    r.finish("q")
    r.finish("q")  # idempotent
    assert r.load("a") == r.load("nobody") and r.load("a").requests == 0


def test_ties_rotate():
    r = Router(BS)
    picks = [r.choose(req(f"r{i}", [i]), ["a", "b", "c"]) for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_prefix_affinity_follows_the_deepest_block():
    r = Router(BS)
    shared = list(range(100, 108))  # two full blocks
    first = r.choose(req("p0", shared + [1]), ["a", "b"])
    r.start(req("p0", shared + [1]), first)
    # another request with the same leading blocks goes to the same replica although it is busier
    assert r.choose(req("p1", shared + [2, 3]), ["a", "b"]) == first
    # a different first block -> least loaded
    assert r.choose(req("p2", list(range(200, 208))), ["a", "b"]) != first
    # the same tokens under another tenant's salt share nothing
    other = r.choose(req("p3", shared + [1], salt="tenant-b"), ["a", "b"])
    assert other != first


def test_affinity_yields_to_overload():
    r = Router(BS, RouterPolicy(affinity_slack_tokens=10))
    shared = list(range(100, 104))  # one block: 4 cached tokens of slack on top of 10
    assert r.choose(req("p0", shared), ["a", "b"]) == "a"
    r.start(req("p0", shared, max_tokens=10), "a")  # a: 14 tokens outstanding, b: 0
    assert r.choose(req("p1", shared + [1]), ["a", "b"]) == "a"  # 14 <= 10 + 4
    r.start(req("p1", shared + [1], max_tokens=10), "a")  # a: 29
    assert r.choose(req("p2", shared + [2]), ["a", "b"]) == "b"  # overloaded: spill
    assert r.choose(req("p3", shared + [3]), ["a", "b"]) == "b"  # ... and the prefix now lives on b


def test_long_shared_prefix_buys_more_slack():
    doc = list(range(64))  # 16 full blocks: 64 cached tokens on top of the base slack
    for slack, expected in ((1, "b"), (2, "a")):
        r = Router(BS, RouterPolicy(affinity_slack_tokens=slack))
        assert r.choose(req("d0", doc + [1]), ["a", "b"]) == "a"
        r.start(req("d0", doc + [1], max_tokens=1), "a")  # 66 tokens outstanding on a, none on b
        assert r.choose(req("d1", doc + [2]), ["a", "b"]) == expected  # stays while 66 <= 64 + slack


def test_not_ready_replicas_are_never_chosen_and_forget_drops_affinity():
    r = Router(BS)
    shared = list(range(8))
    assert r.choose(req("p0", shared), ["a", "b"]) == "a"
    assert r.choose(req("p1", shared), ["b"]) == "b"  # a not ready: affinity ignored
    assert r.affine(r.prefix_hashes(req("p", shared)), ["a", "b"])[0] == "b"
    r.forget("b")
    assert r.affine(r.prefix_hashes(req("p", shared)), ["a", "b"]) == (None, 0)
    with pytest.raises(ValueError, match="no ready replica"):
        r.choose(req("p2", shared), [])


def test_affinity_table_is_bounded():
    r = Router(BS, RouterPolicy(affinity_entries=3, affinity_depth_blocks=2))
    for i in range(10):
        r.choose(req(f"p{i}", [i] * 8), ["a"])
    assert len(r._affinity) == 3


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="max_attempts"):
        RouterPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="ready_wait_s"):
        RouterPolicy(ready_wait_s=-1)


# -- ReplicaSet with fake members ------------------------------------------------------------
class FakeMember:
    """Streams ``tokens`` one per ``delay``; ``die_after`` tokens -> ReplicaLostError."""

    def __init__(self, name: str, tokens: int = 4, delay: float = 0.0, die_after: int | None = None):
        self.name = name
        self.tokens, self.delay, self.die_after = tokens, delay, die_after
        self._ready, self._inc, self._callbacks = True, f"{name}-1", []
        self.requests: list[str] = []
        self.aborted: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    ready = property(lambda self: self._ready)
    incarnation = property(lambda self: self._inc)
    restarts = property(lambda self: 0)

    def subscribe(self, callback):
        self._callbacks.append(callback)

    def set_ready(self, ready: bool, restarted: bool = False):
        self._ready = ready
        if restarted:
            self._inc += "'"
        for c in self._callbacks:
            c()

    async def generate(self, request):
        self.requests.append(request.request_id)
        await self.gate.wait()
        for i in range(self.tokens):
            if self.die_after is not None and i >= self.die_after:
                self._ready = False
                raise ReplicaLostError(f"{self.name} died")
            if request.request_id in self.aborted:
                yield TokenDelta(request.request_id, [], finish_reason=FinishReason.ABORT)
                return
            await asyncio.sleep(self.delay)
            last = i == self.tokens - 1
            yield TokenDelta(request.request_id, [i], finish_reason=FinishReason.LENGTH if last else None)

    def abort(self, request_id, reason=FinishReason.ABORT, stop_reason=None):
        self.aborted.append(request_id)

    def stats(self):
        return EngineStats(num_running=1, num_kv_blocks=10, num_free_kv_blocks=5, kv_bytes_per_token=8,
                           kv_capacity_tokens=40, prompt_tokens=3)

    def shutdown(self):
        self._ready = False


LIMITS = EngineLimits(vocab_size=100, max_model_len=64, block_size=BS, num_kv_blocks=16)
INFO = ModelInfo(name="m", architecture="LlamaForCausalLM", format="bitnet", bits_per_weight=1.58, max_context=64,
                 kv_cache_dtype="auto", vocab_size=100, weight_bytes=1, kv_bytes_per_token=8, kv_capacity_tokens=40,
                 num_layers=1, hidden_size=8, max_request_tokens=40)


async def collect(replicas, request):
    return [d async for d in replicas.generate(request)]


def test_unstarted_request_moves_to_another_replica():
    dead, good = FakeMember("a", die_after=0), FakeMember("b")
    rs = ReplicaSet([dead, good], LIMITS)
    deltas = asyncio.run(collect(rs, req("r", [1, 2, 3])))
    assert dead.requests == ["r"] and good.requests == ["r"]
    assert [t for d in deltas for t in d.token_ids] == [0, 1, 2, 3] and deltas[-1].finished
    health = rs.replica_health()
    assert health["a"].failovers == 1 and health["b"].routed == 1 and health["b"].outstanding_tokens == 0


def test_request_with_streamed_tokens_fails_unavailable():
    rs = ReplicaSet([FakeMember("a", die_after=2)], LIMITS)

    async def run():
        got = []
        with pytest.raises(ReplicaLostError, match="replica 'a' was lost while streaming request 'r'.*retry") as e:
            async for d in rs.generate(req("r", [1, 2])):
                got.append(d)
        return got, e.value

    got, error = asyncio.run(run())
    assert len(got) == 2 and isinstance(error, EngineDeadError)  # -> gRPC UNAVAILABLE


def test_gives_up_after_max_attempts():
    members = [FakeMember(n, die_after=0) for n in "abc"]
    rs = ReplicaSet(members, LIMITS, RouterPolicy(max_attempts=2, ready_wait_s=0.1))
    with pytest.raises(ReplicaLostError, match="could not be started: replica.s. ., . failed"):
        asyncio.run(collect(rs, req("r", [1])))
    assert sum(len(m.requests) for m in members) == 2


def test_waits_for_a_ready_replica_and_is_bounded():
    m = FakeMember("a")
    m.set_ready(False)
    rs = ReplicaSet([m], LIMITS, RouterPolicy(ready_wait_s=0.2))
    with pytest.raises(NoReadyReplicaError, match="no engine replica became ready within 0.2s"):
        asyncio.run(collect(rs, req("r", [1])))
    assert m.requests == []  # never sent to a replica that is not ready

    async def becomes_ready():
        task = asyncio.create_task(collect(rs, req("r2", [1])))
        await asyncio.sleep(0.05)
        # while it waits it is queued work: GetLoad's waiting and the metrics count it
        assert rs.num_awaiting_replica() == 1 and rs.stats().num_waiting == 1
        text = Metrics.for_replica(INFO, rs).render().decode()
        assert 'bitserve_requests_awaiting_replica{model_name="m"} 1.0' in text
        threading.Thread(target=m.set_ready, args=(True,)).start()  # readiness changes on another thread
        return await task

    rs.policy = RouterPolicy(ready_wait_s=5)
    assert asyncio.run(becomes_ready())[-1].finished and m.requests == ["r2"]
    assert rs.num_awaiting_replica() == 0 and rs.stats().num_waiting == 0


def test_abort_reaches_the_owner_or_ends_a_waiting_request():
    busy = FakeMember("a", tokens=50, delay=0.01)
    rs = ReplicaSet([busy], LIMITS)

    async def run():
        task = asyncio.create_task(collect(rs, req("r", [1])))
        await asyncio.sleep(0.05)
        assert rs.owner("r") == "a"
        rs.abort("r")
        return await task

    deltas = asyncio.run(run())
    assert busy.aborted == ["r"] and deltas[-1].finish_reason == FinishReason.ABORT
    assert rs.owner("r") is None

    busy.set_ready(False)

    async def abort_while_waiting():
        task = asyncio.create_task(collect(rs, req("w", [1, 2])))
        await asyncio.sleep(0.05)
        rs.abort("w", FinishReason.STOP, "x")
        return await task

    (final,) = asyncio.run(abort_while_waiting())
    assert final.finish_reason == FinishReason.STOP and final.stop_reason == "x" and final.num_prompt_tokens == 2
    assert "w" not in busy.requests


def test_restarted_replica_is_eligible_again_and_stats_sum():
    a, b = FakeMember("a", die_after=0), FakeMember("b")
    b.set_ready(False)
    rs = ReplicaSet([a, b], LIMITS, RouterPolicy(ready_wait_s=5))

    async def run():
        task = asyncio.create_task(collect(rs, req("r", [1])))
        await asyncio.sleep(0.05)  # a failed; b not ready; a comes back as a new incarnation
        a.die_after = None
        a.set_ready(True, restarted=True)
        return await task

    assert asyncio.run(run())[-1].finished and a.requests == ["r", "r"]
    b.set_ready(True)
    total = rs.stats()
    assert (total.num_running, total.num_kv_blocks, total.num_free_kv_blocks) == (2, 20, 10)
    assert total.kv_capacity_tokens == 80
    assert total.kv_cache_usage == 0.5 and total.kv_bytes_per_token == 8 and rs.num_ready == 2
    assert sum_stats([]) == EngineStats()


def test_validation_uses_the_limits():
    rs = ReplicaSet([FakeMember("a")], LIMITS)
    with pytest.raises(ValueError, match="out of range"):
        rs.validate(req("r", [500]))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        rs.validate(req("r", [1] * 60, max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        async def twice():
            first = rs.generate(req("dup", [1]))
            await first.__anext__()
            await collect(rs, req("dup", [1]))
        asyncio.run(twice())


def test_an_aborted_request_is_not_retried_when_its_replica_is_lost():
    a, b = FakeMember("a", die_after=0), FakeMember("b")
    a.gate.clear()  # 'a' holds the request, then dies before its first token
    rs = ReplicaSet([a, b], LIMITS)

    async def run():
        task = asyncio.create_task(collect(rs, req("r", [1, 2])))
        await asyncio.sleep(0.02)
        assert rs.owner("r") == "a"
        rs.abort("r")
        a.gate.set()
        return await task

    (final,) = asyncio.run(run())
    assert final.finish_reason == FinishReason.ABORT and b.requests == [] and a.aborted == ["r"]
    assert rs._aborted == {}
