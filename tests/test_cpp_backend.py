"""The C++ (OpenMP) backend: what the shared parity suite (test_kernels.py) does not reach.

test_kernels.py already runs ``backend="cpp"`` through every regime at shapes whose
positions fit one task per sample. Here the tasks are forced small, so partial sums,
minima and maxima are reduced across many blocks with a ragged tail; and the checks
specific to the compiled ops: mixed input dtypes, thread-count independence, outputs
handed in poisoned, in-place gradients in 16-bit, the ops' own argument errors,
torch.compile and opcheck, and the error of an unbuilt backend.
"""

from __future__ import annotations

import sys

import pytest
import torch

from vipo_kernels import backends, log_prob, sde_step, vipo_loss
from vipo_kernels.reference import log_prob_reference, sde_step_reference

from .test_kernels import VIDEO, _step_inputs, check_loss_case, run_loss
from vipo_kernels.partials import N_COLUMNS, N_STATS

from .utils import assert_matches, make_loss_case, oracle, rel_err

pytestmark = pytest.mark.skipif(not backends.available("cpp"),
                                reason="the C++ extension is not built")
IMAGE = (3, 5, 7, 9)


@pytest.fixture
def cpp():
    from vipo_kernels import compiled_backend

    return compiled_backend.load("cpu")


@pytest.fixture
def small_blocks(monkeypatch, cpp):
    """Tasks of 16 positions (5 for P < 16): many blocks per sample, a ragged last one."""
    monkeypatch.setattr(cpp, "block_positions", lambda B, C, P, device=None: 16 if P >= 16 else 5)


def _bcp(x):
    return x.reshape(x.shape[0], x.shape[1], -1)


# ------------------------------------------------------------------ parity, many blocks


