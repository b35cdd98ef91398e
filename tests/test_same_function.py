"""Every backend computes the same function, or refuses: the cases where a fused path could differ.

- Float (mse) targets that require grad: the fused kernels compute no target gradient, so they refuse
  such calls (`backend=` a fused one raises, `auto` takes the reference), and `y.grad` matches the
  independent per-task loop.
- `fastmaml.MAML` runs the fused kernels only on a model whose forward is exactly their MLP: a plain
  `nn.Sequential`, no hooks (on the model, a layer, or global), no subclass or instance `forward`, no
  shared layers. Anything else takes the reference path with the model's own result, and `explain`
  says why.
- Frozen parameters (`requires_grad=False`) of `fastmaml.MAML` are neither adapted nor meta-trained,
  on every backend.
- The reference path batches a model with dropout under vmap (each task its own masks), and warns once
  when it must loop over tasks.
- The tests' comparison judges each tensor against its own scale.

Compared in float64 with `_reference_loop.maml_loop` (plain autograd, task by task).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fastmaml
from _reference_loop import assert_close, assert_close_per_tensor, gradients, maml_loop, mlp_apply, random_data, random_params
from test_backends import device_for, require_backend, run_or_skip

F64 = torch.float64
RTOL = 1e-9
FUSED = ["cpu", "triton", "cuda"]
ALL = ["reference", *FUSED, "factored"]


def _mse_case(dims=(3, 7, 5, 2), tasks=3, n_support=5, n_query=4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    params = [p.to(device).requires_grad_() for p in random_params(dims, F64, g)]
    data = [t.to(device) for t in random_data(dims, tasks, n_support, n_query, "mse", F64, g)]
    return params, data


# ---- targets that require grad ---------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(inner_steps=1, inner_lr=0.1),
    dict(inner_steps=3, inner_lr=0.2, activation="tanh"),
    dict(inner_steps=2, inner_lr=0.15, first_order=True),
    dict(inner_steps=2, inner_lr=0.1, query_loss_weights=torch.tensor([0.3, 0.5, 1.0], dtype=F64)),
], ids=["K1", "K3_tanh", "first_order", "multi_step"])
def test_target_gradients_auto(options):
    """`auto` gives mse targets that require grad the loop's gradient (on main the cpu backend took the
    call and left `y.grad` None)."""
    params, (xs, ys, xq, yq) = _mse_case()
    ys.requires_grad_()
    yq.requires_grad_()
    out = fastmaml.maml(params, xs, ys, xq, yq, **options)
    assert out.backend == "reference"
    leaves = {"y_support": ys, "y_query": yq, **{f"params[{i}]": p for i, p in enumerate(params)}}
    got = gradients(out.loss, leaves)
    ref = maml_loop(params, xs, ys, xq, yq, **options)
    want = gradients(ref.loss, leaves)
    assert got["y_support"].abs().max() > 0 or options.get("first_order"), "a test that cannot fail"
    assert_close(got, want, RTOL, "grad")


def test_target_gradients_factored():
    """The factored backend is autograd through the inner loop: float targets that require grad get the
    loop's gradient there too (second order and first order)."""
    for first_order in (False, True):
        params, (xs, ys, xq, yq) = _mse_case(seed=3)
        ys.requires_grad_()
        yq.requires_grad_()
        options = dict(inner_steps=2, inner_lr=0.15, first_order=first_order)
        out = fastmaml.maml(params, xs, ys, xq, yq, backend="factored", **options)
        leaves = {"y_support": ys, "y_query": yq, **{f"params[{i}]": p for i, p in enumerate(params)}}
        got = gradients(out.loss, leaves)
        want = gradients(maml_loop(params, xs, ys, xq, yq, **options).loss, leaves)
        assert got["y_support"].abs().max() > 0 or first_order, "a test that cannot fail"
        assert_close(got, want, RTOL, "grad")


@pytest.mark.parametrize("name", FUSED)
def test_target_gradients_fused_refuses(name):
    """An explicit fused backend refuses targets that require grad, naming them; without grad mode, or
    with targets that need none, it runs."""
    require_backend(name)
    device = device_for(name)
    params, (xs, ys, xq, yq) = _mse_case(device=device)
    why = fastmaml.dispatch.get_backend(name).reject(
        fastmaml._validate.make_problem(params, xs, ys, xq, yq), "maml")
    if why is not None:  # this backend cannot take CPU tensors here (cuda without a GPU)
        pytest.skip(f"backend {name!r} cannot run this call here: {why}")
    ys.requires_grad_()
    with pytest.raises(ValueError, match="y_support or y_query requires grad"):
        fastmaml.maml(params, xs, ys, xq, yq, backend=name)
    with pytest.raises(ValueError, match="y_support or y_query requires grad"):
        fastmaml.adapt(params, xs, ys, backend=name)
    with torch.no_grad():
        out = fastmaml.maml(params, xs, ys, xq, yq, backend=name)
        want = fastmaml.maml(params, xs, ys, xq, yq, backend="reference")
    assert_close(out.task_losses, want.task_losses, RTOL, "task_losses")
    assert fastmaml.maml(params, xs, ys.detach(), xq, yq, backend=name).backend == name


