"""`fastmaml.adapt`, `fastmaml.mlp`, `fastmaml.reptile` and `fastmaml.explain` on the reference path.

`adapt` must give the independent loop's theta_K for every task (and its gradient, since the
reference path is differentiable); `mlp` evaluates per-task parameters and reproduces `maml`'s
query predictions; `reptile` is `params - mean_t theta_K`. float64, fresh random inputs.
"""

import itertools

import pytest
import torch

import fastmaml
from _reference_loop import DIMS_BY_DEPTH, assert_close, make_case, maml_loop, mlp_apply, random_params

RTOL = 1e-8
F64 = torch.float64

ADAPT_GRID = list(itertools.product(
    [1, 2, 4],                                      # depth
    [0, 1, 3],                                      # inner_steps
    ["float", "per_step", "per_parameter"],         # inner_lr form
    ["mse", "cross_entropy"],
))


@pytest.mark.parametrize("depth,K,lr_form,loss", ADAPT_GRID)
def test_adapt_matches_loop(depth, K, lr_form, loss):
    """theta_K of every task, shapes `[T, *param.shape]`, and the gradient of a random function of
    them w.r.t. params, rates and support inputs."""
    activation = "tanh" if depth % 2 else "relu"
    case = make_case(dims=DIMS_BY_DEPTH[depth], tasks=4, inner_steps=K, lr_form=lr_form, loss=loss,
                     activation=activation, seed=ADAPT_GRID.index((depth, K, lr_form, loss)))
    adapted = fastmaml.adapt(case.params, case.x_support, case.y_support, inner_steps=K, inner_lr=case.inner_lr,
                             activation=activation, loss=loss, backend="reference")
    ref = maml_loop(case.params, case.x_support, case.y_support, inner_steps=K, inner_lr=case.inner_lr,
                    activation=activation, loss=loss)
    assert len(adapted) == len(case.params)
    for a, p in zip(adapted, case.params):
        assert a.shape == (4, *p.shape) and a.dtype == F64
    assert_close(adapted, ref.adapted, RTOL, "adapted")

    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(a.shape, dtype=F64, generator=g) for a in ref.adapted]
    leaves = [case.x_support] + case.params + case.rate_tensors()
    got = torch.autograd.grad(sum((a * w).sum() for a, w in zip(adapted, weights)), leaves, allow_unused=True)
    want = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref.adapted, weights)), leaves, allow_unused=True)
    zero = [torch.zeros_like(t) for t in leaves]
    assert_close([z if x is None else x for x, z in zip(got, zero)], [z if x is None else x for x, z in zip(want, zero)],
                 RTOL, "grad of adapted")


def test_adapt_zero_steps_is_params():
    """K = 0: every task keeps the initial params."""
    case = make_case(inner_steps=0, seed=30)
    adapted = fastmaml.adapt(case.params, case.x_support, case.y_support, inner_steps=0, backend="reference")
    for a, p in zip(adapted, case.params):
        assert_close(a, p.unsqueeze(0).expand_as(a), 0.0, "adapted")


def test_adapt_under_no_grad():
    """Evaluation use: under no_grad the result is the same and holds no graph."""
    case = make_case(inner_steps=3, lr_form="per_step", seed=31)
    with torch.no_grad():
        adapted = fastmaml.adapt(case.params, case.x_support, case.y_support, inner_steps=3,
                                 inner_lr=case.inner_lr, backend="reference")
    ref = maml_loop(case.params, case.x_support, case.y_support, inner_steps=3, inner_lr=case.inner_lr)
    assert not any(a.requires_grad for a in adapted)
    assert_close(adapted, ref.adapted, RTOL, "adapted")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_of_adapted_is_query_preds(activation, loss):
    """`mlp(adapt(...), x_query)` is `maml(...).query_preds` (same steps and rates), and `mlp` equals
    the loop's own MLP task by task."""
    case = make_case(dims=[5, 6, 3, 9, 3], inner_steps=2, lr_form="per_layer", loss=loss, activation=activation, seed=32)
    adapted = fastmaml.adapt(case.params, case.x_support, case.y_support, inner_steps=2, inner_lr=case.inner_lr,
                             activation=activation, loss=loss, backend="reference")
    preds = fastmaml.mlp(adapted, case.x_query, activation=activation)
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="reference", **case.kwargs())
    assert preds.shape == out.query_preds.shape == (3, 6, 3)
    assert_close(preds, out.query_preds, RTOL, "mlp(adapt(...))")
    own = torch.stack([mlp_apply([a[t] for a in adapted], case.x_query[t], activation) for t in range(3)])
    assert_close(preds, own, RTOL, "mlp vs loop MLP")


