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


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "bitserve.cli", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags,words", [
    (["--port", "-5"], "port must be in 0..65535"),
    (["--port", "70000"], "port must be in 0..65535"),
    (["--metrics-port", "99999"], "metrics_port must be"),
    (["--max-message-mb", "0"], "max_message_mb must be >= 1"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_serve_flags_are_clear_cli_errors(flags, words):
    result = _cli("serve", *flags)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_unreadable_tls_files_and_non_folder_models_are_named_before_loading(tmp_path):
    result = _cli("serve", "--tls-cert", str(tmp_path / "no.crt"), "--tls-key", str(tmp_path / "no.key"))
    assert result.returncode == 2 and f"--tls-cert {tmp_path / 'no.crt'}: not a readable file" in result.stderr
    assert "loading" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    a_file = tmp_path / "weights.txt"
    a_file.write_text("not a model")
    result = _cli("serve", "--model", str(a_file), "--metrics-port", "-1")
    assert result.returncode == 2 and "not a checkpoint folder or a .gguf file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_ports_in_use_are_clear_cli_errors(tiny_model):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags, words in ([["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"],
                             [["--port", "0", "--metrics-port", str(port)], f"cannot serve metrics on 127.0.0.1:{port}"]):
            result = _cli("serve", "--model", str(tiny_model), "--host", "127.0.0.1", "--metrics-port", "-1",
                          "--dtype", "float32", *flags)
            assert result.returncode == 2 and words in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


def test_remote_chat_sends_every_sampling_flag(monkeypatch, capsys):
    """`bitserve chat` against a server forwards what `--local` would use, and checks it the same way."""
    from bitserve import cli
    from bitserve.rpc import client

    sent = []

    class FakeClient:
        def __init__(self, *args, **kwargs):
            pass

        def model_info(self):
            return pb.ModelInfo(name="m", format="bitnet", bits_per_weight=2.0)

        def stream_chat(self, history, sampling):
            sent.append(sampling)
            yield pb.StreamEvent(delta=pb.Delta(text="ok"))

    monkeypatch.setattr(client, "ChatClient", FakeClient)
    flags = ["--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.3",
             "--presence-penalty", "0.5", "--frequency-penalty", "-0.5", "--min-tokens", "2", "--max-tokens", "9",
             "--stop", "x", "--no-skip-special-tokens", "--include-stop-str-in-output"]
    assert cli.main(["chat", "-m", "hi", *flags]) == 0
    (s,) = sent
    assert (s.temperature, s.top_k, s.min_tokens, s.max_tokens, list(s.stop)) == (pytest.approx(0.7), 5, 2, 9, ["x"])
    assert (s.top_p, s.min_p, s.repetition_penalty) == (pytest.approx(0.9), pytest.approx(0.1), pytest.approx(1.3))
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)
    assert s.skip_special_tokens is False and s.include_stop_str_in_output is True
    assert "ok" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat", "-m", "hi", "--repetition-penalty", "0"])
    assert exit_.value.code == 2 and "repetition_penalty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one answer per turn: no --n
        cli.main(["chat", "-m", "hi", "--n", "2"])


def test_remote_chat_names_what_it_ignores_and_a_refused_token(monkeypatch, capsys):
    """Against a server, model-loading flags do nothing (the server has its model): said, not silently
    dropped; one-shot -m prints no REPL hint; a refused API token is named as such (not "cannot reach")."""
    from bitserve import cli
    from bitserve.rpc import client

    refuse = []

    class FakeClient:
        def __init__(self, *args, **kwargs):
            pass

        def model_info(self):
            if refuse:
                raise client.ServerError("UNAUTHENTICATED", "missing or invalid API token")
            return pb.ModelInfo(name="m", format="bitnet", bits_per_weight=2.0)

        def stream_chat(self, history, sampling):
            yield pb.StreamEvent(delta=pb.Delta(text="ok"))

    monkeypatch.setattr(client, "ChatClient", FakeClient)
    assert cli.main(["chat", "-m", "hi", "--model", "nope", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "note: ignored without --local: --model, --dtype" in err and "/reset" not in err
    assert cli.main(["chat", "-m", "hi"]) == 0
    assert "note:" not in capsys.readouterr().err
    refuse.append(True)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat", "-m", "hi"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "refused the API token" in err and "--api-token" in err