@pytest.mark.parametrize("shape", [IMAGE, VIDEO, (5, 3, 1, 13), (2, 37, 3, 11)],
                         ids=["image", "video", "odd", "many-channels"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("with_map,kl_coef", [(True, 0.0), (False, 0.0), (True, 0.5),
                                              (False, 0.5)],
                         ids=["map", "nomap", "map-kl", "nomap-kl"])
@pytest.mark.parametrize("rewards", [None, 3], ids=["1-reward", "3-rewards"])
def test_loss_fp32_many_blocks(small_blocks, shape, ratio_level, with_map, kl_coef, rewards):
    """Clip regimes below/inside/above, both advantage signs (one beyond adv_clip) and a
    map with zeros come from make_loss_case; fp32 relative error under 1e-5."""
    case = make_loss_case(shape, ratio_level=ratio_level, with_map=with_map, kl_coef=kl_coef,
                          rewards=rewards)
    stats = check_loss_case(case, "cpp", torch.float32)
    if ratio_level == "position" and shape == IMAGE:
        assert 0 < stats["clip_frac_low"] < 1 and 0 < stats["clip_frac_high"] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("layout", [None, "batch"], ids=["contiguous", "noncontiguous"])
def test_loss_low_precision_many_blocks(small_blocks, dtype, ratio_level, layout):
    """FlashAttention's criterion against the same-dtype torch reference (tests/utils.py)."""
    case = make_loss_case(VIDEO, dtype, ratio_level=ratio_level, kl_coef=0.5,
                          noncontiguous=layout)
    check_loss_case(case, "cpp", dtype)


@pytest.mark.parametrize("layout", ["batch", "position"])
def test_loss_noncontiguous_many_blocks(small_blocks, layout):
    case = make_loss_case(VIDEO, kl_coef=0.5, noncontiguous=layout)
    check_loss_case(case, "cpp", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_step_and_log_prob_many_blocks(small_blocks, dtype):
    (v, z, noise), coefs = _step_inputs(VIDEO, dtype, noncontiguous=True)
    nxt, logp = sde_step(v, z, noise, **coefs, backend="cpp")
    same_next, _ = sde_step(v, z, noise, **coefs, backend="torch")
    c64 = {k: c.double() for k, c in coefs.items()}
    ref_next, _ = sde_step_reference(v.double(), z.double(), noise.double(), **c64)
    assert_matches("next_sample", nxt, same_next, ref_next, dtype)
    # The log-prob is of the value as stored, so compare on the kernel's own next sample.
    ref_logp = log_prob_reference(v.double(), z.double(), nxt.double(), **c64)
    assert rel_err(logp, ref_logp) < 1e-5
    for level in ("position", "sample"):
        got = log_prob(v, z, nxt, **coefs, ratio_level=level, backend="cpp")
        ref = log_prob_reference(v.double(), z.double(), nxt.double(), ratio_level=level, **c64)
        assert rel_err(got, ref) < 1e-5


def test_step_rounds_like_torch():
    """The stored next sample is the fp32 value rounded to nearest even, as torch's .to()
    rounds: equal to the same-dtype reference bit for bit (same fp32 operation order)."""
    for dtype in (torch.bfloat16, torch.float16):
        (v, z, noise), coefs = _step_inputs((4, 16, 8, 40), dtype)
        nxt, _ = sde_step(v, z, noise, **coefs, backend="cpp")
        same_next, _ = sde_step(v, z, noise, **coefs, backend="torch")
        assert torch.equal(nxt, same_next)


# ------------------------------------------------------------------ mixed dtypes, outputs


def test_loss_mixed_input_dtypes(small_blocks):
    """Each latent may have its own dtype (bf16 model output, fp32 rollout latents, fp16
    reference): the kernel converts each on load, and the gradient comes back in v's."""
    case = make_loss_case(IMAGE, kl_coef=0.5)
    case.model_output = case.model_output.to(torch.bfloat16)
    case.kwargs["ref_model_output"] = case.kwargs["ref_model_output"].to(torch.float16)
    check_loss_case(case, "cpp", torch.bfloat16)


def test_outputs_poisoned_by_caller(cpp):
    """Outputs handed in full of NaN come back fully written, whatever the tail."""
    case = make_loss_case((3, 5, 7, 9), kl_coef=0.5)
    v, z, x = (_bcp(t) for t in case.args()[:3])
    ref = _bcp(case.kwargs["ref_model_output"])
    B, C, P = v.shape
    cs, co, sd = (case.kwargs[k] for k in ("coef_sample", "coef_output", "std"))
    old, amap = case.old_log_prob.reshape(B, P), case.allocation_map.reshape(B, P).float()
    adv = case.advantages.float().reshape(B, 1)
    bp = cpp.block_positions(B, C, P)
    k = -(-P // bp)
    nan = float("nan")
    grad, partials = torch.full_like(v, nan), torch.full((B, k, N_COLUMNS), nan)
    _, stats = cpp.loss_position(v, z, x, old, adv, torch.ones(1), amap, cs, co, sd, ref, grad,
                              clip_range=1e-2, adv_clip=5.0, kl_coef=0.5, partials_out=partials)
    assert torch.isfinite(grad).all() and torch.isfinite(partials).all()
    assert torch.isfinite(stats).all()
    kl = torch.full((B, k), nan)
    cpp.grad_sample(v, z, x, adv[:, 0], cs, co, sd, ref, grad.fill_(nan), kl_coef=0.5,
                    kl_out=kl)
    assert torch.isfinite(grad).all() and torch.isfinite(kl).all()
    nxt, logp = torch.full_like(z, nan), torch.full((B, P), nan)
    cpp.step(v, z, x, cs, co, sd, next_out=nxt, logp_out=logp)
    assert torch.isfinite(nxt).all() and torch.isfinite(logp).all()
    cpp.log_prob(v, z, x, cs, co, sd, logp_out=logp.fill_(nan))
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_inplace_backward_settings(small_blocks, dtype, ratio_level, inplace):
    """Both settings give the same gradient; in place, it lands in model_output's memory
    (each element of v is read before the same task overwrites it)."""
    case = make_loss_case(IMAGE, dtype, ratio_level=ratio_level, kl_coef=0.5)
    _, _, expected = run_loss(case, "cpp", torch.tensor(1.0))
    leaf = case.model_output.detach().clone().requires_grad_(True)
    v = leaf * 1.0
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend="cpp",
                        inplace_backward=inplace)
    loss.backward()
    assert torch.equal(leaf.grad, expected)
    assert torch.equal(v.detach(), expected) == inplace


# ------------------------------------------------------------------ threads


def test_result_independent_of_thread_count(cpp):
    """Each block is summed by one thread in a fixed order and the blocks are reduced
    in functional.py, so 1 and 2 threads agree exactly (not only to fp32 rounding)."""
    case = make_loss_case((4, 16, 24, 40), kl_coef=0.5)  # 4 x 3 tasks of 256 + tail
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss, stats, grad = run_loss(case, "cpp", torch.tensor(1.5))
            torch.manual_seed(1)
            (v, z, noise), coefs = _step_inputs((4, 16, 24, 40), torch.bfloat16)
            nxt, logp = sde_step(v, z, noise, **coefs, backend="cpp")
            results.append((loss, torch.cat([s.reshape(-1) for s in stats.values()]), grad, nxt, logp))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


# ------------------------------------------------------------------ the ops themselves


def _op_args(cpp):
    case = make_loss_case((2, 3, 4, 5), kl_coef=0.5)
    v, z, x = (_bcp(t) for t in case.args()[:3])
    B, C, P = v.shape
    args = dict(v=v, z=z, x=x, old=case.old_log_prob.reshape(B, P),
                adv=case.advantages.float().reshape(B, 1), weights=torch.ones(1),
                amap=case.allocation_map.reshape(B, P).float(),
                cs=case.kwargs["coef_sample"], co=case.kwargs["coef_output"],
                std=case.kwargs["std"], ref=_bcp(case.kwargs["ref_model_output"]),
                grad=torch.empty_like(v))
    return args


BAD_OP_ARGS = {
    "int v": (TypeError, "v must be float32, bfloat16 or float16",
              lambda a: a.update(v=a["v"].long())),
    "float64 z": (TypeError, "z must be float32, bfloat16 or float16",
                  lambda a: a.update(z=a["z"].double())),
    "x shape": (ValueError, "x has shape", lambda a: a.update(x=a["x"][:, :2])),
    "ref strided positions": (ValueError, "ref must have stride 1 along positions",
                              lambda a: a.update(ref=a["ref"].repeat_interleave(2, 2)[..., ::2])),
    "old shape": (ValueError, "old must have shape", lambda a: a.update(old=a["old"][:, :3])),
    "amap dtype": (ValueError, "amap must be a contiguous float32",
                   lambda a: a.update(amap=a["amap"].double())),
    "adv shape": (ValueError, "adv must have shape", lambda a: a.update(adv=a["adv"][:1])),
    "adv rank": (ValueError, "adv must have shape", lambda a: a.update(adv=a["adv"][:, 0])),
    "weights shape": (ValueError, "weights must have shape",
                      lambda a: a.update(weights=torch.ones(2))),
    "std dtype": (ValueError, "std must be a contiguous float32",
                  lambda a: a.update(std=a["std"].double())),
    "grad dtype": (ValueError, "grad must have v's dtype",
                   lambda a: a.update(grad=a["grad"].half())),
    "grad noncontiguous": (ValueError, "grad must be a contiguous",
                           lambda a: a.update(grad=a["grad"].transpose(0, 1).contiguous()
                                              .transpose(0, 1))),
}


@pytest.mark.parametrize("name", list(BAD_OP_ARGS))
def test_op_argument_errors(cpp, name):
    """Called directly (bypassing the public API's checks), the ops still refuse bad
    arguments with an error that names the tensor."""
    error, message, change = BAD_OP_ARGS[name]
    args = _op_args(cpp)
    change(args)
    with pytest.raises(error, match=message):
        cpp.loss_position(**args, clip_range=1e-2, adv_clip=5.0, kl_coef=0.5)


def test_op_output_errors(cpp):
    a = _op_args(cpp)
    B, C, P = a["v"].shape
    with pytest.raises(ValueError, match="partials_out must be a contiguous float32 tensor"):
        cpp.loss_position(**a, clip_range=1e-2, adv_clip=5.0, kl_coef=0.5,
                          partials_out=torch.empty(B, 99, N_COLUMNS))
    with pytest.raises(ValueError, match="kl_out must have shape"):
        cpp.grad_sample(a["v"], a["z"], a["x"], a["std"], a["cs"], a["co"], a["std"], a["ref"],
                        None, kl_coef=0.5, kl_out=torch.empty(B, 99))
    partials = torch.zeros(B, 1, N_COLUMNS)
    with pytest.raises(ValueError, match="stats_out must be a contiguous float32 tensor"):
        torch.ops.vipo.reduce_partials(partials, a["adv"], a["weights"], a["std"],
                                       torch.empty(3), P, 5.0, 0.5)
    with pytest.raises(ValueError, match="dloss must hold one float32 value"):
        torch.ops.vipo.scale_grad(a["grad"], torch.ones(2))
    with pytest.raises(ValueError, match="next_out must have z's dtype"):
        cpp.step(a["v"], a["z"], a["x"], a["cs"], a["co"], a["std"],
                 next_out=torch.empty_like(a["z"], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="logp_out must have shape"):
        cpp.log_prob(a["v"], a["z"], a["x"], a["cs"], a["co"], a["std"],
                     logp_out=torch.empty(B, P + 1))
    with pytest.raises(ValueError, match="block_p must be >= 1"):
        torch.ops.vipo.log_prob(a["v"], a["z"], a["x"], a["cs"], a["co"], a["std"],
                                torch.empty(B, P), 0)


def test_ops_opcheck(cpp):
    """Schemas, Meta kernels (fake tensors) and AOT dispatch agree with the CPU kernels."""
    a = _op_args(cpp)
    B, C, P = a["v"].shape
    bp = cpp.block_positions(B, C, P)
    k = -(-P // bp)
    partials = torch.empty(B, k, N_COLUMNS)
    torch.library.opcheck(torch.ops.vipo.loss_position.default, (
        a["v"], a["z"], a["x"], a["old"], a["adv"], a["weights"], a["amap"], a["cs"], a["co"],
        a["std"], a["ref"], a["grad"], partials, 1e-2, 5.0, 0.5, bp))
    torch.library.opcheck(torch.ops.vipo.reduce_partials.default, (
        torch.zeros_like(partials), a["adv"], a["weights"], a["std"], torch.empty(N_STATS + 1), P, 5.0, 0.5))
    torch.library.opcheck(torch.ops.vipo.grad_sample.default, (
        a["v"], a["z"], a["x"], a["std"], a["cs"], a["co"], a["std"], None, a["grad"],
        torch.empty(B, k), 0.5, bp))
    torch.library.opcheck(torch.ops.vipo.scale_grad.default, (a["grad"], torch.tensor(2.0)))
    torch.library.opcheck(torch.ops.vipo.step.default, (
        a["v"], a["z"], a["x"], a["cs"], a["co"], a["std"], torch.empty_like(a["z"]),
        torch.empty(B, P), bp))
    torch.library.opcheck(torch.ops.vipo.log_prob.default, (
        a["v"], a["z"], a["x"], a["cs"], a["co"], a["std"], torch.empty(B, P), bp))


def test_primitive_under_torch_compile_fullgraph(cpp):
    """torch.compile traces the op itself (through its Meta kernel), no graph break."""
    a = _op_args(cpp)

    def fused(v, z, x, old, adv, weights, amap, cs, co, std):
        loss, _ = cpp.loss_position(v, z, x, old, adv, weights, amap, cs, co, std, None, None,
                                    clip_range=1e-2, adv_clip=5.0, kl_coef=0.0)
        return loss * 2.0

    inputs = [a[k] for k in ("v", "z", "x", "old", "adv", "weights", "amap", "cs", "co", "std")]
    compiled = torch.compile(fused, fullgraph=True)(*inputs)
    assert rel_err(compiled, fused(*inputs)) < 1e-6


# ------------------------------------------------------------------ dispatch


def test_auto_picks_cpp_on_cpu(cpp):
    assert backends.resolve("auto", torch.device("cpu")) is cpp
    case = make_loss_case(IMAGE)
    loss_auto, _, grad_auto = run_loss(case, "auto", torch.tensor(1.0))
    loss_cpp, _, grad_cpp = run_loss(case, "cpp", torch.tensor(1.0))
    assert torch.equal(loss_auto, loss_cpp) and torch.equal(grad_auto, grad_cpp)
    ref_loss, _, _ = oracle(case)
    assert rel_err(loss_auto, ref_loss) < 1e-5


def test_unbuilt_backend_says_how_to_build(monkeypatch):
    """An extension that fails to import (None in sys.modules makes the import raise,
    as a missing .so does) turns into an error that says how to build it."""
    monkeypatch.setitem(sys.modules, "vipo_kernels.compiled_backend", None)
    monkeypatch.setattr(backends, "_resolved", {})  # an empty cache, restored afterwards
    assert not backends.available("cpp")
    assert backends.resolve("auto", torch.device("cpu")) is None  # falls back to torch
    case = make_loss_case((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"backend='cpp' is unavailable.*"
                                           r"pip install --no-build-isolation -e \."):
        vipo_loss(*case.args(), **case.kwargs, backend="cpp")


def test_cuda_backend_absent_without_cuda_kernels():
    """This build has no CUDA kernels (CPU torch): backend='cuda' is unavailable and
    says what it needs."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("vipo::step", "CUDA"):
        pytest.skip("this build has the CUDA kernels")
    assert not backends.available("cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable.*nvcc"):
        backends._import("cuda")
