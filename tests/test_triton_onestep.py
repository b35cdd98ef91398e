"""The one-step kernel in Triton (fastmaml/backends/_triton_onestep.py): `maml_onestep`'s math for a group of
tasks a program, run by the `triton` backend's training calls under FASTMAML_TRITON_ONESTEP=1.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors: against the CPU op (itself checked
against the independent task loop, tests/test_onestep.py) in float64 over every option it takes, with group
sizes that do not divide the tasks; the backend under the switch against the task loop, its gradients and the
rates' among them; the chunked backward; float32. On a GPU: the compiled kernel against the CPU op at the
sinusoid size with more tasks than programs in flight.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastmaml
from fastmaml.backends import _onestep, triton_maml
from fastmaml.backends import _triton_onestep_call as onestep_call
from _reference_loop import assert_close, assert_close_float32_batch, gradients, maml_loop, make_case, output_cotangents

F64 = torch.float64
DIMS = {1: [3, 9], 2: [3, 9, 4], 3: [3, 9, 6, 4], 4: [3, 9, 6, 5, 4]}


def _interpreter_reason():
    if torch.cuda.is_available():
        return "a GPU is visible: the kernel is compiled, not interpreted (the GPU tests below)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (conftest.py sets it)"
    if not triton_maml._triton_installed():
        return "Triton is not installed"
    return triton_maml.interpreter_problem()


interpreted = pytest.mark.skipif(_interpreter_reason() is not None, reason=str(_interpreter_reason()))


def _inputs(dims, tasks, ns, nq, loss, seed, dtype=F64, device="cpu", scale=0.5):
    """The CPU op's arguments on fresh random inputs (theta, its transposes, rates [2 L], points, targets)."""
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(o, i, generator=g, dtype=F64) * scale, torch.randn(o, generator=g, dtype=F64) * scale)
              for i, o in zip(dims[:-1], dims[1:])]
    theta = torch.cat([t.reshape(-1) for w, b in layers for t in (w, b)])
    theta_t = torch.cat([t.reshape(-1) for w, b in layers for t in (w.t(), b)])
    rates = torch.rand(2 * len(layers), generator=g, dtype=F64) * 0.3 + 0.05
    xs = torch.randn(tasks, ns, dims[0], generator=g, dtype=F64)
    xq = torch.randn(tasks, nq, dims[0], generator=g, dtype=F64)
    if loss == 0:
        ys = torch.randn(tasks, ns, dims[-1], generator=g, dtype=F64)
        yq = torch.randn(tasks, nq, dims[-1], generator=g, dtype=F64)
    else:
        ys = torch.randint(0, dims[-1], (tasks, ns), generator=g)
        yq = torch.randint(0, dims[-1], (tasks, nq), generator=g)
    moved = [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in (theta, theta_t, rates, xs, ys, xq, yq)]
    return moved, (theta, theta_t, rates, xs, ys, xq, yq)


def _refuse_calls(monkeypatch, module, names, message):
    """Make the kernel's calls of `module`'s jit functions `names` fail with `message` (the interpreter calls
    them as Python, through the module's globals)."""
    def refuse(*args):
        raise AssertionError(message)

    for name in names:
        monkeypatch.setattr(module, name, refuse)