def test_target_gradient_of_adapt():
    """`adapt` with a target that requires grad is differentiable in it (reference), like the loop."""
    params, (xs, ys, _, _) = _mse_case()
    ys.requires_grad_()
    adapted = fastmaml.adapt(params, xs, ys, inner_steps=2, inner_lr=0.1)
    ref = maml_loop(params, xs, ys, inner_steps=2, inner_lr=0.1).adapted
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(a.shape, dtype=F64, generator=g) for a in ref]
    got = torch.autograd.grad(sum((a * w).sum() for a, w in zip(adapted, weights)), ys)[0]
    want = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, weights)), ys)[0]
    assert_close(got, want, RTOL, "y_support grad")


# ---- which modules run fused --------------------------------------------------------------------


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()


class ScaledSequential(nn.Sequential):
    """A subclass whose forward is not the MLP's."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 0.5


def _hand_forward(kind):
    """What each altered model computes, written by hand on one task's params `[W1, b1, ..., W3, b3]`."""

    def forward(p, x):
        if kind == "pre_hook":
            x = x * 1.5
        h = x @ p[0].t() + p[1]
        if kind == "forward_hook":
            h = h * 0.0 + 0.25
        h = (h.clamp_min(0) @ p[2].t() + p[3]).clamp_min(0) @ p[4].t() + p[5]
        if kind in ("subclass", "instance_forward"):
            h = 2.0 * h + 0.5
        if kind == "global_hook":
            h = h - 1.0
        return h

    return forward


@pytest.mark.parametrize("kind", ["forward_hook", "pre_hook", "subclass", "instance_forward", "global_hook"])
def test_altered_sequential_takes_reference(kind):
    """A hooked or subclassed Sequential computes something else than the MLP: it runs on the reference
    path with the model's own result (on main it ran fused and ignored the change)."""
    model = _net()
    handle = None
    if kind == "forward_hook":
        handle = model[0].register_forward_hook(lambda mod, inp, out: out * 0.0 + 0.25)
    elif kind == "pre_hook":
        handle = model.register_forward_pre_hook(lambda mod, inp: (inp[0] * 1.5,))
    elif kind == "subclass":
        model = ScaledSequential(*model)
    elif kind == "instance_forward":
        plain = model.forward
        model.forward = lambda x: 2.0 * plain(x) + 0.5
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda mod, inp, out: out - 1.0 if isinstance(mod, nn.Sequential) else None)
    try:
        wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2)
        params, (xs, ys, xq, yq) = _mse_case(dims=(3, 6, 5, 2), seed=3)
        assert not wrapped.is_mlp
        report = wrapped.explain(xs, ys, xq, yq)
        assert "reference  chosen" in report and "cpu        rejected" in report
        assert any(word in report for word in ("hook", "subclasses", "forward method")), report
        out = wrapped(xs, ys, xq, yq)
        assert out.backend == "reference"
        leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]
        ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, forward=_hand_forward(kind))
        assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
        assert_close(list(torch.autograd.grad(out.loss, list(model.parameters()))),
                     list(torch.autograd.grad(ref.loss, leaves)), RTOL, "grad")
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("name", FUSED)
def test_in_place_relu_runs_fused_with_the_models_result(name):
    """`nn.ReLU(inplace=True)` acts on the linear layer's fresh output: the model computes the MLP, so the
    fused kernels take it (they were refused it) and give the model's own result, checked against a loop
    of autograd through the module itself."""
    require_backend(name)
    device = device_for(name)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(inplace=True),
                          nn.Linear(5, 2)).double().to(device)
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, backend=name)
    assert wrapped.is_mlp
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 6, 5, 2), seed=5, device=device)
    out = run_or_skip(name, lambda: wrapped(xs, ys, xq, yq))
    assert out.backend == name
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]
    own = lambda p, x: torch.func.functional_call(model, dict(zip(names, p)), (x,))  # noqa: E731
    ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, forward=own)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(list(torch.autograd.grad(out.loss, list(model.parameters()))),
                 list(torch.autograd.grad(ref.loss, leaves)), RTOL, "grad")


def test_hook_added_after_construction():
    """Whether the model runs fused is decided on every call, not when the wrapper was made."""
    model = _net()
    wrapped = fastmaml.MAML(model, inner_lr=0.1)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 6, 5, 2))
    assert wrapped(xs, ys, xq, yq).backend == "cpu"
    handle = model[2].register_forward_hook(lambda mod, inp, out: out + 1.0)
    assert wrapped(xs, ys, xq, yq).backend == "reference"
    assert "layer 2 (Linear) has forward hooks" in fastmaml.explain(wrapped, xs, ys, xq, yq)
    handle.remove()
    assert wrapped(xs, ys, xq, yq).backend == "cpu"


@pytest.mark.parametrize("kind", ["backward_hook", "shared_layer", "shared_weight", "linear_subclass",
                                  "bias_replaced", "activation_parameter", "call_impl", "reordered",
                                  "sequential_parameter", "nested_parameter"])
