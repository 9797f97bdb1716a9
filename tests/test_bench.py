"""``bitserve bench`` against an in-process server on a tiny model."""

import json

import pytest

from bitserve.cli import _build_parser, main
from bitserve.rpc.bench import BenchConfig, format_table, parse_levels, run_bench
from grpc_harness import ServerThread
from tiny_checkpoints import write_tiny_bitnet_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_bitnet_model(tmp_path_factory.mktemp("bench") / "tiny", seed=3)
    srv = ServerThread(model, engine={"max_num_seqs": 16, "max_queue": 64})
    yield srv
    srv.close()


def _ordered(stats):
    return stats["p50"] <= stats["p90"] <= stats["p99"]


def test_sweep_fixed_output_len(server, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cfg = BenchConfig(address=server.address, num_requests=6, concurrency="1,4", input_len=40, max_tokens=6,
                      out_json=str(out_json), out_png=str(out_png), progress=False)
    result = run_bench(cfg)
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 4]
    for lv in result["levels"]:
        assert lv["completed"] == 6 and lv["errors"] == 0 and lv["errors_by_code"] == {}
        assert lv["total_output_tokens"] == 6 * 6  # ignore_eos: every request generates max_tokens
        assert lv["request_throughput"] > 0 and lv["output_throughput"] > 0
        assert lv["total_token_throughput"] > lv["output_throughput"]
        assert 30 <= lv["mean_input_tokens"] <= 50  # calibrated synthetic prompts (char tokenizer)
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert _ordered(lv[metric]) and lv[metric]["mean"] > 0, metric
        assert lv["ttft_ms"]["p50"] < lv["e2e_ms"]["p50"]
    saved = json.loads(out_json.read_text())
    assert [lv["completed"] for lv in saved["levels"]] == [6, 6] and saved["config"]["concurrency"] == [1, 4]
    assert "api_token" not in saved["config"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    assert "TTFT p50" in table and len(table.splitlines()) == 4


def test_request_rate_and_file_prompts(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n\n{"messages": [{"role": "user", "content": "abc"}]}\n')
    result = run_bench(BenchConfig(address=server.address, num_requests=5, concurrency=2, request_rate=200.0,
                                   dataset=str(prompts), max_tokens=3, warmup=0, progress=False))
    (lv,) = result["levels"]
    assert lv["completed"] == 5 and lv["total_output_tokens"] == 15
    assert result["prompts"] == {"file_prompts": 2}


def test_cli_parser_and_errors_by_code(server, tmp_path, capsys):
    args = _build_parser().parse_args(["bench", "--concurrency", "1,4", "--num-requests", "4", "--output-len", "5",
                                       "--request-rate", "inf", "--no-ignore-eos"])
    from bitserve.cli_args import dataclass_from_args

    cfg = dataclass_from_args(BenchConfig, args)
    assert cfg.levels == [1, 4] and cfg.num_requests == 4 and cfg.max_tokens == 5 and not cfg.ignore_eos
    assert cfg.request_rate == float("inf") and args.func.__name__ == "_bench"
    assert parse_levels(8) == [8] and parse_levels([1, "2,3"]) == [1, 2, 3]
    with pytest.raises(ValueError):
        parse_levels("0,4")

    # max_tokens beyond the tiny model's 256-token context: every request fails, reported by code
    out_json = tmp_path / "errors.json"
    rc = main(["bench", "--address", server.address, "--dataset", "demo", "--concurrency", "2",
               "--num-requests", "3", "--max-tokens", "1000", "--no-progress", "--out-json", str(out_json)])
    assert rc == 1  # nothing completed
    (lv,) = json.loads(out_json.read_text())["levels"]
    assert lv["completed"] == 0 and lv["errors"] == 3 and lv["errors_by_code"] == {"INVALID_ARGUMENT": 3}
    assert lv["ttft_ms"]["p50"] is None and lv["request_throughput"] == 0
    out = capsys.readouterr().out
    assert "INVALID_ARGUMENT x3" in out and "exceeds the context" in out


def test_unreachable_server_is_a_clean_error(capsys):
    with pytest.raises(OSError, match="cannot reach"):
        run_bench(BenchConfig(address="127.0.0.1:1", num_requests=1, progress=False, timeout=1.0))


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    """A results file that cannot be written is an error before any request is sent."""
    for name in ("--out-json", "--out-png"):
        rc = None
        with pytest.raises(SystemExit) as exit_:
            rc = main(["bench", "--address", "127.0.0.1:1", "--num-requests", "1", "--no-progress",
                       name, str(tmp_path / "missing" / "x")])
        assert rc is None and exit_.value.code == 2
        err = capsys.readouterr().err
        assert "cannot write" in err and "missing" in err and "cannot reach" not in err


def test_png_without_matplotlib_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """--out-png needs matplotlib: say so before sending a request, not after the whole run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--address", "127.0.0.1:1", "--num-requests", "1", "--no-progress",
              "--out-png", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "bitserve[plot]" in err and "cannot reach" not in err