def _compare(dims, tasks, ns, nq, act, loss, first_order, cot, g_pred, tasks_per_program, seed, factors=True,
             dtype=F64, device="cpu", tol=1e-10, num_warps=4, reload=True, chunk=0):
    """The Triton kernel's five outputs against the float64 CPU op's on the same inputs."""
    from fastmaml import _ext

    _ext.load()
    triton_maml._kernels()
    from fastmaml.backends import _triton_onestep

    ours, ref = _inputs(dims, tasks, ns, nq, loss, seed, dtype, device)
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.randn(tasks, generator=g, dtype=F64) if cot else None
    gp = torch.randn(tasks, nq, dims[-1], generator=g, dtype=F64) if g_pred else None
    expected = torch.ops.fastmaml.maml_onestep(*ref, c, gp, dims, act, loss, first_order, factors)
    theta, _, rates, xs, ys, xq, yq = ours
    actual = _triton_onestep.launch(theta, rates, xs, ys, xq, yq, None if c is None else c.to(device, dtype),
                                    None if gp is None else gp.to(device, dtype), dims, act, loss, first_order,
                                    factors, tasks_per_program=tasks_per_program, num_warps=num_warps,
                                    reload=reload, chunk=chunk, **({"num_stages": 1} if chunk else {}))
    for name, a, e in zip(("losses", "preds", "U", "V", "rate_grads"), actual, expected):
        assert a.shape == e.shape, name
        if dtype == torch.float32:
            assert_close_float32_batch(a.double().cpu(), e, tol, name, tasks)
        else:
            assert_close(a.double().cpu(), e, tol, name)
    if factors:
        assert expected[2].abs().max() > 0 and expected[4].abs().max() > 0  # the rows are not all zero
    return actual


@interpreted
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("loss", [0, 1])
@pytest.mark.parametrize("first_order", [False, True])
def test_kernel_matches_the_cpu_op(depth, act, loss, first_order):
    """Float64, widths and point counts that are not powers of two (Ns != Nq, 17 query points: padded to 32),
    groups of 1, 2 or 4 tasks over 5 tasks, the seeds of the query backward (a cotangent of the losses,
    of the outputs, both, neither) taken in turn."""
    i = (depth - 1) * 8 + act * 4 + loss * 2 + int(first_order)
    _compare(DIMS[depth], 5, 6, 17 if i % 3 == 0 else 7, act, loss, first_order, cot=i % 2 == 0, g_pred=i % 4 < 2,
             tasks_per_program=(1, 2, 4)[i % 3], seed=i)


@interpreted
@pytest.mark.parametrize("act, loss", [(0, 0), (1, 0), (1, 1)])
def test_kernel_keeping_blocks_in_registers_matches(act, loss):
    """Second order with the written blocks kept in registers, not read back from the rows (reload=False)."""
    _compare([3, 9, 6, 4], 5, 6, 7, act, loss, False, True, True, 2, seed=30 + act + 2 * loss, reload=False)


@interpreted
@pytest.mark.parametrize("label", [-1, 4, 2**32])
def test_class_out_of_range_poisons_its_task(label):
    """A class label out of range (possible on a GPU with the input checks off) makes its task's loss NaN, as in
    the C++ kernels, also past int32 (where a narrower type would wrap it into a class in range)."""
    triton_maml._kernels()
    from fastmaml.backends import _triton_onestep

    (theta, _, rates, xs, ys, xq, yq), _ = _inputs([3, 7, 4], 3, 5, 6, 1, seed=80)
    yq[1, 2] = label
    out = _triton_onestep.launch(theta, rates, xs, ys, xq, yq, None, None, [3, 7, 4], 0, 1, False, True,
                                 tasks_per_program=2, num_warps=4)
    assert torch.isnan(out[0][1]) and torch.isfinite(out[0][[0, 2]]).all()


# Layers of width 1 (padded to 16 here, unlike the register layout's `FASTMAML_TRITON_WIDTH1=keep`: kept 1 wide,
# this kernel spilled more, benchmarks/RESULTS.md): the sinusoid net's input and output, a hidden width of 1;
# both orders, in registers and in chunks. (dims, act, loss, first_order, chunk)
WIDTH1_CASES = [([1, 9, 7, 1], 1, 0, False, 0), ([1, 9, 7, 1], 0, 0, True, 0), ([3, 1, 5], 1, 1, False, 0),
                ([1, 6, 3], 0, 1, False, 0), ([1, 20, 17, 1], 1, 0, False, 16), ([1, 70, 1], 0, 0, False, 16)]


