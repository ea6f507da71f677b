"""The packages import on a CPU-only machine with no C++ toolchain, in a fresh interpreter."""

import subprocess
import sys


def test_packages_import_without_gpu_or_compiler():
    code = "import perk, perk_kernels; print(perk_kernels.lora_inner_step.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lora_inner_step"
