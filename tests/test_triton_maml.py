"""The `triton` backend against the reference backend, and its ops, limits and refusals.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`, set by
conftest.py before fastmaml's Triton module defines them); with a GPU they run compiled on CUDA tensors.
The interpreter takes about 10 ms a program, so problems are 2 or 3 tasks. float32 results are compared
with the float64 reference on the same rounded inputs to 1e-4 (relative to each tensor's largest entry),
float64 ones to 1e-9. `tests/test_backends.py` runs the shared option grid on every backend; this file
covers what is specific to these kernels: padded sizes (widths and point counts past one 16-block), every
depth, several tasks per program, the custom ops themselves, and the reasons for refusing a call.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fastmaml
from _reference_loop import normal_params, random_data

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F64 = torch.float32, torch.float64
RTOL = {F32: 1e-4, F64: 1e-9}


def _backend():
    from fastmaml.backends import triton_maml

    return triton_maml


def _require_runnable():
    """Skip with the backend's reason when this machine cannot run the kernels at all."""
    tm = _backend()
    why = tm.TritonBackend().unavailable()
    if why is None and DEVICE == "cpu":
        why = None if os.environ.get("TRITON_INTERPRET") == "1" else "TRITON_INTERPRET is not 1 and no GPU"
        why = why or tm.interpreter_problem()
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")


def make_problem(dims, tasks, n_support, n_query, loss, seed):
    """Random float64 problem (never zeros): params, x_support, y_support, x_query, y_query."""
    g = torch.Generator().manual_seed(seed)
    params = normal_params(dims, F64, g)
    return (params, *random_data(dims, tasks, n_support, n_query, loss, F64, g))


def make_rates(form, dims, K, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    if form == "float":
        return 0.1
    if form == "per_step":
        return 0.05 + 0.1 * torch.rand(K, generator=g, dtype=F64)
    shapes = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        shapes += [(K, d_out, d_in), (K, d_out)]
    return [0.02 + 0.1 * torch.rand(s, generator=g, dtype=F64) for s in shapes]


def _to(value, dtype, device, grad):
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        return [_to(v, dtype, device, grad) for v in value]
    out = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype).detach()
    return out.requires_grad_(grad and out.is_floating_point())


def assert_close(got, want, rtol, what):
    got = got.detach().to("cpu", F64)
    want = want.detach().to("cpu", F64)
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * max(scale, 1e-12), (
        f"{what}: max abs error {err:.3e} > {rtol:.0e} x max |reference| {scale:.3e}"
    )


def run_both(dims, *, tasks=2, n_support=5, n_query=6, K=1, lr="float", loss="mse", activation="relu",
             first_order=False, query_loss_weights=False, dtype=F32, seed=0):
    """maml on triton (in `dtype`) and reference (float64 on the same rounded inputs); compare the
    outputs and the gradients of params, rate tensors, x_support and x_query."""
    _require_runnable()
    params, xs, ys, xq, yq = make_problem(dims, tasks, n_support, n_query, loss, seed)
    rates = make_rates(lr, dims, K, seed)
    qlw = None
    if query_loss_weights:
        qlw = torch.linspace(0.3, 1.0, K + 1, dtype=F64)
    # Round the inputs to `dtype` first so both backends see the same numbers.
    params, xs, xq = [p.to(dtype).to(F64) for p in params], xs.to(dtype).to(F64), xq.to(dtype).to(F64)
    ys = ys.to(dtype).to(F64) if loss == "mse" else ys
    yq = yq.to(dtype).to(F64) if loss == "mse" else yq
    rates = rates if isinstance(rates, float) else _to(rates, dtype, "cpu", False)
    rates = rates if isinstance(rates, float) else _to(rates, F64, "cpu", False)
    g = torch.Generator().manual_seed(seed + 7)
    cot_preds = torch.randn(tasks, n_query, dims[-1], generator=g, dtype=F64)
    cot_losses = 1.0 + torch.rand(tasks, generator=g, dtype=F64)

    results = {}
    for backend, dt, device in (("reference", F64, "cpu"), ("triton", dtype, DEVICE)):
        leaves = {
            "params": _to(params, dt, device, True),
            "x_support": _to(xs, dt, device, True),
            "x_query": _to(xq, dt, device, True),
        }
        r = _to(rates, dt, device, lr != "float")
        out = fastmaml.maml(
            leaves["params"], leaves["x_support"], _to(ys, dt, device, False), leaves["x_query"],
            _to(yq, dt, device, False), inner_steps=K, inner_lr=r, loss=loss, activation=activation,
            first_order=first_order, backend=backend,
            query_loss_weights=None if qlw is None else qlw.to(device=device, dtype=dt),
        )
        assert out.backend == backend
        objective = (out.task_losses * cot_losses.to(device, dt)).sum() \
            + (out.query_preds * cot_preds.to(device, dt)).sum()
        flat = list(leaves["params"]) + [leaves["x_support"], leaves["x_query"]]
        names = [f"grad params[{i}]" for i in range(len(leaves["params"]))] + ["grad x_support", "grad x_query"]
        if not isinstance(r, float):
            flat += list(r) if isinstance(r, list) else [r]
            names += [f"grad inner_lr[{i}]" for i in range(len(r))] if isinstance(r, list) else ["grad inner_lr"]
        grads = torch.autograd.grad(objective, flat, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, flat)]
        results[backend] = dict(zip(["task_losses", "query_preds"] + names,
                                    [out.task_losses, out.query_preds] + grads))
    for key, want in results["reference"].items():
        assert_close(results["triton"][key], want, RTOL[dtype], key)
    return results