@interpreted
@pytest.mark.parametrize("dims, act, loss, first_order, chunk", WIDTH1_CASES)
def test_width_one_layers_match_the_cpu_op(dims, act, loss, first_order, chunk):
    """Float64 within 1e-10 of the CPU op, with a cotangent of the losses and of the outputs."""
    _compare(dims, 5, 6, 7, act, loss, first_order, True, True, 2, seed=110 + len(dims) + act, chunk=chunk)


@interpreted
def test_kernel_without_factors_gives_losses_and_outputs():
    _compare([3, 9, 4], 3, 5, 6, 1, 0, False, False, False, 2, seed=40, factors=False)


# The chunked form (and the default one) under the interpreter's barrier watch: tests/test_triton_barriers.py.
# (dims, act, loss, cot, g_pred, tasks a program, chunk, support points, query points)
CHUNKED_CASES = [([3, 20, 17, 4], 0, 0, True, True, 2, 16, 6, 7), ([3, 20, 17, 4], 1, 1, False, True, 1, 16, 17, 3),
                 ([2, 33, 5], 1, 0, True, False, 4, 16, 6, 7), ([3, 9, 40, 18, 4], 0, 1, False, False, 1, 16, 17, 3),
                 ([3, 9, 40, 18, 4], 1, 0, True, True, 2, 32, 6, 7), ([5, 70, 3], 0, 0, True, False, 1, 16, 17, 3)]


@interpreted
@pytest.mark.parametrize("dims, act, loss, cot, g_pred, tasks_per_program, chunk, ns, nq", CHUNKED_CASES)
def test_chunked_kernel_matches_the_cpu_op(dims, act, loss, cot, g_pred, tasks_per_program, chunk, ns, nq):
    """The products reading their operands from the factor rows, `chunk` columns a step (the form of padded
    widths above 64): float64 within 1e-10 of the CPU op at widths of one to five chunks, with more query than
    support points and more support than query points (a block read with the other's point count reads rows
    of its neighbour block)."""
    _compare(dims, 5, ns, nq, act, loss, False, cot, g_pred, tasks_per_program, seed=90 + act + 2 * loss,
             chunk=chunk)


@interpreted
def test_chunked_kernel_takes_no_operand_from_registers(monkeypatch):
    """With chunks, no product with a shared weight matrix or Gram matrix of two blocks takes its operands from
    registers (`_fw`, `_bw`, `_bmm_nt`, which the interpreter calls as Python): that is the form's point."""
    triton_maml._kernels()
    from fastmaml.backends import _triton_onestep_blocks

    _refuse_calls(monkeypatch, _triton_onestep_blocks, ("_fw", "_bw", "_bmm_nt"), "a product from registers")
    _compare([3, 20, 17, 4], 3, 6, 7, 1, 1, False, True, True, 1, seed=98, chunk=16)
    with pytest.raises(Exception, match="from registers"):  # the interpreter wraps it in InterpreterError
        _compare([3, 20, 17, 4], 3, 6, 7, 1, 1, False, True, True, 1, seed=98)


@interpreted
def test_chunked_launch_without_factors_runs_with_rows_in_chunks(monkeypatch):
    """A call without factors (no gradient wanted) in the chunked form reads its blocks from rows it then drops:
    the losses and outputs of the CPU op, over task chunks of at most the rows' budget (here two tasks), from
    the support and query passes only (the query backward and the tangents, which alone call `_bmm_tn` and
    `_loss_hvp`, are not run)."""
    triton_maml._kernels()
    from fastmaml.backends import _triton_onestep

    per_task = _onestep.row_bytes([3, 20, 4], 6, 7, False, 8)
    monkeypatch.setattr(_onestep, "MAX_FACTOR_BYTES", 2 * per_task)
    launches = []
    real = _triton_onestep.onestep_kernel.run
    monkeypatch.setattr(_triton_onestep.onestep_kernel, "run", lambda *a, **k: launches.append(1) or real(*a, **k))
    _refuse_calls(monkeypatch, _triton_onestep, ("_bmm_tn", "_loss_hvp"), "a backward pass in a call without factors")
    out = _compare([3, 20, 4], 5, 6, 7, 0, 0, False, True, False, 1, seed=97, factors=False, chunk=16)
    assert len(launches) == 3 and out[2].numel() == 0 and out[4].shape == (0, 4)
    # No tasks: no launch, empty outputs of the op's shapes.
    (theta, _, rates, xs, ys, xq, yq), _ = _inputs([3, 20, 4], 0, 6, 7, 0, seed=97)
    empty = _triton_onestep.launch(theta, rates, xs, ys, xq, yq, None, None, [3, 20, 4], 0, 0, False, False,
                                   tasks_per_program=1, num_warps=4, chunk=16)
    assert len(launches) == 3
    assert [tuple(t.shape) for t in empty] == [(0,), (0, 7, 4), (0,), (0,), (0, 4)]


