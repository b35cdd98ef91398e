"""`fastmaml.MAML`, the nn.Module wrapper, against `fastmaml.maml` and the independent per-task loop.

MLPs (nn.Sequential of Linear and one activation) take the fused structure; learned inner rates in
every form are registered as parameters and receive the loop's gradients; a small conv net and a
net with BatchNorm (which vmap cannot batch) run on the reference path and match a per-task loop
written with torch.nn.functional. All comparisons in float64 on fresh random inputs.
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.nn import mlp_structure
from _reference_loop import assert_close, gradients, maml_loop, mlp_apply, objective, output_cotangents

F64 = torch.float64
RTOL = 1e-8


def _data(T, Ns, Nq, d_in, d_out, loss, seed, x_shape=None):
    """Fresh random task data: `x [T, N, *x_shape]` (default `[d_in]`), targets for `loss`."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x_shape) if x_shape else (d_in,)
    xs = torch.randn(T, Ns, *shape, dtype=F64, generator=g)
    xq = torch.randn(T, Nq, *shape, dtype=F64, generator=g)
    if loss == "mse":
        ys = torch.randn(T, Ns, d_out, dtype=F64, generator=g)
        yq = torch.randn(T, Nq, d_out, dtype=F64, generator=g)
    else:
        ys = torch.randint(0, d_out, (T, Ns), generator=g)
        yq = torch.randint(0, d_out, (T, Nq), generator=g)
    return xs, ys, xq, yq


def _mlp(dims, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).double()


def _leaves(module):
    """The module's parameters as fresh float64 leaves (for the independent loop)."""
    return [p.detach().clone().requires_grad_() for p in module.parameters()]


# ---- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,expected",
    [
        (nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 2)), "relu"),
        (nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)), "tanh"),
        (nn.Sequential(nn.Linear(3, 2)), "relu"),  # one layer: no activation to pick, any works
        (nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)), None),
        (nn.Sequential(nn.Linear(3, 7, bias=False), nn.ReLU(), nn.Linear(7, 2)), None),
        # In place on the linear layer's fresh output: the same function (the kernels never run the module).
        (nn.Sequential(nn.Linear(3, 7), nn.ReLU(inplace=True), nn.Linear(7, 2)), "relu"),
        (nn.Sequential(nn.Linear(3, 7), nn.GELU(), nn.Linear(7, 2)), None),
        (nn.Sequential(nn.Linear(3, 7), nn.ReLU()), None),
        (nn.Sequential(nn.Linear(3, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2)), None),
        (nn.Linear(3, 2), None),
    ],
    ids=["relu", "tanh", "single_linear", "mixed_activations", "no_bias", "inplace", "gelu", "ends_in_activation",
         "batchnorm", "bare_linear"],
)
def test_mlp_structure(model, expected):
    """Only nn.Sequential(Linear, act, ..., Linear) with biases and one activation runs fused."""
    assert mlp_structure(model) == expected
    assert fastmaml.MAML(model).is_mlp == (expected is not None)


# ---- MLP module vs fastmaml.maml ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_module_matches_functional(backend, loss, first_order):
    """MAML(Sequential MLP) gives `fastmaml.maml`'s output and gradients with the same params
    (`auto` may pick a fused backend: the same values to float64 precision)."""
    model = _mlp([3, 7, 5, 4], nn.ReLU, seed=1)
    wrapped = fastmaml.MAML(model, inner_lr=0.15, inner_steps=3, first_order=first_order, loss=loss, backend=backend)
    assert wrapped.is_mlp and wrapped.activation == "relu"
    xs, ys, xq, yq = _data(5, 6, 7, 3, 4, loss, seed=2)
    out = wrapped(xs, ys, xq, yq)
    if backend == "reference":
        assert out.backend == "reference"
    params = _leaves(model)
    ref = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=3, inner_lr=0.15, first_order=first_order,
                        activation="relu", loss=loss, backend="reference")
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(out.query_preds, ref.query_preds, RTOL, "query_preds")
    cot = output_cotangents(ref.task_losses, ref.query_preds)
    got = torch.autograd.grad(objective(out.loss, out.task_losses, out.query_preds, cot), list(model.parameters()))
    want = torch.autograd.grad(objective(ref.loss, ref.task_losses, ref.query_preds, cot), params)
    assert_close(list(got), list(want), RTOL, "grad")


