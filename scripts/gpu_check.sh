#!/usr/bin/env bash
# One-call GPU check of the weight kernels: the `gpu`-marked kernel tests, then the benchmark.
# Meant to finish in under 8 minutes on one H100/H200 (triton 3.6 + torch 2.11 or newer).
#
#   scripts/gpu_check.sh [--quick]        # results in $OUT (default /tmp/bitserve_gpu_check)
#
# Writes gpu_tests.log, bench.log, bench.json, bench.png; prints the benchmark table last.
# Exit status: 0 when the tests pass and every benchmarked op agrees with its twin.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${OUT:-/tmp/bitserve_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
QUICK=""
[[ "${1:-}" == "--quick" ]] && QUICK="--quick"

# `bitserve` maps server/ plugins/ kernels/ through package-dir: install it editable without
# network, or fall back to a path shim that does the same mapping.
if ! "$PY" -c "import bitserve.kernels.ops" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
    SHIM=/tmp/bitserve_shim/bitserve
    mkdir -p "$SHIM"
    cat >"$SHIM/__init__.py" <<PYEOF
import os as _os
__path__ = [_os.path.join("$ROOT", "server"), "$ROOT"]
exec(compile(open(_os.path.join("$ROOT", "server", "__init__.py")).read(), "bitserve/__init__.py", "exec"))
PYEOF
    export PYTHONPATH="/tmp/bitserve_shim${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/gpu.txt"

T0=$(date +%s)
XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"
timeout 240 "$PY" -m pytest -q -m gpu $XDIST tests/test_triton_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
RC_TESTS=${PIPESTATUS[0]}
T1=$(date +%s)
echo "gpu tests: rc=$RC_TESTS in $((T1 - T0)) s"

BUDGET=$((420 - (T1 - T0)))
[[ $BUDGET -lt 60 ]] && BUDGET=60
timeout $((BUDGET + 90)) "$PY" -m bitserve.kernels.bench --out-dir "$OUT" --budget-s "$BUDGET" $QUICK 2>&1 | tee "$OUT/bench.log"
RC_BENCH=${PIPESTATUS[0]}
T2=$(date +%s)
echo "benchmark: rc=$RC_BENCH in $((T2 - T1)) s; total $((T2 - T0)) s; results in $OUT"
[[ $RC_TESTS -eq 0 && $RC_BENCH -eq 0 ]]
