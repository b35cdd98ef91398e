"""The one-step kernels (`maml_onestep`, csrc/task/onestep.h; fastmaml/backends/_onestep.py): one inner step
with theta_1 kept as theta_0 plus rank-Ns updates and the meta-gradient returned as factor rows.

On the CPU op (the math with a team of one): every option it takes against the independent task loop in
float64, with every cotangent (the task losses', the query output's), both rows-kept and chunked backwards;
what it refuses, and why; the op's argument checks. The team loops (a warp on a GPU) with teams of threads:
tests/onestep_team_check.cpp. On a GPU: the CUDA op against the CPU op, the cuda backend's switch, more
tasks than resident warps, the sinusoid size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import fastmaml
from fastmaml._validate import make_problem
from fastmaml.backends import _onestep
from _host_checks import build_and_run
from _reference_loop import (DIMS_BY_DEPTH, assert_close, assert_close_float32_batch, gradients, maml_loop, make_case,
                             near_relu_kinks, output_cotangents)

F64 = torch.float64
CHECK = Path(__file__).resolve().parent / "onestep_team_check.cpp"


def _problem(case, dtype=F64, device="cpu"):
    c = case.to(dtype, device) if (dtype != F64 or device != "cpu") else case
    return c, make_problem(c.params, c.x_support, c.y_support, c.x_query, c.y_query,
                           **c.kwargs())


def _case(**kw):
    kw.setdefault("grad_inputs", False)
    return make_case(**kw)


def _oracle(case, cot):
    out = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                    **case.kwargs())
    a, b = cot
    value = (out.task_losses * a).sum() + (0 if b is None else (out.query_preds * b).sum())
    return out, gradients(value, case.leaves())


def _ours(case, cot):
    _, problem = _problem(case)
    assert _onestep.reason(problem, False, False) is None
    losses, preds, _ = _onestep.maml(problem)
    a, b = cot
    value = (losses * a).sum() + (0 if b is None else (preds * b).sum())
    return losses, preds, gradients(value, case.leaves())


def _rates_no_grad(case):
    """The case with rates that need no gradient (the kernel's rate gradients are left out)."""
    if isinstance(case.inner_lr, list):
        case.inner_lr = [r.detach() for r in case.inner_lr]
    elif isinstance(case.inner_lr, torch.Tensor):
        case.inner_lr = case.inner_lr.detach()
    return case


def _compare_with_the_loop(depth: int, cotangent: str, seed: int, **options) -> None:
    """Float64, fresh random inputs, widths that are not powers of two, Ns != Nq: losses, outputs and the
    gradient of every parameter and learned rate within 1e-10 of the independent loop, under the task losses'
    cotangent alone or with the query output's."""
    dims = DIMS_BY_DEPTH[depth]
    case = _case(dims=dims, tasks=4, n_support=5, n_query=7, seed=seed, **options)
    losses_cot, preds_cot = output_cotangents(torch.zeros(4, dtype=F64), torch.zeros(4, 7, dims[-1], dtype=F64),
                                              seed=depth)
    cot = (losses_cot, preds_cot if cotangent == "losses_and_preds" else None)
    ref, g_ref = _oracle(case, cot)
    losses, preds, g = _ours(case, cot)
    assert_close(losses, ref.task_losses, 1e-10, "task_losses")
    assert_close(preds, ref.query_preds, 1e-10, "query_preds")
    assert_close(g, g_ref, 1e-10, "grads")
    assert max(t.abs().max().item() for t in g.values()) > 0


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_form", ["float", "per_step", "per_layer", "scalar_tensor"])
@pytest.mark.parametrize("cotangent", ["losses", "losses_and_preds"])
def test_matches_the_task_loop(depth, activation, first_order, lr_form, cotangent):
    _compare_with_the_loop(depth, cotangent, depth, lr_form=lr_form, first_order=first_order, activation=activation)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_form", ["float", "per_layer"])
@pytest.mark.parametrize("cotangent", ["losses", "losses_and_preds"])
def test_cross_entropy_matches_the_task_loop(depth, activation, first_order, lr_form, cotangent):
    """The cross-entropy loss (int64 classes): the same comparisons as the mse loss's."""
    _compare_with_the_loop(depth, cotangent, 20 + depth, lr_form=lr_form, first_order=first_order,
                           activation=activation, loss="cross_entropy")


def test_out_of_range_class_is_refused_on_the_cpu():
    case = _case(dims=[3, 7, 4], tasks=2, loss="cross_entropy", seed=1)
    case.y_query[1, 2] = 4
    _, problem = _problem(case)
    with pytest.raises(ValueError, match="class 4"):
        _onestep.maml(problem)


def test_second_order_differs_from_first_order():
    """The Hessian term is there: at one rate the two orders' gradients differ by far more than rounding."""
    grads = []
    for fo in (False, True):
        case = _case(dims=[3, 7, 5, 2], tasks=3, first_order=fo, activation="tanh", seed=11)
        grads.append(_ours(case, (torch.ones(3, dtype=F64), None))[2])
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) > 1e-3