def test_mlp_random_batched_params():
    """`mlp` on unrelated per-task params (each task its own random net), with gradients."""
    g = torch.Generator().manual_seed(33)
    T = 5
    per_task = [random_params([3, 7, 5, 2], F64, g) for _ in range(T)]
    batched = [torch.stack(parts).requires_grad_() for parts in zip(*per_task)]
    x = torch.randn(T, 6, 3, dtype=F64, generator=g, requires_grad=True)
    out = fastmaml.mlp(batched, x, activation="tanh")
    own = torch.stack([mlp_apply([b[t] for b in batched], x[t], "tanh") for t in range(T)])
    assert_close(out, own, RTOL, "mlp")
    w = torch.randn(out.shape, dtype=F64, generator=g)
    assert_close(list(torch.autograd.grad((out * w).sum(), batched + [x])),
                 list(torch.autograd.grad((own * w).sum(), batched + [x])), RTOL, "grad")


@pytest.mark.parametrize("lr_form", ["float", "per_step", "per_parameter"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_reptile(lr_form, loss):
    """`params - mean_t theta_K(t)`, one detached tensor per param; the params are left untouched."""
    case = make_case(tasks=5, inner_steps=4, lr_form=lr_form, loss=loss, seed=34)
    before = [p.detach().clone() for p in case.params]
    direction = fastmaml.reptile(case.params, case.x_support, case.y_support, inner_steps=4,
                                 inner_lr=case.inner_lr, loss=loss, backend="reference")
    ref = maml_loop(case.params, case.x_support, case.y_support, inner_steps=4, inner_lr=case.inner_lr, loss=loss)
    expected = [p - a.mean(0) for p, a in zip(case.params, ref.adapted)]
    assert [d.shape for d in direction] == [p.shape for p in case.params]
    assert not any(d.requires_grad for d in direction)
    assert_close(direction, expected, RTOL, "reptile")
    assert all(torch.equal(p, b) for p, b in zip(case.params, before))
    # Used as `.grad`, one SGD step of rate 1 lands on the mean of the adapted params.
    for p, d in zip(case.params, direction):
        p.grad = d
    torch.optim.SGD(case.params, lr=1.0).step()
    assert_close(case.params, [a.mean(0) for a in ref.adapted], RTOL, "params after one Reptile step")


def test_explain_names_reference():
    """`explain` reports the call and every backend; with a module-free MLP call on CPU tensors the
    reference backend is in the list, and for a float16 call (no kernel runs it) it is chosen."""
    case = make_case(inner_steps=2, seed=35)
    report = fastmaml.explain(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                              **case.kwargs())
    assert isinstance(report, str) and "reference" in report and "fastmaml.maml" in report
    assert "T=3" in report and "K=2" in report and "dims=[3, 7, 5, 2]" in report
    for name in fastmaml.list_backends():
        assert name in report
    adapt_report = fastmaml.explain(case.params, case.x_support, case.y_support, inner_steps=2)
    assert "fastmaml.adapt" in adapt_report and "reference" in adapt_report

    half = case.to(torch.float16)
    report16 = fastmaml.explain(half.params, half.x_support, half.y_support, half.x_query, half.y_query,
                                **half.kwargs())
    chosen = [line.split()[0] for line in report16.splitlines()[1:] if line.split()[1] == "chosen"]
    assert chosen == ["reference"], report16
