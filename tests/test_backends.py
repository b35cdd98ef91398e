"""Every kernel backend against the reference backend, on fresh random problems.

Parametrised over the registered backends other than "reference" (`fastmaml.list_backends()`;
`FASTMAML_TEST_BACKENDS=a,b` picks others, "reference" included, to check this file itself).
Compared in float64 to 1e-9 relative and in float32 to 1e-4 relative (against the float64 reference
on the same rounded inputs): the loss, task losses, query predictions and the gradients of params,
rate tensors and both inputs, for every option; `adapt` and `reptile` too.

Skips, and when a skip is a failure instead:
- a backend whose `unavailable()` gives a reason is skipped with it, unless it should run on this
  machine (cpu with a C++ compiler, triton when installed and either a GPU or the interpreter is
  there, cuda with a GPU): then the test fails;
- a backend that rejects a call (device, dtype, an option) is skipped with its reason, except
  `cpu`, which must take every call here, and `factored`, which must take every call but those with
  per-parameter rates (MUST_ACCEPT), and any backend that should run here must take the
  plainest call (`test_accepts_a_plain_call`), so that a backend rejecting everything cannot pass
  as a run of skips;
- the "triton" backend runs on CPU tensors in the Triton interpreter (~10 ms a program): it gets a
  reduced grid of 2 to 3 tasks.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import re
import shutil

import pytest
import torch

import fastmaml
from fastmaml import dispatch
from _reference_loop import (DIMS_BY_DEPTH, LR_FORMS, assert_close, assert_close_per_tensor, gradients, make_case,
                             near_relu_kinks, objective, output_cotangents, task_objective)

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# Backends that must take every call of this file when they can run here, but for the refusals named.
MUST_ACCEPT = {"cpu": None, "factored": "Meta-SGD"}
F32, F64 = torch.float32, torch.float64


def _selected_backends() -> list[str]:
    wanted = os.environ.get("FASTMAML_TEST_BACKENDS")
    if wanted:
        return [name.strip() for name in wanted.split(",") if name.strip()]
    return [name for name in fastmaml.list_backends() if name != "reference"]


BACKENDS = _selected_backends()


def should_run_here(name: str) -> bool:
    """Whether this machine has what the backend needs (so that being unavailable is a bug)."""
    if name in ("reference", "factored"):
        return True
    if name == "cpu":
        return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False
        if torch.cuda.is_available():
            return True
        return os.environ.get("TRITON_INTERPRET") == "1" and triton_interpreter_problem() is None
    if name == "cuda":  # a GPU, a CUDA build of torch and nvcc to build the extension
        has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
        return torch.cuda.is_available() and torch.version.cuda is not None and has_nvcc
    return False


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem():
    """Why Triton's interpreter cannot run a kernel with a runtime-bounded loop here, or None.

    The kernels loop over steps and layers with runtime bounds; Triton 3.6's interpreter fails on such
    loops with numpy >= 2.4. That is this machine's setup, not a fault of the backend, so the triton
    tests are then skipped (with this reason) rather than failed.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def count(out, n):
        acc = tl.zeros([8], dtype=tl.float32)
        for _ in range(n):
            acc += 1.0
        tl.store(out + tl.arange(0, 8), acc)

    out = torch.zeros(8)
    try:
        count[(1,)](out, 3)
    except Exception as err:  # the interpreter raises its own error types
        import numpy

        return f"the Triton interpreter fails here ({type(err).__name__}: {err}; numpy {numpy.__version__})"
    return None if bool((out == 3).all()) else "the Triton interpreter computed a wrong loop count"


def device_for(name: str) -> str:
    """cpu runs CPU tensors; the GPU backends run CUDA tensors when there is a GPU, else CPU tensors
    (Triton's interpreter; the cuda backend then rejects the call, and is skipped with its reason)."""
    if name in ("cpu", "reference"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_backend(name: str) -> None:
    """Skip (or fail, see the module docstring) when the backend cannot run at all here."""
    if name not in fastmaml.list_backends():
        pytest.fail(f"backend {name!r} is not registered (registered: {fastmaml.list_backends()})")
    why = dispatch.get_backend(name).unavailable()
    if why is None:
        return
    if should_run_here(name):
        pytest.fail(f"backend {name!r} should run on this machine but says it is unavailable: {why}")
    pytest.skip(f"backend {name!r} unavailable: {why}")


def run_or_skip(name: str, fn):
    """Call `fn()`; a refusal of the explicit backend skips the test with its reason (fails for cpu)."""
    try:
        return fn()
    except ValueError as err:
        if f"backend={name!r} cannot run this call" not in str(err):
            raise
        if name in MUST_ACCEPT and (MUST_ACCEPT[name] is None or MUST_ACCEPT[name] not in str(err)):
            pytest.fail(f"backend {name!r} must run this call but refused: {err}")
        pytest.skip(str(err))


# ---- the reference results, computed once per problem (both dtypes compare against them) ----------


def _key(options: dict) -> tuple:
    return tuple(sorted(options.items()))


@functools.lru_cache(maxsize=None)
def reference_result(key: tuple):
    """`(outputs, gradients)` of the reference backend in float64 for `make_case(**dict(key))`."""
    case = make_case(**dict(key))
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="reference", **case.kwargs())
    cot = output_cotangents(out.task_losses, out.query_preds)
    grads = gradients(objective(out.loss, out.task_losses, out.query_preds, cot), case.leaves(), retain_graph=True)
    task_grads = gradients(task_objective(out.loss, out.task_losses, cot), case.leaves())
    outputs = {"loss": out.loss, "task_losses": out.task_losses, "query_preds": out.query_preds}
    return ({k: v.detach() for k, v in outputs.items()}, {k: v.detach() for k, v in grads.items()},
            {k: v.detach() for k, v in task_grads.items()})