def _count_runs(monkeypatch, budget):
    """Set the rows' budget and record the task count of every kernel run."""
    monkeypatch.setattr(_onestep, "MAX_FACTOR_BYTES", budget)
    calls = []
    real = _onestep._Call.run
    monkeypatch.setattr(_onestep._Call, "run",
                        lambda self, lo, hi, c, g, f: calls.append(hi - lo) or real(self, lo, hi, c, g, f))
    return calls


def _task_row_bytes(case):
    _, problem = _problem(case)
    return _onestep.row_bytes(list(problem.dims), problem.n_support, problem.n_query, problem.first_order, 8)


@pytest.mark.parametrize("keep_mb", [0, "two_tasks"])
def test_chunked_backward_matches(monkeypatch, keep_mb):
    """Without kept rows (the budget below every task's) the forward sums its rows chunk by chunk, and a
    backward with per-task cotangents reruns the kernel chunk by chunk; the sum over chunks gives the same
    gradients as the rows kept."""
    case = _case(dims=[3, 7, 5, 2], tasks=5, n_support=4, n_query=6, activation="tanh", seed=5)
    cot = (torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(2)), None)
    _, _, kept = _ours(case, cot)
    calls = _count_runs(monkeypatch, 0 if keep_mb == 0 else 2 * _task_row_bytes(case))
    _, _, chunked = _ours(case, cot)
    assert_close(chunked, kept, 1e-12, "grads")
    assert calls == ([1] * 10 if keep_mb == 0 else [2, 2, 1] * 2)


@pytest.mark.parametrize("budget", ["all", "two_tasks", 0])
@pytest.mark.parametrize("first_order", [False, True])
def test_mean_loss_backward_runs_the_kernel_once(monkeypatch, budget, first_order):
    """`loss.backward()` (the mean loss's cotangent alone): the forward's summed rows, scaled, with no kernel run
    in the backward whatever the budget; the gradients (the learned rates' among them) within 1e-10 of the task
    loop's. With the task losses' cotangent too, the two add up."""
    case = _case(dims=[3, 7, 5, 2], tasks=5, n_support=4, n_query=6, activation="tanh", seed=12,
                 first_order=first_order, lr_form="per_layer")
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    extra = torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(3))
    g_ref = gradients(3.0 * ref.loss, case.leaves(), retain_graph=True)
    g_both_ref = gradients(3.0 * ref.loss + (ref.task_losses * extra).sum(), case.leaves())
    size = {"all": 1 << 40, "two_tasks": 2 * _task_row_bytes(case), 0: 0}[budget]
    calls = _count_runs(monkeypatch, size)
    _, problem = _problem(case)
    losses, _, loss = _onestep.maml(problem)
    forward_calls = list(calls)
    assert forward_calls == {"all": [5], "two_tasks": [2, 2, 1], 0: [1] * 5}[budget]
    assert_close(loss, ref.loss, 1e-10, "loss")
    assert_close(gradients(3.0 * loss, case.leaves(), retain_graph=True), g_ref, 1e-10, "grads")
    assert calls == forward_calls  # no run in the backward
    assert_close(gradients(3.0 * loss + (losses * extra).sum(), case.leaves()), g_both_ref, 1e-10, "grads")


