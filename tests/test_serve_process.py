"""`bitserve serve` as a real process: ready banner, SIGTERM drain, clean exit."""

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from bitserve.v1 import chat_pb2 as pb
from bitserve.v1 import chat_pb2_grpc
from grpc_harness import chat_request
from tiny_checkpoints import write_tiny_bitnet_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_bitnet_model(tmp_path_factory.mktemp("proc") / "tiny", seed=5)


def start_server(model, *extra):
    cmd = [sys.executable, "-m", "bitserve.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "-1", "--dtype", "float32", "--grace-period-s", "30", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on grpc://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_sigterm_drains_in_flight_stream(tiny_model):
    proc, port = start_server(tiny_model)
    try:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stream = stub.ChatStream(chat_request("long", temperature=0.0, max_tokens=120, ignore_eos=True), timeout=60)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(100):  # the drain flag is set as soon as the signal is handled
            try:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            except grpc.RpcError as e:
                refused = e
                break
            time.sleep(0.02)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert rest[-1].end.finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(e.delta.token_ids) for e in [first] + rest if e.HasField("delta")) == 120
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_model_path_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bitserve.cli", "serve", "--model", str(tmp_path / "nope"),
                             "--metrics-port", "-1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "nope" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
