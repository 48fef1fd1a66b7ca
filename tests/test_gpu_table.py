"""benchmarks/gpu_table.py: the same code that makes the GPU table runs here on the CPU,
at tiny size (every implementation, Triton under its interpreter) and at the Flux and Wan
sizes (the C++ backend), so the script cannot rot unnoticed and its check against the
float64 oracle is known to hold at the real sizes before a device is lent."""

import json

import pytest
import torch

from benchmarks import gpu_table
from benchmarks.inputs import OFFSETS, loss_inputs, loss_oracle
from benchmarks.shapes import SHAPES
from vipo_kernels import backends

needs_cpp = pytest.mark.skipif(not backends.available("cpp"), reason="C++ extension not built")


def _rows(path):
    return json.loads(path.read_text())["rows"]


def test_smoke_table(tmp_path):
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    assert gpu_table.main(["--smoke", "--md", str(md), "--json", str(js)]) == 0
    rows = _rows(js)
    assert rows and not [r for r in rows if "error" in r]
    impls = {r["impl"] for r in rows}
    assert {"torch-eager", "torch-compile", "triton", "triton-kernel"} <= impls
    for row in rows:
        assert row["wall_ms"] > 0 and row["gbps"] > 0, row
    assert "copy bandwidth" in md.read_text()
    assert md.read_text().count("| loss fwd+bwd |") == len([r for r in rows
                                                              if r["op"] == "loss fwd+bwd"])


@needs_cpp
def test_real_sizes_on_the_cpu(tmp_path):
    """The table at the Flux and Wan sizes in fp32 and bf16: every implementation agrees
    with the float64 oracle (the old inputs put ratios within rounding of the clip edges,
    and the check aborted the table on its first row)."""
    js = tmp_path / "table.json"
    code = gpu_table.main(["--device", "cpu", "--backends", "cpp", "--dtypes", "fp32,bf16",
                           "--no-compile", "--calls", "1", "--json", str(js)])
    rows = _rows(js)
    assert code == 0, [r for r in rows if "error" in r]
    assert {r["shape"].split()[0] for r in rows} == set(SHAPES)
    assert {r["impl"] for r in rows} == {"torch-eager", "cpp", "cpp-kernel"}
    fused = [r for r in rows if r["impl"] == "cpp" and r["op"] == "loss fwd+bwd"]
    assert len(fused) == 4 and all(r["peak_latents"] < 1.1 for r in fused)


def test_inputs_span_the_clip_regimes_away_from_its_edges():
    """Every position's float64 log-ratio is one of the OFFSETS x eps, up to the fp32
    storage of the old log-prob, so each sits at least eps/2 from a clip edge."""
    eps = 1e-4
    args, kwargs = loss_inputs((3, 16, 8, 8), torch.bfloat16, clip_range=eps)
    v, z, x, old, *_ = args
    from vipo_kernels.reference import log_prob_reference

    coefs = {k: kwargs[k].double() for k in ("coef_sample", "coef_output", "std")}
    log_ratio = log_prob_reference(v.double(), z.double(), x.double(), **coefs) - old.double()
    nearest = torch.stack([(log_ratio - o * eps).abs() for o in OFFSETS]).min(dim=0).values
    assert float(nearest.max()) < 1e-5  # fp32 rounding of |log p| ~ 30 is a few 1e-6
    _, _, stats = loss_oracle(args, kwargs)
    assert 0 < float(stats["clip_frac_low"]) < 0.5 and 0 < float(stats["clip_frac_high"]) < 0.5


def test_a_wrong_implementation_is_a_failed_row_not_a_lost_table(tmp_path, monkeypatch):
    """An implementation off by 1% is caught by the oracle check; its row is recorded as
    failed, the other rows are still measured and written, and the exit status is 1."""
    real = gpu_table.loss_impls

    def with_a_wrong_one(kernels, compile_):
        impls = real(kernels, compile_)
        eager = impls["torch-eager"]
        impls["off-by-1%"] = lambda *a, **k: eager(*a, **k) * 1.01
        return impls

    monkeypatch.setattr(gpu_table, "loss_impls", with_a_wrong_one)
    js, md = tmp_path / "table.json", tmp_path / "table.md"
    assert gpu_table.main(["--smoke", "--no-compile", "--backends", "triton", "--json", str(js),
                           "--md", str(md)]) == 1
    rows = _rows(js)
    failed = [r for r in rows if "error" in r]
    assert {r["impl"] for r in failed} == {"off-by-1%"} and len(failed) == 2
    assert "disagrees with the float64 oracle" in failed[0]["error"]
    assert len(rows) - len(failed) == 2 * 5  # per shape: 3 loss rows + 2 step rows
    assert "FAILED: AssertionError" in md.read_text()
