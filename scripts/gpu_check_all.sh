#!/usr/bin/env bash
# One short GPU session for everything that needs CUDA: weight-kernel and KV-kernel tests on the
# GPU, the weight-kernel benchmark (the whole table, then tuning sweeps as time allows), the quick KV benchmark (kernels + engine decode tok/s per
# KV dtype on a random 2B4T, CUDA graphs vs eager), the engine under steady arrivals (eager vs decode
# graphs vs piecewise graphs for mixed steps, on the same random 2B4T), and demo-model accuracy
# through LLM.chat on CUDA (CUDA graphs, then --enforce-eager).
# Each step has its own time limit so one slow or broken step cannot eat the others' time, and the
# whole run stops starting steps at TOTAL_LIMIT seconds (default 570: under a 600 s call); a step
# that would run past it gets only what is left. Steps run in order of importance.
# About 8 minutes on one H100 (triton 3.6 + torch 2.11); prints a summary table last.
# gtests: the engine's decode and piecewise CUDA graphs against --enforce-eager on the GPU.
#
#   OUT=/tmp/check scripts/gpu_check_all.sh [STEP ...]   # steps: wtests gtests kvtests wbench kvbench
#                                                         # mixed demo (default), and profile (ncu on
#                                                         # the decode GEMV)
#
# $OUT gets summary.txt, bench.json, bench.png, kv_check.json, kv_check.png, mixed_steps.json,
# mixed_steps.png and logs.tgz (this run's logs). PYTHON: the interpreter (default: the repo's
# .venv if there is one, else python3). Refuses to run without a CUDA device; exits 1 if a step
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${OUT:-/tmp/bitserve_gpu_all}"
LOGS="${LOGS:-$(mktemp -d /tmp/bitserve_gpu_logs.XXXXXX)}"  # fresh: nothing stale reaches $OUT
mkdir -p "$OUT" "$LOGS"
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS="${*:-wtests gtests kvtests wbench kvbench mixed demo}"
TOTAL_LIMIT="${TOTAL_LIMIT:-570}"
T_START=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check_all: $PY sees no CUDA device (or no torch); these checks need one" >&2
  exit 2
fi
if ! "$PY" -c "import bitserve.kernels.ops" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/pip.log" 2>&1; then
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
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.mem --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$LOGS/gpu.txt"

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( TOTAL_LIMIT - (t0 - T_START) ))
  if (( left < 15 )); then
    printf '%-8s skipped: the run is at its TOTAL_LIMIT of %ss\n' "$name" "$TOTAL_LIMIT" | tee -a "$SUMMARY"
    return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  (( rc != 0 )) && FAILED=1
  tail -n 25 "$LOGS/$name.log"
  local what
  what=$(grep -E 'passed|failed|error|skipped|Error' "$LOGS/$name.log" | tail -n 1)
  [ -n "$what" ] || what=$(tail -n 1 "$LOGS/$name.log")
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$dt" "$(printf '%s' "$what" | cut -c1-90)" | tee -a "$SUMMARY"
}
FAILED=0

for s in $STEPS; do
  case $s in
    wtests) step wtests 90 "$PY" -m pytest -q -m gpu $XDIST tests/test_triton_kernels.py tests/test_pointwise_kernels.py -p no:cacheprovider --timeout=60 ;;
    gtests) step gtests 150 "$PY" -m pytest -q -m gpu tests/test_cuda_graphs.py tests/test_piecewise_graphs.py -p no:cacheprovider --timeout=120 ;;  # first captures compile every token-count bucket
    kvtests) step kvtests 50 "$PY" -m pytest -q $XDIST tests/test_kv_kernels.py -p no:cacheprovider --timeout=40 ;;
    wbench) step wbench 160 "$PY" -m bitserve.kernels.bench --out-dir "$OUT" --budget-s 130 ;;  # the full table first, then the sweep
    kvbench) step kvbench 90 "$PY" benchmarks/kv_gpu_check.py --out "$LOGS/kv" --quick ;;
    # the 4-layer random 2B4T kvbench --quick wrote (a 30-layer one would take a minute to generate)
    mixed) step mixed 90 "$PY" benchmarks/mixed_steps.py --out "$OUT" --layers 4 --steps 150 ;;
    demo) step demo 50 "$PY" benchmarks/demo_accuracy.py --n 200 --batch 200 --show-errors 3
          step demo_eager 50 "$PY" benchmarks/demo_accuracy.py --n 200 --batch 200 --show-errors 3 --enforce-eager ;;
    profile)  # not in the default set: ncu on the decode GEMV (qkv and gate_up shapes, M=1)
      for nk in "3840 2560" "13824 2560"; do
        set -- $nk
        step "profile_$1" 90 ncu --kernel-name regex:'dp4a|ternary|quantize' --launch-skip 6 --launch-count 4 \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
          "$PY" benchmarks/profile_linear.py --n "$1" --k "$2" --m 1
      done ;;
  esac
done
cp "$LOGS/kv/kv_check.json" "$LOGS/kv/kv_check.png" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
echo "=== summary ==="
cat "$LOGS/gpu.txt" "$SUMMARY"
exit "$FAILED"