def test_chunked_products_need_the_second_order_rows():
    """The chunked products read H and D from the rows: refused where a launch does not write them (first
    order, blocks not read back), and for a chunk that is not a power of two of at least 16 (`tl.dot`'s least)."""
    if not triton_maml._triton_installed():
        pytest.skip("Triton is not installed")
    triton_maml._kernels()
    from fastmaml.backends import _triton_onestep

    for first_order, factors, reload, chunk in [(True, True, True, 16), (False, True, False, 16),
                                                (False, True, True, 8), (False, True, True, 24)]:
        with pytest.raises(ValueError, match="chunk"):
            _triton_onestep.constants([1, 100, 1], 5, 5, 1, 0, 0, first_order, factors=factors, reload=reload,
                                      chunk=chunk)
    assert _triton_onestep.constants([1, 100, 1], 5, 5, 1, 0, 0, False, chunk=16)["KC"] == 16


@interpreted
def test_sinusoid_size_in_float32_within_1e4():
    """The 1-40-40-1 net with 10 + 10 points in float32 within 1e-4 of the float64 CPU op."""
    _compare([1, 40, 40, 1], 7, 10, 10, 0, 0, False, True, False, 2, seed=41, dtype=torch.float32, tol=1e-4)


def _case(**kw):
    kw.setdefault("grad_inputs", False)
    return make_case(**kw)


@pytest.fixture
def onestep_on(monkeypatch):
    """The triton backend with its one-step switch on, counting the calls that take the one-step path."""
    monkeypatch.setattr(onestep_call, "ONESTEP", True)
    monkeypatch.setattr(onestep_call, "ONESTEP_TASKS", 2)
    calls = []
    real = _onestep.maml

    def counted(problem, kernel=None):
        calls.append(kernel)
        return real(problem, kernel)

    monkeypatch.setattr(_onestep, "maml", counted)
    return calls


@interpreted
@pytest.mark.parametrize("depth, loss, lr_form, cotangent", [
    (2, "mse", "per_layer", "losses"), (3, "mse", "float", "losses_and_preds"),
    (2, "cross_entropy", "scalar_tensor", "losses_and_preds"), (3, "cross_entropy", "per_step", "losses")])
def test_backend_switch_matches_the_task_loop(onestep_on, depth, loss, lr_form, cotangent):
    """`fastmaml.maml(..., backend="triton")` under the switch: losses, outputs and the gradient of every
    parameter and learned rate within 1e-10 of the independent loop (float64), through the Triton kernel."""
    dims = {2: [3, 7, 4], 3: [3, 7, 5, 4]}[depth]
    case = _case(dims=dims, tasks=5, n_support=5, n_query=7, seed=50 + depth, lr_form=lr_form, loss=loss,
                 activation="tanh")
    lc, pc = output_cotangents(torch.zeros(5, dtype=F64), torch.zeros(5, 7, dims[-1], dtype=F64), seed=depth)
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query, backend="triton",
                        **case.kwargs())
    assert onestep_on == [onestep_call.run]

    def value(o):
        return (o.task_losses * lc).sum() + ((o.query_preds * pc).sum() if cotangent == "losses_and_preds" else 0)

    assert_close(out.task_losses, ref.task_losses, 1e-10, "task_losses")
    assert_close(out.query_preds, ref.query_preds, 1e-10, "query_preds")
    assert_close(gradients(value(out), case.leaves()), gradients(value(ref), case.leaves()), 1e-10, "grads")


