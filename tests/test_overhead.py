"""The lean call path (G3): what a training call does and does not do on every call.

- Validation and dispatch are remembered per call signature (fastmaml/_plans.py): a repeated call skips
  them, and a call that differs in anything the checks look at (shapes, dtypes, devices, requires_grad,
  options, grad mode) is validated again; a bad call is refused every time, never served from the cache.
- The checks that read data (finite rate tensors and multi-step weights, class indices in range) never
  run in Python on the default CPU path: the CPU kernels make them inside the operation, and bad data is
  still refused there with the same kind of error.
- `torch.compile(fullgraph=True)` (inductor) of a meta-loss function gives the eager loss and gradients
  for every option, compiles once for a training loop (no recompilation from one meta-iteration to the
  next) and works as the first call of a process (no eager call needed to load the extension first).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml import _plans, _validate, dispatch
from _reference_loop import normal_params, random_data

F32, F64 = torch.float32, torch.float64


def _cpu_backend_or_skip():
    why = dispatch.unavailable("cpu")
    if why is not None:
        pytest.skip(f"the cpu backend is unavailable: {why}")


def make_call(dims=(2, 9, 7, 3), T=3, ns=5, nq=4, loss="mse", dtype=F64, seed=0):
    """A random call: params that require grad, then `x_support, y_support, x_query, y_query`."""
    gen = torch.Generator().manual_seed(seed)
    params = [p.requires_grad_() for p in normal_params(dims, dtype, gen)]
    return (params, *random_data(dims, T, ns, nq, loss, dtype, gen))


def rates(kind, params, K, dtype=F64):
    if kind == "float":
        return 0.05
    if kind == "tensor":
        return torch.linspace(0.03, 0.06, K, dtype=dtype).requires_grad_()
    return [torch.full((K, *p.shape), 0.04, dtype=dtype).requires_grad_() for p in params]


# ---- the plans -----------------------------------------------------------------------------------------


def test_repeated_call_is_planned_and_identical():
    _cpu_backend_or_skip()
    params, xs, ys, xq, yq = make_call()
    _plans.clear()
    first = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05)
    g1 = torch.autograd.grad(first.loss, params)
    assert len(_plans._PLANS) == 1
    second = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05)
    g2 = torch.autograd.grad(second.loss, params)
    assert len(_plans._PLANS) == 1 and second.backend == first.backend == "cpu"
    assert torch.equal(first.loss, second.loss)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_planned_call_still_refuses(monkeypatch):
    """After a good call is planned, calls that differ in what the checks read are validated again."""
    _cpu_backend_or_skip()
    params, xs, ys, xq, yq = make_call()
    fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05)
    with pytest.raises(ValueError, match="inner_lr must be finite"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=math.nan)
    with pytest.raises(TypeError, match="inner_steps"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2.0, inner_lr=0.05)
    with pytest.raises(TypeError, match="first_order"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05, first_order=1)
    with pytest.raises(TypeError, match="inner_lr"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=True)
    with pytest.raises(ValueError, match="x_query"):
        fastmaml.maml(params, xs, ys, xq[:, :, :1], yq, inner_steps=2, inner_lr=0.05)
    with pytest.raises(TypeError, match="dtype"):
        fastmaml.maml(params, xs.float(), ys, xq, yq, inner_steps=2, inner_lr=0.05)
    # A different grad mode is another plan (adapt-only checks depend on it); the result is the same loss.
    with torch.no_grad():
        out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05)
    assert not out.loss.requires_grad


def test_registering_a_backend_forgets_the_plans():
    _cpu_backend_or_skip()
    params, xs, ys, xq, yq = make_call()
    fastmaml.maml(params, xs, ys, xq, yq, inner_steps=1)
    assert _plans._PLANS
    dispatch.register_backend(dispatch.get_backend("cpu"))
    assert not _plans._PLANS


# ---- no data-reading checks in Python on the default CPU path -------------------------------------------


@pytest.mark.parametrize("lr_kind", ["float", "tensor", "list"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_default_cpu_path_reads_no_data_in_python(monkeypatch, lr_kind, loss):
    _cpu_backend_or_skip()
    params, xs, ys, xq, yq = make_call(loss=loss)
    K = 2
    qw = torch.tensor([0.2, 0.3, 0.5], dtype=F64)

    def forbidden(*args, **kwargs):
        raise AssertionError("a data-reading check ran in Python on the default CPU path")

    monkeypatch.setattr(_validate, "_all_finite", forbidden)
    monkeypatch.setattr(_validate, "check_values", forbidden)
    for _ in range(2):  # the first call plans, the second is planned
        out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, inner_lr=rates(lr_kind, params, K), loss=loss,
                            query_loss_weights=qw)
        assert out.backend == "cpu"
        out.loss.backward()
    monkeypatch.undo()
    # The same data checks, made by the operation: bad values are refused with ValueError.
    bad_rates = rates(lr_kind, params, K)
    if lr_kind == "float":
        bad_rates = math.inf
    elif lr_kind == "tensor":
        bad_rates = bad_rates.detach().clone()
        bad_rates[1] = math.nan
    else:
        bad_rates = [r.detach().clone() for r in bad_rates]
        bad_rates[3][0, 1] = math.nan
    with pytest.raises(ValueError, match="inner_lr.*finite"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, inner_lr=bad_rates, loss=loss, query_loss_weights=qw)
    with pytest.raises(ValueError, match="query_loss_weights.*finite"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, loss=loss,
                      query_loss_weights=torch.tensor([0.2, math.nan, 0.5], dtype=F64))
    if loss == "cross_entropy":
        with pytest.raises(ValueError, match=r"y_query holds class 3 but must be in \[0, 2\]"):
            fastmaml.maml(params, xs, ys, xq, torch.full_like(yq, 3), inner_steps=K, loss=loss)
        with pytest.raises(ValueError, match=r"y_support holds class -1"):
            fastmaml.adapt(params, xs, torch.full_like(ys, -1), inner_steps=K, loss=loss)


def test_reference_backend_checks_values_in_python():
    params, xs, ys, xq, yq = make_call(loss="cross_entropy")
    with pytest.raises(ValueError, match=r"y_support holds class 7 but must be in \[0, 2\]"):
        fastmaml.maml(params, xs, torch.full_like(ys, 7), xq, yq, loss="cross_entropy", backend="reference")
    with pytest.raises(ValueError, match=r"inner_lr\[1\] must be finite.*params\[1\]"):
        bad = [torch.full((1, *p.shape), math.nan if i == 1 else 0.1, dtype=F64) for i, p in enumerate(params)]
        fastmaml.maml(params, xs, ys, xq, yq, inner_lr=bad, loss="cross_entropy", backend="reference")


@pytest.mark.parametrize("label", [3, -1, 2**32 + 1])
def test_triton_poisons_a_class_out_of_range(label):
    """Where the data checks are off (GPU tensors by default), the kernels turn a task with a class out
    of range into a nan loss and gradient instead of reading outside the logits, also past int32 (where a
    narrower type would wrap 2**32 + 1 into class 1). The Triton kernel is checked here in the interpreter,
    called without the Python checks; the CUDA kernel in tests/test_gpu_overhead.py."""
    # The interpreter only: the call below gives the backend CPU tensors and skips its device checks, which
    # a compiled kernel cannot read (on a GPU, tests/test_gpu_overhead.py's case runs the compiled kernel).
    if dispatch.unavailable("triton") is not None or not _interpreter():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1); the GPU case is in test_gpu_overhead.py")
    params, xs, ys, xq, yq = make_call(loss="cross_entropy", dtype=F32, T=3)
    yq = yq.clone()
    yq[1, 2] = label  # D_out = 3: out of range in task 1 only
    problem = _validate.make_problem(params, xs, ys, xq, yq, inner_steps=1, loss="cross_entropy")
    task_losses = dispatch.get_backend("triton").maml(problem)[0]
    assert torch.isnan(task_losses[1]) and torch.isfinite(task_losses[[0, 2]]).all(), task_losses
    grads = torch.autograd.grad(task_losses[[0, 2]].sum() + task_losses[1], params)
    assert all(torch.isnan(g).any() for g in grads[-2:])


def _interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def test_check_inputs_switch():
    previous = fastmaml.set_check_inputs(True)
    try:
        assert fastmaml.check_inputs_enabled()
        assert fastmaml.set_check_inputs(False) is True
        assert not fastmaml.check_inputs_enabled()
        with pytest.raises(TypeError, match="bool"):
            fastmaml.set_check_inputs("yes")
    finally:
        fastmaml.set_check_inputs(previous)


# ---- torch.compile -------------------------------------------------------------------------------------

OPTIONS = [
    pytest.param(dict(lr_kind="float", loss="mse"), id="float-mse"),
    pytest.param(dict(lr_kind="tensor", loss="mse"), id="tensor-mse"),
    pytest.param(dict(lr_kind="list", loss="mse"), id="per_param-mse"),
    pytest.param(dict(lr_kind="float", loss="cross_entropy"), id="float-ce"),
    pytest.param(dict(lr_kind="list", loss="cross_entropy", first_order=True), id="per_param-ce-first_order"),
    pytest.param(dict(lr_kind="float", loss="mse", multi_step=True), id="multi_step"),
    pytest.param(dict(lr_kind="tensor", loss="mse", x_grad=True), id="input_grads"),
]


def _fused_backend_or_skip(backend: str) -> str:
    """The device a fused backend is compiled for here (cpu: CPU tensors; cuda, triton: a GPU)."""
    if backend != "cpu" and not torch.cuda.is_available():
        pytest.skip(f"{backend} under torch.compile needs a GPU (its CPU form is the Triton interpreter)")
    why = dispatch.unavailable(backend)
    if why is not None:
        pytest.skip(f"the {backend} backend is unavailable: {why}")
    return "cpu" if backend == "cpu" else "cuda"


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("option", OPTIONS)
def test_compile_inductor_matches_eager_without_recompiling(option, backend):
    """The meta-loss under torch.compile(fullgraph=True) with inductor: the eager loss and gradients (of
    the params, the rate tensors and the inputs), and one compilation for three meta-iterations."""
    device = _fused_backend_or_skip(backend)
    torch._dynamo.reset()
    loss_name, K = option["loss"], 2
    params, xs, ys, xq, yq = make_call(loss=loss_name, dtype=F32, seed=5)
    params = [p.detach().to(device).requires_grad_() for p in params]
    xs, ys, xq, yq = (t.to(device) for t in (xs, ys, xq, yq))
    lr = rates(option["lr_kind"], params, K, F32)
    if isinstance(lr, torch.Tensor):
        lr = lr.detach().to(device).requires_grad_()
    elif isinstance(lr, list):
        lr = [r.detach().to(device).requires_grad_() for r in lr]
    qw = torch.tensor([0.2, 0.3, 0.5], device=device) if option.get("multi_step") else None
    if option.get("x_grad"):
        xs.requires_grad_()
        xq.requires_grad_()
    first_order = option.get("first_order", False)

    def meta_loss(params, xs, ys, xq, yq, lr):
        out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, inner_lr=lr, loss=loss_name,
                            first_order=first_order, query_loss_weights=qw, backend=backend)
        return out.loss + 0.01 * out.task_losses.square().sum()

    wrt = list(params) + ([lr] if isinstance(lr, torch.Tensor) else list(lr) if isinstance(lr, list) else [])
    wrt += [xs, xq] if option.get("x_grad") else []
    compiled = torch.compile(meta_loss, fullgraph=True, backend="inductor")
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step in range(3):  # new data each meta-iteration, same shapes
        if step:
            fresh = [t.to(device) for t in make_call(loss=loss_name, dtype=F32, seed=5 + step)[1:]]
            fresh = [None, *fresh]
            xs.data.copy_(fresh[1])
            ys.copy_(fresh[2])
            xq.data.copy_(fresh[3])
            yq.copy_(fresh[4])
        got = compiled(params, xs, ys, xq, yq, lr)
        got_grads = torch.autograd.grad(got, wrt)
        want = meta_loss(params, xs, ys, xq, yq, lr)
        want_grads = torch.autograd.grad(want, wrt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("learn", [None, "per_parameter"])
def test_compile_maml_module(learn):
    """A meta-loss calling `fastmaml.MAML` (the drop-in module; learned per-parameter rates too) under
    torch.compile(fullgraph=True): the eager loss and gradients, one graph for three iterations."""
    _cpu_backend_or_skip()
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    maml = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, learn_inner_lr=learn)

    def meta_loss(xs, ys, xq, yq):
        return maml(xs, ys, xq, yq).loss

    compiled = torch.compile(meta_loss, fullgraph=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for seed in range(3):
        _, *data = make_call(dims=(2, 9, 3), dtype=F32, seed=seed)
        got = compiled(*data)
        got_grads = torch.autograd.grad(got, list(maml.parameters()))
        want = meta_loss(*data)
        want_grads = torch.autograd.grad(want, list(maml.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


_FIRST_CALL = """
import torch, fastmaml
torch.manual_seed(0)
params = [torch.randn(7, 2, requires_grad=True), torch.randn(7, requires_grad=True),
          torch.randn(3, 7, requires_grad=True), torch.randn(3, requires_grad=True)]
