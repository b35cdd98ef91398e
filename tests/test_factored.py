"""The factored backend's own parts: its memory estimate against what autograd keeps, the chunked path
(`_factored_chunks.Chunked`; under torch.compile, activation checkpointing) against the unchunked one, each form of its
layers (factors only, dense from the first step) against the reference, its switches, what it refuses,
and its torch.compile capture.
Its results against the reference in the default form, for every option, are in test_backends.py."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from fastmaml.backends import _factored_reverse, factored
from _reference_loop import assert_close, gradients, make_case

F64 = torch.float64


def _run(case, **extra):
    return fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                         backend="factored", **case.kwargs(), **extra)


def _kept_bytes(case) -> int:
    """Bytes of the tensors autograd saves for the backward (each storage once), less the inputs'."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(case)
    inputs = {t.untyped_storage().data_ptr() for t in [*case.params, case.x_support, case.x_query]}
    return sum(n for ptr, n in storages.items() if ptr not in inputs)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dims,K,ns,nq,loss,qw", [
    ((1, 40, 40, 1), 1, 10, 10, "mse", False),
    ((1, 40, 40, 1), 5, 20, 5, "mse", False),
    ((1, 96, 96, 1), 5, 10, 10, "mse", False),
    ((5, 64, 3), 2, 10, 10, "cross_entropy", True),
    ((4, 24, 24, 24, 3), 3, 7, 9, "mse", True),
])
@pytest.mark.parametrize("dense", ["auto", "never", "always"])
def test_memory_estimate_bounds_what_autograd_keeps(monkeypatch, dense, activation, dims, K, ns, nq, loss, qw):
    """`saved_bytes_per_task` (which sizes the chunks) is at least what autograd keeps and at most 1.4x,
    with the layers factored, dense, or turning dense on the way."""
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", 1 << 40)  # one chunk: every intermediate kept
    monkeypatch.setattr(factored, "DENSE", dense)
    monkeypatch.setattr(_factored_reverse, "MODE", "autograd")
    T = 6
    case = make_case(dims=dims, tasks=T, n_support=ns, n_query=nq, inner_steps=K, loss=loss,
                     query_loss_weights=qw, activation=activation, seed=3).to(torch.float32)
    kept = _kept_bytes(case)
    problem = fastmaml._validate.make_problem(
        case.params, case.x_support, case.y_support, case.x_query, case.y_query, inner_steps=K,
        query_loss_weights=case.query_loss_weights, loss=loss, activation=activation)
    estimate = factored.saved_bytes_per_task(problem) * T
    assert kept <= estimate <= 1.4 * kept, (kept, estimate)
    # The written-out sweep keeps its own tensors (through save_for_backward, so the hooks see them; tanh's
    # `D W` products, which autograd does not keep): the estimate bounds them too.
    monkeypatch.setattr(_factored_reverse, "MODE", "hand")
    by_hand = _kept_bytes(case)
    assert 0 < by_hand <= estimate, (by_hand, estimate)


CHUNK_OPTIONS = {
    "so-qlw-tanh": dict(inner_steps=3, lr_form="per_layer", query_loss_weights=True, grad_weights=True,
                        activation="tanh"),
    "fo-ce": dict(inner_steps=2, lr_form="per_step", loss="cross_entropy", first_order=True),
    "float-rate": dict(inner_steps=2, lr_form="float"),
}


