"""Builds the ``vipo`` package and, from csrc/, the compiled extension ``vipo_kernels._C``.

The C++ (CPU, OpenMP) part is always built, through torch.utils.cpp_extension with ninja.
The CUDA part is added only where torch has CUDA and nvcc is found (cpp_extension.CUDA_HOME;
a CPU-only torch reports None there whatever the environment says). If the compiled build
fails, the failure is printed in a banner and the pure-Python package still installs: the
``torch`` and ``triton`` backends keep working, and ``backend="cpp"`` raises an error that
says how to build it.

Environment knobs (after FlashAttention's setup.py):
  VIPO_SKIP_EXT=1       build no compiled extension at all
  VIPO_SKIP_CUDA=1      build the C++ part only, even where CUDA is available
  VIPO_REQUIRE_EXT=1    make a failed or skipped compiled build an error instead of a
                        warning (benchmarks/gpu_check.sh sets it: a check must not pass on a
                        build that silently did not happen)
  VIPO_REQUIRE_CUDA=1   also make it an error that the CUDA part cannot be built (torch
                        without CUDA, or no nvcc); implies VIPO_REQUIRE_EXT=1
  MAX_JOBS=N            parallel compile jobs (read by cpp_extension)
  TORCH_CUDA_ARCH_LIST  CUDA architectures, default "8.0;9.0" (A100, H100/H200)
Always install with ``--no-build-isolation`` (see docs/environment.md): an isolated
build resolves its own torch, possibly a multi-GB CUDA wheel.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# No -std: cpp_extension picks the standard its torch headers need (C++20 for torch 2.13).
# -fno-math-errno, -fno-trapping-math: let GCC if-convert and vectorise the row loops (no
# code here reads errno or FP exception flags); IEEE results are unchanged.
# -ffp-contract=off: no fused multiply-adds, so the step rounds bit for bit like torch's
# separate multiply and add (csrc/cpu/step_cpu.cpp), on every target.
# -march=native (VIPO_MARCH overrides it, e.g. x86-64-v3 for a binary that moves between
# machines): the extension is built where it runs; AVX-512 made the fused loss kernel 1.2-1.5x
# faster than baseline SSE2 on the development machine (2 threads, quiet).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
             "-march=" + os.environ.get("VIPO_MARCH", "native")]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _banner(lines):
    bar = "=" * 78
    print("\n".join([bar, *("vipo: " + line for line in lines), bar]), file=sys.stderr)


REQUIRE_CUDA = os.environ.get("VIPO_REQUIRE_CUDA") == "1"
REQUIRE_EXT = REQUIRE_CUDA or os.environ.get("VIPO_REQUIRE_EXT") == "1"


def _required(reason: str):
    """Stops the build where VIPO_REQUIRE_EXT / VIPO_REQUIRE_CUDA ask for what cannot be
    built; otherwise the caller warns and carries on without it."""
    if REQUIRE_EXT:
        sys.exit(f"vipo: {reason} (VIPO_REQUIRE_EXT=1 or VIPO_REQUIRE_CUDA=1 makes this fatal)")


def _extensions():
    """The extension list and the BuildExtension subclass, or ([], {}) if none is built."""
    if os.environ.get("VIPO_SKIP_EXT") == "1":
        _required("VIPO_SKIP_EXT=1 asks for no compiled extension")
        _banner(["VIPO_SKIP_EXT=1: building no compiled extension (backend='cpp' and 'cuda' "
                 "will be unavailable)"])
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        _required(f"torch is not importable ({err}), so no compiled extension can be built")
        _banner([f"torch is not importable ({err}); building no compiled extension.",
                 "Install torch first, then: pip install --no-build-isolation -e ."])
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + ["csrc/ops_cuda.cpp"]
    sources = [s for s in sources if s not in cuda_sources]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("VIPO_SKIP_CUDA") != "1")
    if REQUIRE_CUDA and not with_cuda:
        _required(f"VIPO_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: torch "
                  f"{torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME (nvcc) "
                  f"{cpp_extension.CUDA_HOME}, VIPO_SKIP_CUDA={os.environ.get('VIPO_SKIP_CUDA')}")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "vipo_kernels._C", sources + cuda_sources,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DVIPO_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "vipo_kernels._C", sources, extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"])
    _banner([f"building vipo_kernels._C: C++ (OpenMP){' + CUDA' if with_cuda else ''}"
             f"{'' if with_cuda else ' (no CUDA: torch ' + torch.__version__ + ', CUDA_HOME ' + str(cpp_extension.CUDA_HOME) + ')'}"])

    class BuildExtensionOrWarn(cpp_extension.BuildExtension):
        """cpp_extension's builder, but a failure leaves a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure
                if REQUIRE_EXT:
                    raise
                _banner(["BUILDING THE COMPILED EXTENSION FAILED; installing without it.",
                         f"  {type(err).__name__}: {err}",
                         "The torch and triton backends work; backend='cpp'/'cuda' will raise.",
                         "Scroll up for the compiler output; set VIPO_REQUIRE_EXT=1 to fail here."])

    return [ext], {"build_ext": BuildExtensionOrWarn.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