def check_maml(name: str, options: dict, dtype: torch.dtype) -> None:
    """`maml(backend=name)` in `dtype` against the float64 reference: outputs and every gradient."""
    require_backend(name)
    case = make_case(**options).to(dtype, device_for(name))
    out = run_or_skip(name, lambda: fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query,
                                                  case.y_query, backend=name, **case.kwargs()))
    assert out.backend == name
    want_out, want_grads, want_task_grads = reference_result(_key(options))
    T, Nq = case.x_query.shape[:2]
    assert out.loss.shape == () and out.task_losses.shape == (T,) and out.query_preds.shape == (T, Nq, case.params[-1].shape[0])
    assert out.query_preds.dtype == dtype and out.query_preds.device == case.x_query.device
    rtol = RTOL[dtype]
    assert_close({"loss": out.loss, "task_losses": out.task_losses, "query_preds": out.query_preds}, want_out,
                 rtol, "")
    cot = output_cotangents(want_out["task_losses"], want_out["query_preds"])
    cot = tuple(c.to(out.loss.device) for c in cot)
    # Both objectives from the same forward: with a cotangent on the query output, and without one (a
    # training loop's; the cpu backend's fused forward-backward then takes its other path).
    got = gradients(objective(out.loss, out.task_losses, out.query_preds, cot), case.leaves(), retain_graph=True)
    assert_close(got, want_grads, rtol, "grad")
    got_task = gradients(task_objective(out.loss, out.task_losses, cot), case.leaves())
    assert_close(got_task, want_task_grads, rtol, "task-objective grad")


# ---- the grids ------------------------------------------------------------------------------------

OPTION_GRID = [
    dict(inner_steps=K, lr_form=lr, first_order=fo, query_loss_weights=qlw, loss=loss, activation=act)
    for K, lr, fo, qlw, loss, act in itertools.product(
        [0, 1, 3], LR_FORMS, [False, True], [False, True], ["mse", "cross_entropy"], ["relu", "tanh"])
]
DEPTH_GRID = [
    dict(dims=tuple(DIMS_BY_DEPTH[depth]), tasks=4, n_support=7, n_query=3, inner_steps=K, lr_form="per_parameter",
         loss=loss, activation=act)
    for depth, K, loss, act in itertools.product([1, 2, 3, 4], [0, 1, 3], ["mse", "cross_entropy"], ["relu", "tanh"])
]
# The Triton interpreter's grid: each option at least once, 2 or 3 tasks.
REDUCED_GRID = [
    dict(inner_steps=0, lr_form="float", loss="mse", activation="relu"),
    dict(inner_steps=1, lr_form="float", loss="mse", activation="relu"),
    dict(inner_steps=3, lr_form="per_step", loss="mse", activation="tanh"),
    dict(inner_steps=2, lr_form="per_parameter", loss="cross_entropy", activation="relu"),
    dict(inner_steps=2, lr_form="per_layer", loss="cross_entropy", activation="tanh", first_order=True),
    dict(inner_steps=3, lr_form="float", loss="mse", activation="tanh", first_order=True),
    dict(inner_steps=2, lr_form="per_step", loss="mse", activation="relu", query_loss_weights=True),
    dict(inner_steps=1, lr_form="per_parameter", loss="cross_entropy", activation="tanh", query_loss_weights=True),
    dict(dims=tuple(DIMS_BY_DEPTH[1]), tasks=2, inner_steps=2, lr_form="per_parameter", loss="mse", activation="relu"),
    dict(dims=tuple(DIMS_BY_DEPTH[4]), tasks=2, inner_steps=2, lr_form="per_step", loss="cross_entropy",
         activation="tanh"),
    # the sinusoid net's shape: the Triton register layout keeps its 1-wide input and output 1 wide
    dict(dims=(1, 9, 7, 1), tasks=3, inner_steps=3, lr_form="per_step", loss="mse", activation="tanh"),
]


