"""Test-wide setup. TRITON_INTERPRET must be set before triton is imported, because
``triton.jit`` reads it at decoration; VIPO_POISON makes every kernel output start as NaN."""

import os

os.environ.setdefault("VIPO_POISON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("VIPO_TEST_CUDA") != "1":
    # Decided without importing torch.cuda at collection (cheap, and no CUDA context in
    # workers that never use it): gpu_check.sh sets
    # VIPO_TEST_CUDA=1 on a CUDA machine so Triton compiles for the device instead.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """One tiny SD3 pipeline and DINOv2 backbone on disk, shared by the trainer-level tests
    that run `python -m vipo.train` (in process or as subprocesses)."""
    from vipo import tiny

    root = tmp_path_factory.mktemp("tiny_world")
    return {"sd3": tiny.build_sd3(root / "sd3"), "dinov2": tiny.build_dinov2(root / "dinov2")}


@pytest.fixture
def fresh_accelerate():
    """In-process trainer runs: accelerate's singletons reset, the thread count restored (the
    tiny preset sets 1 through run.cpu_threads)."""
    from .run_helpers import reset_accelerate

    reset_accelerate()
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    reset_accelerate()