def test_module_query_loss_weights():
    """`forward(..., query_loss_weights=w)` is the multi-step loss of the loop."""
    model = _mlp([3, 6, 2], nn.Tanh, seed=3)
    wrapped = fastmaml.MAML(model, inner_lr=0.2, inner_steps=2, backend="reference")
    xs, ys, xq, yq = _data(3, 5, 4, 3, 2, "mse", seed=4)
    w = torch.tensor([0.3, 0.5, 1.1], dtype=F64)
    out = wrapped(xs, ys, xq, yq, query_loss_weights=w)
    params = _leaves(model)
    ref = maml_loop(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.2, activation="tanh", query_loss_weights=w)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(list(torch.autograd.grad(out.loss, list(model.parameters()))),
                 list(torch.autograd.grad(ref.loss, params)), RTOL, "grad")


# ---- learned inner rates -------------------------------------------------------------------------


def _expected_rate_shapes(mode, params, K):
    if mode == "scalar":
        return [()]
    if mode == "per_step":
        return [(K,)]
    if mode == "per_layer":
        return [(K,) + (1,) * p.dim() for p in params]
    return [tuple(p.shape) for p in params]


@pytest.mark.parametrize("mode", ["scalar", "per_step", "per_layer", "per_parameter"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_learned_rates(mode, loss):
    """Each `learn_inner_lr` mode registers float64 rate parameters of the documented shapes, and the
    meta-gradient of the rates and of the model equals the independent loop's."""
    K = 3
    model = _mlp([4, 6, 5, 3], nn.Tanh, seed=5)
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=K, learn_inner_lr=mode, loss=loss, backend="reference")
    names = [n for n, _ in wrapped.named_parameters() if n.startswith("inner_lrs.")]
    rates = list(wrapped.inner_lrs)
    assert len(names) == len(rates) and names == [f"inner_lrs.{i}" for i in range(len(rates))]
    assert [tuple(r.shape) for r in rates] == _expected_rate_shapes(mode, list(model.parameters()), K)
    assert all(r.dtype == F64 and r.requires_grad for r in rates)
    # Distinct random rates, so a rate used for the wrong step or parameter shows.
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for r in rates:
            r.copy_(0.05 + 0.2 * torch.rand(r.shape, dtype=F64, generator=g))
    xs, ys, xq, yq = _data(4, 5, 6, 4, 3, loss, seed=7)
    out = wrapped(xs, ys, xq, yq)
    out.loss.backward()

    params = _leaves(model)
    loop_rates = [r.detach().clone().requires_grad_() for r in rates]
    lr = loop_rates[0] if mode in ("scalar", "per_step") else loop_rates
    ref = maml_loop(params, xs, ys, xq, yq, inner_steps=K, inner_lr=lr, activation="tanh", loss=loss)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    want = torch.autograd.grad(ref.loss, params + loop_rates)
    assert all(r.grad is not None for r in rates), "a learned rate received no gradient"
    assert_close([p.grad for p in model.parameters()], list(want[:len(params)]), RTOL, "model grad")
    assert_close([r.grad for r in rates], list(want[len(params):]), RTOL, "rate grad")


def test_state_dict_carries_the_rates_form(tmp_path):
    """The learned rates' form (learn_inner_lr, inner_lr_range) goes with state_dict(): loaded into a MAML
    with the same form the rates and losses are the saved module's; into one with another range (or none,
    where a stored raw value would be a rate of -0.35) the load is refused, naming both; a state_dict
    without the form (saved before it was stored) loads as before."""
    def make(**kw):
        return fastmaml.MAML(_mlp([3, 5, 2], nn.Tanh, seed=2), inner_lr=0.04, inner_steps=2,
                             learn_inner_lr="per_layer", backend="reference", **kw)

    source = make(inner_lr_range=(0.0, 0.1))
    with torch.no_grad():
        for r in source.inner_lrs:
            r.add_(torch.randn(r.shape, dtype=r.dtype))
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    saved = torch.load(tmp_path / "sd.pt", weights_only=True)
    xs, ys, xq, yq = _data(3, 4, 5, 3, 2, "mse", seed=3)
    same = make(inner_lr_range=(0.0, 0.1))
    same.load_state_dict(saved)
    assert torch.equal(same(xs, ys, xq, yq).task_losses, source(xs, ys, xq, yq).task_losses)
    for other in (None, (0.0, 0.5)):
        with pytest.raises(ValueError, match=r"inner_lr_range=\(0.0, 0.1\); this fastmaml.MAML has .*"
                                             + re.escape(f"inner_lr_range={other!r}")):
            make(inner_lr_range=other).load_state_dict(saved)
    with pytest.raises(ValueError, match="learn_inner_lr='per_layer', .* has learn_inner_lr='per_step'"):
        fastmaml.MAML(_mlp([3, 5, 2], nn.Tanh, seed=2), inner_lr=0.04, inner_steps=2, learn_inner_lr="per_step",
                      inner_lr_range=(0.0, 0.1)).load_state_dict(saved, strict=False)
    older = {k: v for k, v in saved.items() if k != "_extra_state"}
    assert not make(inner_lr_range=(0.0, 0.1)).load_state_dict(older).missing_keys


def test_explain_describes_what_the_module_runs():
    """A module's explain names the backend it was made with and whether it runs the call (it reported
    auto's choice, cpu, for a module that runs reference); it describes adapt with the inner_steps given;
    options the module decides for itself are refused, not dropped."""
    wrapped = fastmaml.MAML(_mlp([3, 5, 2], nn.Tanh, seed=2), inner_lr=0.04, backend="reference")
    xs, ys, xq, yq = _data(2, 4, 5, 3, 2, "mse", seed=3)
    report = wrapped.explain(xs, ys, xq, yq)
    assert "backend='reference' was asked for: it runs this call" in report
    assert wrapped(xs, ys, xq, yq).backend == "reference"
    assert "fastmaml.adapt on cpu, T=2, K=7" in fastmaml.explain(wrapped, xs, ys, inner_steps=7)
    with pytest.raises(TypeError, match="first_order: the module's own settings decide them"):
        fastmaml.explain(wrapped, xs, ys, xq, yq, first_order=True)
    with pytest.raises(ValueError, match="forward, which takes the module's inner_steps"):
        wrapped.explain(xs, ys, xq, yq, inner_steps=3)
    params = [p.detach() for p in wrapped.model.parameters()]
    assert "backend='cpu' was asked for: it runs this call" in fastmaml.explain(params, xs, ys, xq, yq,
                                                                                 activation="tanh", backend="cpu")
    wrapped.backend = "cuda"
    if not torch.cuda.is_available():
        assert "backend='cuda' was asked for: the call raises (" in wrapped.explain(xs, ys, xq, yq)


# ---- modules that are not MLPs: the reference path ----------------------------------------------


def _conv_forward(params, x):
    """Conv2d(2, 3, 3) -> ReLU -> flatten -> Linear(27, 4), written with torch.nn.functional; `x [N, 2, 5, 5]`."""
    cw, cb, lw, lb = params
    h = F.conv2d(x, cw, cb).clamp_min(0).flatten(1)
    return h @ lw.t() + lb


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_conv_net(first_order):
    """A conv net runs on the reference path (vmap over tasks) and matches a per-task loop:
    loss, predictions, parameter and input gradients, float64, cross-entropy, `x [T, N, C, H, W]`."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()
    wrapped = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, first_order=first_order, loss="cross_entropy")
    assert not wrapped.is_mlp
    xs, ys, xq, yq = _data(3, 5, 6, None, 4, "cross_entropy", seed=9, x_shape=(2, 5, 5))
    xs.requires_grad_()
    xq.requires_grad_()
    out = wrapped(xs, ys, xq, yq)
    assert out.backend == "reference" and out.query_preds.shape == (3, 6, 4)
    params = _leaves(model)
    ref = maml_loop(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.3, first_order=first_order,
                    loss="cross_entropy", forward=_conv_forward)
    assert_close(out.loss, ref.loss, RTOL, "loss")
    assert_close(out.query_preds, ref.query_preds, RTOL, "query_preds")
    cot = output_cotangents(ref.task_losses, ref.query_preds)
    named = {**{f"p{i}": p for i, p in enumerate(model.parameters())}, "x_support": xs, "x_query": xq}
    got = gradients(objective(out.loss, out.task_losses, out.query_preds, cot), named)
    want = gradients(objective(ref.loss, ref.task_losses, ref.query_preds, cot),
                     {**{f"p{i}": p for i, p in enumerate(params)}, "x_support": xs, "x_query": xq})
    assert_close(got, want, RTOL, "grad")


def _bn_forward(params, x):
    """Linear(3, 6) -> BatchNorm1d(6) (batch statistics, biased variance, eps 1e-5) -> ReLU -> Linear(6, 2)."""
    w1, b1, gamma, beta, w2, b2 = params
    h = x @ w1.t() + b1
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    return h.clamp_min(0) @ w2.t() + b2


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_batchnorm_task_loop(monkeypatch, first_order):
    """BatchNorm in training mode updates its running statistics in place, which vmap cannot batch (and
    vmap's second derivatives through batch statistics are wrong, so second-order calls do not try it):
    the reference path loops over tasks, says so once with a TaskLoopWarning, and still matches (batch
    statistics per task)."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    wrapped = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order, backend="reference")
    xs, ys, xq, yq = _data(3, 7, 5, 3, 2, "mse", seed=11)
    said = "vmap cannot batch this model" if first_order else "second derivatives through this model differ"
    with pytest.warns(fastmaml.TaskLoopWarning, match=said) as record:
        out = wrapped(xs, ys, xq, yq)
    assert len(record) == 1 and record[0].filename == __file__, "one warning, pointing at the caller's line"
    params = _leaves(model)
    ref = maml_loop(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.1, forward=_bn_forward,
                    first_order=first_order)
    assert_close(out.task_losses, ref.task_losses, RTOL, "task_losses")
    assert_close(out.query_preds, ref.query_preds, RTOL, "query_preds")
    assert_close(list(torch.autograd.grad(out.loss, list(model.parameters()))),
                 list(torch.autograd.grad(ref.loss, params)), RTOL, "grad")
    # The running statistics the first call updated do not enter training-mode outputs; the module
    # remembers that vmap failed and loops at once (vmap is not tried again in this mode).
    from fastmaml.backends import reference as reference_backend

    tried = []
    real_vmap = torch.func.vmap
    monkeypatch.setattr(reference_backend.torch.func, "vmap", lambda *a, **k: tried.append(1) or real_vmap(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.TaskLoopWarning)  # once per module and mode
        again = wrapped(xs, ys, xq, yq)
    assert_close(again.task_losses, ref.task_losses, RTOL, "task_losses (second call)")
    assert not tried, "vmap was tried again on a module it failed on"
    model.eval()  # running statistics: vmap can batch it again, and is tried in this mode
    wrapped(xs, ys, xq, yq)
    assert tried


# ---- adapt / functional ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_module_adapt_and_functional(kind):
    """`adapt` returns `{name: [T, *shape]}` equal to the loop's theta_K; `functional` evaluates them
    and reproduces `forward`'s query predictions; more steps than training work with a fixed rate."""
    if kind == "mlp":
        model, forward, loss = _mlp([3, 7, 2], nn.ReLU, seed=12), None, "mse"
        xs, ys, xq, yq = _data(4, 5, 3, 3, 2, loss, seed=13)
    else:
        torch.manual_seed(12)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()
        forward, loss = _conv_forward, "cross_entropy"
        xs, ys, xq, yq = _data(3, 5, 4, None, 4, loss, seed=13, x_shape=(2, 5, 5))
    wrapped = fastmaml.MAML(model, inner_lr=0.2, inner_steps=2, loss=loss, backend="reference")
    names = [n for n, _ in model.named_parameters()]
    params = _leaves(model)
    for steps in (None, 5):
        adapted = wrapped.adapt(xs, ys, inner_steps=steps)
        assert list(adapted) == names
        ref = maml_loop(params, xs, ys, inner_steps=steps or 2, inner_lr=0.2, loss=loss, forward=forward)
        for (name, a), r, p in zip(adapted.items(), ref.adapted, params):
            assert a.shape == (xs.shape[0], *p.shape), name
            assert_close(a, r, RTOL, f"adapted[{name}]")
    adapted = wrapped.adapt(xs, ys)
    preds = wrapped.functional(adapted, xq)
    out = wrapped(xs, ys, xq, yq)
    assert_close(preds, out.query_preds, RTOL, "functional(adapt(...))")
    if kind == "mlp":
        expected = torch.stack([mlp_apply([adapted[n][t] for n in names], xq[t], "relu") for t in range(xq.shape[0])])
        assert_close(preds, expected, RTOL, "functional vs own MLP")