@interpreted
def test_backend_switch_chunked_backward(onestep_on, monkeypatch):
    """No rows kept (budget 0): the forward runs the Triton kernel a task at a time, summing each one's rows;
    the mean loss's gradient and that of per-task cotangents (the kernel rerun a task at a time) as the loop's."""
    monkeypatch.setattr(_onestep, "MAX_FACTOR_BYTES", 0)
    case = _case(dims=[3, 7, 4], tasks=3, n_support=5, n_query=6, seed=60)
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query, backend="triton",
                        **case.kwargs())
    assert_close(gradients(out.loss, case.leaves(), retain_graph=True), gradients(ref.loss, case.leaves(), True),
                 1e-10, "grads")
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert_close(gradients((out.task_losses * w).sum(), case.leaves()),
                 gradients((ref.task_losses * w).sum(), case.leaves()), 1e-10, "grads")
    assert len(onestep_on) == 1


@interpreted
def test_backend_switch_takes_wide_layers_in_chunks(onestep_on, monkeypatch):
    """A layer of 70 (padded to 128): the chunked form, chosen by the backend (chunks of 16), through the autograd
    function, in float32 (the backend takes widths above 64 in float32 only): losses, outputs and gradients
    within 1e-4 of the float64 task loop (and a call without gradients, which the forward kernel runs)."""
    monkeypatch.setattr(onestep_call, "ONESTEP_CHUNK", None)
    monkeypatch.delenv("FASTMAML_TRITON_ONESTEP_CHUNK", raising=False)
    chunks = []
    from fastmaml.backends import _triton_onestep

    real = _triton_onestep.launch
    monkeypatch.setattr(_triton_onestep, "launch", lambda *a, **k: chunks.append(k["chunk"]) or real(*a, **k))
    case = _case(dims=[2, 70, 3], tasks=3, n_support=5, n_query=6, seed=64, lr_form="per_layer")
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    c = case.to(torch.float32)
    out = fastmaml.maml(c.params, c.x_support, c.y_support, c.x_query, c.y_query, backend="triton", **c.kwargs())
    assert_close(out.task_losses.double(), ref.task_losses, 1e-4, "task_losses")
    assert_close({k: v.double() for k, v in gradients(out.loss, c.leaves()).items()},
                 gradients(ref.loss, case.leaves()), 1e-4, "grads")
    with torch.no_grad():
        quiet = fastmaml.maml(c.params, c.x_support, c.y_support, c.x_query, c.y_query, backend="triton",
                              **c.kwargs())
    assert_close(quiet.query_preds.double(), ref.query_preds.detach(), 1e-4, "query_preds")
    assert onestep_on == [onestep_call.run] and chunks == [16]  # no_grad: the forward kernel


@interpreted
def test_backend_switch_leaves_other_calls_to_the_sweep(onestep_on):
    """Two inner steps: `_onestep.reason` refuses, the reverse sweep runs (no one-step call)."""
    case = _case(dims=[3, 7, 4], tasks=2, n_support=5, n_query=6, seed=61, inner_steps=2)
    fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query, backend="triton",
                  **case.kwargs()).loss.backward()
    assert onestep_on == []


@pytest.mark.parametrize("cap, warps, expected", [(0, 8, 255), (0, 4, 255), (0, 16, 128), (0, 32, 64), (200, 8, 200),
                                                  (200, 16, 128), (96, 16, 96)])
def test_register_cap_fits_the_warps(monkeypatch, cap, warps, expected):
    """The one-step launch's register cap: FASTMAML_TRITON_MAXNREG or 255, at most what a program of its warps
    can hold (16 warps at 255 registers could not launch)."""
    monkeypatch.setattr(triton_maml, "MAXNREG", cap)
    assert onestep_call.register_cap(warps) == expected