def _case_id(options: dict) -> str:
    parts = []
    if "dims" in options:
        parts.append("d" + "x".join(map(str, options["dims"])))
    parts.append(f"K{options['inner_steps']}")
    parts.append(options["lr_form"])
    parts.append("fo" if options.get("first_order") else "so")
    if options.get("query_loss_weights"):
        parts.append("qlw")
    parts += [options.get("loss", "mse"), options.get("activation", "relu")]
    if options.get("grad_inputs") is False:
        parts.append("nogradx")
    if "tasks" in options:
        parts.append(f"T{options['tasks']}")
    return "-".join(parts)


# The factored backend refuses per-parameter rates (DEPTH_GRID's): its depths with per-tensor ones.
FACTORED_DEPTH_GRID = [dict(o, lr_form="per_layer") for o in DEPTH_GRID]


def _maml_params():
    out = []
    for name in BACKENDS:
        grids = {"triton": REDUCED_GRID, "factored": OPTION_GRID + FACTORED_DEPTH_GRID}
        cases = grids.get(name, OPTION_GRID + DEPTH_GRID)
        for (i, options), dtype in itertools.product(enumerate(cases), [F64, F32]):
            options = {**options, "seed": i}  # both dtypes: the same problem, one reference run
            out.append(pytest.param(name, options, dtype,
                                    id=f"{name}-{_case_id(options)}-{'f64' if dtype == F64 else 'f32'}"))
    return out


@pytest.mark.parametrize("name,options,dtype", _maml_params())
def test_maml_matches_reference(name, options, dtype):
    check_maml(name, options, dtype)


# The GPU kernels at the sizes they are measured at: the sinusoid net (1-40-40-1, 10 + 10 points, K = 1
# and 5) and batches of 20,000 tasks (more than a launch has blocks) at widths 40 and 128, each option at
# least once. Rates scaled by 0.1 (0.005 to 0.03): at the default ones a 128-wide net diverges over 5
# steps. The float64 reference runs on the GPU too (on the CPU it would take minutes).
GPU_SIZE_GRID = [
    dict(dims=(1, 40, 40, 1), tasks=25, inner_steps=1, lr_form="float"),
    dict(dims=(1, 40, 40, 1), tasks=25, inner_steps=5, lr_form="per_parameter", query_loss_weights=True),
    dict(dims=(1, 40, 40, 1), tasks=20000, inner_steps=5, lr_form="per_step", activation="tanh", first_order=True),
    dict(dims=(1, 128, 128, 1), tasks=20000, inner_steps=1, lr_form="per_parameter"),
    dict(dims=(1, 128, 128, 5), tasks=20000, inner_steps=5, lr_form="float", loss="cross_entropy",
         query_loss_weights=True),
    dict(dims=(1, 128, 128, 1), tasks=20000, inner_steps=5, lr_form="per_layer", activation="tanh"),
]


def reference_in_chunks(case, cotangents, chunk: int):
    """The float64 reference of `objective` over the whole batch, run `chunk` tasks at a time: `(loss,
    task_losses, query_preds, gradients by leaf)`. The meta-loss is the mean of the task losses, so the
    objective is a sum over tasks and its gradient the sum of the chunks' (zero outside a chunk for the
    inputs). One call at T=20,000, width 128, K=5 held 24-54 GB of the GPU (the H200 run of
    2026-11-30), too much for the GPU check's parallel workers."""
    T = case.x_support.shape[0]
    a, b = cotangents
    leaves = case.leaves()
    grads = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
    losses, preds = [], []
    for lo in range(0, T, chunk):
        part = slice(lo, min(lo + chunk, T))
        out = fastmaml.maml(case.params, case.x_support[part], case.y_support[part], case.x_query[part],
                            case.y_query[part], backend="reference", **case.kwargs())
        value = (out.task_losses * (1.0 / T + a[part])).sum() + (out.query_preds * b[part]).sum()
        for name, g in gradients(value, leaves).items():
            grads[name] += g
        losses.append(out.task_losses.detach())
        preds.append(out.query_preds.detach())
    task_losses = torch.cat(losses)
    return task_losses.mean(), task_losses, torch.cat(preds), grads


@pytest.mark.parametrize("options", [
    dict(dims=(2, 9, 3), tasks=7, inner_steps=2, lr_form="per_step", query_loss_weights=True),
    dict(dims=(2, 9, 7, 3), tasks=7, inner_steps=1, lr_form="per_parameter", loss="cross_entropy"),
], ids=_case_id)
def test_reference_in_chunks_is_the_whole_batch(options):
    """The GPU-size test's oracle (the reference run a chunk of tasks at a time) is the one-call reference:
    outputs and every gradient (parameters, rates, inputs, step weights) to rounding."""
    case = make_case(**options, seed=5).to(F64)
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="reference", **case.kwargs())
    cot = output_cotangents(out.task_losses, out.query_preds)
    want_grads = gradients(objective(out.loss, out.task_losses, out.query_preds, cot), case.leaves())
    assert len(want_grads) >= 4
    loss, losses, preds, grads = reference_in_chunks(case, cot, chunk=3)
    assert_close({"loss": loss, "task_losses": losses, "query_preds": preds, **grads},
                 {"loss": out.loss, "task_losses": out.task_losses, "query_preds": out.query_preds, **want_grads},
                 1e-12)


