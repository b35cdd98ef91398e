"""`fastmaml.maml` on the reference backend against the independent per-task loop (tests/_reference_loop.py).

Every option (inner steps, rate forms, first order, multi-step query loss, loss, activation, depth)
is checked on fresh random problems: the loss, the task losses, the query predictions and the
gradient of every differentiable input, in float64 (to 1e-8 relative) and in float32 (to 1e-4
relative against the float64 loop on the same rounded inputs). `gradcheck` confirms the gradients
against finite differences on small float64 problems.
"""

import itertools

import pytest
import torch

import fastmaml
from _reference_loop import (
    DIMS_BY_DEPTH,
    LR_FORMS,
    assert_close,
    gradients,
    make_case,
    maml_loop,
    mlp_apply,
    objective,
    output_cotangents,
)

RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def check_against_loop(case, dtype, backend="reference"):
    """Run `fastmaml.maml` on `case` converted to `dtype` and compare every output and gradient with
    the float64 loop on the same values. Returns the fastmaml output."""
    run = case.to(dtype)
    out = fastmaml.maml(run.params, run.x_support, run.y_support, run.x_query, run.y_query,
                        backend=backend, **run.kwargs())
    assert out.backend == backend
    expected = maml_loop(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                         **case.kwargs())
    T, Nq, D_out = case.x_query.shape[0], case.x_query.shape[1], case.params[-1].shape[0]
    assert out.loss.shape == () and out.task_losses.shape == (T,) and out.query_preds.shape == (T, Nq, D_out)
    assert out.loss.dtype == dtype and out.query_preds.dtype == dtype
    rtol = RTOL[dtype]
    assert_close(out.loss, expected.loss, rtol, "loss")
    assert_close(out.task_losses, expected.task_losses, rtol, "task_losses")
    assert_close(out.query_preds, expected.query_preds, rtol, "query_preds")

    cot = output_cotangents(expected.task_losses, expected.query_preds)
    got = gradients(objective(out.loss, out.task_losses, out.query_preds, cot), run.leaves())
    want = gradients(objective(expected.loss, expected.task_losses, expected.query_preds, cot), case.leaves())
    assert_close(got, want, rtol, "grad")
    return out


OPTION_GRID = list(itertools.product(
    [0, 1, 3],                   # inner_steps
    LR_FORMS,                    # inner_lr form
    [False, True],               # first_order
    [False, True],               # query_loss_weights
    ["mse", "cross_entropy"],    # loss
    ["relu", "tanh"],            # activation
))


def _grid_id(case):
    K, lr_form, fo, qlw, loss, act = case
    return f"K{K}-{lr_form}-{'fo' if fo else 'so'}{'-qlw' if qlw else ''}-{loss}-{act}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grid", OPTION_GRID, ids=[_grid_id(c) for c in OPTION_GRID])
def test_options_match_loop(grid, dtype):
    """Every combination of options on a depth-3 net [3, 7, 5, 2]; the weights of the multi-step loss
    require grad too (the reference backend differentiates them)."""
    K, lr_form, first_order, qlw, loss, activation = grid
    seed = OPTION_GRID.index(grid)
    case = make_case(dims=DIMS_BY_DEPTH[3], inner_steps=K, lr_form=lr_form, first_order=first_order,
                     query_loss_weights=qlw, grad_weights=True, loss=loss, activation=activation, seed=seed)
    check_against_loop(case, dtype)