@pytest.mark.parametrize("name, value", [("FASTMAML_TRITON_ONESTEP", "yes"), ("FASTMAML_TRITON_ONESTEP_TASKS", "3"),
                                         ("FASTMAML_TRITON_ONESTEP_CHUNK", "8")])
def test_mistyped_switches_are_refused(monkeypatch, name, value):
    """Read on first use: a value the backend does not know is refused, naming the switch."""
    if not triton_maml._triton_installed():
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(onestep_call, "ONESTEP", None)
    monkeypatch.setattr(onestep_call, "ONESTEP_TASKS", None)
    monkeypatch.setattr(onestep_call, "ONESTEP_CHUNK", None)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        triton_maml.TritonBackend().unavailable()


@pytest.mark.parametrize("variant", [
    dict(dtype="float32", dims=[1, 40, 40, 1], ns=10, nq=10, act=0, loss=0, first_order=False, tasks=1),
    dict(dtype="float64", dims=[3, 9, 6, 5, 4], ns=10, nq=17, act=1, loss=1, first_order=True, tasks=2),
    dict(dtype="float32", dims=[1, 128, 128, 1], ns=10, nq=10, act=1, loss=0, first_order=False, tasks=1)])
def test_sm90_cubin_builds_without_a_gpu(variant):
    """Through ptxas to a cubin for an H100 / H200 without a GPU (the interpreter cannot show what only the
    compiler refuses): the sinusoid training call; float64 at depth 4 with tanh, cross-entropy, first order
    and two tasks a program; the 1-128-128-1 net with tanh (the chunked products). In a subprocess, with
    TRITON_INTERPRET unset."""
    import json
    import subprocess
    import sys

    if not triton_maml._triton_installed():
        pytest.skip("Triton is not installed")
    script = (
        "import json, sys, torch\n"
        "from fastmaml.backends import _triton_targets as t\n"
        "v = json.loads(sys.argv[1])\n"
        "k = t.onestep_compile_for_target(getattr(torch, v['dtype']), v['dims'], v['ns'], v['nq'], v['act'],\n"
        "    v['loss'], first_order=v['first_order'], tasks_per_program=v['tasks'])\n"
        "print('cubin bytes', len(k.asm['cubin']), 'shared', k.metadata.shared)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(variant)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "cubin bytes" in proc.stdout, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) <= 232448  # an sm_90 block's shared memory


# ---- on a GPU -------------------------------------------------------------------------------------------

def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not triton_maml._triton_installed():
        return "Triton is not installed"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("dtype, tasks_per_program", [(torch.float32, 1), (torch.float32, 2), (torch.float64, 1)],
                         ids=["f32_one", "f32_two", "f64_one"])
@pytest.mark.parametrize("shape", ["depth4_tanh", "sinusoid_20000", "ce_5way"])
def test_gpu_kernel_matches_the_cpu_op(dtype, tasks_per_program, shape):
    """The compiled kernel (8 warps, as the backend launches it) against the float64 CPU op: float64 within
    1e-10, float32 within 1e-4 (per tensor from 1,000 tasks); 20,000 tasks at the sinusoid size; one or two
    tasks a program (nine compiles)."""
    dims, tasks, ns, nq, act, loss = {"depth4_tanh": ([5, 6, 3, 9, 3], 37, 13, 5, 1, 0),
                                      "sinusoid_20000": ([1, 40, 40, 1], 20000, 10, 10, 0, 0),
                                      "ce_5way": ([12, 33, 5], 301, 5, 15, 0, 1)}[shape]
    _compare(dims, tasks, ns, nq, act, loss, False, True, True, tasks_per_program, seed=70, dtype=dtype,
             device="cuda", tol=1e-10 if dtype == F64 else 1e-4, num_warps=8)


@pytest.mark.parametrize("dims, ns, nq, first_order, chunk, why", [
    ([1, 130, 1], 5, 6, False, "auto", "padded widths up to 128"),
    ([1, 100, 1], 5, 6, True, "auto", "with first order"),
    ([1, 100, 1], 5, 6, False, "0", "with FASTMAML_TRITON_ONESTEP_CHUNK=0"),
    ([1, 40, 1], 5, 33, False, "auto", "up to 32 support and query points"),
    ([1, 40, 1], 33, 5, False, "auto", "up to 32 support and query points")])
def test_sizes_beyond_the_kernel_are_refused(monkeypatch, dims, ns, nq, first_order, chunk, why):
    """Padded widths above 64 run only in chunks, which read the rows a second-order call writes; above 128 and
    beyond 32 points not at all. Each refusal says why; the largest sizes taken are taken."""
    from fastmaml._validate import make_problem

    monkeypatch.setattr(onestep_call, "ONESTEP_CHUNK", chunk)
    case = _case(dims=dims, tasks=2, n_support=ns, n_query=nq, seed=62, first_order=first_order)
    problem = make_problem(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    assert _onestep.reason(problem, False, False) is None
    assert why in onestep_call.reason(problem, False, False)
    wide = chunk == "auto"  # chunks of 16 by default; none with the switch at 0
    for dims, ns, nq, taken, chunks in [([1, 64, 1], 32, 17, True, 0), ([1, 128, 3], 10, 10, wide, 16 if wide else 0)]:
        case = _case(dims=dims, tasks=2, n_support=ns, n_query=nq, seed=63)
        problem = make_problem(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                               **case.kwargs())
        assert (onestep_call.reason(problem, False, False) is None) == taken
        assert onestep_call.chunk(dims, False) == chunks
    assert onestep_call.chunk([1, 128, 3], True) == 0


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("act", [0, 1], ids=["relu", "tanh"])
def test_gpu_chunked_kernel_matches_the_cpu_op(act):
    """The chunked form as the backend launches it at width 128 (chunks of 16, one stage, 8 warps): 20,000 tasks
    of the 1-128-128-1 net in float32 within 1e-4 of the float64 CPU op, per tensor (float32 alone puts single
    elements past 1e-4 here: the CPU op in float32 has `preds` at 1.2e-4 and `V` at 2.4e-4 on these inputs)."""
    _compare([1, 128, 128, 1], 20000, 10, 10, act, 0, False, True, True, 1, seed=71, dtype=torch.float32,
             device="cuda", tol=1e-4, num_warps=8, chunk=onestep_call.chunk([1, 128, 128, 1], False))


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_gpu_chunked_kernel_without_factors_matches_the_cpu_op():
    """A call without factors in the chunked form at width 128 (support and query passes only, rows as scratch):
    2,000 tasks' losses and outputs in float32 within 1e-4 of the float64 CPU op, per tensor. Not in the GPU
    check's quick stage (each variant is a compile); the full GPU suite runs it."""
    dims = [1, 128, 128, 1]
    _compare(dims, 2000, 10, 10, 1, 0, False, True, False, 1, seed=72, factors=False, dtype=torch.float32,
             device="cuda", tol=1e-4, num_warps=8, chunk=onestep_call.chunk(dims, False))


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_gpu_backend_switch_matches_the_task_loop(onestep_on):
    """`fastmaml.maml(..., backend="triton")` on CUDA tensors under the switch (two tasks a program): the
    gradients of the mean loss within 1e-4 of the float64 task loop, through the compiled kernel."""
    case = _case(dims=[1, 40, 40, 1], tasks=50, n_support=10, n_query=10, seed=2)
    ref = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    g_ref = gradients(ref.loss, case.leaves())
    c = case.to(torch.float32, "cuda")
    out = fastmaml.maml(c.params, c.x_support, c.y_support, c.x_query, c.y_query, backend="triton", **c.kwargs())
    g = gradients(out.loss, c.leaves())
    assert onestep_on == [onestep_call.run]
    assert_close({k: v.double().cpu() for k, v in g.items()}, g_ref, 1e-4, "grads")
