#!/usr/bin/env bash
# Measures the project on a GPU: the GPU tests, then the benchmark suites, then a summary table
# of ratios (last, so it ends up in the device tool's output tail). Tests and every suite take
# more than one 10-minute device call: split them.
#   SKIP_BENCH=1 bash bench/gpu.sh                 # the tests alone (~6-8 min with xdist)
#   SKIP_TESTS=1 BENCH_K="attention or s2" bash bench/gpu.sh   # these suites alone
#   bash bench/gpu.sh -k vmm     # only suites / tests matching an expression
#   (also: TEST_TIMEOUT / BENCH_TIMEOUT seconds, TEST_PROCS, VMWEAVE_E2E_* in bench_engine.py,
#    SAVE_TRITON_CACHE=MAX_MB to bring the compile cache back: bench/triton_cache.sh)
# The GPU tests are compile-bound (each new kernel specialisation is a Triton build): with
# pytest-xdist they run in TEST_PROCS processes (default 12). On an H200 host of 16 cores 8
# processes ran ~95% of the tree in 5 min; one process did not finish it in 10.
# Logs and pytest-benchmark JSON land in $OUT (the device tool's folder) or bench/out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export BENCH_OUT=${OUT:-bench/out}
mkdir -p "$BENCH_OUT"; rm -f "$BENCH_OUT/rows.json"
# Triton's compile cache: unpacked from .gpu/triton-cache (carried from an earlier call, see
# bench/triton_cache.sh); SAVE_TRITON_CACHE=MAX_MB packs it into $OUT at the end (mind the
# device tool's 8 files: the tests alone write 2, a bench run 6)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/vmweave-triton-cache}
bash bench/triton_cache.sh load
# `[ -z ] ||` rather than `[ -n ] &&`: the script's exit status is the tests' and suites', not this test's
save_cache() { [ -z "${SAVE_TRITON_CACHE:-}" ] || bash bench/triton_cache.sh save "$BENCH_OUT" "$SAVE_TRITON_CACHE"; }
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$BENCH_OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$BENCH_OUT/card.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_PROCS:-12} --dist load")
  timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -rf --maxfail=30 $XDIST tests -p no:cacheprovider "$@" 2>&1 | tail -n 60 > "$BENCH_OUT/tests.log"
  rc=${PIPESTATUS[0]}
  echo "tests: $(tail -n 1 "$BENCH_OUT/tests.log")"
fi
[ -z "${SKIP_BENCH:-}" ] || { save_cache; exit "$rc"; }
timeout "${BENCH_TIMEOUT:-400}" python3 -m pytest -q -s bench -p no:cacheprovider -o python_files='bench_*.py' \
  --benchmark-json="$BENCH_OUT/bench.json" ${BENCH_K:+-k "$BENCH_K"} "$@" > "$BENCH_OUT/bench.log" 2>&1
bench_rc=$?
echo "bench exit: $bench_rc"
[ "$rc" -ne 0 ] || rc=$bench_rc
grep -E "passed|failed|error" "$BENCH_OUT/bench.log" | tail -n 5
python3 bench/summary.py "$BENCH_OUT/rows.json" | tee "$BENCH_OUT/summary.md"
save_cache
exit "$rc"