# ---- against the reference -------------------------------------------------------------------------

CASES = [
    # widths and point counts past one 16-block (padded to 32), not powers of two
    dict(dims=(3, 21, 2), n_support=17, n_query=19, K=1, lr="per_step", loss="mse", activation="tanh", tasks=3),
    dict(dims=(18, 5, 11), n_support=5, n_query=3, K=2, lr="per_parameter", loss="cross_entropy",
         activation="relu"),
    # every depth, K in {0, 1, 2}
    dict(dims=(5, 3), K=2, lr="per_parameter", loss="mse", activation="relu"),
    dict(dims=(4, 6, 5, 3), K=1, lr="float", loss="cross_entropy", activation="tanh"),
    dict(dims=(3, 5, 4, 6, 2), K=2, lr="per_step", loss="mse", activation="tanh"),
    dict(dims=(3, 7, 4), K=0, lr="float", loss="cross_entropy", activation="relu"),
    # first order
    dict(dims=(4, 7, 3), K=2, lr="per_parameter", loss="mse", activation="tanh", first_order=True),
    dict(dims=(4, 6, 5), K=1, lr="per_step", loss="cross_entropy", activation="relu", first_order=True),
    # MAML++ multi-step loss
    dict(dims=(3, 6, 2), K=2, lr="per_step", loss="mse", activation="tanh", query_loss_weights=True),
    dict(dims=(3, 5, 4), K=2, lr="float", loss="cross_entropy", activation="relu", query_loss_weights=True,
         first_order=True),
    # layers of width 1, which the register layout keeps 1 wide (products as broadcasts and row sums): the
    # sinusoid net's input and output, a hidden layer of 1, a single class
    dict(dims=(1, 9, 7, 1), K=2, lr="per_parameter", loss="mse", activation="tanh", tasks=3),
    dict(dims=(1, 6, 1), K=1, lr="per_step", loss="mse", activation="relu", first_order=True),
    dict(dims=(3, 1, 5), K=2, lr="float", loss="cross_entropy", activation="tanh", query_loss_weights=True),
    dict(dims=(1, 5, 1), K=1, lr="per_parameter", loss="cross_entropy", activation="relu"),
    # a full block of 16 support points (the last row of a 1-wide product's sum is a real point), and widths
    # of 17 and 33 (the scratch layout's loops end in a chunk of 1)
    dict(dims=(1, 17, 33, 1), n_support=16, n_query=9, K=2, lr="per_step", loss="mse", activation="tanh"),
    # a width and a point count padded to 64 (with FASTMAML_TRITON_K_CHUNK=32, products reduced in chunks)
    dict(dims=(2, 37, 3), n_support=33, n_query=5, K=1, lr="per_parameter", loss="mse", activation="tanh",
         tasks=2),
]


