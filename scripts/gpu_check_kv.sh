#!/usr/bin/env bash
# GPU check of the KV-cache kernels only: tests/test_kv_kernels.py on CUDA and
# benchmarks/kv_gpu_check.py --quick. See scripts/gpu_check_all.sh, which this calls.
exec "$(dirname "$0")/gpu_check_all.sh" kvtests kvbench
