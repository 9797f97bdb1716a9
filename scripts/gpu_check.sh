#!/usr/bin/env bash
# GPU check of the weight kernels only: the `gpu` kernel tests and kernels/bench.py (with the GEMV
# sweep). See scripts/gpu_check_all.sh, which this calls.
exec "$(dirname "$0")/gpu_check_all.sh" wtests wbench