def test_other_modules_not_fused(kind):
    """Backward hooks, a layer used twice, tied weights and Linear subclasses keep a model off the
    fused path (a shared layer would be adapted once per use by the kernels)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    if kind == "backward_hook":
        model[2].register_full_backward_hook(lambda mod, gin, gout: None)
    elif kind == "shared_layer":
        model = nn.Sequential(model[0], nn.Tanh(), model[0], nn.Tanh(), model[4])
    elif kind == "shared_weight":
        model[2].weight = model[0].weight
    elif kind == "bias_replaced":  # a buffer in the bias's place, a parameter of the same shape elsewhere
        bias = model[0].bias.detach().clone()
        del model[0].bias
        model[0].register_buffer("bias", bias)
        model[0].register_parameter("shift", nn.Parameter(torch.zeros(4, dtype=F64)))
    elif kind == "activation_parameter":
        model[1].register_parameter("scale", nn.Parameter(torch.ones(4, dtype=F64)))
    elif kind == "call_impl":
        plain = model[2]._call_impl
        model[2]._call_impl = lambda *a, **k: plain(*a, **k) * 2.0
    elif kind == "sequential_parameter":  # a parameter of the Sequential itself (the kernels would not adapt it)
        model.register_parameter("extra", nn.Parameter(torch.ones(3, dtype=F64)))
    elif kind == "nested_parameter":  # a module below a layer, with parameters of its own
        model[2].add_module("inner", nn.Linear(2, 2).double())
    elif kind == "reordered":  # weight re-registered after bias: the parameters come bias first
        weight = model[0].weight.detach().clone()
        del model[0].weight
        model[0].weight = nn.Parameter(weight)
    else:
        class MyLinear(nn.Linear):
            pass

        model[2] = MyLinear(4, 4).double()
    activation, why = fastmaml.nn.mlp_structure_reason(model)
    assert activation is None and why
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, backend="auto")
    _, (xs, ys, xq, yq) = _mse_case(dims=(4, 4, 4, 2), seed=4)
    out = wrapped(xs, ys, xq, yq)
    assert out.backend == "reference"
    if kind == "shared_layer":  # the model's own function: theta holds one copy of the shared layer
        leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]

        def forward(p, x):
            h = torch.tanh(torch.tanh(x @ p[0].t() + p[1]) @ p[0].t() + p[1])
            return h @ p[2].t() + p[3]

        ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, forward=forward)
        assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")


def test_layer_added_after_construction():
    """A layer appended to the model after the wrapper was made is adapted and returned by adapt."""
    model = _net()
    wrapped = fastmaml.MAML(model, inner_lr=0.1)
    model.append(nn.ReLU())
    model.append(nn.Linear(2, 2).double())
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 6, 5, 2))
    with torch.no_grad():
        adapted = wrapped.adapt(xs, ys)
    assert sorted(adapted) == sorted(n for n, _ in model.named_parameters())
    leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=1, inner_lr=0.1)
    assert_close(wrapped(xs, ys, xq, yq).task_losses, ref.task_losses, RTOL, "task_losses")


def test_forward_mode_ad_and_autocast_take_the_reference():
    """torch.func.jvp through maml (the fused kernels have no forward-mode formula: on main the tangent
    came back 0) and autocast (the model computes in lower precision) run on the reference path."""
    params, (xs, ys, xq, yq) = _mse_case()
    params = [p.detach() for p in params]

    def loss_of(y, backend="auto"):
        return fastmaml.maml(params, xs, y, xq, yq, inner_steps=2, inner_lr=0.1, activation="tanh",
                             backend=backend).loss

    tangent = torch.func.jvp(loss_of, (ys,), (torch.ones_like(ys),))[1]
    want = torch.func.jvp(lambda y: loss_of(y, "reference"), (ys,), (torch.ones_like(ys),))[1]
    assert want.abs() > 0
    assert_close(tangent, want, RTOL, "jvp")
    with torch.autocast("cpu", torch.bfloat16):
        assert fastmaml.maml(params, xs, ys, xq, yq).backend == "reference"
        with pytest.raises(ValueError, match="autocast"):
            fastmaml.maml(params, xs, ys, xq, yq, backend="cpu")


def test_torch_func_transforms_leave_the_fused_kernels():
    """torch.func.grad and vjp through maml: the fused kernels' autograd Functions have no rule for their
    transforms (`auto` picked cpu, which raised from inside the call). `auto` takes another backend, with
    the reference's result, also where a plan for the same call was remembered outside the transform; an
    explicit fused backend is refused with the reason."""
    params, (xs, ys, xq, yq) = _mse_case(dims=(3, 7, 5, 2), tasks=4)
    params = [p.detach() for p in params]

    def loss_of(w, backend="auto"):
        return fastmaml.maml([w, *params[1:]], xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, backend=backend).loss

    outside = [params[0].clone().requires_grad_(), *params[1:]]  # the key of the calls under grad below
    assert fastmaml.maml(outside, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1).backend == "cpu"
    want = torch.func.grad(lambda w: loss_of(w, "reference"))(params[0])
    assert want.abs().max() > 0, "a test that cannot fail"
    assert_close(torch.func.grad(loss_of)(params[0]), want, RTOL, "grad")
    _, vjp = torch.func.vjp(loss_of, params[0])
    assert_close(vjp(torch.ones((), dtype=F64))[0], want, RTOL, "vjp")
    with pytest.raises(ValueError, match="torch.func transform"):
        torch.func.grad(lambda w: loss_of(w, "cpu"))(params[0])


# ---- values that are not finite -------------------------------------------------------------------


# Triton (the interpreter here, 5-12 s a case) with relu only: its tanh path did not change and the tanh
# cases of the other backends run.
_NAN_CASES = [(n, a) for n in [*FUSED, "factored", "triton:scratch"] for a in ("relu", "tanh")
              if a == "relu" or not n.startswith("triton")]


@pytest.mark.parametrize("where", ["x_support", "y_support", "weight"])
@pytest.mark.parametrize("name,activation", _NAN_CASES)
def test_nan_spreads_as_in_the_reference(monkeypatch, name, activation, where):
    """A NaN in one task's support point or target, or in a hidden weight, is NaN wherever the reference
    makes it NaN: the task losses, the predictions, every gradient element, the weights after one step; the
    rest equals the reference's. (The kernels' ReLU turned NaN into 0, so a diverged or corrupted task gave
    a finite loss.) Triton in both its layouts."""
    if name == "triton:scratch":
        from fastmaml.backends import triton_maml
        monkeypatch.setattr(triton_maml, "LAYOUT", "scratch")
        name = "triton"
    require_backend(name)
    device = device_for(name)
    params, (xs, ys, xq, yq) = _mse_case(dims=(3, 9, 6, 4), tasks=5, n_support=5, n_query=6, seed=7, device=device)
    if where != "weight":
        # A NaN in x makes the point's every activation NaN; one in y only its loss derivatives, which
        # meet ReLU's mask where h <= 0 (there torch passes 0, not 0 * NaN).
        data = xs if where == "x_support" else ys
        data = data.clone()
        data[1, 2, 0] = float("nan")
        xs, ys = (data, ys) if where == "x_support" else (xs, data)
    else:
        with torch.no_grad():
            params[2][4, 1] = float("nan")
    got = {}
    for b in ("reference", name):
        out = run_or_skip(b, lambda: fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1,
                                                   activation=activation, backend=b))
        objective = out.loss + (out.query_preds * torch.linspace(0.5, 1.5, 4, dtype=F64, device=device)).mean()
        got[b] = {"task_losses": out.task_losses.detach(), "query_preds": out.query_preds.detach(),
                  **{f"grad[{i}]": g for i, g in enumerate(torch.autograd.grad(objective, params))}}
        with torch.no_grad():  # one step's weights: there a NaN target leaves rows of W1 finite
            adapted = run_or_skip(b, lambda: fastmaml.adapt(params, xs, ys, inner_steps=1, inner_lr=0.1,
                                                            activation=activation, backend=b))
        got[b].update({f"adapted[{i}]": a for i, a in enumerate(adapted)})
    want = got["reference"]
    # One task's support point or target: that task only. A shared weight: every task.
    assert want["task_losses"].isnan().sum() == (5 if where == "weight" else 1), "a test that cannot fail"
    for key, value in got[name].items():
        assert torch.equal(value.isnan(), want[key].isnan()), f"{key}: NaN at other places than the reference's"
        assert_close(value.nan_to_num(), want[key].nan_to_num(), RTOL, key)


# ---- frozen parameters --------------------------------------------------------------------------


# The backends whose kernels work on padded tiles: an infinity there meets the padding's zeros (inf * 0 =
# NaN), and the NaN reaches real outputs through the next product, where the reference's saturating tanh
# gives a finite value. NaN is allowed there, a finite value other than the reference's is not.
_PADDED_TILES = {"triton", "cuda"}


@pytest.mark.parametrize("where", ["x_query", "weight"])
@pytest.mark.parametrize("name", [*FUSED, "factored"])
def test_an_infinity_gives_the_references_values_or_nan(name, where):
    """An infinite query input or first-layer weight, tanh: the reference is finite where tanh saturates
    (a task's loss, every gradient of the weight case). cpu and factored give its values exactly where it
    does, NaN where it does; a kernel on padded tiles (docs/kernels.md) may give NaN instead of a value, never
    another finite value."""
    require_backend(name)
    device = device_for(name)
    params, (xs, ys, xq, yq) = _mse_case(dims=(3, 7, 5, 2), tasks=3, n_support=5, n_query=4, seed=11, device=device)
    params = [p.detach() for p in params]
    if where == "x_query":
        xq = xq.clone()
        xq[1, 2, 0] = float("inf")
    else:
        params[0] = params[0].clone()
        params[0][0, 1] = float("inf")
    got = {}
    for b in ("reference", name):
        leaves = [p.clone().requires_grad_() for p in params]
        out = run_or_skip(b, lambda: fastmaml.maml(leaves, xs, ys, xq, yq, inner_steps=1, inner_lr=0.1,
                                                   activation="tanh", backend=b))
        assert out.backend == b
        got[b] = {"task_losses": out.task_losses.detach(),
                  **{f"grad[{i}]": g for i, g in enumerate(torch.autograd.grad(out.loss, leaves))}}
    want = got["reference"]
    assert want["task_losses"].isfinite().all(), "a test that cannot fail: the reference saturates"
    for key, value in got[name].items():
        if name in _PADDED_TILES:
            kept = ~value.isnan()
            assert torch.equal(value[kept].isinf(), want[key][kept].isinf()), key
            value, reference = value[kept], want[key][kept]
        else:
            reference = want[key]
            assert torch.equal(value.isnan(), reference.isnan()), f"{key}: NaN at other places than the reference's"
            assert torch.equal(value.isinf(), reference.isinf()), f"{key}: inf at other places than the reference's"
        infinite, finite = reference.isinf(), reference.isfinite()
        assert torch.equal(value[infinite], reference[infinite]), f"{key}: another sign of infinity"
        assert_close(value[finite], reference[finite], RTOL, key)


@pytest.mark.parametrize("learn", [None, "per_step", "per_parameter"])
@pytest.mark.parametrize("name", ALL)
def test_frozen_parameters(name, learn):
    """A parameter with requires_grad=False is neither adapted nor meta-trained, on every backend: its
    adapted value is theta_0 for every task, it gets no gradient, and the rest matches a loop in which
    it has rate 0."""
    require_backend(name)
    device = device_for(name)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double().to(device)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    K, lr = 2, 0.2
    wrapped = fastmaml.MAML(model, inner_lr=lr, inner_steps=K, learn_inner_lr=learn, backend=name).to(device)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 6, 2), tasks=2, seed=7, device=device)
    try:
        out = wrapped(xs, ys, xq, yq)
    except ValueError as err:
        refused = f"backend={name!r} cannot run this call" in str(err)
        if refused and (name in ("cuda", "triton") or (name == "factored" and learn == "per_parameter")):
            pytest.skip(str(err))
        raise
    assert out.backend == name
    out.loss.backward()
    assert model[0].weight.grad is None and model[2].bias.grad is None
    frozen = [not p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        adapted = wrapped.adapt(xs, ys)
    for (pname, p), f in zip(model.named_parameters(), frozen):
        if f:
            assert torch.equal(adapted[pname], p.detach().expand_as(adapted[pname])), f"{pname} was adapted"
        else:
            assert not torch.equal(adapted[pname][0], p.detach()), f"{pname} was not adapted"
    # The oracle: the same loop with rate 0 for the frozen tensors.
    leaves = [p.detach().clone().cpu().requires_grad_(not f) for p, f in zip(model.parameters(), frozen)]
    rates = [torch.full((), 0.0 if f else lr, dtype=F64) for f in frozen]
    data = [t.cpu() for t in (xs, ys, xq, yq)]
    ref = maml_loop(leaves, *data, inner_steps=K, inner_lr=rates, activation="tanh")
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    trained = [p for p, f in zip(model.parameters(), frozen) if not f]
    want = torch.autograd.grad(ref.loss, [p for p, f in zip(leaves, frozen) if not f])
    assert_close([p.grad for p in trained], list(want), RTOL, "grad")
    if learn is not None:
        rate_grads = [r.grad for r in wrapped.inner_lrs]
        if learn == "per_parameter":  # the frozen tensors' rates stay without gradient
            assert [g is None for g in rate_grads] == frozen
        else:
            assert rate_grads[0] is not None and rate_grads[0].abs().max() > 0


# ---- inputs the function does not depend on -------------------------------------------------------


@pytest.mark.parametrize("K,first_order,lr_form", [(0, False, "per_layer"), (0, False, "meta_sgd"),
                                                   (0, False, "scalar_tensor"), (2, True, "per_step"),
                                                   (1, True, "meta_sgd")])
@pytest.mark.parametrize("name", ALL)
def test_unused_inputs_get_no_gradient(name, K, first_order, lr_form):
    """The rates at K = 0, the support set at K = 0 or first order: the function does not depend on them,
    so autograd leaves their gradient None, and every backend does the same (the fused kernels returned
    zeros, which an optimizer with weight decay or momentum would still apply). The loss requires grad as
    the reference's does (at K = 0 with only the rates and the support set requiring grad, not at all)."""
    from _reference_loop import make_case

    require_backend(name)
    device = device_for(name)
    case = make_case(dims=(3, 7, 2), tasks=3, inner_steps=max(K, 1), lr_form=lr_form, first_order=first_order,
                     seed=11).to(F64, device)
    case.y_support.requires_grad_()  # mse targets: the fused kernels refuse them where they are used
    kwargs = dict(case.kwargs(), inner_steps=K)
    leaves = {**case.leaves(), "y_support": case.y_support}
    unused = {n for n in leaves if n.startswith("inner_lr") and K == 0} | {"x_support", "y_support"}
    assert "x_support" in leaves and len(leaves) > len(unused), "a test that cannot fail"
    if name == "factored" and lr_form == "meta_sgd":
        pytest.skip("the factored backend refuses Meta-SGD rates (one rate per element)")
    # Every other backend must run it: the fused kernels refused targets that require grad.
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query, backend=name,
                        **kwargs)
    out.loss.backward()
    nones = {n for n, t in leaves.items() if t.grad is None}
    assert nones == unused, f"None gradients {sorted(nones)}, the reference's {sorted(unused)}"
    assert all(leaves[n].grad.abs().max() > 0 for n in set(leaves) - nones)
    for leaf in leaves.values():
        leaf.grad = None
    frozen = [p.detach() for p in case.params]  # only unused leaves require grad: nothing to differentiate
    out = fastmaml.maml(frozen, case.x_support, case.y_support, case.x_query.detach(), case.y_query, backend=name,
                        **kwargs)
    assert out.loss.requires_grad == (K > 0 and any(n.startswith("inner_lr") for n in leaves)), out.backend