def _id(case):
    parts = ["x".join(map(str, case["dims"])), f"K{case['K']}", case["lr"], case["loss"], case["activation"]]
    parts += ["fo"] if case.get("first_order") else []
    parts += ["qlw"] if case.get("query_loss_weights") else []
    return "-".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_reference_float32(case):
    run_both(**case, seed=CASES.index(case))


_F64_CASES = [CASES[1], CASES[4], CASES[10], CASES[12]]  # the last two with layers of width 1


@pytest.mark.parametrize("case", _F64_CASES, ids=[_id(c) for c in _F64_CASES])
def test_matches_reference_float64(case):
    run_both(**case, dtype=F64, seed=100 + CASES.index(case))


def test_products_in_chunks_match_reference():
    """FASTMAML_TRITON_K_CHUNK=32 (read when the kernels are defined, so in a fresh process): the
    products of the width-37 case (padded to 64) reduce in two chunks, and still match the reference."""
    case = CASES[-1]
    env = dict(os.environ, FASTMAML_TRITON_K_CHUNK="32")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_matches_reference_float32[{_id(case)}]"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_several_tasks_per_program(monkeypatch):
    """A small scratch budget makes each program run several tasks (and sum their gradients)."""
    tm = _backend()
    monkeypatch.setattr(tm, "SCRATCH_BYTES", 1)  # one program for all tasks
    assert tm._programs(3, 10, 100, 4) == 1
    run_both((3, 6, 2), tasks=3, K=2, lr="per_parameter", loss="mse", activation="tanh", seed=7)


def test_program_count_fills_whole_waves():
    """On a GPU the program count past one a multiprocessor is a multiple of their number; within the
    scratch budget, and never more than the tasks."""
    tm = _backend()
    per_program = 14 * 16_897 * 4 + 21 * 16 * 128 * 4  # W=128, K=5, every gradient, scratch layout
    budget = tm.SCRATCH_BYTES // per_program
    assert budget == 240
    assert tm._programs(65536, 14, 16_897, 4, 21 * 16 * 128 * 4) == 240  # not a GPU: the budget
    assert tm._programs(65536, 14, 16_897, 4, 21 * 16 * 128 * 4, sms=132) == 132
    assert tm._programs(65536, 14, 16_897, 4, 21 * 16 * 128 * 4, sms=100) == 200
    assert tm._programs(100, 14, 16_897, 4, 21 * 16 * 128 * 4, sms=132) == 100  # fewer tasks than SMs
    assert tm._programs(65536, 2, 1_761, 4, 0, sms=132) == 19_054 - 19_054 % 132
    # Two programs a multiprocessor (FASTMAML_TRITON_MAXNREG=128 at 8 warps): the budget's 240 are one
    # wave of up to 264, and past a wave the count is a multiple of 264.
    assert tm._programs(65536, 14, 16_897, 4, 21 * 16 * 128 * 4, sms=132, per_sm=2) == 240
    assert tm._programs(65536, 2, 1_761, 4, 0, sms=132, per_sm=2) == 19_054 - 19_054 % 264


def test_first_order_has_no_support_input_gradient():
    """FOMAML: the adapted parameters do not depend on x_support, so its gradient is exactly zero."""
    res = run_both((3, 5, 2), K=2, first_order=True, seed=8)
    assert torch.count_nonzero(res["triton"]["grad x_support"]) == 0


def test_adapt_matches_reference():
    _require_runnable()
    dims = (3, 19, 4)
    params, xs, ys, _, _ = make_problem(dims, 3, 18, 1, "cross_entropy", seed=9)
    rates = make_rates("per_parameter", dims, 2, seed=9)
    with torch.no_grad():
        want = fastmaml.adapt(params, xs, ys, inner_steps=2, inner_lr=rates, loss="cross_entropy",
                              activation="tanh", backend="reference")
        got = fastmaml.adapt(_to(params, F64, DEVICE, False), xs.to(DEVICE), ys.to(DEVICE), inner_steps=2,
                             inner_lr=_to(rates, F64, DEVICE, False), loss="cross_entropy", activation="tanh",
                             backend="triton")
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, RTOL[F64], f"adapted params[{i}]")


# ---- the scratch layout (`_triton_scratch.py`) ------------------------------------------------------


