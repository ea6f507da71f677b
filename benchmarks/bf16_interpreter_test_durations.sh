#!/bin/bash
# What issue 27's tests (the kernels' and the engine's bf16 cases on the Triton interpreter, whose
# bf16 tests/triton_bf16_interpreter.py makes a GPU's) add to make test: they alone, as make test
# runs them (2 pytest-xdist workers), with every test's duration, summed.
#     bash benchmarks/bf16_interpreter_test_durations.sh     (PYTHON=... picks the interpreter; default .venv's)
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=benchmarks/results/bf16-interpreter-test-durations.txt
files="tests/test_triton_bf16_interpreter.py tests/test_lora_linear.py tests/test_fused_linear_cross_entropy.py
       tests/test_lora_inner_step.py tests/test_meta_grad_accumulate.py tests/test_engine_triton.py"
tests="test_triton_bf16_interpreter or test_low_precision_matches or test_triton_row_kernels_in_low_precision
       or test_triton_path_in_low_precision or test_bf16_through_the_triton_kernels"
{
  echo "# issue 27's tests alone, 2 workers as in make test, every test's duration; summed at the end"
  echo "command: bash benchmarks/bf16_interpreter_test_durations.sh"
  echo "    (PYTHONPATH=\$PWD $PY -m pytest" $files "-k \"$(echo $tests)\" -q -n 2 --durations=0)"
  echo "commit: $(git rev-parse --short HEAD) ($(git status --porcelain --untracked-files=no | grep -q . && echo uncommitted changes || echo clean))"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;" \
       "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (shared with other jobs)"
  echo
  start=$(date +%s)
  PYTHONPATH=$PWD $PY -m pytest $files -k "$(echo $tests)" -q -n 2 --durations=0 -p no:cacheprovider 2>&1
  echo "rc=$? wall=$(( $(date +%s) - start )) s (pytest's start-up included)"
} > $out
{
  echo
  echo "## summed (setup + call + teardown of the durations above)"
  grep -E "^[0-9.]+s (call|setup|teardown) " $out | awk '{s+=$1; n+=($2=="call")} END {
    printf "%d tests timed, %.1f s of test time: about %.0f s of make test wall time over its 2 workers\n", n, s, s/2}'
} >> $out
tail -4 $out