def test_near_relu_kinks_finds_a_task_on_a_kink():
    """`near_relu_kinks` (the GPU-size test's filter) flags a task with a support pre-activation exactly at 0
    and no other, and follows its bound; a query point at 0 under theta_0 only where the loss reads that pass
    (query-loss weights), not where it reads only theta_K's (whose bias has moved)."""
    for qlw in (False, True):
        case = make_case(dims=(2, 9, 7, 1), tasks=6, inner_steps=2, lr_form="per_step", query_loss_weights=qlw,
                         seed=11).to(F64)
        with torch.no_grad():
            case.params[1][3] = 0.0  # the first layer's unit 3 has no bias ...
            case.x_support[4] = 0.0  # ... so task 4's support points all sit on its kink at step 0
            case.x_query[1] = 0.0  # ... and task 1's query points too
        assert near_relu_kinks(case, rel=1e-12).tolist() == [False, qlw, False, False, True, False]
        assert near_relu_kinks(case, rel=1.0 + 1e-9).all()


@pytest.mark.parametrize("options", [dict(o, n_support=10, n_query=10, lr_scale=0.1, seed=100 + i)
                                     for i, o in enumerate(GPU_SIZE_GRID)], ids=_case_id)
@pytest.mark.parametrize("name", [n for n in BACKENDS if n in ("cuda", "triton", "factored")])
def test_gpu_sizes_match_reference(name, options):
    if not torch.cuda.is_available():
        pytest.skip("the GPU sizes (up to 20,000 tasks of width 128) need a GPU")
    require_backend(name)
    case = make_case(**options)
    ref, run = case.to(F64, "cuda"), case.to(F32, "cuda")
    got = run_or_skip(name, lambda: fastmaml.maml(run.params, run.x_support, run.y_support, run.x_query,
                                                  run.y_query, backend=name, **run.kwargs()))
    cot = tuple(c.to("cuda") for c in output_cotangents(got.task_losses, got.query_preds))
    if options["tasks"] >= 1000 and options.get("activation", "relu") == "relu":
        # The tasks whose passes come within float32's reach of a ReLU kink get no cotangent (they stay in
        # the mean loss at 1/T; near_relu_kinks says why): the bound is then one float32 itself can meet.
        keep = ~near_relu_kinks(ref)
        assert keep.float().mean() > 0.9, f"{int((~keep).sum())} tasks near a kink: not a test of the rest"
        cot = (cot[0] * keep, cot[1] * keep.view(-1, 1, 1))
    want_loss, want_losses, want_preds, want_grads = reference_in_chunks(ref, cot, chunk=2500)
    # Thousands of tasks: within 1e-4 per tensor (norm-wise), no element beyond 1e-2 of its tensor's
    # scale. Elementwise 1e-4 fails for float32 itself there (assert_close_per_tensor says why).
    compare = (functools.partial(assert_close_per_tensor, worst=1e-2) if options["tasks"] >= 1000
               else assert_close)
    names = ("loss", "task_losses", "query_preds")
    compare(dict(zip(names, got[:3])), dict(zip(names, (want_loss, want_losses, want_preds))), RTOL[F32], name="")
    got_grads = gradients(objective(got.loss, got.task_losses, got.query_preds, cot), run.leaves())
    compare(got_grads, want_grads, RTOL[F32], name="grad")


# The Triton kernels' other layout (`_triton_scratch.py`, which `auto` takes from width 128) on the same
# grid, with and without input gradients: the seeds are the grid's, so the reference runs are shared.
SCRATCH_GRID = [dict(o, seed=i) for i, o in enumerate(REDUCED_GRID)] + [
    dict(inner_steps=2, lr_form="per_parameter", grad_inputs=False, tasks=3, seed=40),
    dict(inner_steps=2, lr_form="float", grad_inputs=False, loss="cross_entropy", first_order=True, tasks=3,
         seed=40),
]


