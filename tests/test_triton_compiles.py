"""The Triton kernels compile for real GPUs (sm_80, sm_90) with this Triton, on a machine
without one. The rest of the suite runs them under the interpreter, which accepts code the
compiler rejects, so this runs ``vipo_kernels.triton_compile_check`` in a subprocess with
TRITON_INTERPRET unset."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "vipo_kernels.triton_compile_check",
                             "--arch", "80", "90"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "60 Triton kernel variants compiled" in result.stdout, result.stdout[-2000:]
