"""Build detr_fast and its extension detr_fast._C from csrc/.

The C++ sources (csrc/*.cpp) are always compiled. The CUDA sources (csrc/*.cu) are compiled too when torch is a
CUDA build and nvcc is found, unless DETR_FAST_CUDA=0. Without torch the package installs without the extension
and runs on its reference paths.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

CSRC = "csrc"


def _cuda_home():
    """The CUDA toolkit root, or None. torch's own guess (dirname of dirname of `which nvcc`) is wrong when nvcc on
    PATH is a wrapper script such as /usr/local/bin/nvcc, so look for the folder that really holds the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _extension_modules():
    """([extension], cmdclass) for detr_fast._C, or ([], {}) when there is nothing to build."""
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
    except ImportError:
        print("detr_fast: torch is not importable, so detr_fast._C is not built (install with --no-build-isolation)")
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    build_cuda = False
    if cuda_sources and os.environ.get("DETR_FAST_CUDA", "1") != "0":
        cuda_home = _cuda_home()
        if cuda_home is not None and torch.version.cuda is not None:
            # cpp_extension reads CUDA_HOME when it is imported, so set it first.
            os.environ["CUDA_HOME"] = cuda_home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                # No GPU to ask for its architecture: build for A100 and H100.
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            build_cuda = True
        else:
            print(
                f"detr_fast: building the CPU extension only (CUDA toolkit: {cuda_home}, torch CUDA: "
                f"{torch.version.cuda})"
            )
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch's build helpers add the standard its headers need (C++17 up to torch 2.x, C++20 since).
    # -fno-trapping-math lets the compiler vectorize loops with selects around divisions (csrc/match_cost_cpu.cpp);
    # it changes no result (no fast-math: NaN, inf and rounding stay IEEE).
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs on one thread. The
        # extension needs libgomp.so.1, which resolves to torch's own runtime when torch ships it under that name
        # (the pinned wheel does) and is loaded first (detr_fast imports torch before the extension).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.abspath(CSRC)]
    if build_cuda:
        extension = CUDAExtension(
            "detr_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("DETR_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "detr_fast._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_modules()

setup(
    packages=find_packages(include=["detr_fast", "detr_fast.*"]) + ["detr_fast.kernels"],
    package_dir={"detr_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