def _use_layout(monkeypatch, layout):
    """Run the calls of this test in `layout`, and record the layout each launch took."""
    tm = _backend()
    monkeypatch.setattr(tm, "LAYOUT", layout)
    taken = []
    module = tm._module

    def spy(which):
        taken.append(which)
        return module(which)

    monkeypatch.setattr(tm, "_module", spy)
    return taken


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_scratch_layout_matches_reference_float32(case, monkeypatch):
    taken = _use_layout(monkeypatch, "scratch")
    run_both(**case, seed=200 + CASES.index(case))
    assert set(taken) == {"scratch"}, taken


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[_id(CASES[1]), _id(CASES[4])])
def test_scratch_layout_matches_reference_float64(case, monkeypatch):
    taken = _use_layout(monkeypatch, "scratch")
    run_both(**case, dtype=F64, seed=300 + CASES.index(case))
    assert set(taken) == {"scratch"}, taken


def test_wide_nets_take_the_scratch_layout(monkeypatch):
    """`auto` runs a width padded to 128 in the scratch layout (width 100: reductions in 7 chunks of 16), narrower
    nets in the register layout."""
    taken = _use_layout(monkeypatch, "auto")
    run_both((2, 100, 3), tasks=2, n_support=10, n_query=7, K=2, lr="per_parameter", loss="mse",
             activation="tanh", seed=400)
    assert set(taken) == {"scratch"}, taken
    taken.clear()
    run_both((2, 60, 3), tasks=2, n_support=4, n_query=3, K=1, lr="float", loss="cross_entropy",
             activation="relu", seed=401)
    assert set(taken) == {"registers"}, taken


def test_scratch_layout_several_tasks_per_program(monkeypatch):
    tm = _backend()
    taken = _use_layout(monkeypatch, "scratch")
    monkeypatch.setattr(tm, "SCRATCH_BYTES", 1)  # one program for all tasks
    run_both((3, 6, 2), tasks=3, K=2, lr="per_parameter", loss="cross_entropy", activation="relu", seed=402)
    assert set(taken) == {"scratch"}, taken


def test_width_one_layers_kept_or_padded(monkeypatch):
    """FASTMAML_TRITON_WIDTH1: the register layout pads a 1-wide layer to 16 by default and keeps it 1 wide
    under `keep` (the A/B's other way, which matches the reference too); the scratch layout always pads; a
    value it does not know is refused by name."""
    tm = _backend()
    monkeypatch.setattr(tm, "WIDTH1", None)
    monkeypatch.delenv("FASTMAML_TRITON_WIDTH1", raising=False)
    consts = tm.kernel_constants("bwd", [1, 40, 40, 1], 10, 10, 0, 0)
    assert (consts["BD0"], consts["BD1"], consts["BD3"]) == (16, 64, 16)
    monkeypatch.setattr(tm, "WIDTH1", "keep")
    consts = tm.kernel_constants("bwd", [1, 40, 40, 1], 10, 10, 0, 0)
    assert (consts["BD0"], consts["BD1"], consts["BD3"]) == (1, 64, 1)
    assert tm.kernel_constants("bwd", [1, 40, 40, 1], 10, 10, 0, 0, layout="scratch")["BD0"] == 16
    run_both((1, 9, 7, 1), tasks=2, K=2, lr="per_parameter", loss="mse", activation="tanh", seed=403)
    run_both((1, 9, 7, 1), tasks=2, K=1, lr="float", loss="mse", activation="relu", seed=404, first_order=True)
    monkeypatch.setattr(tm, "WIDTH1", None)
    monkeypatch.setenv("FASTMAML_TRITON_WIDTH1", "narrow")
    with pytest.raises(ValueError, match="FASTMAML_TRITON_WIDTH1"):
        tm.width1()


def test_a_bad_layout_switch_is_refused(monkeypatch):
    tm = _backend()
    monkeypatch.setattr(tm, "LAYOUT", None)
    monkeypatch.setenv("FASTMAML_TRITON_LAYOUT", "shared")
    with pytest.raises(ValueError, match="FASTMAML_TRITON_LAYOUT must be one of"):
        tm.layout_for([1, 40, 1])


