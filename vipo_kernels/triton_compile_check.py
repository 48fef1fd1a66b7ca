"""Compiles every Triton kernel to a CUDA binary (PTX, then cubin through the ptxas that
ships with Triton) for the given architectures, without a GPU.

    python -m vipo_kernels.triton_compile_check [--arch 80 90]

The Triton interpreter, which runs the CPU test suite, accepts code the real compiler
rejects (a plain Python global inside a kernel, for one), so this is the check that the
kernels the GPU will run are valid Triton for this version. Must run with
TRITON_INTERPRET unset: under the interpreter ``triton.jit`` returns interpreted functions.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget

from . import triton_backend as tb

BLOCK = {"BLOCK_C": 16, "BLOCK_P": 128}  # the GPU tile of _block_sizes for C = 16
INT64_ARGS = ("stride_",)


def _signature(kernel, constexprs: dict, latent_dtype: str) -> dict:
    """Triton types for every argument: latents in ``latent_dtype``, per-sample and
    per-position buffers fp32, strides int64, sizes int32, the gradient scale fp32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("v_ptr", "z_ptr", "x_ptr", "r_ptr", "next_ptr", "grad_ptr"):
            signature[name] = f"*{latent_dtype}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name.startswith(INT64_ARGS):
            signature[name] = "i64"
        elif name == "grad_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def variants():
    """(kernel, constexprs) pairs covering every constexpr branch of every kernel."""
    for sample_noise in (True, False):
        yield tb._gaussian_step_kernel, {"SAMPLE_NOISE": sample_noise, **BLOCK}
    for has_map, has_ref, write_grad in itertools.product((True, False), repeat=3):
        yield tb._vipo_loss_position_kernel, {
            "CLIP_RANGE": 1e-4, "ADV_CLIP": 5.0, "KL_COEF": 0.1, "HAS_MAP": has_map,
            "HAS_REF": has_ref, "WRITE_GRAD": write_grad, **BLOCK}
    for has_ref, write_grad in itertools.product((True, False), repeat=2):
        yield tb._vipo_grad_sample_kernel, {"KL_COEF": 0.1, "HAS_REF": has_ref,
                                            "WRITE_GRAD": write_grad, **BLOCK}
    yield tb._scale_grad_kernel, {"BLOCK": 4096}


def compile_all(archs=(80, 90), dtypes=("fp32", "bf16"), log=print) -> int:
    """Compiles every variant for every arch and latent dtype; returns the count."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    count = 0
    for (kernel, constexprs), arch, dtype in itertools.product(list(variants()), archs, dtypes):
        start = time.perf_counter()
        source = triton.compiler.ASTSource(fn=kernel, constexprs=constexprs,
                                           signature=_signature(kernel, constexprs, dtype))
        binary = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        assert binary.asm.get("cubin"), f"no cubin for {kernel.__name__}"
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
        log(f"ok  sm_{arch} {dtype:5s} {kernel.__name__}({flags}) "
            f"{time.perf_counter() - start:.1f} s")
        count += 1
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities, e.g. 80 (A100) 90 (H100/H200)")
    args = parser.parse_args(argv)
    count = compile_all(tuple(args.arch))
    print(f"{count} Triton kernel variants compiled for sm_{', sm_'.join(map(str, args.arch))} "
          f"(triton {triton.__version__})")


if __name__ == "__main__":
    sys.exit(main())