DEPTH_GRID = list(itertools.product([1, 2, 3, 4], [0, 1, 3], ["mse", "cross_entropy"], ["relu", "tanh"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth,K,loss,activation", DEPTH_GRID)
def test_depths_match_loop(depth, K, loss, activation, dtype):
    """Depth 1 to 4 with per-parameter rates, second order; T = 4 tasks of 7 support and 3 query points."""
    case = make_case(dims=DIMS_BY_DEPTH[depth], tasks=4, n_support=7, n_query=3, inner_steps=K,
                     lr_form="per_parameter", loss=loss, activation=activation,
                     seed=100 + DEPTH_GRID.index((depth, K, loss, activation)))
    check_against_loop(case, dtype)


@pytest.mark.parametrize("lr_form", ["scalar_tensor", "meta_sgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_broadcast_rates_match_loop(lr_form, first_order):
    """Rates that broadcast: a 0-d tensor (every step and param) and `[*shape]` per param (every step)."""
    case = make_case(inner_steps=3, lr_form=lr_form, first_order=first_order, activation="tanh", seed=7)
    check_against_loop(case, torch.float64)


def test_single_point_single_task():
    """T = 1, Ns = Nq = 1: the means over points and tasks are plain values."""
    case = make_case(dims=[4, 3, 1], tasks=1, n_support=1, n_query=1, inner_steps=2, lr_form="per_step", seed=11)
    check_against_loop(case, torch.float64)


def test_inputs_without_grad():
    """Only the params require grad: the input gradients are not asked for and the rest still matches."""
    case = make_case(inner_steps=2, grad_inputs=False, lr_form="per_layer", seed=12)
    check_against_loop(case, torch.float64)


def test_first_order_gives_no_support_gradient():
    """FOMAML treats the inner gradients as constants, so the support inputs get no gradient at all,
    while the second-order meta-gradient does reach them."""
    for first_order in (True, False):
        case = make_case(inner_steps=2, first_order=first_order, seed=13)
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="reference", **case.kwargs())
        (g,) = torch.autograd.grad(out.loss, case.x_support, allow_unused=True)
        if first_order:
            assert g is None or g.abs().max() == 0
        else:
            assert g is not None and g.abs().max() > 1e-6


def test_zero_steps_is_plain_query_loss():
    """K = 0: no adaptation; the predictions are the initial net's and the rates get no gradient."""
    case = make_case(inner_steps=0, lr_form="per_step", seed=14)
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="reference", **case.kwargs())
    expected = torch.stack([mlp_apply(case.params, xq) for xq in case.x_query])
    assert_close(out.query_preds, expected, 1e-12, "query_preds")
    (g,) = torch.autograd.grad(out.loss, case.x_support, allow_unused=True)
    assert g is None or g.abs().max() == 0


def test_second_order_differs_from_first_order():
    """The exact meta-gradient is not the first-order one (a check that the Hessian term is there)."""
    grads = {}
    for first_order in (False, True):
        case = make_case(inner_steps=3, first_order=first_order, activation="tanh", seed=15)
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="reference", **case.kwargs())
        grads[first_order] = torch.autograd.grad(out.loss, case.params[0])[0]
    assert (grads[False] - grads[True]).abs().max() > 1e-6 * grads[False].abs().max()


# ---- gradcheck (finite differences) on small float64 problems -------------------------------------

GRADCHECK_CASES = [
    dict(inner_steps=2, lr_form="per_parameter", loss="mse", activation="tanh"),
    dict(inner_steps=2, lr_form="per_step", loss="cross_entropy", activation="relu", query_loss_weights=True),
    dict(inner_steps=3, lr_form="per_layer", loss="mse", activation="relu"),
    dict(inner_steps=0, lr_form="per_step", loss="cross_entropy", activation="tanh"),
]


@pytest.mark.parametrize("options", GRADCHECK_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_gradcheck(options):
    """Finite differences agree with the autograd meta-gradient for params, rates, inputs and
    the multi-step loss weights (outputs: loss and query_preds). Second order only: the first-order
    gradient is by design not the derivative of the loss."""
    case = make_case(dims=[3, 5, 2], tasks=2, n_support=3, n_query=4, grad_weights=True, round_to=None,
                     seed=20, **options)
    names = list(case.leaves())
    K = case.options["inner_steps"]

    def fn(*tensors):
        named = dict(zip(names, tensors))
        params = [named[f"params[{i}]"] for i in range(len(case.params))]
        if isinstance(case.inner_lr, torch.Tensor):
            lr = named["inner_lr[0]"]
        elif isinstance(case.inner_lr, list):
            lr = [named[f"inner_lr[{i}]"] for i in range(len(case.inner_lr))]
        else:
            lr = case.inner_lr
        out = fastmaml.maml(params, named["x_support"], case.y_support, named["x_query"], case.y_query,
                            inner_lr=lr, query_loss_weights=named.get("query_loss_weights"),
                            backend="reference", **case.options)
        return out.loss, out.query_preds

    inputs = tuple(case.leaves()[n] for n in names)
    assert len(inputs) >= 4 + (0 if K == 0 else 1)
    # Cross-entropy under vmap is slow in PyTorch (~7 ms a call): check a random projection there.
    fast = case.options["loss"] == "cross_entropy"
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)