def test_second_backward_through_the_graph():
    """retain_graph: the first backward uses the kept rows and frees them; a second reruns the kernel and
    gives the same gradients."""
    case = _case(dims=[3, 7, 5, 2], tasks=4, seed=9)
    _, problem = _problem(case)
    losses, _, _ = _onestep.maml(problem)
    first = torch.autograd.grad(losses.sum(), case.params, retain_graph=True)
    second = torch.autograd.grad(losses.sum(), case.params)
    assert_close(list(second), list(first), 1e-12, "grads")


def test_no_grad_call_keeps_no_rows(monkeypatch):
    """Without a gradient to give (no_grad, though the parameters require grad), the forward asks the
    kernel for no factor rows."""
    case = _case(dims=[3, 7, 2], tasks=3, seed=4)
    _, problem = _problem(case)
    asked = []
    real = _onestep._Call.run
    monkeypatch.setattr(_onestep._Call, "run",
                        lambda self, lo, hi, c, g, f: asked.append(f) or real(self, lo, hi, c, g, f))
    with torch.no_grad():
        losses, preds, loss = _onestep.maml(problem)
    assert asked == [False]
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                    **case.kwargs())
    assert_close(losses, ref.task_losses.detach(), 1e-10)
    assert not losses.requires_grad and not loss.requires_grad
    from fastmaml.backends._fused import flat_theta

    out = torch.ops.fastmaml.maml_onestep(
        flat_theta(problem).detach(), _onestep.transposed(problem), _onestep.rates(problem), problem.x_support,
        problem.y_support, problem.x_query, problem.y_query, None, None, [3, 7, 2], 0, 0, False, False)
    assert out[2].numel() == 0 and out[3].numel() == 0
    assert_close(out[0], ref.task_losses.detach(), 1e-10)


def test_float32_within_1e4_of_float64():
    """The sinusoid net's shape (1-40-40-1, 10 + 10 points), float32 against the float64 loop."""
    case = _case(dims=[1, 40, 40, 1], tasks=6, n_support=10, n_query=10, seed=8)
    cot = (torch.full((6,), 1 / 6, dtype=F64), None)
    ref, g_ref = _oracle(case, cot)
    c32, problem = _problem(case, torch.float32)
    losses, _, _ = _onestep.maml(problem)
    g = gradients((losses * cot[0].float()).sum(), c32.leaves())
    assert_close(losses.double(), ref.task_losses, 1e-4, "task_losses")
    assert_close({k: v.double() for k, v in g.items()}, g_ref, 1e-4, "grads")


@pytest.mark.parametrize("change, why", [
    (dict(inner_steps=2), "2 inner steps"),
    (dict(query_loss_weights=True), "per-step query-loss weights"),
    (dict(lr_form="per_parameter"), "Meta-SGD"),
])
def test_refuses_what_it_does_not_compute(change, why):
    case = _case(dims=[3, 7, 2], tasks=2, **change)
    _, problem = _problem(case)
    assert why in _onestep.reason(problem, False, False)


def test_refuses_gradients_it_does_not_give():
    case = _case(dims=[3, 7, 2], tasks=2)
    _, problem = _problem(case)
    assert _onestep.reason(problem, True, False) is None  # learned rates: the kernel gives their gradient
    assert "inputs" in _onestep.reason(problem, False, True)
    case.y_support.requires_grad_(True)
    _, problem = _problem(case)
    assert "targets" in _onestep.reason(problem, False, False)


