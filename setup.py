"""Optional CUDA extension (`perk_kernels._C`, meta-gradient accumulation from csrc/).

Built only when asked with PERK_BUILD_CUDA=1 (install with `pip install --no-build-isolation -e .`
so the build sees the installed torch); otherwise the install is pure Python and perk_kernels
falls back to its Triton/torch paths.

When asked for and impossible (torch not importable, a CPU-only torch, no CUDA toolchain) the
install stops with the reason: set PERK_BUILD_CUDA=0 to install without the extension. When the
toolchain's CUDA major version differs from the one torch was built with (torch refuses that
build), the install goes on without the extension and says so on stderr (`pip install -v`
shows it) and in the warning perk_kernels gives when the extension is missing.
"""

import os
import re
import subprocess
import sys

from setuptools import setup

SKIP_NOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perk_kernels", "_C_not_built.txt")


def _nvcc_version(cuda_home: str) -> str | None:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found[1]}.{found[2]}" if found else None


def _skip(reason: str) -> tuple[list, dict]:
    """Install without the extension, saying why where the user will see it."""
    message = f"perk: building without the CUDA extension perk_kernels._C: {reason}"
    print(message, file=sys.stderr)
    with open(SKIP_NOTE, "w") as f:
        f.write(reason + "\n")
    return [], {}


def cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("PERK_BUILD_CUDA") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        raise SystemExit(
            f"perk: PERK_BUILD_CUDA=1 but torch is not importable in the build environment ({e}): install torch "
            "first and use `pip install --no-build-isolation`, or set PERK_BUILD_CUDA=0"
        ) from e
    if torch.version.cuda is None:
        raise SystemExit(
            f"perk: PERK_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a CUDA build of "
            "torch, or set PERK_BUILD_CUDA=0"
        )
    if CUDA_HOME is None:
        raise SystemExit(
            "perk: PERK_BUILD_CUDA=1 but no CUDA toolchain was found (set CUDA_HOME to it), or set PERK_BUILD_CUDA=0"
        )
    nvcc = _nvcc_version(CUDA_HOME)
    if nvcc is not None and nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return _skip(
            f"nvcc in {CUDA_HOME} is CUDA {nvcc} but torch was built with CUDA {torch.version.cuda}; torch "
            "refuses to build extensions across CUDA major versions. meta_grad_accumulate uses its Triton "
            f"kernels instead. Point CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit to build it."
        )
    if os.path.exists(SKIP_NOTE):
        os.remove(SKIP_NOTE)
    extension = CUDAExtension(
        "perk_kernels._C",
        ["csrc/meta_grad.cpp", "csrc/meta_grad_kernel.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