# ---- the reference path: vmap with randomness, a warning when it loops ----------------------------


def test_dropout_runs_under_vmap(monkeypatch):
    """A model with dropout is batched by vmap (no task loop, no warning), each task drawing its own
    masks; the same seed gives the same result, and in eval mode it matches the loop."""
    from fastmaml.backends import reference as reference_backend

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 16, 2), tasks=4, seed=9)
    same = [t[:1].expand_as(t).contiguous() for t in (xs, ys, xq, yq)]  # four copies of one task
    looped = []
    real_loop = reference_backend._run_batched

    def spy(problem, *args):
        out = real_loop(problem, *args)
        looped.append(problem.extras.get("no_vmap", False))
        return out

    monkeypatch.setattr(reference_backend, "_run_batched", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.TaskLoopWarning)
        torch.manual_seed(1)
        first = wrapped(*same)
        torch.manual_seed(1)
        again = wrapped(*same)
    assert looped == [False, False]
    assert first.backend == "reference"
    assert torch.equal(first.task_losses, again.task_losses)
    assert len(set(first.task_losses.tolist())) == 4, "every task should draw its own dropout masks"
    first.loss.backward()
    model.eval()
    out = wrapped(xs, ys, xq, yq)
    leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses (eval)")


class _Tokens(nn.Module):
    """Four token ids per point (given as floats, as fastmaml takes inputs), embedded with a padding row."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=0)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        return self.out(self.embed(x.long()).flatten(1))


def _normed(layer):
    return lambda: nn.Sequential(nn.Linear(3, 8), layer(), nn.Tanh(), nn.Linear(8, 2))


# name -> (model, which calls vmap gets wrong: "second order", "every order" or None)
_VMAP_CASES = {
    "layer_norm": (_normed(lambda: nn.LayerNorm(8)), "second order"),
    "layer_norm_no_bias": (_normed(lambda: nn.LayerNorm(8, bias=False)), "second order"),
    "batch_norm_batch_stats": (_normed(lambda: nn.BatchNorm1d(8, track_running_stats=False)), "second order"),
    "instance_norm": (_normed(lambda: nn.Sequential(nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, affine=True),
                                                    nn.Flatten())), "second order"),
    "embedding_padding": (_Tokens, "every order"),
    "batch_norm_no_affine": (_normed(lambda: nn.BatchNorm1d(8, affine=False, track_running_stats=False)), None),
    "group_norm": (_normed(lambda: nn.GroupNorm(2, 8)), None),
    "layer_norm_no_scale": (_normed(lambda: nn.LayerNorm(8, elementwise_affine=False)), None),
}


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
@pytest.mark.parametrize("case", list(_VMAP_CASES))
def test_models_vmap_differentiates_wrongly_match_the_loop(monkeypatch, case, first_order):
    """vmap over tasks of torch.func.grad differs from autograd task by task through some layers (the
    second-order meta-gradient through a LayerNorm with a learned scale, an affine instance norm or an
    affine batch norm on batch statistics; every gradient through an Embedding's padding row): the
    reference path runs those calls task by task, with one TaskLoopWarning naming the layer, and matches
    the independent loop; the other layers, and the other calls, stay batched (and match too)."""
    make, wrong = _VMAP_CASES[case]
    torch.manual_seed(4)
    model = make().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a scale away from 1, a shift away from 0, a padding row not 0
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 8, 2), tasks=4, n_support=6, n_query=5, seed=12)
    if case == "embedding_padding":
        g = torch.Generator().manual_seed(13)
        xs, xq = (torch.randint(0, 6, (4, n, 4), generator=g).double() for n in (6, 5))
    reason, every_order = fastmaml.nn.vmap_gradient_reason(model)
    assert (reason is not None, every_order) == (wrong is not None, wrong == "every order")
    loops = wrong == "every order" or (wrong == "second order" and not first_order)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fastmaml.TaskLoopWarning)
        out = wrapped(xs, ys, xq, yq)
    said = [str(w.message) for w in caught if issubclass(w.category, fastmaml.TaskLoopWarning)]
    assert out.backend == "reference"
    assert len(said) == loops and (not loops or "derivatives through this model differ" in said[0]), said
    params = list(model.parameters())
    got = torch.autograd.grad(out.loss, params)
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in params]

    def forward(ps, x):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, first_order=first_order, forward=forward)
    want = torch.autograd.grad(ref.loss, leaves)

    def flat(grads):  # judged against the largest gradient (a bias before a norm has gradient 0 + rounding)
        return torch.cat([g.reshape(-1) for g in grads])

    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(flat(got), flat(want), RTOL, "meta-gradient")
    if loops:  # a test that can fail: batched by vmap, this call is wrong
        from fastmaml.backends import reference as reference_backend

        monkeypatch.setattr(fastmaml.nn, "vmap_gradient_reason", lambda model: (None, False))
        monkeypatch.setattr(reference_backend, "_untrusted_call", lambda func, args, kwargs: None)
        batched = torch.autograd.grad(wrapped(xs, ys, xq, yq).loss, params)
        error = (flat(batched) - flat(want)).abs().max() / flat(want).abs().max()
        assert error > 1e-4, error


class _Functional(nn.Module):
    """A custom forward that calls a norm or an embedding through torch.nn.functional (or torch.ops) on
    parameters of its own: no layer of it is one `vmap_gradient_reason` knows."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(12 if kind == "embedding_padding" else 3, 8)
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(8))
        self.shift = nn.Parameter(0.3 * torch.randn(8))
        self.table = nn.Parameter(torch.randn(6, 3))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        kind = self.kind
        if kind == "embedding_padding":
            h = self.inp(F.embedding(x.long(), self.table, padding_idx=0).flatten(1)) * self.scale + self.shift
            return self.out(torch.tanh(h))
        h = self.inp(x)
        if kind == "layer_norm":
            h = F.layer_norm(h, (8,), self.scale, self.shift)
        elif kind == "torch_layer_norm":
            h = torch.layer_norm(h, [8], self.scale, self.shift)
        elif kind == "aten_layer_norm":
            h = torch.ops.aten.native_layer_norm(h, [8], self.scale, self.shift, 1e-5)[0]
        elif kind == "instance_norm":
            h = F.instance_norm(h.view(-1, 2, 4), weight=self.scale[:2], bias=self.shift[:2]).flatten(1)
        elif kind == "batch_norm_batch_stats":
            h = F.batch_norm(h, None, None, self.scale, self.shift, training=True)
        elif kind == "group_norm":
            h = F.group_norm(h, 2, self.scale, self.shift)
        elif kind == "layer_norm_no_scale":
            h = F.layer_norm(h, (8,)) * self.scale + self.shift  # the scale outside: no learned one inside
        return self.out(torch.tanh(h * self.table[1, 1]))