@pytest.mark.parametrize("what", ["loss", "outputs", "all", "again", "again-all"])
@pytest.mark.parametrize("options", list(CHUNK_OPTIONS), ids=list(CHUNK_OPTIONS))
def test_chunks_give_the_unchunked_result(monkeypatch, options, what):
    """Tasks in chunks of 3 (7 tasks: the last chunk shorter): the same outputs and gradients as one pass,
    in float64, for the gradient of the mean loss (taken during the forward), of the task losses and
    predictions with any cotangent (each chunk recomputed), of both, and of a gradient (create_graph)."""
    case = make_case(dims=(3, 9, 6, 4), tasks=7, seed=21, **CHUNK_OPTIONS[options])
    results = {}
    for name, budget in (("one", 1 << 40), ("chunks", None)):
        if budget is None:
            problem = fastmaml._validate.make_problem(
                case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                **{k: v for k, v in case.kwargs().items()})
            budget = factored.saved_bytes_per_task(problem) * 3
        monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", budget)
        out = _run(case)
        assert (type(out.loss.grad_fn).__name__ == "ChunkedBackward") == (name == "chunks")
        cot = torch.linspace(0.5, 1.5, 7, dtype=F64)
        outputs = (out.task_losses * cot).sum() + out.query_preds.square().mean()
        if what.startswith("again"):
            first = out.loss + outputs if what == "again-all" else out.loss
            (g,) = torch.autograd.grad(first, case.params[2], create_graph=True)
            objective = (g * g).sum()
        else:
            objective = {"loss": out.loss, "outputs": outputs, "all": out.loss + outputs}[what]
        results[name] = ({"loss": out.loss.detach(), "task_losses": out.task_losses.detach(),
                          "query_preds": out.query_preds.detach()}, gradients(objective, case.leaves()))
    assert set(results["chunks"][1]) == set(case.leaves())
    assert results["one"][1]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(results["chunks"][0], results["one"][0], 1e-12, "")
    assert_close(results["chunks"][1], results["one"][1], 1e-12, "grad")


def test_chunks_with_one_tensor_passed_twice(monkeypatch):
    """x_query the same tensor as x_support, its gradient taken with create_graph through chunks (the
    recompute then runs on the original tensors) and differentiated again: one pass's gradients, not
    twice them."""
    case = make_case(dims=(3, 9, 6, 4), tasks=7, seed=22, inner_steps=2, lr_form="per_step", activation="tanh")
    x = case.x_support
    results = {}
    for name, budget in (("one", 1 << 40), ("chunks", 1)):
        monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", budget)
        out = fastmaml.maml(case.params, x, case.y_support, x, case.y_support, backend="factored", **case.kwargs())
        first = out.loss + (out.task_losses * torch.linspace(0.5, 1.5, 7, dtype=F64)).sum()
        gx, g = torch.autograd.grad(first, [x, case.params[2]], create_graph=True)
        results[name] = [gx, g, *torch.autograd.grad((gx * gx).sum() + (g * g).sum(), [x, case.params[0]])]
    assert_close(results["chunks"], results["one"], 1e-12, "grad")


def test_chunk_size(monkeypatch):
    """All tasks in one chunk without grad or under the budget; chunks of budget // per-task bytes above."""
    case = make_case(dims=(3, 9, 6, 4), tasks=10, inner_steps=2, seed=2)
    problem = fastmaml._validate.make_problem(case.params, case.x_support, case.y_support, case.x_query,
                                              case.y_query, inner_steps=2)
    per_task = factored.saved_bytes_per_task(problem)
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", per_task * 4 + 1)
    assert factored._chunk_tasks(problem) == 4
    with torch.no_grad():
        assert factored._chunk_tasks(problem) == 10
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", 1)
    assert factored._chunk_tasks(problem) == 1


def test_refuses_per_parameter_rates_and_says_why():
    """Meta-SGD rates (one per element) are refused naming the tensor; rates broadcast from [K, 1, ...]
    run. (`auto` takes the cpu kernel for this small call, ahead of factored in its order.)"""
    case = make_case(inner_steps=2, lr_form="per_parameter", seed=4)
    with pytest.raises(ValueError, match=r"inner_lr\[0\].*Meta-SGD"):
        _run(case)
    case = make_case(inner_steps=2, lr_form="per_layer", seed=4)
    assert _run(case).backend == "factored"
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query, **case.kwargs())
    assert out.backend != "factored"


