"""The gRPC API end to end over loopback (in-process server on port 0)."""

import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from bitserve.v1 import chat_pb2 as pb
from grpc_harness import ServerThread, chat_request
from tiny_checkpoints import write_tiny_bitnet_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_bitnet_model(tmp_path_factory.mktemp("grpc") / "tiny", seed=3)


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerThread(tiny_model, engine={"max_num_seqs": 64, "max_queue": 256}, metrics=True)
    yield srv
    srv.close()


def wait_all_blocks_free(stub, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = stub.GetLoad(pb.GetLoadRequest())
        if load.kv_blocks_free == load.kv_blocks_total and load.running == 0 and load.waiting == 0:
            return load
        time.sleep(0.02)
    raise AssertionError(f"blocks still held: {load}")


def test_reflection_only_client_streams(server):
    """A client that knows nothing but reflection finds the service and streams a completion."""
    channel = server.channel()
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "bitserve.v1.ChatService" in services
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("bitserve.v1.ChatService")
    method = service.methods_by_name["ChatStream"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = request_cls()
    msg = request.messages.add()
    msg.role, msg.content = "user", "hello"
    request.sampling.max_tokens = 5
    request.sampling.temperature = 0.0
    call = channel.unary_stream("/bitserve.v1.ChatService/ChatStream",
                                request_serializer=request_cls.SerializeToString,
                                response_deserializer=response_cls.FromString)
    events = list(call(request, timeout=30))
    assert events and events[-1].WhichOneof("event") == "end"
    assert events[-1].end.usage.completion_tokens == 5
    assert sum(len(e.delta.token_ids) for e in events if e.WhichOneof("event") == "delta") == 5


def test_unary_equals_stream_and_model_info(server):
    stub = server.stub()
    request = chat_request("abc", temperature=0.0, max_tokens=8, ignore_eos=True)
    response = stub.Chat(request, timeout=30)
    events = list(stub.ChatStream(request, timeout=30))
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    ids = [t for e in events if e.HasField("delta") for t in e.delta.token_ids]
    assert response.choices[0].text == text and list(response.choices[0].token_ids) == ids
    assert response.choices[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 0
    assert response.usage == response.choices[0].usage  # one choice: the request's usage is its usage
    assert 0 < response.usage.ttft_s <= response.usage.e2e_time_s
    several = stub.Chat(chat_request("abc", temperature=1.0, max_tokens=5, ignore_eos=True, n=3), timeout=30)
    u, each = several.usage, [c.usage for c in several.choices]
    assert u.completion_tokens == 15 and u.prompt_tokens == each[0].prompt_tokens
    assert u.ttft_s == min(c.ttft_s for c in each) and u.e2e_time_s == max(c.e2e_time_s for c in each)
    assert u.decode_time_s == max(c.decode_time_s for c in each)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.format == "bitnet" and info.architecture == "BitNetForCausalLM"
    assert 1.5 < info.bits_per_weight < 2.5
    assert info.vocab_size == 100 and info.max_context == 256 and info.kv_bytes_per_token > 0
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == [info.name]


def test_completion_with_token_ids_and_stop_string(server):
    stub = server.stub()
    ids = pb.CompletionRequest(token_ids=pb.TokenIds(ids=[10, 20, 30, 40]),
                               sampling=pb.SamplingOptions(temperature=0.0, max_tokens=12, ignore_eos=True))
    full = stub.Complete(ids, timeout=30).choices[0]
    stop = full.text[3:5]
    ids.sampling.stop.append(stop)
    cut = stub.Complete(ids, timeout=30).choices[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == pb.FINISH_REASON_STOP_STRING and cut.stop_string == stop


def test_n_choices_and_logprobs(server):
    stub = server.stub()
    events = list(stub.ChatStream(chat_request("xyz", temperature=1.5, max_tokens=4, n=3, seed=7, logprobs=2,
                                               ignore_eos=True), timeout=30))
    ends = [e.end for e in events if e.HasField("end")]
    assert sorted(e.index for e in ends) == [0, 1, 2]
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert all(len(lp.top) == 2 for d in deltas for lp in d.logprobs)
    assert sum(len(d.logprobs) for d in deltas) == 12


def test_cancel_mid_stream_frees_blocks(server):
    stub = server.stub()
    call = stub.ChatStream(chat_request("cancel me", temperature=0.0, max_tokens=200, ignore_eos=True), timeout=60)
    got = 0
    for event in call:
        got += event.HasField("delta")
        if got == 3:
            call.cancel()
            break
    wait_all_blocks_free(stub)


def test_deadline_exceeded_frees_blocks(server):
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ChatStream(chat_request("slow", temperature=0.0, max_tokens=200, ignore_eos=True), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_blocks_free(stub)


def test_abort_rpc_ends_stream_with_abort(server):
    stub = server.stub()
    call = stub.ChatStream(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="q")], request_id="to-abort",
                                          sampling=pb.SamplingOptions(temperature=0.0, max_tokens=200,
                                                                      ignore_eos=True)), timeout=60)
    first = next(call)
    assert first.request_id == "to-abort"
    assert stub.Abort(pb.AbortRequest(request_id="to-abort")).found
    rest = list(call)
    assert rest[-1].end.finish_reason == pb.FINISH_REASON_ABORT
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort")).found  # idempotent
    wait_all_blocks_free(stub)


def test_64_concurrent_streams(server):
    stub = server.stub()
    results, errors = {}, []

    def run(i):
        try:
            req = chat_request(f"q{i}", temperature=0.0, max_tokens=3 + i % 5, ignore_eos=True)
            events = list(stub.ChatStream(req, timeout=120))
            results[i] = events
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append((i, e.code(), e.details()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert len(results) == 64
    for i, events in results.items():
        end = events[-1].end
        assert end.finish_reason == pb.FINISH_REASON_LENGTH and end.usage.completion_tokens == 3 + i % 5
    wait_all_blocks_free(stub)


@pytest.mark.parametrize("request_, code", [
    (chat_request("x", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
    (chat_request("x", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT),
    (chat_request("x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
    (chat_request("x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
    (chat_request("x", max_tokens=10_000), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="x")]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.ChatRequest(model="no-such-model", messages=[pb.ChatMessage(role="user", content="x")]),
     grpc.StatusCode.NOT_FOUND),
])
def test_bad_requests_get_status_codes(server, request_, code):
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(request_, timeout=30)
    assert err.value.code() == code
    assert err.value.details() and "Traceback" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err2:
        list(stub.ChatStream(request_, timeout=30))
    assert err2.value.code() == code


def test_huge_n_is_refused_at_once(server):
    """A unary call with an absurd n is refused like the stream is: before anything is built for its
    choices (it made n response messages first: 2**31-1 of them took the server's memory)."""
    stub = server.stub()
    for call in (stub.Chat, lambda r, timeout: list(stub.ChatStream(r, timeout=timeout))):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(chat_request("x", max_tokens=2, n=2**31 - 1), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-queue" in err.value.details()
        assert time.monotonic() - started < 5
    reply = stub.Chat(chat_request("x", max_tokens=2, n=3, temperature=0.0), timeout=30)
    assert [c.index for c in reply.choices] == [0, 1, 2]


def test_request_id_in_flight_is_already_exists(server):
    """A second call with the id of a request still in flight is ALREADY_EXISTS (and leaves the
    first alone); once the first has finished, the id is free again."""
    stub = server.stub()
    first = chat_request("long", max_tokens=40, ignore_eos=True, temperature=0.0)
    first.request_id = "dup-id"
    stream = stub.ChatStream(first, timeout=60)
    next(stream)
    second = chat_request("x", max_tokens=2)
    second.request_id = "dup-id"
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(second, timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup-id" in err.value.details()
    rest = list(stream)
    assert rest[-1].end.finish_reason == pb.FINISH_REASON_LENGTH
    assert stub.Chat(second, timeout=30).request_id == "dup-id"
    wait_all_blocks_free(stub)


def test_malformed_request_bytes_are_invalid_argument(server):
    """Bytes that do not parse as the method's message (a string field with bad UTF-8, garbage) are
    INVALID_ARGUMENT naming the problem, counted in the RPC metrics -- not UNKNOWN with a protobuf
    exception's text and a server-side traceback."""
    stub = server.stub()
    channel = server.channel()
    good = chat_request("ok").SerializeToString()
    bad_utf8 = good.replace(b"ok", b"\xff\xfe")
    for body in (bad_utf8, b"\xff\xff\xff\xff"):
        for method, call in (("Chat", channel.unary_unary), ("ChatStream", channel.unary_stream)):
            rpc = call(f"/bitserve.v1.ChatService/{method}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                result = rpc(body, timeout=30)
                if method == "ChatStream":
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body, err.value)
            assert f"malformed {method} request" in err.value.details()
    assert stub.Chat(chat_request("still fine", max_tokens=2), timeout=30).choices[0].token_ids
    handled = [s for fam in text_string_to_metric_families(server.metrics.render().decode()) for s in fam.samples
               if s.name == "bitserve_grpc_server_handled_total" and s.labels.get("grpc_method") == "ChatStream"
               and s.labels.get("grpc_code") == "INVALID_ARGUMENT"]
    assert handled and handled[0].value >= 2


def test_status_messages_quoting_huge_input_stay_short(server):
    """An error that quotes the request (an unknown 100k-character model name, a reused 20k-character
    request_id) keeps its status code: the message is cut before it outgrows gRPC's header limit
    (it came back as RESOURCE_EXHAUSTED "metadata size exceeds hard limit")."""
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="x" * 100_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "characters cut" in err.value.details() and len(err.value.details()) < 1000
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(pb.ChatRequest(model="\U0001f600" * 50_000, messages=[pb.ChatMessage(role="user", content="x")]),
                  timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    first = chat_request("long", max_tokens=60, ignore_eos=True, temperature=0.0)
    first.request_id = "r" * 20_000
    stream = stub.ChatStream(first, timeout=60)
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(first, timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.cancel()
    wait_all_blocks_free(stub)


def test_engine_failure_is_internal_for_unary_and_ends_streams_with_the_reason(server):
    """A failed engine step ends its requests: a unary call gets INTERNAL with the engine's reason
    (not OK with an empty answer), a stream an end event with FINISH_REASON_ERROR and the reason."""
    stub = server.stub()
    core = server.app.replica.engine.core
    step = core.step

    def failing_step():
        core.step = step  # one failure, then back to normal
        raise RuntimeError("simulated device fault")

    core.step = failing_step
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(chat_request("x", max_tokens=4, n=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "simulated device fault" in err.value.details()
    core.step = failing_step
    events = list(stub.ChatStream(chat_request("x", max_tokens=4), timeout=30))
    assert events[-1].end.finish_reason == pb.FINISH_REASON_ERROR
    assert "simulated device fault" in events[-1].end.error
    assert stub.Chat(chat_request("x", max_tokens=2), timeout=30).choices[0].finish_reason == pb.FINISH_REASON_LENGTH
    wait_all_blocks_free(stub)


def test_prompt_beyond_context_is_invalid(server):
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(chat_request("y" * 300, max_tokens=1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="other"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_warm_up_is_not_a_client_request(tiny_model):
    """The server's start-up generation (compile time included) stays out of the request counters and
    latency histograms: before any client call they are empty."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        out = {}
        for fam in text_string_to_metric_families(srv.metrics.render().decode()):
            for x in fam.samples:
                if x.name in ("bitserve_request_success_total", "bitserve_e2e_request_latency_seconds_count",
                              "bitserve_time_to_first_token_seconds_count"):
                    out[x.name + x.labels.get("finished_reason", "")] = x.value
        return out

    srv = ServerThread(tiny_model, metrics=True)
    try:
        assert srv.app.replica.stats().prompt_tokens > 0  # the warm-up did run through the engine
        before = counts()
        assert len(before) == 7 and not any(before.values()), before
        srv.stub().Chat(chat_request("first", max_tokens=2, ignore_eos=True), timeout=30)
        after = counts()
        assert after["bitserve_request_success_totallength"] == 1
        assert after["bitserve_e2e_request_latency_seconds_count"] == 1
    finally:
        srv.close()


def test_metrics_count_what_was_sent(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        out = {}
        for fam in text_string_to_metric_families(server.metrics.render().decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
        return out

    stub = server.stub()
    wait_all_blocks_free(stub)
    before = samples()
    prompt_tokens = 0
    for i in range(3):
        r = stub.Chat(chat_request(f"m{i}", temperature=0.0, max_tokens=4 + i, ignore_eos=True), timeout=30)
        prompt_tokens += r.usage.prompt_tokens
    after = samples()
    delta = lambda name, labels=(): after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert delta("bitserve_generation_tokens_total") == 4 + 5 + 6
    assert delta("bitserve_prompt_tokens_total") == prompt_tokens
    assert delta("bitserve_request_success_total", (("finished_reason", "length"),)) == 3
    assert delta("bitserve_time_to_first_token_seconds_count") == 3
    assert delta("bitserve_e2e_request_latency_seconds_count") == 3
    handled = (("grpc_code", "OK"), ("grpc_method", "Chat"), ("grpc_service", "bitserve.v1.ChatService"))
    assert delta("bitserve_grpc_server_handled_total", handled) == 3


def test_choices_ended_by_a_stop_string_are_timed(server):
    """A choice the front end ends on a stop string (the engine never saw it finish) carries its
    timings: it is in the latency histograms and its usage has TTFT and e2e (they were left out,
    so the TTFT metrics covered only requests that ended on length or EOS)."""
    stub = server.stub()
    base = stub.Chat(chat_request("timing", temperature=0.0, max_tokens=12, ignore_eos=True), timeout=30)
    text = base.choices[0].text
    assert len(text) >= 6, text
    stop = text[len(text) // 2 - 2: len(text) // 2]

    def ttft_and_e2e_counts():
        counts = {}
        for fam in text_string_to_metric_families(server.metrics.render().decode()):
            for s in fam.samples:
                if s.name in ("bitserve_time_to_first_token_seconds_count", "bitserve_e2e_request_latency_seconds_count"):
                    counts[s.name] = s.value
        return counts

    wait_all_blocks_free(stub)
    before = ttft_and_e2e_counts()
    request = chat_request("timing", temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    reply = stub.Chat(request, timeout=30)
    events = list(stub.ChatStream(request, timeout=30))
    after = ttft_and_e2e_counts()
    for choice, usage in ((reply.choices[0], reply.usage), (events[-1].end, events[-1].end.usage)):
        assert choice.finish_reason == pb.FINISH_REASON_STOP_STRING and choice.stop_string == stop
        assert 0 < usage.ttft_s <= usage.e2e_time_s
    assert {k: after[k] - before[k] for k in after} == {k: 2 for k in after}
    wait_all_blocks_free(stub)


def test_health_and_drain(tiny_model):
    srv = ServerThread(tiny_model, start=False)
    try:
        release = threading.Event()
        original = srv.rpc.warm_up

        async def slow_warm_up():
            import asyncio

            while not release.is_set():
                await asyncio.sleep(0.01)
            await original()

        srv.rpc.warm_up = slow_warm_up
        started = srv.submit(srv.rpc.start())
        deadline = time.monotonic() + 10
        while srv.rpc.port is None and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.port = srv.rpc.port
        health = health_pb2_grpc.HealthStub(srv.channel())
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service="bitserve.v1.ChatService"),  # noqa: E731
                                     timeout=5).status
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        started.result(30)
        assert check() == health_pb2.HealthCheckResponse.SERVING

        stub = srv.stub()
        stream = stub.ChatStream(chat_request("long", temperature=0.0, max_tokens=60, ignore_eos=True), timeout=60)
        first = next(stream)
        drained = srv.submit(srv.rpc.drain(grace=30))
        deadline = time.monotonic() + 5
        while not srv.rpc.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_request("new"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)  # the in-flight stream still finishes normally
        assert rest[-1].end.finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(e.delta.token_ids) for e in [first] + rest if e.HasField("delta")) == 60
        drained.result(30)
    finally:
        srv.close()


def test_drain_aborts_what_outlasts_the_grace_period(tiny_model):
    """While draining, Abort and GetLoad still answer and new generation calls are UNAVAILABLE; when
    the grace period ends, every request still in flight is aborted: a stream gets its end event with
    FINISH_REASON_ABORT and a unary call its partial answer, not a cut-off UNAVAILABLE."""
    srv = ServerThread(tiny_model)
    try:
        core = srv.app.replica.engine.core
        step = core.step

        def slow_step():  # ~50 tokens/s: 200 tokens outlast the grace period by seconds
            time.sleep(0.02)
            return step()

        core.step = slow_step
        stub = srv.stub()
        long = chat_request("long", temperature=0.0, max_tokens=200, ignore_eos=True)
        stream = stub.ChatStream(long, timeout=60)
        first = next(stream)
        unary: list = []
        caller = threading.Thread(target=lambda: unary.append(stub.Chat(long, timeout=60)))
        caller.start()
        deadline = time.monotonic() + 10
        while srv.app.frontend.num_active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.app.frontend.num_active == 2
        drained = srv.submit(srv.rpc.drain(grace=1.0))
        while not srv.rpc.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_request("new"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stub.GetLoad(pb.GetLoadRequest(), timeout=10).running >= 1
        assert not stub.Abort(pb.AbortRequest(request_id="unknown"), timeout=10).found
        rest = list(stream)
        assert rest[-1].end.finish_reason == pb.FINISH_REASON_ABORT
        streamed = sum(len(e.delta.token_ids) for e in [first] + rest if e.HasField("delta"))
        assert 0 < streamed < 200
        caller.join(30)
        (reply,) = unary
        assert reply.choices[0].finish_reason == pb.FINISH_REASON_ABORT
        assert 0 < len(reply.choices[0].token_ids) < 200
        drained.result(30)
    finally:
        core.step = step
        srv.close()


def test_kv_cache_smaller_than_the_context_caps_the_default_max_tokens(tiny_model, caplog):
    """A KV cache that cannot hold one full context is served with a warning; a request without
    max_tokens then stops where the cache ends (LENGTH) instead of being refused, and an explicit
    max_tokens beyond it is INVALID_ARGUMENT naming the blocks."""
    with caplog.at_level("WARNING", logger="bitserve.app"):
        srv = ServerThread(tiny_model, engine={"num_kv_blocks": 4})  # 4 blocks x 4 tokens
    try:
        assert "less than one full context" in caplog.text
        assert srv.app.info.max_request_tokens == 16 < srv.app.info.max_context
        stub = srv.stub()
        prompt = pb.CompletionRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                      sampling=pb.SamplingOptions(temperature=0.0, ignore_eos=True))
        reply = stub.Complete(prompt, timeout=30)
        assert reply.choices[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(reply.choices[0].token_ids) == 16 - 3
        prompt.sampling.max_tokens = 14
        with pytest.raises(grpc.RpcError) as err:
            stub.Complete(prompt, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "KV blocks" in err.value.details()
    finally:
        srv.close()


def test_auth_token(tiny_model):
    srv = ServerThread(tiny_model, server={"api_token": "s3cret"})
    try:
        stub = srv.stub()
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModelInfo(pb.GetModelInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer wrong"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer s3cret"),))
        assert info.format == "bitnet"
        health = health_pb2_grpc.HealthStub(srv.channel())  # health stays open for probes
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.close()


def test_queue_full_is_resource_exhausted(tiny_model):
    srv = ServerThread(tiny_model, engine={"max_num_seqs": 1, "max_queue": 1})
    try:
        stub = srv.stub()
        long = chat_request("hold", temperature=0.0, max_tokens=200, ignore_eos=True)
        running = stub.ChatStream(long, timeout=60)
        next(running)  # running
        queued = stub.ChatStream(long, timeout=60)  # fills the queue (max_queue = 1)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_request("overflow", max_tokens=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        queued.cancel()
        wait_all_blocks_free(stub)
    finally:
        srv.close()


def test_n_larger_than_the_queue_is_invalid_argument(tiny_model):
    srv = ServerThread(tiny_model, engine={"max_num_seqs": 1, "max_queue": 2})
    try:
        stub = srv.stub()
        before = srv.app.replica.stats().prompt_tokens  # the warm-up's
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_request("many", max_tokens=2, n=3), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-queue" in err.value.details()
        assert srv.app.replica.stats().prompt_tokens == before  # nothing was queued
    finally:
        srv.close()


def test_health_follows_the_engine(tiny_model):
    """If the engine thread dies, the chat service's health (readiness) turns NOT_SERVING and calls
    are UNAVAILABLE; after a while without any engine, the overall health (liveness) too."""
    srv = ServerThread(tiny_model)
    try:
        health = health_pb2_grpc.HealthStub(srv.channel())
        ready = lambda: health.Check(health_pb2.HealthCheckRequest(service="bitserve.v1.ChatService"),  # noqa: E731
                                     timeout=5).status
        live = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731

        def wait_for(check, status):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if check() == status:
                    return True
                time.sleep(0.02)
            return False

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert ready() == serving and live() == serving
        # Watch (what gRPC's client-side health checking uses) streams the same statuses
        watch = health.Watch(health_pb2.HealthCheckRequest(service="bitserve.v1.ChatService"), timeout=30)
        assert next(watch).status == serving
        srv.rpc._watchdog.cancel()  # the same watchdog, faster
        srv.submit(srv.rpc._watch_engines(period_s=0.02, liveness_after_s=1.0))
        srv.app.replica.engine.shutdown()  # the thread stops, as if it had died
        assert wait_for(ready, not_serving)
        assert next(watch).status == not_serving
        watch.cancel()
        assert live() == serving  # not yet: Ray could bring a replica back
        with pytest.raises(grpc.RpcError) as err:
            srv.stub().Chat(chat_request("x", max_tokens=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert wait_for(live, not_serving)
    finally:
        srv.close()


def test_stubs_are_fresh():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_cancelled_stream_is_counted_once():
    """A stream cancelled while its handler waits at a yield ends with GeneratorExit: the interceptor
    still records it (CANCELLED), so handled == started; deadlines are DEADLINE_EXCEEDED."""
    import asyncio
    import collections

    from bitserve.rpc.interceptor import ServerInterceptor
    from bitserve.v1 import chat_pb2_grpc

    started, handled = collections.Counter(), collections.Counter()

    class Endless(chat_pb2_grpc.ChatServiceServicer):
        async def ChatStream(self, request, context):
            while True:
                yield pb.StreamEvent(delta=pb.Delta(text="x", token_ids=[1]))
                await asyncio.sleep(0.001)

    async def main():
        interceptor = ServerInterceptor(is_draining=lambda: False, observe=lambda m, c, s: handled.update([c]),
                                        observe_started=lambda m: started.update([m]))
        server = grpc.aio.server(interceptors=[interceptor])
        chat_pb2_grpc.add_ChatServiceServicer_to_server(Endless(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def cancel_after_one():
            call = stub.ChatStream(pb.ChatRequest())
            async for _ in call:
                call.cancel()
                break

        async def time_out():
            try:
                async for _ in stub.ChatStream(pb.ChatRequest(), timeout=3.0):
                    pass
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # the deadline calls first, until the server has started them all (on a busy machine a call
        # queued behind 150 others could expire before its handler ran: never started, never counted)
        deadlines = [asyncio.ensure_future(time_out()) for _ in range(20)]
        for _ in range(200):
            if sum(started.values()) >= 20:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*[cancel_after_one() for _ in range(150)], *deadlines)
        for _ in range(100):
            if sum(handled.values()) == sum(started.values()) >= 170:
                break
            await asyncio.sleep(0.05)
        await channel.close()
        await server.stop(0)

    asyncio.run(main())
    assert sum(started.values()) == 170
    assert handled == {"CANCELLED": 150, "DEADLINE_EXCEEDED": 20}
