"""Optional CUDA extension (`perk_kernels._C`, meta-gradient accumulation from csrc/).

Built only when asked with PERK_BUILD_CUDA=1 and a CUDA build of torch plus a CUDA toolchain are
present (install with `pip install --no-build-isolation -e .` so the build sees that torch);
otherwise the install is pure Python and perk_kernels falls back to its Triton/torch paths.
"""

import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("PERK_BUILD_CUDA") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("PERK_BUILD_CUDA=1 but torch is not importable in the build environment: skipping "
              "the CUDA extension (use pip install --no-build-isolation)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("PERK_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolchain was found: skipping "
              "the CUDA extension")
        return [], {}
    extension = CUDAExtension(
        "perk_kernels._C",
        ["csrc/meta_grad.cpp", "csrc/meta_grad_kernel.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