# kind -> which calls vmap gets wrong, as in _VMAP_CASES
_FUNCTIONAL_CASES = {
    "layer_norm": "second order", "torch_layer_norm": "second order", "aten_layer_norm": "second order",
    "instance_norm": "second order",
    "batch_norm_batch_stats": "second order", "embedding_padding": "every order",
    "group_norm": None, "layer_norm_no_scale": None,
}


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
@pytest.mark.parametrize("kind", list(_FUNCTIONAL_CASES))
def test_functional_calls_vmap_differentiates_wrongly_match_the_loop(monkeypatch, kind, first_order):
    """The same layers called through torch.nn.functional in a custom forward, which the module walk
    cannot see: the reference path sees the calls in the forward's first batched run, drops that run's
    result where it is wrong for the call, loops (one TaskLoopWarning), and goes straight to the loop in
    the next call. Every call matches the independent loop; batched, the looped ones would not."""
    wrong = _FUNCTIONAL_CASES[kind]
    torch.manual_seed(5)
    model = _Functional(kind).double()
    assert fastmaml.nn.vmap_gradient_reason(model) == (None, False)
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 8, 2), tasks=4, n_support=6, n_query=5, seed=14)
    if kind == "embedding_padding":
        g = torch.Generator().manual_seed(15)
        xs, xq = (torch.randint(0, 6, (4, n, 4), generator=g).double() for n in (6, 5))
    loops = wrong == "every order" or (wrong == "second order" and not first_order)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in params]

    def forward(ps, x):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, first_order=first_order, forward=forward)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref.loss, leaves)])
    from fastmaml.backends import reference as reference_backend

    vmapped = []
    real_vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: vmapped.append(1) or real_vmap(*a, **k))
    for call in range(2):
        vmapped.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fastmaml.TaskLoopWarning)
            out = wrapped(xs, ys, xq, yq)
        said = [str(w.message) for w in caught if issubclass(w.category, fastmaml.TaskLoopWarning)]
        assert len(said) == (loops and call == 0), said
        assert not said or "forward calls" in said[0], said
        # the first call runs vmap (then the loop where wrong); the second runs vmap only where right
        assert len(vmapped) == (1 if call == 0 or not loops else 0), (call, vmapped)
        got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, params)])
        assert_close(out.task_losses, ref.task_losses, RTOL, f"task_losses, call {call}")
        assert_close(got, want, RTOL, f"meta-gradient, call {call}")
    if loops:  # a test that can fail: batched by vmap, this call is wrong
        monkeypatch.setattr(reference_backend, "_untrusted_call", lambda func, args, kwargs: None)
        fresh = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order)
        batched = torch.cat([g.reshape(-1) for g in torch.autograd.grad(fresh(xs, ys, xq, yq).loss, params)])
        error = (batched - want).abs().max() / want.abs().max()
        assert error > 1e-4, error


