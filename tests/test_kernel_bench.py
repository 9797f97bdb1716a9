"""The GPU benchmark's CPU-side parts: report table, targets, buffer rotation, no-GPU exit.

(The plot is drawn by the GPU check itself: importing matplotlib costs tens of seconds on a busy
2-core machine.)"""

import json

import pytest
import torch

from bitserve.kernels import bench


def _result():
    recs = []
    for shape, n, k in bench.SHAPES_2B4T[:2]:
        for m, us, bf in ((1, 4.0, 20.0), (32, 6.0, 22.0), (512, 60.0, 55.0)):
            recs.append(dict(op="w2a8", shape=shape, N=n, K=k, M=m, path="auto", us=us, bf16_us=bf, GBps=1000.0,
                             pct_copy=33.3, bf16_pct_copy=50.0, speedup=round(bf / us, 2), bytes=1, rel_err=1e-3,
                             timing="graph", copies=8))
    return dict(device="test", torch="x", triton="y", copy_GBps=3000.0, l2_bytes=50 << 20, records=recs,
                best_configs={})


def test_table_and_targets():
    result = _result()
    text = bench.table(result)
    assert text.count("\n") == 1 + len(result["records"]) and "2b4t.qkv" in text
    lines = bench.targets(result)
    assert lines[0].startswith("M=1 2B4T >= 70% copy") and "5.00x" in lines[1]
    assert any(line.startswith("M=32") for line in lines) and "0.92x" in lines[-1]
    json.dumps(result)


def test_switch_points_read_the_sweep():
    """dp4a beats the GEMM at M=2 and 4 on both shapes, at 8 on one of two (a tie counts as a
    win: half), at 16 on neither -> ternary_decode.MAX_M 8; the GEMM wins against the one-dot GEMM
    already at M=32 -> ternary_prefill.MIN_M below 32; W2A16 timed nowhere -> no row."""
    def rec(shape, m, path, us):
        return dict(op="w2a8", shape=shape, N=1, K=1, M=m, path=path, us=us, bf16_us=1.0, GBps=1.0, pct_copy=1.0,
                    bf16_pct_copy=1.0, speedup=1.0, bytes=1, rel_err=0.0, timing="graph", copies=1)

    records = []
    for shape in ("a", "b"):
        records += [rec(shape, 2, "dp4a", 1.0), rec(shape, 2, "gemm", 2.0), rec(shape, 4, "dp4a", 1.0),
                    rec(shape, 4, "gemm", 2.0), rec(shape, 16, "dp4a", 3.0), rec(shape, 16, "gemm", 2.0),
                    rec(shape, 32, "gemm", 5.0), rec(shape, 32, "wide", 4.0), rec(shape, 512, "gemm", 50.0),
                    rec(shape, 512, "wide", 40.0), rec(shape, 32, "dp4a/pdl", 0.1)]  # a variant: not compared
    records += [rec("a", 8, "dp4a", 1.0), rec("a", 8, "gemm", 2.0), rec("b", 8, "dp4a", 3.0), rec("b", 8, "gemm", 2.0)]
    points = {p["setting"]: p for p in bench.switch_points({"records": records}) if p["ops"] == ["w2a8"]}
    decode = points["ternary_decode.MAX_M"]
    assert decode["wins"] == {2: [2, 2], 4: [2, 2], 8: [1, 2], 16: [0, 2]}
    assert decode["suggested"] == 8 and decode["now"] == bench._setting("ternary_decode.MAX_M")
    prefill = points["ternary_prefill.MIN_M"]
    assert prefill["wins"] == {32: [0, 2], 512: [0, 2]} and prefill["suggested"] is None
    assert len(bench.switch_points({"records": records})) == 2  # nothing timed for the other ops
    lines = bench.switch_lines(bench.switch_points({"records": records}))
    assert "M=8 1/2" in lines[0] and lines[0].endswith("suggests 8")
    assert lines[1].endswith("suggests below 32 (lost at M=32)")
    json.dumps(bench.switch_points({"records": records}))


def test_copies_cover_three_l2(monkeypatch):
    monkeypatch.setattr(bench, "_l2_bytes", lambda: 50 << 20)
    assert bench.copies_for(400 << 10) == 384  # a 0.4 MB k/v projection: 384 copies > 3x L2
    assert bench.copies_for(1 << 30) == 1
    assert bench.copies_for(1) == bench.MAX_COPIES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_without_gpu(capsys):
    assert bench.main(["--out-dir", "/nonexistent"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host this would run the whole check")
def test_gpu_check_all_refuses_without_a_gpu(tmp_path):
    """No CUDA device: exit 2 with a message, nothing written as if it had run."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_all.sh"
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(script), "wtests"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OUT": str(out), "LOGS": str(tmp_path / "logs")})
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert not (out / "summary.txt").exists()
