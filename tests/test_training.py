"""Training that survives a diverging task: `fastmaml.FiniteStep`, learned rates kept in range
(`fastmaml.MAML(..., inner_lr_range=...)`), and learned per-step rates for more test steps.

Compared in float64 with the independent per-task loop of `_reference_loop.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from _reference_loop import assert_close, maml_loop, random_data

F64 = torch.float64
RTOL = 1e-9


def _model(seed=0, dims=(3, 7, 2)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2])).double()


def _tasks(seed=1, T=4, dims=(3, 7, 2)):
    return random_data(dims, T, 5, 6, "mse", F64, torch.Generator().manual_seed(seed))


# ---- FiniteStep ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_non_finite_step_is_skipped(backend, how):
    """A meta-step whose loss (a task with an infinite target) or gradient is not finite changes neither
    the parameters nor the optimizer's state; it is counted, and the next finite step is taken."""
    model = _model()
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, learn_inner_lr="per_layer", backend=backend)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    guard = fastmaml.FiniteStep(opt)
    xs, ys, xq, yq = _tasks()
    out = maml(xs, ys, xq, yq)
    out.loss.backward()
    assert guard.step(out.loss) and guard.steps == 1  # a finite step first, so Adam has state
    params_before = [p.detach().clone() for p in maml.parameters()]
    state_before = copy.deepcopy(opt.state_dict())

    opt.zero_grad()
    if how == "loss":
        bad = yq.clone()
        bad[2, 0, 0] = float("inf")  # one diverging task
        out = maml(xs, ys, xq, bad)
        assert not torch.isfinite(out.loss)
    else:
        out = maml(xs, ys, xq, yq)
    out.loss.backward()
    if how == "gradient":
        next(maml.parameters()).grad[0, 0] = float("nan")
    assert not guard.step(out.loss)
    assert guard.skipped == 1 and guard.steps == 1
    assert all(p.grad is None for p in maml.parameters())
    for p, before in zip(maml.parameters(), params_before):
        assert torch.equal(p.detach(), before)
    state_after = opt.state_dict()
    for key, before in state_before["state"].items():
        for name, value in before.items():
            assert torch.equal(torch.as_tensor(state_after["state"][key][name]), torch.as_tensor(value)), name

    out = maml(xs, ys, xq, yq)
    out.loss.backward()
    assert guard.step(out.loss) and guard.steps == 2
    assert guard.state_dict() == {"steps": 2, "skipped": 1}
    # the finite steps were taken: the first moved the parameters, and so did the one after the skip
    assert any(not torch.equal(p.detach(), before) for p, before in zip(maml.parameters(), params_before))
    first_params = [p.detach().clone() for p in _model().parameters()]  # the same seed's starting point
    assert any(not torch.equal(a, b) for a, b in zip(params_before, first_params))


def test_finite_step_judges_values_not_norms():
    """Large but finite gradients (a float16 gradient whose L2 norm overflows) are finite; a sparse
    gradient is checked by its values; the loss may be a number."""
    half = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    half.grad = torch.full((1000,), 3000.0, dtype=torch.float16)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 4])).sum().backward()
    guard = fastmaml.FiniteStep(torch.optim.SGD([half, emb.weight], lr=1e-3))
    assert guard.is_finite(1.0)
    assert not guard.is_finite(float("nan"))
    emb.weight.grad = torch.sparse_coo_tensor([[1]], torch.full((1, 3), float("inf")), (10, 3))
    assert not guard.is_finite()


def test_finite_step_skips_a_gradient_whose_square_overflows():
    """A finite float32 gradient of 1e21 makes Adam's second moment inf (its `(1 - beta2) g g` overflows
    from about 5.8e20), and the parameter never moves again (shown without the guard). The guard skips a
    step whose gradient's square overflows (from 1.8e19, whatever the optimizer scales the square by,
    Adagrad 1). The square is taken in float32 at least (a float16 gradient of 3000 passes above) and in
    float64 for float64 gradients."""
    bare = nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([bare], lr=0.1)
    bare.grad = torch.tensor([1.0, 1e21, 1.0])
    adam.step()
    assert torch.isinf(adam.state[bare]["exp_avg_sq"][1])
    for _ in range(3):
        before = bare.detach().clone()
        bare.grad = torch.ones(3)
        adam.step()
        assert bare[1] == before[1] and bare[0] != before[0], "the parameter should be frozen without the guard"

    guarded = nn.Parameter(torch.ones(3))
    guard = fastmaml.FiniteStep(torch.optim.Adam([guarded], lr=0.1))
    guarded.grad = torch.tensor([1.0, 1e20, 1.0])
    assert not guard.step() and guard.skipped == 1 and torch.equal(guarded.detach(), torch.ones(3))
    guarded.grad = torch.tensor([1.0, 1e19, 1.0])  # its square, 1e38, is a float32
    assert guard.step() and guard.steps == 1
    wide = nn.Parameter(torch.ones(3, dtype=F64))
    wide.grad = torch.tensor([1.0, 1e20, 1.0], dtype=F64)
    assert fastmaml.FiniteStep(torch.optim.Adam([wide])).is_finite()