def test_warps_switch(monkeypatch):
    """FASTMAML_TRITON_WARPS: unset, each layout's own choice (8 for the scratch layout); a power of two
    sets every launch's warps (the GPU check's A/B); anything else is refused, naming the switch."""
    tm = _backend()
    monkeypatch.setattr(tm, "WARPS", None)
    monkeypatch.delenv("FASTMAML_TRITON_WARPS", raising=False)
    assert tm.num_warps_for([1, 40, 40, 1], 10, 10, "scratch") == 8
    assert tm.num_warps_for([1, 5, 1], 10, 10, "registers") == 4
    monkeypatch.setattr(tm, "WARPS", None)
    monkeypatch.setenv("FASTMAML_TRITON_WARPS", "2")
    assert tm.num_warps_for([1, 40, 40, 1], 10, 10, "scratch") == 2
    assert tm.num_warps_for([1, 5, 1], 10, 10, "registers") == 2
    monkeypatch.setattr(tm, "WARPS", None)
    monkeypatch.setenv("FASTMAML_TRITON_WARPS", "3")
    with pytest.raises(ValueError, match="FASTMAML_TRITON_WARPS must be 0 .* got '3'"):
        tm.num_warps_for([1, 40, 40, 1], 10, 10, "scratch")


def test_register_cap_switch(monkeypatch):
    """FASTMAML_TRITON_MAXNREG: unset, no cap in the launch options (ptxas's own registers); a count from
    64 to 255 caps every launch (the GPU check's A/B), beside the warps; anything else is refused, naming
    the switch."""
    tm = _backend()
    for name in ("WARPS", "MAXNREG"):
        monkeypatch.setattr(tm, name, None)
    monkeypatch.delenv("FASTMAML_TRITON_WARPS", raising=False)
    monkeypatch.delenv("FASTMAML_TRITON_MAXNREG", raising=False)
    assert tm.launch_options([1, 40, 40, 1], 10, 10, "scratch") == {"num_warps": 8}
    assert [tm.programs_per_sm(w) for w in (2, 4, 8)] == [1, 1, 1]  # not known before the compile
    monkeypatch.setattr(tm, "MAXNREG", None)
    monkeypatch.setenv("FASTMAML_TRITON_MAXNREG", "128")
    assert tm.launch_options([1, 40, 40, 1], 10, 10, "scratch") == {"num_warps": 8, "maxnreg": 128}
    assert tm.launch_options([1, 5, 1], 10, 10, "registers") == {"num_warps": 4, "maxnreg": 128}
    assert [tm.programs_per_sm(w) for w in (2, 4, 8, 16)] == [8, 4, 2, 1]  # 64 K registers
    monkeypatch.setattr(tm, "MAXNREG", None)
    monkeypatch.setenv("FASTMAML_TRITON_MAXNREG", "100")  # allocated as 104
    assert [tm.programs_per_sm(w) for w in (1, 4, 8)] == [19, 4, 2]
    for bad in ("32", "256", "1e2"):
        monkeypatch.setattr(tm, "MAXNREG", None)
        monkeypatch.setenv("FASTMAML_TRITON_MAXNREG", bad)
        with pytest.raises(ValueError, match=f"FASTMAML_TRITON_MAXNREG must be 0 .* got '{bad}'"):
            tm.launch_options([1, 40, 40, 1], 10, 10, "scratch")


# ---- the custom ops --------------------------------------------------------------------------------


def _flat_args(dtype=F64, K=1, loss=1):
    from fastmaml.backends import _fused
    from fastmaml._validate import make_problem as validated

    dims = (3, 5, 4)
    params, xs, ys, xq, yq = make_problem(dims, 2, 4, 3, "cross_entropy" if loss else "mse", seed=11)
    problem = validated([p.to(dtype) for p in params], xs.to(dtype), ys, xq.to(dtype), yq, inner_steps=K,
                        inner_lr=0.2, loss="cross_entropy" if loss else "mse", activation="tanh")
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in _fused.fused_args(problem))