@pytest.mark.parametrize("options", SCRATCH_GRID, ids=_case_id)
def test_triton_scratch_layout_matches_reference(options, monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton is not among FASTMAML_TEST_BACKENDS")
    require_backend("triton")
    from fastmaml.backends import triton_maml

    monkeypatch.setattr(triton_maml, "LAYOUT", "scratch")
    check_maml("triton", options, F32)


def _small_params(cases):
    return [pytest.param(name, opts, id=f"{name}-{_case_id(opts)}") for name in BACKENDS for opts in cases]


@pytest.mark.parametrize(
    "name,options",
    _small_params([
        dict(inner_steps=2, lr_form="per_parameter", grad_inputs=False),
        dict(inner_steps=2, lr_form="float", grad_inputs=False, loss="cross_entropy", first_order=True),
    ]),
)
def test_maml_without_input_grads(name, options):
    """Only params (and rates) require grad: the kernels skip the input gradients and the rest agrees."""
    check_maml(name, {**options, "tasks": 3, "seed": 40}, F64)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_input_grads_only(name, first_order):
    """ANIL-like use: frozen params, gradients for the inputs (a backbone's features) only."""
    require_backend(name)
    case = make_case(inner_steps=2, first_order=first_order, loss="cross_entropy", seed=41)
    for p in case.params:
        p.requires_grad_(False)
    run = case.to(F64, device_for(name))
    out = run_or_skip(name, lambda: fastmaml.maml(run.params, run.x_support, run.y_support, run.x_query, run.y_query,
                                                  backend=name, **run.kwargs()))
    ref = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="reference", **case.kwargs())
    got = gradients(out.loss, {"x_support": run.x_support, "x_query": run.x_query})
    want = gradients(ref.loss, {"x_support": case.x_support, "x_query": case.x_query})
    assert_close(got, want, RTOL[F64], "grad")


@pytest.mark.parametrize("name", BACKENDS)
def test_no_grad_call(name):
    """Under no_grad (evaluation) the outputs are the same and carry no graph."""
    require_backend(name)
    base = make_case(inner_steps=3, lr_form="per_step", seed=42)
    case = base.to(F64, device_for(name))
    with torch.no_grad():
        out = run_or_skip(name, lambda: fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query,
                                                      case.y_query, backend=name, **case.kwargs()))
        ref = fastmaml.maml(base.params, base.x_support, base.y_support, base.x_query, base.y_query,
                            backend="reference", **base.kwargs())
    assert not out.loss.requires_grad
    assert_close(out.query_preds, ref.query_preds, RTOL[F64], "query_preds")
    assert_close(out.task_losses, ref.task_losses, RTOL[F64], "task_losses")


@pytest.mark.parametrize("name", BACKENDS)
def test_accepts_a_plain_call(name):
    """A backend that should run on this machine must take the plainest call (float32 MLP, one step,
    a float rate, mse): rejecting everything here would otherwise pass as a run of skips."""
    require_backend(name)
    case = make_case(dims=(3, 7, 2), inner_steps=1, seed=43).to(F32, device_for(name))
    call = lambda: fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query,  # noqa: E731
                                 case.y_query, backend=name, **case.kwargs())
    if not should_run_here(name):
        run_or_skip(name, call)
        return
    try:
        out = call()
    except ValueError as err:
        pytest.fail(f"backend {name!r} should run here but refused a plain float32 call: {err}")
    assert out.backend == name and torch.isfinite(out.loss)


# ---- adapt and reptile ---------------------------------------------------------------------------

ADAPT_CASES = [
    dict(inner_steps=3, lr_form="per_step", loss="mse", activation="tanh"),
    dict(inner_steps=2, lr_form="per_parameter", loss="cross_entropy", activation="relu"),
    dict(dims=tuple(DIMS_BY_DEPTH[4]), inner_steps=5, lr_form="float", loss="mse", activation="relu"),
    dict(dims=tuple(DIMS_BY_DEPTH[1]), inner_steps=0, lr_form="float", loss="cross_entropy", activation="tanh"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "name,options",
    [pytest.param(n, o, id=f"{n}-{_case_id(o)}") for n in BACKENDS for o in ADAPT_CASES],
)
def test_adapt_matches_reference(name, options, dtype):
    """`adapt` (under no_grad, as the fused backends serve it): theta_K of every task."""
    require_backend(name)
    options = {**options, "seed": 50}
    case = make_case(**options)
    run = case.to(dtype, device_for(name))
    kw = dict(inner_steps=options["inner_steps"], activation=options["activation"], loss=options["loss"])
    with torch.no_grad():
        got = run_or_skip(name, lambda: fastmaml.adapt(run.params, run.x_support, run.y_support,
                                                       inner_lr=run.inner_lr, backend=name, **kw))
        want = fastmaml.adapt(case.params, case.x_support, case.y_support, inner_lr=case.inner_lr,
                              backend="reference", **kw)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(g.dtype == dtype for g in got)
    assert_close(got, want, RTOL[dtype], "adapted")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_reptile_matches_reference(name, dtype):
    """`reptile`: `params - mean_t theta_K`, from the backend's `adapt`."""
    require_backend(name)
    case = make_case(dims=(3, 7, 5, 2), tasks=3, inner_steps=4, lr_form="per_layer", loss="mse", activation="tanh",
                     seed=51)
    run = case.to(dtype, device_for(name))
    kw = dict(inner_steps=4, activation="tanh", loss="mse")
    got = run_or_skip(name, lambda: fastmaml.reptile(run.params, run.x_support, run.y_support, inner_lr=run.inner_lr,
                                                     backend=name, **kw))
    want = fastmaml.reptile(case.params, case.x_support, case.y_support, inner_lr=case.inner_lr,
                            backend="reference", **kw)
    assert_close(got, want, RTOL[dtype], "reptile")


# ---- what the fused backends refuse ---------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in ("reference", "factored")])
def test_meta_gradient_is_not_differentiated_again(name):
    """The fused backward computes the meta-gradient once: a gradient of it raises a clear error
    instead of returning a silently wrong (zero) second derivative."""
    require_backend(name)
    case = make_case(inner_steps=1, seed=52).to(F64, device_for(name))
    out = run_or_skip(name, lambda: fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query,
                                                  case.y_query, backend=name, **case.kwargs()))
    (g,) = torch.autograd.grad(out.loss, case.params[0], create_graph=True)
    with pytest.raises(RuntimeError, match="reference"):
        torch.autograd.grad(g.sum(), case.params[0])


