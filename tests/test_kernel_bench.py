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


def test_copies_cover_three_l2(monkeypatch):
    monkeypatch.setattr(bench, "_l2_bytes", lambda: 50 << 20)
    assert bench.copies_for(400 << 10) == 384  # a 0.4 MB k/v projection: 384 copies > 3x L2
    assert bench.copies_for(1 << 30) == 1
    assert bench.copies_for(1) == bench.MAX_COPIES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_without_gpu(capsys):
    assert bench.main(["--out-dir", "/nonexistent"]) == 2
    assert "CUDA" in capsys.readouterr().err