def test_finite_step_refuses_a_non_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fastmaml.FiniteStep([torch.zeros(1)])


# ---- learned rates in a range -------------------------------------------------------------------


@pytest.mark.parametrize("learn", ["scalar", "per_step", "per_layer", "per_parameter"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bounded_rates_match_the_loop(learn, backend):
    """With inner_lr_range the rates start at inner_lr, and the meta-gradient of the raw parameters is the
    loop's through the same map `low + (high - low) * sigmoid(raw)`."""
    model = _model(seed=2)
    low, high, lr, K = 0.01, 0.5, 0.2, 2
    maml = fastmaml.MAML(model, inner_lr=lr, inner_steps=K, learn_inner_lr=learn, inner_lr_range=(low, high),
                         backend=backend)
    for r in maml.inner_lr_values():
        assert torch.allclose(r, torch.full_like(r, lr), rtol=1e-12)
    with torch.no_grad():  # move the raw values off their start, differently per element
        for r in maml.inner_lrs:
            r.add_(torch.linspace(-1, 1, r.numel(), dtype=F64).reshape(r.shape))
    xs, ys, xq, yq = _tasks(seed=3)
    out = maml(xs, ys, xq, yq)
    assert out.backend == backend
    got = torch.autograd.grad(out.loss, list(maml.parameters()))

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    raws = [r.detach().clone().requires_grad_() for r in maml.inner_lrs]
    rates = [low + (high - low) * torch.sigmoid(r) for r in raws]
    if learn == "scalar":
        inner_lr = rates[0]
    elif learn == "per_step":
        inner_lr = rates[0]
    else:
        inner_lr = rates
    ref = maml_loop(params, xs, ys, xq, yq, inner_steps=K, inner_lr=inner_lr, activation="tanh")
    want = torch.autograd.grad(ref.loss, params + raws)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(list(got), list(want), RTOL, "grad")


def test_bounded_rates_stay_in_range_under_a_large_step():
    """Adam with a huge step size pushes the rates as far as it can: they stay inside the range."""
    maml = fastmaml.MAML(_model(seed=4), inner_lr=0.05, inner_steps=1, learn_inner_lr="per_parameter",
                         inner_lr_range=(0.0, 0.1))
    opt = torch.optim.Adam(maml.inner_lrs.parameters(), lr=50.0)
    xs, ys, xq, yq = _tasks(seed=5)
    for _ in range(20):
        opt.zero_grad()
        maml(xs, ys, xq, yq).loss.backward()
        opt.step()
    values = torch.cat([r.detach().reshape(-1) for r in maml.inner_lr_values()])
    assert values.min() >= 0.0 and values.max() <= 0.1
    assert values.max() - values.min() > 0.05, "the rates should have moved (a test that cannot fail)"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(inner_lr_range=(0.0, 1.0)), ValueError, "give learn_inner_lr"),
    (dict(learn_inner_lr="scalar", inner_lr_range=(0.2, 1.0)), ValueError, "low < inner_lr < high"),
    (dict(learn_inner_lr="scalar", inner_lr_range=(-0.1, 1.0)), ValueError, "0 <= low"),
    (dict(learn_inner_lr="scalar", inner_lr_range=(0.0, float("inf"))), ValueError, "finite"),
    (dict(learn_inner_lr="scalar", inner_lr_range="ab"), TypeError, "pair of numbers"),
])
def test_bad_range_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastmaml.MAML(_model(), inner_lr=0.1, **kwargs)


# ---- learned per-step rates at other step counts ------------------------------------------------


@pytest.mark.parametrize("learn", ["per_step", "per_layer"])
@pytest.mark.parametrize("steps", [1, 5])
def test_per_step_rates_for_other_step_counts(learn, steps):
    """adapt with more steps than trained reuses the last step's learned rate; with fewer, the first."""
    K = 3
    model = _model(seed=6)
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=K, learn_inner_lr=learn)
    with torch.no_grad():
        for r in maml.inner_lrs:
            r.copy_(torch.tensor([0.05, 0.1, 0.2], dtype=F64).view(K, *([1] * (r.dim() - 1))).expand_as(r))
    xs, ys, _, _ = _tasks(seed=7)
    with torch.no_grad():
        adapted = maml.adapt(xs, ys, inner_steps=steps)
    per_step = [0.05, 0.1, 0.2, 0.2, 0.2][:steps]
    ref = maml_loop([p.detach() for p in model.parameters()], xs, ys, inner_steps=steps,
                    inner_lr=torch.tensor(per_step, dtype=F64), activation="tanh").adapted
    assert_close([adapted[n] for n, _ in model.named_parameters()], [r.detach() for r in ref], RTOL, "adapted")
