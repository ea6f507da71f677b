#!/usr/bin/env bash
# Everything a lent GPU is for, in one call that ends before a deadline: the CUDA extension's build
# and the GPU tests, then the benchmark suite with whatever time they left. Results go to $OUT (the device tool's output
# folder; benchmarks/results/ without it) and are written as they come: the environment and the
# tests' log first, then the benchmarks' JSON, summary and plots, also when time runs out.
#
#   OUT=/some/dir bash tools/gpu_session.sh [SECONDS]     # SECONDS: the whole call, default 540
#
# Run from the repository root; the project need not be installed (PYTHONPATH=. is set here).
set -uo pipefail

total=${1:-540}
start=$(date +%s)
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
elapsed() { echo $(($(date +%s) - start)); }

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "command: OUT=\$OUT bash tools/gpu_session.sh $total"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
} | tee "$out/environment.txt"

# The optional CUDA extension (csrc/), in place, where a CUDA toolchain exists: its tests skip without it.
if python3 -c "import sys; from torch.utils.cpp_extension import CUDA_HOME; sys.exit(CUDA_HOME is None)" 2>/dev/null; then
    PERK_BUILD_CUDA=1 MAX_JOBS=8 timeout 120 python3 setup.py build_ext --inplace > "$out/build-ext.log" 2>&1
    echo "build of perk_kernels._C: exit $? after $(elapsed) s" | tee -a "$out/build-ext.log"
else
    echo "no CUDA toolchain: perk_kernels._C not built, its tests skip" | tee "$out/build-ext.log"
fi

# The build and the tests end within 45% of the call; the Triton kernels the tests compile stay in
# Triton's cache for the benchmarks.
tests_left=$((total * 45 / 100 - $(elapsed)))
if ((tests_left > 0)); then
    timeout "$tests_left" python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
    echo "gpu tests: exit ${PIPESTATUS[0]} after $(elapsed) s" | tee -a "$out/gpu-tests.log"
else
    echo "gpu tests: no time left after the build ($(elapsed) s)" | tee "$out/gpu-tests.log"
fi

# No benchmark starts after the budget; one that started before it (the first size of a series is
# not predicted) is interrupted 30 s before the end of the call, and run.py still saves and reports
# every benchmark that finished.
left=$((total - $(elapsed)))
if ((left < 120)); then
    echo "no time left for the benchmarks ($(elapsed) s of $total s spent)"
    exit 1
fi
timeout -s INT -k 20 $((left - 30)) python3 -m benchmarks.run --budget $((left - 90)) --out-dir "$out" 2>&1 |
    tee "$out/benchmarks.log"
echo "benchmarks: exit ${PIPESTATUS[0]} after $(elapsed) s" | tee -a "$out/benchmarks.log"