def test_a_remembered_call_does_not_let_per_parameter_rates_through():
    """Rates of shape [K, *shape] expanded from [K, 1, ...] (stride 0: one per tensor and step) run; the
    same shapes with a rate per element, in a later call, are refused (explicitly) or left to another
    backend (`auto`, here with targets that require grad so that the cpu kernel refuses too). The plan
    remembered for the first call keyed the rates without their strides: the second ran on factored,
    which took each tensor's first rate (task losses off by 0.6 to 4.5)."""
    case = make_case(dims=(2, 37, 29, 3), tasks=6, n_support=4, n_query=5, inner_steps=3, seed=23)
    K = 3
    one_each = [torch.full((K,) + (1,) * p.dim(), 0.2, dtype=F64).expand(K, *p.shape) for p in case.params]
    per_element = [torch.rand(K, *p.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
                   for i, p in enumerate(case.params)]
    ys = case.y_support.detach().requires_grad_()
    for backend in ("factored", "auto"):
        args = (case.params, case.x_support, ys, case.x_query, case.y_query)
        first = fastmaml.maml(*args, inner_steps=K, inner_lr=one_each, backend=backend)
        assert first.backend == "factored"
        if backend == "factored":
            with pytest.raises(ValueError, match=r"inner_lr\[0\].*Meta-SGD"):
                fastmaml.maml(*args, inner_steps=K, inner_lr=per_element, backend=backend)
        else:
            assert fastmaml.maml(*args, inner_steps=K, inner_lr=per_element, backend=backend).backend == "reference"


@pytest.mark.parametrize("transform", ["jvp", "grad"])
def test_chunks_refuse_forward_mode_and_torch_func(monkeypatch, transform):
    """The chunks' autograd Function has no forward-mode or torch.func rule (they raised
    NotImplementedError and RuntimeError from inside the call, `auto` included): a call that would run in
    chunks is refused under them, and `auto` takes the reference. One chunk runs them (autograd's form)."""
    case = make_case(dims=(3, 9, 6, 4), tasks=7, seed=24, inner_steps=2, lr_form="float")
    params = [p.detach() for p in case.params]

    def loss_of(x, backend):
        return fastmaml.maml(params, x, case.y_support, case.x_query, case.y_query, backend=backend,
                             **case.kwargs()).loss

    def run(backend):
        if transform == "jvp":
            return torch.func.jvp(lambda x: loss_of(x, backend), (case.x_support,),
                                  (torch.ones_like(case.x_support),))[1]
        return torch.func.grad(lambda x: loss_of(x, backend))(case.x_support)

    want = run("reference")
    assert want.abs().max() > 0, "a test that cannot fail"
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", 1)
    with pytest.raises(ValueError, match="runs in chunks"):
        run("factored")
    assert_close(run("auto"), want, 1e-12, transform)
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", 1 << 40)
    assert_close(run("factored"), want, 1e-12, transform)


def test_refuses_other_models_and_half_precision():
    """A module that is not the MLP (here a softplus net) and bfloat16 are refused with the reason."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Softplus(), torch.nn.Linear(5, 2)).double()
    case = make_case(dims=(3, 5, 2), inner_steps=1, seed=5)
    with pytest.raises(ValueError, match="backend=.factored. cannot run this call.*Softplus"):
        fastmaml.MAML(model, inner_steps=1, backend="factored")(case.x_support, case.y_support, case.x_query,
                                                                case.y_query)
    backend = fastmaml.dispatch.get_backend("factored")
    half = [p.detach().to(torch.bfloat16) for p in case.params]
    data = [t.to(torch.bfloat16) if t.is_floating_point() else t
            for t in (case.x_support, case.y_support, case.x_query, case.y_query)]
    problem = fastmaml._validate.make_problem(half, *data, inner_steps=1)
    assert "float32 and float64" in backend.reject(problem, "maml")


def test_compiles_in_one_graph():
    """torch.compile(fullgraph=True) traces the factored backend (plain PyTorch ops) into one graph: the
    eager loss and meta-gradient (params and the per-step rates), and no recompilation on a second call.
    The aot_eager backend: dynamo's graph and AOT autograd's joint graph, without inductor's code
    generation (37 s of C++ compiles here for the same check of the capture)."""
    # The 12-wide layer in factors at the first step and dense at the second: both forms in one graph.
    check_compiled(tasks=5, calls=2)


def test_compiles_in_chunks(monkeypatch):
    """Above the chunk budget under torch.compile: the chunks under activation checkpointing (dynamo does
    not trace `Chunked`'s gradients taken in its forward), one graph, the eager result."""
    monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", 1)  # a chunk per task
    check_compiled(tasks=3, calls=1)


def check_compiled(tasks: int, calls: int) -> None:
    """The compiled factored backend (aot_eager, fullgraph) against eager on the 2-12-12-1 net, K = 2:
    loss and meta-gradient, one graph over `calls` calls."""
    torch._dynamo.reset()
    case = make_case(dims=(2, 12, 12, 1), tasks=tasks, inner_steps=2, lr_form="per_step", seed=8).to(torch.float32)
    leaves = [*case.params, case.inner_lr]

    def meta_loss(params, xs, ys, xq, yq, lr):
        return fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=lr, backend="factored").loss

    args = (case.params, case.x_support, case.y_support, case.x_query, case.y_query, case.inner_lr)
    want = meta_loss(*args)
    want_grads = torch.autograd.grad(want, leaves)
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(meta_loss, fullgraph=True, backend="aot_eager")
    for _ in range(calls):
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, leaves)
        assert_close([got, *got_grads], [want, *want_grads], 1e-5, "compiled")
    assert counts["stats"]["unique_graphs"] == 1