@pytest.mark.parametrize("name", [n for n in BACKENDS if n == "factored"])
def test_meta_gradient_differentiated_again(name):
    """The factored backend is plain autograd: the gradient of its meta-gradient (a third derivative of the
    inner loss) is the reference's."""
    require_backend(name)
    case = make_case(inner_steps=2, lr_form="per_step", activation="tanh", seed=52).to(F64, device_for(name))
    grads = {}
    for backend in ("reference", name):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        (g,) = torch.autograd.grad(out.loss, case.params[2], create_graph=True)
        grads[backend] = gradients((g * g).sum(), case.leaves())
    assert grads["reference"]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(grads[name], grads["reference"], 1e-9, "grad of the meta-gradient")


def test_auto_passes_over_gpu_kernels_on_large_gpu_batches():
    """`auto` skips cuda/triton on a GPU where the reference measured faster (a speed rule with its
    reason), keeps them for small batches, and leaves other devices and backends alone."""
    from types import SimpleNamespace

    gpu = torch.device("cuda")
    small = SimpleNamespace(device=gpu, num_tasks=25, dims=[1, 40, 40, 1])
    large = SimpleNamespace(device=gpu, num_tasks=65536, dims=[1, 40, 40, 1])
    wide = SimpleNamespace(device=gpu, num_tasks=1024, dims=[1, 128, 128, 1])
    for name in ("cuda", "triton"):
        assert dispatch._auto_skip(name, small) is None
        for problem in (large, wide):
            why = dispatch._auto_skip(name, problem)
            assert why is not None and "ask for it explicitly" in why
    assert dispatch._auto_skip("reference", large) is None
    assert dispatch._auto_skip("cpu", SimpleNamespace(device=torch.device("cpu"), num_tasks=65536,
                                                      dims=[1, 128, 128, 1])) is None
    assert dispatch._auto_skip("cuda", SimpleNamespace(device=gpu, num_tasks=10**6, dims=None)) is None


def test_auto_takes_factored_where_its_widest_layer_stays_in_factors(monkeypatch):
    """`auto` prefers `factored` to the reference (after the fused kernels) while the widest layer's K
    factor pairs cost fewer multiply-adds than its dense product, on either device, and passes over it
    with a reason where that layer turns dense (where the reference measured faster). With the cpu
    backend unavailable, an auto call takes `factored` and computes the reference's function."""
    from types import SimpleNamespace

    def problem(device, K, width, n_support=10):
        return SimpleNamespace(device=torch.device(device), num_tasks=65536, dims=[1, width, width, 1],
                               inner_steps=K, n_support=n_support)

    for device in ("cuda", "cpu"):
        order = dispatch.AUTO_ORDER[device]
        assert order.index("factored") == order.index("reference") - 1
        assert dispatch._auto_skip("factored", problem(device, 1, 40)) is None
        assert dispatch._auto_skip("factored", problem(device, 2, 40)) is None  # 2 x 10 x 80 = 1,600 = 40 x 40
        assert dispatch._auto_skip("factored", problem(device, 5, 128)) is None
        assert dispatch._auto_skip("factored", problem(device, 6, 128)) is None
        why = dispatch._auto_skip("factored", problem(device, 5, 40))
        assert why is not None and "40 x 40 layer turns dense after 3 of the 5" in why, why
        why = dispatch._auto_skip("factored", problem(device, 7, 128))
        assert why is not None and "after 7 of the 7" in why, why
        assert dispatch._auto_skip("factored", problem(device, 1, 40, n_support=25)) is not None  # 25 x 80
    assert dispatch._auto_skip("factored", SimpleNamespace(device=torch.device("cuda"), num_tasks=10,
                                                           dims=None)) is None  # not an MLP: reject() says

    # Width 17 with 3 support points holds 2 steps in factors (2 x 3 x 34 < 289), not 6 (612).
    monkeypatch.setitem(dispatch._UNAVAILABLE, "cpu", "not built (this test)")
    from fastmaml import _plans

    monkeypatch.setattr(_plans, "_PLANS", {})  # no plan remembered from before cpu was made unavailable
    for K, expected in ((2, "factored"), (6, "reference")):
        case = make_case(dims=(2, 17, 17, 3), tasks=4, n_support=3, n_query=5, inner_steps=K, lr_scale=0.2,
                         seed=60 + K)
        report = fastmaml.explain(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                                  **case.kwargs())
        chosen = [line.split()[0] for line in report.splitlines()[1:] if line.split()[1] == "chosen"]
        assert chosen == [expected], report
    case = make_case(dims=(2, 17, 17, 3), tasks=4, n_support=3, n_query=5, inner_steps=2, lr_scale=0.2, seed=62)
    grads = {}
    for backend in ("auto", "reference"):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        assert out.backend == ("factored" if backend == "auto" else "reference")
        grads[backend] = gradients(out.loss + (out.query_preds ** 2).sum(), case.leaves())
    assert grads["reference"]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(grads["auto"], grads["reference"], 1e-9, "auto (factored) against the reference")


