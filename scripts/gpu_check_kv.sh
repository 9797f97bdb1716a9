#!/usr/bin/env bash
# One-call GPU check of the KV-cache kernels (issue #6): the KV kernel tests on the GPU
# (Triton vs twins, incl. the `gpu`-marked 2B4T-shape tests), then benchmarks/kv_gpu_check.py
# (decode/prefill/write µs and GB/s per KV dtype, end-to-end decode tok/s on a random 2B4T).
# About 5 minutes on one H100 (triton 3.6 + torch 2.11 or newer); `--quick` about 2.
#
#   scripts/gpu_check_kv.sh [--quick]        # results in $OUT (default /tmp/bitserve_kv_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bitserve_kv_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
QUICK=""
[[ "${1:-}" == "--quick" ]] && QUICK="--quick"
if ! "$PY" -c "import bitserve.kernels.kv_attention" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || true
fi
T0=$(date +%s)
timeout 200 "$PY" -m pytest -q tests/test_kv_kernels.py tests/test_kv_cache.py -p no:cacheprovider 2>&1 | tee "$OUT/kv_tests.log"
RC_TESTS=${PIPESTATUS[0]}
T1=$(date +%s)
echo "kv tests: rc=$RC_TESTS in $((T1 - T0)) s"
timeout 420 "$PY" benchmarks/kv_gpu_check.py --out "$OUT" $QUICK 2>&1 | tee "$OUT/kv_bench.log"
RC_BENCH=${PIPESTATUS[0]}
echo "kv benchmark: rc=$RC_BENCH in $(( $(date +%s) - T1 )) s; results in $OUT"
[[ $RC_TESTS -eq 0 && $RC_BENCH -eq 0 ]]