class _NormAndPadding(nn.Module):
    """An nn.LayerNorm (the module walk: wrong in second order) and an embedding with a padding row called
    through torch.nn.functional (wrong in every order), as a review's reproducer had them."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 3))
        self.norm = nn.LayerNorm(12)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(F.embedding(x.long(), self.table, padding_idx=0).flatten(1))))


@pytest.mark.parametrize("first", ["adapt_k0", "first_order", "walk_finding"])
def test_what_the_calls_showed_is_not_lost(first):
    """The calls a forward made are judged with every finding: a first `adapt` with no inner steps (the
    forward never differentiated) records nothing; a module walk's finding (second order) does not hide
    the calls' worse one (every order); a first-order first call keeps a second-order finding for later.
    Each later call matches the independent loop."""
    torch.manual_seed(6)
    if first == "walk_finding":
        model, wrong_first_order = _NormAndPadding().double(), True
    else:
        model, wrong_first_order = _Functional("layer_norm").double(), False
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 8, 2), tasks=4, n_support=6, n_query=5, seed=16)
    if first == "walk_finding":
        g = torch.Generator().manual_seed(17)
        xs, xq = (torch.randint(0, 6, (4, n, 4), generator=g).double() for n in (6, 5))
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=wrong_first_order)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def forward(ps, x):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fastmaml.TaskLoopWarning)
        if first == "adapt_k0":
            wrapped.adapt(xs, ys, inner_steps=0)
        elif first == "first_order":
            wrapped.first_order = True
            wrapped(xs, ys, xq, yq)
            wrapped.first_order = False
        for _ in range(2):
            out = wrapped(xs, ys, xq, yq)
            leaves = [p.detach().clone().requires_grad_() for p in params]
            ref = maml_loop(leaves, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, first_order=wrapped.first_order,
                            forward=forward)
            got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, params)])
            want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref.loss, leaves)])
            assert_close(got, want, RTOL, "meta-gradient")
    said = [str(w.message) for w in caught if issubclass(w.category, fastmaml.TaskLoopWarning)]
    assert len(said) == 1 and ("padding_idx" if first == "walk_finding" else "layer_norm") in said[0], said


def test_a_failing_model_raises_its_own_error_without_blaming_vmap():
    """A model that fails in a loop too (a bug, not a vmap limit) raises its own error, with no
    TaskLoopWarning, and is not marked as one vmap cannot batch."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            raise RuntimeError("a bug in the model")

    wrapped = fastmaml.MAML(Broken(), inner_lr=0.1)
    _, (xs, ys, xq, yq) = _mse_case(dims=(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.TaskLoopWarning)
        with pytest.raises(RuntimeError, match="a bug in the model"):
            wrapped(xs, ys, xq, yq)
    assert wrapped._no_vmap == {True: False, False: False}


# ---- the tests' own comparison ------------------------------------------------------------------


def test_float32_comparisons_record_their_errors_when_asked(monkeypatch, tmp_path):
    """With FASTMAML_ERROR_LOG set (the GPU check sets it), every float32 comparison appends its worst
    element over the tensor's scale and its norm-wise error, passing or not: the figures the float32
    bounds are to be set from. float64 comparisons and runs without the variable write nothing."""
    log = tmp_path / "errors.jsonl"
    want = torch.tensor([1.0, -2.0, 4.0], dtype=F64)
    got = (want + torch.tensor([0.0, 4e-5, 0.0], dtype=F64)).float()
    assert_close(got, want, 1e-4, "plain")  # no variable: nothing written
    monkeypatch.setenv("FASTMAML_ERROR_LOG", str(log))
    assert_close(got, want, 1e-4, "f32")
    assert_close(want, want, 1e-9, "f64")
    with pytest.raises(AssertionError):
        assert_close_per_tensor({"t": got}, {"t": want}, 1e-7, worst=1e-2)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["tensor"] for r in rows] == ["f32", "t"]
    assert rows[0]["test"].endswith("test_float32_comparisons_record_their_errors_when_asked")
    assert rows[0]["worst_over_scale"] == pytest.approx(1e-5, rel=0.05) and rows[0]["numel"] == 3
    assert rows[0]["norm_wise"] == pytest.approx(4e-5 / math.sqrt(21), rel=0.05)


