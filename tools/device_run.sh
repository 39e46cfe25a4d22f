#!/usr/bin/env bash
# The one script for the GPU machine: run it from the source tree, in one device call.
#   bash tools/device_run.sh [tests] [sanitize] [racecheck] [compile-time] [bench] [tune]
#                            [tune-bwd] [asv] [options-bench] [diag] [matmul]
#   (default: all but the tile sweeps and asv)
# PYTEST_ARGS narrows the test stage (e.g. PYTEST_ARGS="-x tests/test_backward_gpu.py"),
# BENCH_ARGS the benchmark (e.g. BENCH_ARGS="--direction bwd").
# Full logs and tables go under $OUT (./.out when unset); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
stages=${*:-tests sanitize racecheck compile-time bench}
summary=()

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import cupy, numpy, sys; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'python', sys.version.split()[0])"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo "tree: $(cat .git-commit 2>/dev/null || echo unknown)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

for s in $stages; do
  case $s in
    tests)
      # (eval: PYTEST_ARGS may quote, e.g. -k "not mma")
      eval "python3 -m pytest -m gpu -q -rf -p no:cacheprovider ${PYTEST_ARGS:-tests}" 2>&1 \
        | tee "$OUT/pytest.txt" | tail -n 25
      summary+=("tests: $(tail -n 1 "$OUT/pytest.txt")") ;;
    sanitize)
      # (--report-api-errors no: cuda.bindings probes the driver with cuGetProcAddress
      #  for entry points this driver lacks, which memcheck would count as errors)
      compute-sanitizer --tool memcheck --leak-check no --report-api-errors no --error-exitcode 3 \
        python3 tools/sanitize_cases.py > "$OUT/sanitizer.txt" 2>&1
      rc=$?; tail -n 5 "$OUT/sanitizer.txt"
      summary+=("memcheck: rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.txt" | tail -n 1)") ;;
    racecheck)
      compute-sanitizer --tool racecheck --error-exitcode 3 \
        python3 tools/sanitize_cases.py --small > "$OUT/racecheck.txt" 2>&1
      rc=$?; tail -n 5 "$OUT/racecheck.txt"
      summary+=("racecheck: rc=$rc $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.txt" | tail -n 1)") ;;
    matmul)  # the card's bf16 matmul rate, to read attention TFLOP/s against
      python3 tools/matmul_peak.py 2>&1 | tee "$OUT/matmul.txt"
      summary+=("$(head -n 1 "$OUT/matmul.txt")") ;;
    compile-time)
      python3 -m cuflash compile-time 2>&1 | tee "$OUT/compile_time.txt"
      summary+=("compile: $(tail -n 1 "$OUT/compile_time.txt")") ;;
    bench)
      python3 -m cuflash bench ${BENCH_ARGS:-} --json "$OUT/bench.json" > "$OUT/bench.txt" \
        2> "$OUT/bench_progress.txt"
      summary+=("bench: rc=$?") ;;
    tune)
      python3 tools/tune_fwd.py > "$OUT/tune.txt" 2>/dev/null
      cat "$OUT/tune.txt" ;;
    asv)  # needs tools/asv_prepare.py's .asv/ and .whl/ carried; see docs/benchmarks.md
      bash tools/asv_device.sh > "$OUT/asv.txt" 2>&1
      summary+=("asv: $(grep -c 'rc=0' "$OUT/asv.txt") of $(grep -c '^==' "$OUT/asv.txt") commits ran clean") ;;
    options-bench)
      python3 tools/bench_options.py ${OPTIONS_BENCH_ARGS:-} --json "$OUT/options_bench.json" \
        > "$OUT/options_bench.txt" 2> "$OUT/options_bench_progress.txt"
      summary+=("options bench: rc=$?") ;;
    diag)  # error spread of the options kernels, DIAG_ARGS e.g. "--variants --softcap"
      PYTHONPATH=$PWD:$PWD/tests python3 tools/diag_options.py ${DIAG_ARGS:-} \
        > "$OUT/diag_options.txt" 2>&1
      summary+=("diag: rc=$?") ;;
    tune-bwd)
      python3 tools/tune_bwd.py ${TUNE_ARGS:-} > "$OUT/tune_bwd.txt" 2> "$OUT/tune_bwd_progress.txt"
      cat "$OUT/tune_bwd.txt" ;;
  esac
done

echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/bench.txt" ] && cat "$OUT/bench.txt"
[ -f "$OUT/options_bench.txt" ] && cat "$OUT/options_bench.txt"
[ -f "$OUT/diag_options.txt" ] && cat "$OUT/diag_options.txt"
exit 0