def test_op_checks_its_arguments():
    case = _case(dims=[3, 7, 2], tasks=2)
    _, p = _problem(case)
    from fastmaml.backends._fused import flat_theta

    theta = flat_theta(p).detach()
    good = [theta, _onestep.transposed(p), _onestep.rates(p), p.x_support.detach(), p.y_support, p.x_query.detach(),
            p.y_query, None, None, [3, 7, 2], 0, 0, False, True]
    torch.ops.fastmaml.maml_onestep(*good)
    for i, bad, msg in [(2, torch.zeros(3, dtype=F64), "rates must be"), (0, theta.float(), "dtype"),
                        (10, 2, "activation"), (11, 2, "loss"), (4, p.y_support[:, :, :1].contiguous(), "ys must be"),
                        (3, p.x_support.detach().transpose(1, 2).contiguous().transpose(1, 2), "contiguous")]:
        args = list(good)
        args[i] = bad
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.fastmaml.maml_onestep(*args)


def test_team_loops_match_the_team_of_one(tmp_path):
    """The per-task math with teams of 2, 5, 32 and 33 threads (a warp is 32) against the team of one, with
    both forms of the FFMA loop (the unpredicated one the host and a GPU's shared-operand form run, the
    predicated one of a GPU's generic form), exactly; and with the tensor-core tiles emulated lane by lane
    (teams of 32, 33 and 64; 5, too small for a warp, falls back to the FFMA loop), within 1e-11 of each
    tensor's scale (their sums run in another order). In float, both engines (the tiles' 3xTF32 splits
    emulated) within 1e-4 of each tensor's scale of the double result, as the GPU tests ask (about 5e-7 and
    9e-7 measured; plain TF32 products would be about 2e-3)."""
    out = build_and_run(tmp_path, CHECK, ["-O1"])
    assert "ok: 10 cases x 12 teams and loops (120 runs: cols_product's two loops, tensor cores)" in out
    # The Python side's size of a task's scratch (the kernels' bound on it) is the layout's.
    layouts = [line.split()[1:] for line in out.splitlines() if line.startswith("layout ")]
    assert len(layouts) == 10, out
    for fields in layouts:
        bar = fields.index("|")
        dims = [int(d) for d in fields[:bar]]
        ns, nq, act, total = (int(f) for f in fields[bar + 1:])
        assert _onestep.workspace_bytes(dims, ns, nq, 1, ["relu", "tanh"][act]) == total, fields


@pytest.mark.skipif(os.environ.get("FASTMAML_TSAN") == "0", reason="FASTMAML_TSAN=0 skips the ThreadSanitizer run")
def test_team_loops_have_no_data_race(tmp_path):
    out = build_and_run(tmp_path, CHECK, ["-O1", "-g", "-fsanitize=thread"])
    assert "ThreadSanitizer" not in out, out


# ---- on a GPU -------------------------------------------------------------------------------------------

def _cuda_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from fastmaml import _ext
    from fastmaml.backends.cuda import cuda_kernels_registered

    # Not load(): an extension that fails here must skip these tests with its reason, not stop the collection
    # of every other test in the same pytest run (the CUDA backend's own tests fail on it, loudly).
    why = _ext.unavailable()
    if why is not None:
        return f"the extension is unavailable: {why}"
    return None if cuda_kernels_registered("maml_onestep") else "the loaded library has no CUDA maml_onestep"


_CUDA_UNREADY = _cuda_ready()
needs_cuda = pytest.mark.skipif(_CUDA_UNREADY is not None,
                                reason=f"needs a GPU and the CUDA maml_onestep: {_CUDA_UNREADY}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("setting", ["", "FASTMAML_ONESTEP_WARPS=2", "FASTMAML_ONESTEP_WARPS=16",
                                     "FASTMAML_ONESTEP_SHARED=0", "FASTMAML_ONESTEP_FORM=generic",
                                     "FASTMAML_ONESTEP_PRODUCTS=ffma",
                                     "FASTMAML_ONESTEP_PRODUCTS=ffma FASTMAML_ONESTEP_FORM=shared"])
