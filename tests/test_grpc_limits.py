"""The gRPC server under pressure: the concurrency limit, oversized prompts, slow tokenizing."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitserve.frontend import MAX_PROMPT_CHARS_PER_TOKEN
from bitserve.v1 import chat_pb2 as pb
from grpc_harness import ServerThread, chat_request
from tiny_checkpoints import write_tiny_bitnet_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_bitnet_model(tmp_path_factory.mktemp("limits") / "tiny", seed=5)


def health_status(srv, service=""):
    stub = health_pb2_grpc.HealthStub(srv.channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_concurrency_limit_counts_generation_only(tiny_model):
    """At --max-concurrent-streams, generation calls get RESOURCE_EXHAUSTED while health probes,
    GetLoad and Abort still answer; a freed slot admits the next call."""
    srv = ServerThread(tiny_model, engine={"max_num_seqs": 4}, server={"max_concurrent_streams": 2})
    try:
        stub = srv.stub()
        long = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hold")], request_id="held-1",
                              sampling=pb.SamplingOptions(temperature=0.0, max_tokens=200, ignore_eos=True))
        first = stub.ChatStream(long, timeout=60)
        next(first)
        long.request_id = "held-2"
        second = stub.ChatStream(long, timeout=60)
        next(second)
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_request("third", max_tokens=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent calls" in err.value.details()
        for _ in range(100):  # far more probes than the limit: none is refused
            assert health_status(srv) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(srv, "bitserve.v1.ChatService") == health_pb2.HealthCheckResponse.SERVING
        assert stub.GetLoad(pb.GetLoadRequest(), timeout=5).running == 2
        assert stub.Abort(pb.AbortRequest(request_id="held-1"), timeout=5).found
        events = list(first)
        assert events[-1].end.finish_reason == pb.FINISH_REASON_ABORT
        reply = stub.Chat(chat_request("now", temperature=0.0, max_tokens=2, ignore_eos=True), timeout=30)
        assert reply.usage.completion_tokens == 2
        second.cancel()
    finally:
        srv.close()


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerThread(tiny_model)
    yield srv
    srv.close()


def test_oversized_prompts_are_refused_before_tokenizing(server, monkeypatch):
    stub = server.stub()
    max_context = stub.GetModelInfo(pb.GetModelInfoRequest()).max_context
    calls = []
    tokenizer = server.app.frontend.tokenizer
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    text = "a" * (max_context * MAX_PROMPT_CHARS_PER_TOKEN + 1)
    chars = len(text) + len("user")  # a message's role counts too
    for call, length in ((lambda: stub.Chat(chat_request(text, max_tokens=2), timeout=30), chars),
                         (lambda: list(stub.ChatStream(chat_request(text, max_tokens=2), timeout=30)), chars),
                         (lambda: stub.Complete(pb.CompletionRequest(text=text), timeout=30), len(text))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"prompt is too long: {length} characters" in err.value.details()
    many = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")] * (max_context + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(many, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{max_context + 1} messages cannot fit" in err.value.details()
    assert calls == []  # nothing was tokenized
    # at the limit the prompt is tokenized, and refused by its token count
    with pytest.raises(grpc.RpcError) as err:
        stub.Complete(pb.CompletionRequest(text=text[:-1]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert calls and f"the prompt has {len(text) - 1} tokens" in err.value.details()  # one per "a" in this vocab


def test_tokenizing_does_not_block_the_event_loop(server, monkeypatch):
    """A prompt being rendered and tokenized (slow for long ones) leaves the server answering."""
    release = threading.Event()
    entered = threading.Event()
    frontend = server.app.frontend
    chat_prompt = frontend.chat_prompt

    def slow_chat_prompt(*args, **kwargs):
        entered.set()
        release.wait(30)
        return chat_prompt(*args, **kwargs)

    monkeypatch.setattr(frontend, "chat_prompt", slow_chat_prompt)
    stub = server.stub()
    pending = stub.Chat.future(chat_request("slow", temperature=0.0, max_tokens=3, ignore_eos=True), timeout=60)
    try:
        assert entered.wait(10)
        started = time.monotonic()
        assert health_status(server) == health_pb2.HealthCheckResponse.SERVING
        done = stub.Complete(pb.CompletionRequest(text="fast", sampling=pb.SamplingOptions(
            temperature=0.0, max_tokens=2, ignore_eos=True)), timeout=10)
        assert done.usage.completion_tokens == 2 and time.monotonic() - started < 10
        assert not pending.done()
    finally:
        release.set()
    assert pending.result(timeout=30).usage.completion_tokens == 3


def test_an_error_after_the_client_left_is_recorded_as_its_cancel():
    """A refusal (queue full) that comes as the client's deadline passes is not sent (the call is
    over, and grpc would log an error for the abort): it is recorded as DEADLINE_EXCEEDED."""
    import asyncio

    from bitserve.engine.scheduler import QueueFullError
    from bitserve.rpc.interceptor import ServerInterceptor

    seen = []

    class FinishedContext:
        aborted = False

        def done(self):
            return True

        def time_remaining(self):
            return 0.0

        async def abort(self, code, message):
            self.aborted = True

    interceptor = ServerInterceptor(is_draining=lambda: False, observe=lambda m, c, s: seen.append(c))
    context = FinishedContext()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(interceptor._fail("/bitserve.v1.ChatService/Chat", context, time.monotonic(),
                                      QueueFullError("full")))
    assert seen == ["DEADLINE_EXCEEDED"] and not context.aborted