@pytest.mark.parametrize("name", [n for n in BACKENDS if n in ("cpu", "cuda", "triton")])
def test_training_call_runs_forward_and_backward_in_one_op(name, monkeypatch):
    """A training call (grad mode, params requiring grad) on a fused backend runs its training op (the
    forward and the meta-gradient in one kernel), and its meta-gradient equals the reverse sweep's (the
    query-output cotangent path) to rounding. On triton: one launch of the backward kernel for the call
    and `loss.backward()` together, none of the forward kernel."""
    require_backend(name)
    case = make_case(inner_steps=2, lr_form="per_parameter", loss="mse", activation="tanh", seed=41).to(F64, device_for(name))
    launches = []
    if name == "triton":
        from fastmaml.backends import _triton_ops

        for launcher in ("_backward_launch", "_forward_launch"):
            def spy(*args, _real=getattr(_triton_ops, launcher), _name=launcher):
                launches.append(_name)
                return _real(*args)
            monkeypatch.setattr(_triton_ops, launcher, spy)
    out = run_or_skip(name, lambda: fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query,
                                                  case.y_query, backend=name, **case.kwargs()))
    # The C++ autograd kernel (csrc/autograd_fwdbwd.cpp) of maml_train on CPU and CUDA tensors; on triton
    # the Python formula of its own training op (_fused.register_train_autograd).
    assert ("triton_maml_train" if name == "triton" else "MamlTrain") in out.task_losses.grad_fn.name()
    leaves = case.leaves()
    rows = gradients(out.loss, leaves, retain_graph=True)
    assert launches == (["_backward_launch"] if name == "triton" else [])
    sweep = gradients(out.loss + 0 * out.query_preds.sum(), leaves)  # a query cotangent (of zeros): maml_bwd
    assert_close(rows, sweep, 1e-11, "fused vs reverse sweep")
    assert launches == (["_backward_launch"] * 2 if name == "triton" else [])


@pytest.mark.parametrize("name, bad, choices, good", [
    ("FASTMAML_CUDA_THREADS", ["48", "256", "warp"], ("128", "64", "32"), ["32"]),
    ("FASTMAML_CUDA_MIN_BLOCKS", ["3", "5", "four"], ("0", "4", "6"), ["6", " 4 ", ""]),
    ("FASTMAML_CUDA_STATES", ["shared", "globals"], ("workspace", "global"), [" Global", "workspace", ""])])
def test_a_bad_cuda_kernel_switch_is_refused(monkeypatch, name, bad, choices, good):
    """The CUDA kernels' A/B switches read in C++ (the team size, which compiled reverse sweep is launched,
    where it keeps the support states): the kernels would run the default for any other value, so the
    backend raises on any machine, naming the switch and its values; case and spaces are ignored as the
    kernels ignore them."""
    from fastmaml.backends.cuda import CudaBackend

    if name == "FASTMAML_CUDA_STATES":
        monkeypatch.setenv("FASTMAML_CUDA_MIN_BLOCKS", "6")  # global needs one (the test below)
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {choices}")):
            CudaBackend().unavailable()
    for value in good:
        monkeypatch.setenv(name, value)
        CudaBackend().unavailable()  # a reason or None, no error