def test_opcheck_ops():
    """torch.library.opcheck on the four ops (schema, fake kernels, autograd registration, and
    AOTAutograd tracing, which runs the forward's and the training call's backward through
    `triton_maml_bwd`)."""
    _require_runnable()
    from fastmaml.backends import _triton_ops

    ops = _triton_ops.ops()
    args = list(_flat_args())
    for i in (0, 1, 2, 4):
        args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(ops.fwd, tuple(args))
    T, Nq, DL = args[4].shape[0], args[4].shape[1], args[7][-1]
    g_losses = torch.rand(T, dtype=F64, device=DEVICE)
    g_preds = torch.randn(T, Nq, DL, dtype=F64, device=DEVICE)
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]) + (
        g_losses, g_preds, *args[7:], True, True)
    torch.library.opcheck(ops.bwd, bwd_args)
    adapt_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:4]) + tuple(args[7:10])
    torch.library.opcheck(ops.adapt, adapt_args)
    torch.library.opcheck(ops.train, tuple(args) + (True, True))


def test_op_rejects_wrong_flat_sizes():
    _require_runnable()
    from fastmaml.backends import _triton_ops

    ops = _triton_ops.ops()
    args = list(_flat_args())
    args[0] = args[0][:-1]
    with pytest.raises(ValueError, match="theta must be"):
        ops.fwd(*args)


# ---- refusals --------------------------------------------------------------------------------------


def _problem(dims, n_support=4, n_query=3, device="cpu", dtype=F32, **kw):
    from fastmaml._validate import make_problem as validated

    params, xs, ys, xq, yq = make_problem(dims, 2, n_support, n_query, "mse", seed=12)
    params = [p.to(device, dtype) for p in params]
    return validated(params, xs.to(device, dtype), ys.to(device, dtype), xq.to(device, dtype), yq.to(device, dtype),
                     **kw)


def _pretend_interpreter(monkeypatch):
    """Let CPU problems reach the size checks: interpreter on, kernels not yet defined (on a GPU
    machine they were defined compiled by the tests above), its self-test passed."""
    tm = _backend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tm, "_KERNELS", None)
    monkeypatch.setattr(tm, "interpreter_problem", lambda: None)


@pytest.mark.parametrize(
    "dims,n_support,n_query,dtype,reason",
    [
        ((3, 129, 2), 4, 3, F32, "width 129"),
        ((3, 65, 2), 4, 3, F64, "width 65"),
        ((3, 4, 4, 4, 4, 2), 4, 3, F32, "depth 5"),
        ((3, 4, 2), 65, 3, F32, "65 support points"),
        ((3, 4, 2), 4, 65, F32, "65 query points"),
        ((3, 100, 2), 17, 3, F32, "17 support points"),
        ((3, 64, 2), 4, 33, F64, "33 query points"),
    ],
)
def test_size_limits_are_refused_with_reason(dims, n_support, n_query, dtype, reason, monkeypatch):
    tm = _backend()
    _pretend_interpreter(monkeypatch)
    why = tm.TritonBackend().reject(_problem(dims, n_support, n_query, dtype=dtype), "maml")
    assert why is not None and reason in why


def test_largest_sizes_are_accepted(monkeypatch):
    tm = _backend()
    _pretend_interpreter(monkeypatch)
    for dtype, table in tm.MAX_POINTS_BY_WIDTH.items():
        for width, points in table.items():
            dims = (width,) * (tm.MAX_DEPTH + 1)
            why = tm.TritonBackend().reject(_problem(dims, points, points, dtype=dtype), "maml")
            assert why is None, f"{dtype} width {width} with {points} points: {why}"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend().TritonBackend().reject(_problem((3, 4, 2)), "maml")
    assert why is not None and "TRITON_INTERPRET=1" in why


def test_explicit_backend_names_the_reason(monkeypatch):
    _pretend_interpreter(monkeypatch)
    params, xs, ys, xq, yq = make_problem((3, 200, 2), 2, 4, 3, "mse", seed=13)
    with pytest.raises(ValueError, match="width 200"):
        fastmaml.maml(params, xs, ys, xq, yq, backend="triton")


def test_import_does_not_import_triton():
    """Importing fastmaml (and this backend's module) must not import Triton: it is loaded on first use."""
    import subprocess
    import sys

    code = ("import sys, fastmaml, fastmaml.backends.triton_maml; "
            "fastmaml.list_backends(); print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