data = [torch.randn(4, 5, 2), torch.randn(4, 5, 3), torch.randn(4, 6, 2), torch.randn(4, 6, 3)]
def meta_loss(params, xs, ys, xq, yq):
    return fastmaml.maml(params, xs, ys, xq, yq, inner_steps=1, inner_lr=0.05, backend=BACKEND).loss
loss = torch.compile(meta_loss, fullgraph=True, backend=COMPILER)(params, *data)
torch.testing.assert_close(loss, meta_loss(params, *data), rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_as_the_first_call(backend):
    """torch.compile before any eager call, in a fresh process: what the backend must ask or set up once
    (build or load the extension, probe the interpreter, define the Triton ops) happens eagerly while the
    call is traced, so it does not break the graph. triton runs in the interpreter here (aot_eager: the
    trace is what is tested); on a GPU, tests/test_gpu_overhead.py compiles it with inductor."""
    env = dict(os.environ)
    if backend == "cpu":
        _cpu_backend_or_skip()  # built here, so the child only loads it
        compiler = "inductor"
    else:
        from fastmaml.backends import triton_maml

        if torch.cuda.is_available():
            pytest.skip("with a GPU, tests/test_gpu_overhead.py compiles the triton backend as a first call")
        why = triton_maml.TritonBackend().unavailable()
        if why is None and os.environ.get("TRITON_INTERPRET") != "1":
            why = "TRITON_INTERPRET is not 1 in this process"
        why = why or triton_maml.interpreter_problem()
        if why is not None:
            pytest.skip(f"the triton backend cannot run in the interpreter here: {why}")
        env["TRITON_INTERPRET"] = "1"
        compiler = "aot_eager"
    code = _FIRST_CALL.replace("BACKEND", repr(backend)).replace("COMPILER", repr(compiler))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_cuda_kernel_query_is_a_traced_constant():
    """The cuda backend asks the dispatcher which ops the loaded library registered on every training
    call; under torch.compile that question is answered eagerly (a dispatcher query cannot be traced),
    here with no GPU and whatever library is loaded."""
    from fastmaml.backends.cuda import CudaBackend

    backend = CudaBackend()
    want = backend.max_fused_rows_bytes()
    compiled = torch.compile(lambda x: x + (backend.max_fused_rows_bytes() > 0), fullgraph=True, backend="eager")
    assert compiled(torch.ones(2)).tolist() == [1.0 + (want > 0)] * 2


@pytest.mark.parametrize("module, probe, inner", [("_lowrank", "_triton_reason", "_probe_triton"),
                                                  ("_lowrank_cuda", "kernel_missing", "_probe")])
def test_kernel_probes_are_traced_constants(module, probe, inner, monkeypatch):
    """The factored backend's kernel probes (is Triton installed; does the extension have its CUDA low-rank
    kernels) are asked inside the traced call and answered eagerly: torch 2.11's dynamo refuses to trace
    the first one's module search, and a fullgraph compile of a factored call stopped there. A probe that
    breaks any graph stands in for each, so the test fails on every torch if the answer is traced."""
    import importlib

    where = importlib.import_module(f"fastmaml.backends.{module}")
    asked = []

    def breaking_probe():
        torch._dynamo.graph_break()
        asked.append(1)
        return "probed"

    monkeypatch.setattr(where, inner, breaking_probe)
    ask = getattr(where, probe)
    compiled = torch.compile(lambda x: x + len(ask()), fullgraph=True, backend="eager")
    assert compiled(torch.ones(2)).tolist() == [7.0, 7.0]
    assert asked == [1], "the probe should run once, eagerly, while the call is traced"