def test_chunk_budget_from_the_environment(monkeypatch):
    """FASTMAML_FACTORED_CHUNK_MB sets the chunk budget (MAX_CHUNK_BYTES is read at import); a bad value is
    refused by name."""
    monkeypatch.delenv("FASTMAML_FACTORED_CHUNK_MB", raising=False)
    assert factored._chunk_budget() == 1 << 30
    monkeypatch.setenv("FASTMAML_FACTORED_CHUNK_MB", "4096")
    assert factored._chunk_budget() == 4096 << 20
    for bad in ("1.5", "0", "-3", "lots"):
        monkeypatch.setenv("FASTMAML_FACTORED_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="FASTMAML_FACTORED_CHUNK_MB"):
            factored._chunk_budget()


@pytest.mark.parametrize("dense", ["never", "always"])
@pytest.mark.parametrize("options", [
    dict(inner_steps=3, lr_form="per_layer", query_loss_weights=True, activation="tanh"),
    dict(inner_steps=3, lr_form="per_step", loss="cross_entropy", first_order=True),
    dict(dims=(2, 11, 11, 11, 3), inner_steps=4, lr_form="float", loss="cross_entropy", activation="relu"),
], ids=["so-qlw-tanh", "fo-ce", "depth4-K4"])
def test_either_form_matches_the_reference(monkeypatch, dense, options):
    """Every layer kept in factors at every step, or dense from the first step (test_backends runs the
    default, which turns dense where that is cheaper): the reference's outputs and gradients in float64."""
    from test_backends import check_maml

    monkeypatch.setattr(factored, "DENSE", dense)
    options = {"dims": (3, 9, 6, 4), "tasks": 4, "seed": 60, **options}
    check_maml("factored", options, F64)
    case = make_case(**options)
    problem = fastmaml._validate.make_problem(case.params, case.x_support, case.y_support, case.x_query,
                                              case.y_query, **case.kwargs())
    layers = factored._adapted_layers(problem, case.x_support, case.y_support, case.params,
                                      factored._step_rates(problem))[-1]
    assert [layer.w is not None for layer in layers] == [dense == "always"] * len(layers)


def test_dense_mode_from_the_environment(monkeypatch):
    """FASTMAML_FACTORED_DENSE picks the form (read at import); a bad value is refused by name. Under
    "auto" a layer turns dense once its factors cost more than the dense product."""
    monkeypatch.delenv("FASTMAML_FACTORED_DENSE", raising=False)
    assert factored._dense_mode() == "auto"
    monkeypatch.setenv("FASTMAML_FACTORED_DENSE", "Never")
    assert factored._dense_mode() == "never"
    monkeypatch.setenv("FASTMAML_FACTORED_DENSE", "sometimes")
    with pytest.raises(ValueError, match="FASTMAML_FACTORED_DENSE"):
        factored._dense_mode()
    monkeypatch.setattr(factored, "DENSE", "auto")
    assert [factored._dense_after(k, 10, 40, 40) for k in (1, 2, 3)] == [False, False, True]
    assert not factored._dense_after(6, 10, 128, 128) and factored._dense_after(7, 10, 128, 128)