@pytest.mark.parametrize("shape", ["depth4_tanh", "sinusoid_20000", "width128", "ce_5way"])
def test_cuda_op_matches_the_cpu_op(monkeypatch, dtype, setting, shape):
    """The CUDA kernel's outputs, factor rows and rate gradients against the CPU op's on the same inputs: float64
    within 1e-10, float32 within 1e-4 of the float64 CPU op (per tensor from 1,000 tasks: at 20,000 the CPU op in
    float32 puts single elements of `U` 1.2e-4 to 4.1e-4 of the scale off, over nine draws of the cotangents);
    more tasks than resident warps (20,000); width 128; cross-entropy with 5 classes. The launch report must
    say which form ran: in float32 the products on tensor cores (3xTF32) unless FASTMAML_ONESTEP_PRODUCTS=ffma,
    in the shared-operand form where it fits; the FFMA loop (float64, or asked) in that form only where
    FASTMAML_ONESTEP_FORM=shared asks (its build was miscompiled and gave wrong losses on an H200,
    2026-12-04; tests/test_onestep_ptx.py holds the mended build). At 20,000 tasks in float32 the outputs of
    the tasks within float32's reach of a ReLU kink are left out (`near_relu_kinks`, 59 of them): with them
    the FFMA loop's U was 2.35e-4 norm-wise on that H200 and the CPU op's 2.9e-5; without them the CPU op's
    is 1.4e-7."""
    if setting == "FASTMAML_ONESTEP_FORM=generic" and (shape == "width128" or dtype == torch.float64):
        pytest.skip("width 128 and float64 run the generic form anyway")
    if setting == "FASTMAML_ONESTEP_PRODUCTS=ffma" and dtype == torch.float64:
        pytest.skip("float64 has no tensor-core products: the FFMA loop is its default case")
    ffma_shared = "FASTMAML_ONESTEP_FORM=shared" in setting
    if ffma_shared and (shape == "width128" or (shape == "sinusoid_20000" and dtype == torch.float64)):
        pytest.skip("the shared-operand form does not fit here (the plan runs the generic form): the "
                    "FASTMAML_ONESTEP_PRODUCTS=ffma case")
    for pair in setting.split():
        name, value = pair.split("=")
        monkeypatch.setenv(name, value)
    dims, tasks, ns, nq, act, loss = {"depth4_tanh": ([5, 6, 3, 9, 3], 37, 13, 5, "tanh", "mse"),
                                      "sinusoid_20000": ([1, 40, 40, 1], 20000, 10, 10, "relu", "mse"),
                                      "width128": ([1, 128, 128, 1], 300, 10, 10, "relu", "mse"),
                                      "ce_5way": ([12, 33, 5], 301, 5, 15, "relu", "cross_entropy")}[shape]
    case = _case(dims=dims, tasks=tasks, n_support=ns, n_query=nq, activation=act, lr_form="per_layer", seed=3,
                 loss=loss)
    case = _rates_no_grad(case)
    _, p64 = _problem(case)
    g = torch.Generator().manual_seed(4)  # the same inputs whichever tests ran before in this process
    cot = torch.randn(tasks, dtype=F64, generator=g)
    gp = torch.randn(tasks, nq, dims[-1], dtype=F64, generator=g)
    from fastmaml.backends._fused import flat_theta
    act_id, loss_id = 1 if act == "tanh" else 0, 1 if loss == "cross_entropy" else 0

    def args(p, dev, dt):
        return [flat_theta(p).detach().to(dev, dt), _onestep.transposed(p).to(dev, dt), _onestep.rates(p).to(dev, dt),
                *(t.detach().to(dev, dt if t.is_floating_point() else t.dtype).contiguous()
                  for t in (p.x_support, p.y_support, p.x_query, p.y_query)),
                cot.to(dev, dt), gp.to(dev, dt), dims, act_id, loss_id, False, True]

    like = torch.empty(1, device="cuda", dtype=dtype)
    report = list(torch.ops.fastmaml_testing.cuda_onestep_launch(like, dims, ns, nq, tasks, act_id, loss_id))
    shared_form, mma = report[-2], report[-1]
    copies = like.element_size() * sum((n * dims[0] + 15) // 16 * 16 for n in (ns, nq))  # the inputs' copies
    assert report[5] == _onestep.workspace_bytes(dims, ns, nq, like.element_size(), act) + shared_form * copies, \
        f"the plan's scratch a task is not the size the Python side bounds: {report}"
    tiles = dtype == torch.float32 and "FASTMAML_ONESTEP_PRODUCTS=ffma" not in setting
    assert mma == int(tiles), f"the plan's products are not the ones asked for: {report}"
    if ffma_shared:
        assert shared_form == 1, f"the FFMA loop's shared-operand form was asked for and did not run: {report}"
    else:
        assert mma or not shared_form, f"the FFMA loop in the shared-operand form unasked: {report}"
    expected = torch.ops.fastmaml.maml_onestep(*args(p64, "cpu", F64))
    actual = torch.ops.fastmaml.maml_onestep(*args(p64, "cuda", dtype))
    keep = ~near_relu_kinks(case) if dtype == torch.float32 and tasks >= 1000 and act == "relu" else None
    rows = _onestep.factor_rows(ns, nq, first_order=False)
    for name, a, e in zip(("losses", "preds", "U", "V", "rate_grads"), actual, expected):
        a = a.double().cpu()
        if dtype == F64:
            assert_close(a, e, 1e-10, name)
            continue
        if keep is not None:
            a, e = _of_tasks(a, name, keep, dims, rows), _of_tasks(e, name, keep, dims, rows)
        assert_close_float32_batch(a, e, 1e-4, name, tasks)


def _of_tasks(x: torch.Tensor, name: str, keep: torch.Tensor, dims: list[int], rows: int) -> torch.Tensor:
    """One output of maml_onestep restricted to the tasks `keep` marks: losses, preds and the rates' gradients
    by their first dimension, U and V (flat, a block [T, rows, width] a layer) block by block."""
    if name not in ("U", "V"):
        return x[keep]
    widths = dims[1:] if name == "U" else [d + 1 for d in dims[:-1]]
    out, offset = [], 0
    for w in widths:
        n = keep.numel() * rows * w
        out.append(x[offset:offset + n].view(keep.numel(), rows * w)[keep].reshape(-1))
        offset += n
    assert offset == x.numel(), (name, offset, x.numel())
    return torch.cat(out)


@needs_cuda
def test_cuda_backend_switch_runs_the_onestep_kernel(monkeypatch):
    from fastmaml.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "ONESTEP", True)
    case = _case(dims=[1, 40, 40, 1], tasks=50, n_support=10, n_query=10, seed=2)
    ref, g_ref = _oracle(case, (torch.full((50,), 1 / 50, dtype=F64), None))
    c = case.to(torch.float32, "cuda")
    calls = []
    real = _onestep.maml
    monkeypatch.setattr(_onestep, "maml", lambda problem: calls.append(1) or real(problem))
    out = fastmaml.maml(c.params, c.x_support, c.y_support, c.x_query, c.y_query,
                        backend="cuda", **c.kwargs())
    g = gradients(out.loss, c.leaves())
    assert calls == [1]
    assert_close({k: v.double().cpu() for k, v in g.items()}, g_ref, 1e-4, "grads")


@pytest.mark.parametrize("name, value", [("FASTMAML_CUDA_ONESTEP", "yes"), ("FASTMAML_ONESTEP_KEEP_MB", "1.5")])
def test_mistyped_import_switches_are_refused(name, value):
    """Read at import: a value they do not know makes the import fail, naming the switch (a mistyped
    switch must not measure the default under another name)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import fastmaml.backends.cuda"], capture_output=True, text=True,
                          env={**os.environ, name: value}, timeout=120)
    assert proc.returncode != 0 and name in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize("name, value", [("FASTMAML_ONESTEP_WARPS", "3"), ("FASTMAML_ONESTEP_SHARED", "off"),
                                         ("FASTMAML_ONESTEP_FORM", "fast"),
                                         ("FASTMAML_ONESTEP_PRODUCTS", "tf32")])
def test_mistyped_launch_switches_are_refused(monkeypatch, name, value):
    """Read by the CUDA plan on every launch: the backend refuses values it would not read as written."""
    from fastmaml.backends.cuda import CudaBackend

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        CudaBackend().unavailable()