def test_assert_close_judges_each_tensor_by_its_own_scale():
    """A tensor 1e-5 the size of the largest in a comparison is checked to rtol of itself (with the
    old 1% floor of the largest, a 10% error in it passed)."""
    big = torch.full((3,), 1.0, dtype=F64)
    small = torch.tensor([1e-5, -2e-5, 3e-5], dtype=F64)
    with pytest.raises(AssertionError, match="small"):
        assert_close({"big": big, "small": small * 1.001}, {"big": big, "small": small}, 1e-4)
    assert_close({"big": big, "small": small * (1 + 1e-5)}, {"big": big, "small": small}, 1e-4)
    # A tensor that is zero in exact arithmetic is held to the collection's floor, not to its own zero.
    assert_close([big, torch.full((2,), 1e-13, dtype=F64)], [big, torch.zeros(2, dtype=F64)], 1e-4)
    with pytest.raises(AssertionError):
        assert_close([big, torch.full((2,), 1e-9, dtype=F64)], [big, torch.zeros(2, dtype=F64)], 1e-4)


def test_assert_close_per_tensor_fails_a_wrong_task_not_float32_kinks():
    """The large-batch comparison (the GPU grid's 20,000 tasks): a few predictions off by 5e-4 of the
    scale, as float32's ReLU kinks give, pass; one task computed wrong, or one element off by 2%, fails."""
    g = torch.Generator().manual_seed(3)
    want = {"preds": torch.randn(20000, 10, 5, dtype=F64, generator=g), "bias": torch.randn(128, dtype=F64, generator=g)}
    kinks = {k: v.clone() for k, v in want.items()}
    kinks["preds"].view(-1)[torch.randperm(want["preds"].numel(), generator=g)[:20]] += 5e-4 * 4.4
    with pytest.raises(AssertionError):
        assert_close(kinks, want, 1e-4)
    assert_close_per_tensor(kinks, want, 1e-4, worst=1e-2)
    wrong_task = {k: v.clone() for k, v in want.items()}
    wrong_task["preds"][9991] = torch.randn(10, 5, dtype=F64, generator=g)
    with pytest.raises(AssertionError, match="preds: norm-wise error"):
        assert_close_per_tensor(wrong_task, want, 1e-4, worst=10.0)
    spike = {k: v.clone() for k, v in want.items()}
    spike["bias"][7] += 0.02 * want["bias"].abs().max()
    with pytest.raises(AssertionError, match="bias: 1/128 elements off"):
        assert_close_per_tensor(spike, want, 1e-4, worst=1e-2)


def test_hand_forward_is_the_mlp():
    """The hand-written forward of the altered models reduces to the plain MLP (guards the oracle)."""
    params = random_params((3, 6, 5, 2), F64, torch.Generator().manual_seed(2))
    x = torch.randn(4, 3, dtype=F64)
    base = _hand_forward("none")
    assert_close(base(params, x), mlp_apply(params, x, "relu"), 1e-14, "forward")