@pytest.mark.parametrize("backend, name, bad, good", [
    ("cuda", "FASTMAML_CUDA_TILES", ["00", " 0", "off"], ["0", "1", ""]),
    ("cuda", "FASTMAML_CUDA_LDS", ["no", "0 "], ["0", "1"]),
    ("cuda", "FASTMAML_CUDA_MMA", ["on", "true", "1 "], ["1", "0", ""]),
    ("cpu", "FASTMAML_CPU_ISA", ["Baseline", "avx", "scalar"], ["baseline", ""]),
    ("cpu", "FASTMAML_KEEP_ROWS", ["no", "false"], ["0", "1", ""])])
def test_a_switch_read_exactly_in_cpp_refuses_other_spellings(monkeypatch, backend, name, bad, good):
    """Switches the C++ side compares exactly (no case folding, no spaces): any other spelling would run
    the default under the mistyped name, so the backend refuses it, naming the switch."""
    from fastmaml.backends.cpu import CpuBackend
    from fastmaml.backends.cuda import CudaBackend

    make = CudaBackend if backend == "cuda" else CpuBackend
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=re.escape(name)):
            make().unavailable()
    for value in good:
        monkeypatch.setenv(name, value)
        make().unavailable()  # a reason or None, no error


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), (" off ", False), ("FALSE", False),
                                       ("no", False), ("1", True), ("true", True), ("On", True), ("yes", True)])
def test_the_input_checks_switch_reads_yes_and_no(value, on):
    """FASTMAML_CHECK_INPUTS: `=off` used to switch the checks on (any value but "" and "0" did)."""
    from fastmaml._validate import check_inputs_setting

    assert check_inputs_setting(value) is on


def test_the_input_checks_switch_refuses_other_values():
    from fastmaml._validate import check_inputs_setting

    for value in ("2", "maybe", "enable"):
        with pytest.raises(ValueError, match="FASTMAML_CHECK_INPUTS must be 0 or 1"):
            check_inputs_setting(value)


def test_a_bad_shared_workspace_cap_is_refused(monkeypatch):
    """FASTMAML_CUDA_SHARED_KB, read in C++ with atoll: any text would become 0 (every workspace in
    global memory) and measure that under the name of the mistyped value."""
    from fastmaml.backends.cuda import CudaBackend

    for value in ("44k", "-1", "forty", "4.5"):
        monkeypatch.setenv("FASTMAML_CUDA_SHARED_KB", value)
        with pytest.raises(ValueError, match="FASTMAML_CUDA_SHARED_KB"):
            CudaBackend().unavailable()
    for value in ("0", " 44 ", "227", ""):
        monkeypatch.setenv("FASTMAML_CUDA_SHARED_KB", value)
        CudaBackend().unavailable()  # a reason or None, no error


@pytest.mark.parametrize("blocks", [None, "0", " 0 "])
def test_states_apart_without_a_staging_sweep_is_refused(monkeypatch, blocks):
    """FASTMAML_CUDA_STATES=global is staged only by the reverse sweeps compiled for 4 or 6 blocks: with the
    default sweep (FASTMAML_CUDA_MIN_BLOCKS unset or 0) it would change nothing, so the backend raises on any
    machine, naming both switches; with 4 or 6 it is taken."""
    from fastmaml.backends.cuda import CudaBackend

    monkeypatch.setenv("FASTMAML_CUDA_STATES", "global")
    if blocks is None:
        monkeypatch.delenv("FASTMAML_CUDA_MIN_BLOCKS", raising=False)
    else:
        monkeypatch.setenv("FASTMAML_CUDA_MIN_BLOCKS", blocks)
    with pytest.raises(ValueError, match=r"FASTMAML_CUDA_STATES=global takes effect only .* "
                                         r"FASTMAML_CUDA_MIN_BLOCKS=4 or 6"):
        CudaBackend().unavailable()
    for taken in ("4", "6"):
        monkeypatch.setenv("FASTMAML_CUDA_MIN_BLOCKS", taken)
        CudaBackend().unavailable()  # a reason or None, no error


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_a_bad_reverse_thetas_switch_is_refused(monkeypatch, backend):
    """FASTMAML_REVERSE_THETAS (the reverse sweep's kept or rebuilt thetas) is auto, keep or recompute, case
    and spaces ignored as the kernels ignore them: any other value raises on any machine."""
    from fastmaml.backends.cpu import CpuBackend
    from fastmaml.backends.cuda import CudaBackend

    make = CpuBackend if backend == "cpu" else CudaBackend
    monkeypatch.setenv("FASTMAML_REVERSE_THETAS", "recomputed")
    with pytest.raises(ValueError, match=r"FASTMAML_REVERSE_THETAS must be one of \('auto', 'keep', 'recompute'\)"):
        make().unavailable()
    monkeypatch.setenv("FASTMAML_REVERSE_THETAS", " Recompute ")
    make().unavailable()  # a reason or None, no error
