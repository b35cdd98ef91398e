"""Bad input to the public API: one test per refusal.

Each case changes one argument of a valid call and expects `ValueError` or `TypeError` whose
message names that argument; afterwards the valid call must still work (a refusal leaves no state
behind). Cases are data (a name, the changed arguments, the exception type, the words expected in
the message), so each refusal is one parametrised test.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import fastmaml
from _reference_loop import random_params

T, NS, NQ, DIMS, K = 3, 5, 6, [3, 7, 2], 2
F64 = torch.float64


def valid_call(loss: str = "mse") -> dict:
    """Arguments of a valid `fastmaml.maml` call (fresh random tensors)."""
    g = torch.Generator().manual_seed(0)
    params = random_params(DIMS, F64, g)
    if loss == "mse":
        ys, yq = torch.randn(T, NS, DIMS[-1], dtype=F64, generator=g), torch.randn(T, NQ, DIMS[-1], dtype=F64, generator=g)
    else:
        ys, yq = torch.randint(0, DIMS[-1], (T, NS), generator=g), torch.randint(0, DIMS[-1], (T, NQ), generator=g)
    return dict(
        params=params,
        x_support=torch.randn(T, NS, DIMS[0], dtype=F64, generator=g),
        y_support=ys,
        x_query=torch.randn(T, NQ, DIMS[0], dtype=F64, generator=g),
        y_query=yq,
        inner_steps=K,
        inner_lr=0.1,
        loss=loss,
        backend="reference",
    )


def call_maml(kwargs: dict):
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("params", "x_support", "y_support", "x_query", "y_query")]
    return fastmaml.maml(*args, **kwargs)


def assert_valid_call_works(loss: str = "mse") -> None:
    out = call_maml(valid_call(loss))
    assert out.task_losses.shape == (T,) and torch.isfinite(out.loss)


def with_params(change):
    """A mutation of the params list (the list is copied first)."""

    def mutate(kw):
        params = list(kw["params"])
        change(params)
        return {"params": params}

    return mutate


def _set(i, value_fn):
    def change(params):
        params[i] = value_fn(params[i])

    return change


def _bad_rate_element(kw):
    rates = [torch.full((K, *p.shape), 0.1, dtype=F64) for p in kw["params"]]
    rates[1] = torch.full((K, 5), 0.1, dtype=F64)  # b1 is [7]: [K, 5] does not broadcast to [K, 7]
    return {"inner_lr": rates}


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# (id, mutation: kwargs -> changed kwargs, loss of the valid call, exception type, pattern in the message)
CASES = [
    # ranks
    ("x_support_rank2", lambda kw: {"x_support": kw["x_support"][0]}, "mse", ValueError, r"x_support.*\[T, N, D_in\]"),
    ("x_query_rank4", lambda kw: {"x_query": kw["x_query"].unsqueeze(0)}, "mse", ValueError, r"x_query.*\[T, N, D_in\]"),
    ("y_support_rank2_mse", lambda kw: {"y_support": kw["y_support"][..., 0]}, "mse", ValueError, r"y_support.*\[T, N, D_out\]"),
    ("y_query_rank3_ce", lambda kw: {"y_query": kw["y_query"].unsqueeze(-1)}, "cross_entropy", ValueError, r"y_query.*\[T, N\]"),
    ("x_not_a_tensor", lambda kw: {"x_support": kw["x_support"].tolist()}, "mse", TypeError, r"x_support.*torch\.Tensor"),
    ("no_tasks", lambda kw: {"x_support": kw["x_support"][:0], "y_support": kw["y_support"][:0]}, "mse", ValueError, r"x_support"),
    ("no_points", lambda kw: {"x_query": kw["x_query"][:, :0], "y_query": kw["y_query"][:, :0]}, "mse", ValueError,
     r"x_query.*one point"),
    # sizes that do not agree
    ("tasks_mismatch", lambda kw: {"x_query": kw["x_query"][:-1], "y_query": kw["y_query"][:-1]}, "mse", ValueError, r"x_query.*tasks"),
    ("points_mismatch_support", lambda kw: {"y_support": kw["y_support"][:, :-1]}, "mse", ValueError, r"y_support.*\[3, 5, 2\]"),
    ("points_mismatch_query_ce", lambda kw: {"y_query": kw["y_query"][:, :-1]}, "cross_entropy", ValueError, r"y_query.*\[3, 6\]"),
    ("d_in_mismatch", lambda kw: {"x_support": torch.randn(T, NS, 4, dtype=F64)}, "mse", ValueError, r"x_support.*D_in = 3"),
    ("d_in_mismatch_query", lambda kw: {"x_query": torch.randn(T, NQ, 2, dtype=F64)}, "mse", ValueError, r"x_query.*D_in = 3"),
    ("d_out_mismatch", lambda kw: {"y_query": torch.randn(T, NQ, 3, dtype=F64)}, "mse", ValueError, r"y_query.*D_out\] = \[3, 6, 2\]"),
    # params
    ("params_odd_count", with_params(lambda p: p.pop()), "mse", ValueError, r"params.*even"),
    ("params_empty", lambda kw: {"params": []}, "mse", ValueError, r"params.*even, non-zero"),
    ("params_single_tensor", lambda kw: {"params": kw["params"][0]}, "mse", TypeError, r"params must be a sequence"),
    ("params_do_not_chain", with_params(_set(2, lambda w: torch.randn(2, 6, dtype=F64))), "mse", ValueError, r"params\[2\].*chain"),
    ("params_bias_size", with_params(_set(1, lambda b: torch.randn(6, dtype=F64))), "mse", ValueError, r"params\[1\].*\[7\]"),
    ("params_weight_rank", with_params(_set(0, lambda w: w.reshape(-1))), "mse", ValueError, r"params\[0\].*\[out, in\]"),
    ("params_not_float", with_params(_set(0, lambda w: w.long())), "mse", TypeError, r"params\[0\].*floating"),
    ("params_mixed_dtype", with_params(_set(3, lambda b: b.float())), "mse", TypeError, r"params\[3\].*dtype"),
    ("params_mixed_device", with_params(_set(2, _meta)), "mse", ValueError, r"params\[2\].*meta"),
    ("params_not_tensor", with_params(_set(1, lambda b: b.tolist())), "mse", TypeError, r"params\[1\].*torch\.Tensor"),
    # inner_steps
    ("inner_steps_negative", lambda kw: {"inner_steps": -1}, "mse", ValueError, r"inner_steps.*>= 0"),
    ("inner_steps_float", lambda kw: {"inner_steps": 2.0}, "mse", TypeError, r"inner_steps.*int"),
    ("inner_steps_bool", lambda kw: {"inner_steps": True}, "mse", TypeError, r"inner_steps.*int"),
    # inner_lr
    ("inner_lr_nan", lambda kw: {"inner_lr": math.nan}, "mse", ValueError, r"inner_lr.*finite"),
    ("inner_lr_inf", lambda kw: {"inner_lr": math.inf}, "mse", ValueError, r"inner_lr.*finite"),
    ("inner_lr_tensor_nan", lambda kw: {"inner_lr": torch.tensor([0.1, math.nan], dtype=F64)}, "mse", ValueError, r"inner_lr.*finite"),
    ("inner_lr_list_inf", lambda kw: {"inner_lr": [torch.full(p.shape, math.inf if i == 2 else 0.1, dtype=F64)
                                                   for i, p in enumerate(kw["params"])]}, "mse", ValueError, r"inner_lr\[2\].*finite"),
    ("inner_lr_list_of_floats", lambda kw: {"inner_lr": [0.1] * 4}, "mse", TypeError, r"inner_lr\[0\].*torch\.Tensor"),
    ("inner_lr_bool", lambda kw: {"inner_lr": True}, "mse", TypeError, r"inner_lr"),
    ("inner_lr_string", lambda kw: {"inner_lr": "0.1"}, "mse", TypeError, r"inner_lr"),
    ("inner_lr_tensor_length", lambda kw: {"inner_lr": torch.full((K + 1,), 0.1, dtype=F64)}, "mse", ValueError, r"inner_lr.*\[K\] = \[2\]"),
    ("inner_lr_tensor_rank2", lambda kw: {"inner_lr": torch.full((K, 1), 0.1, dtype=F64)}, "mse", ValueError, r"inner_lr.*\[K\]"),
    ("inner_lr_list_length", lambda kw: {"inner_lr": [torch.tensor(0.1, dtype=F64)] * 3}, "mse", ValueError, r"inner_lr.*one tensor per param \(4\)"),
    ("inner_lr_list_element_shape", _bad_rate_element, "mse", ValueError, r"inner_lr\[1\].*\[2, 7\]"),
    ("inner_lr_list_element_steps", lambda kw: {"inner_lr": [torch.full((K + 1, *p.shape), 0.1, dtype=F64) for p in kw["params"]]},
     "mse", ValueError, r"inner_lr\[0\].*\[2, 7, 3\]"),
    ("inner_lr_dtype", lambda kw: {"inner_lr": torch.tensor(0.1, dtype=torch.float32)}, "mse", TypeError, r"inner_lr.*dtype"),
    ("inner_lr_device", lambda kw: {"inner_lr": torch.empty(K, dtype=F64, device="meta")}, "mse", ValueError, r"inner_lr.*meta"),
    # choices
    ("activation_unknown", lambda kw: {"activation": "gelu"}, "mse", ValueError, r"activation.*'gelu'"),
    ("loss_unknown", lambda kw: {"loss": "l1"}, "mse", ValueError, r"loss.*'l1'"),
    ("backend_unknown", lambda kw: {"backend": "tpu"}, "mse", ValueError, r"backend.*'tpu'"),
    ("backend_not_a_string", lambda kw: {"backend": None}, "mse", TypeError, r"backend"),
    ("first_order_not_bool", lambda kw: {"first_order": "yes"}, "mse", TypeError, r"first_order"),
    # labels
    ("ce_float_labels", lambda kw: {"y_support": kw["y_support"].double()}, "cross_entropy", TypeError, r"y_support.*int64"),
    ("ce_int32_labels", lambda kw: {"y_query": kw["y_query"].int()}, "cross_entropy", TypeError, r"y_query.*int64"),
    ("ce_label_too_large", lambda kw: {"y_query": torch.full((T, NQ), DIMS[-1])}, "cross_entropy", ValueError, r"y_query.*\[0, 1\]"),
    ("ce_label_negative", lambda kw: {"y_support": torch.full((T, NS), -1)}, "cross_entropy", ValueError, r"y_support.*\[0, 1\]"),
    ("mse_int_targets", lambda kw: {"y_support": kw["y_support"].long()}, "mse", TypeError, r"y_support.*floating"),
    # dtypes and devices
    ("x_float32_params_float64", lambda kw: {"x_support": kw["x_support"].float()}, "mse", TypeError, r"x_support.*float32.*float64"),
    ("y_dtype_mismatch", lambda kw: {"y_query": kw["y_query"].float()}, "mse", TypeError, r"y_query.*dtype"),
    ("x_int", lambda kw: {"x_query": kw["x_query"].long()}, "mse", TypeError, r"x_query.*floating"),
    ("x_on_other_device", lambda kw: {"x_query": _meta(kw["x_query"])}, "mse", ValueError, r"x_query.*meta"),
    ("y_on_other_device", lambda kw: {"y_support": _meta(kw["y_support"])}, "mse", ValueError, r"y_support.*meta"),
    ("labels_on_other_device", lambda kw: {"y_query": _meta(kw["y_query"])}, "cross_entropy", ValueError, r"y_query.*meta"),
    # multi-step loss weights
    ("query_loss_weights_length", lambda kw: {"query_loss_weights": torch.ones(K, dtype=F64)}, "mse", ValueError,
     r"query_loss_weights.*\[inner_steps \+ 1\] = \[3\]"),
    ("query_loss_weights_nan", lambda kw: {"query_loss_weights": torch.tensor([1.0, math.nan, 1.0], dtype=F64)}, "mse",
     ValueError, r"query_loss_weights.*finite"),
    ("query_loss_weights_dtype", lambda kw: {"query_loss_weights": torch.ones(K + 1)}, "mse", TypeError, r"query_loss_weights.*dtype"),
    ("query_loss_weights_list", lambda kw: {"query_loss_weights": [1.0] * (K + 1)}, "mse", TypeError, r"query_loss_weights.*Tensor"),
]


@pytest.mark.parametrize("name,mutate,loss,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_maml_refuses(name, mutate, loss, exc, pattern):
    kwargs = valid_call(loss)
    kwargs.update(mutate(kwargs))
    with pytest.raises(exc) as info:
        call_maml(kwargs)
    assert info.type is exc, f"{name}: raised {info.type.__name__}, expected {exc.__name__}: {info.value}"
    assert re.search(pattern, str(info.value)), f"{name}: message {str(info.value)!r} does not match {pattern!r}"
    assert_valid_call_works(loss)


def test_explicit_backend_that_cannot_run():
    """`backend="cuda"` on CPU tensors: an error that says why (or, where no cuda backend is
    registered, that the name is unknown). Never a silent fall back to another backend."""
    kwargs = valid_call()
    kwargs["backend"] = "cuda"
    with pytest.raises(ValueError) as info:
        call_maml(kwargs)
    message = str(info.value)
    if "cuda" in fastmaml.list_backends():
        assert re.search(r"backend='cuda' cannot run this call: \S+", message), message
    else:
        assert "backend must be" in message and "'cuda'" in message, message
    assert_valid_call_works()


def test_unavailable_backends_say_why():
    """`explain` lists every registered backend; each one it rejects for this float64 CPU call refuses
    an explicit request with the same reason (the ones that can run it are tested in test_backends)."""
    kwargs = valid_call()
    data = [kwargs.pop(k) for k in ("params", "x_support", "y_support", "x_query", "y_query")]
    kwargs.pop("backend")
    report = fastmaml.explain(*data, **kwargs)
    for name in fastmaml.list_backends():
        found = re.search(rf"^\s+{name}\s+(chosen|can run.*|rejected: (.+))$", report, re.M)
        assert found, f"{name} missing from the report:\n{report}"
        reason = found.group(2)
        # Not chosen for this device, or passed over by a speed rule (`dispatch._auto_skip`): it can run it.
        if reason is None or reason.startswith("not chosen automatically") or "ask for it explicitly" in reason:
            continue
        with pytest.raises(ValueError) as info:
            call_maml({**valid_call(), "backend": name})
        assert f"backend={name!r} cannot run this call: {reason}" in str(info.value), str(info.value)
    assert_valid_call_works()


# ---- the other entry points --------------------------------------------------------------------


def test_adapt_refuses_bad_support():
    kwargs = valid_call()
    with pytest.raises(ValueError, match=r"y_support"):
        fastmaml.adapt(kwargs["params"], kwargs["x_support"], kwargs["y_support"][:, :-1], inner_steps=K,
                       backend="reference")
    adapted = fastmaml.adapt(kwargs["params"], kwargs["x_support"], kwargs["y_support"], inner_steps=K,
                             backend="reference")
    assert adapted[0].shape == (T, *kwargs["params"][0].shape)


def test_adapt_refuses_negative_steps():
    kwargs = valid_call()
    with pytest.raises(ValueError, match=r"inner_steps"):
        fastmaml.adapt(kwargs["params"], kwargs["x_support"], kwargs["y_support"], inner_steps=-2)
    assert_valid_call_works()


def test_reptile_refuses_unknown_loss():
    kwargs = valid_call()
    with pytest.raises(ValueError, match=r"loss"):
        fastmaml.reptile(kwargs["params"], kwargs["x_support"], kwargs["y_support"], loss="hinge")
    assert_valid_call_works()


def test_explain_refuses_bad_input():
    kwargs = valid_call()
    with pytest.raises(ValueError, match=r"x_query"):
        fastmaml.explain(kwargs["params"], kwargs["x_support"], kwargs["y_support"], kwargs["x_query"][:, :, :2],
                         kwargs["y_query"])
    assert_valid_call_works()


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda bp, x: (bp[:1], x), ValueError, r"params.*even"),
        (lambda bp, x: ([bp[0][:2]] + bp[1:], x), ValueError, r"batched_params\[1\].*T = 2"),
        (lambda bp, x: (bp, x[..., :2]), ValueError, r"x must be \[T, N, D_in\]"),
        (lambda bp, x: (bp, x.float()), TypeError, r"x has dtype"),
        (lambda bp, x: (bp, x), None, None),
    ],
    ids=["odd_params", "tasks_mismatch", "d_in_mismatch", "dtype", "valid"],
)
def test_mlp_refuses(change, exc, pattern):
    """`fastmaml.mlp`: batched params `[T, *shape]` and `x [T, N, D_in]` must agree."""
    kwargs = valid_call()
    batched = [p.unsqueeze(0).expand(T, *p.shape) for p in kwargs["params"]]
    batched, x = change(batched, kwargs["x_query"])
    if exc is None:
        assert fastmaml.mlp(batched, x).shape == (T, NQ, DIMS[-1])
        return
    with pytest.raises(exc, match=pattern):
        fastmaml.mlp(batched, x)


def test_mlp_refuses_unknown_activation():
    kwargs = valid_call()
    batched = [p.unsqueeze(0).expand(T, *p.shape) for p in kwargs["params"]]
    with pytest.raises(ValueError, match=r"activation"):
        fastmaml.mlp(batched, kwargs["x_query"], activation="sigmoid")
    assert fastmaml.mlp(batched, kwargs["x_query"], activation="tanh").shape == (T, NQ, DIMS[-1])


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(learn_inner_lr="per_block"), ValueError, r"learn_inner_lr"),
        (dict(inner_steps=-1), ValueError, r"inner_steps"),
        (dict(loss="nll"), ValueError, r"loss"),
    ],
    ids=["learn_inner_lr", "inner_steps", "loss"],
)
def test_module_refuses(kwargs, exc, pattern):
    model = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 2)).double()
    with pytest.raises(exc, match=pattern):
        fastmaml.MAML(model, **kwargs)
    assert fastmaml.MAML(model, inner_steps=1).inner_steps == 1


def test_module_refuses_non_module():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        fastmaml.MAML(lambda x: x)


def test_module_adapt_with_per_step_rates_learned_for_no_steps():
    """Learned per-step rates reuse the last step's rate for more steps (tests/test_training.py); with
    rates learned for K = 0 steps there is none, and adapt says so."""
    model = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    wrapped = fastmaml.MAML(model, inner_steps=0, learn_inner_lr="per_step", backend="reference")
    kwargs = valid_call()
    with pytest.raises(ValueError, match=r"learned for 0 steps"):
        wrapped.adapt(kwargs["x_support"], kwargs["y_support"], inner_steps=2)
    adapted = wrapped.adapt(kwargs["x_support"], kwargs["y_support"])
    assert adapted["0.weight"].shape == (T, 7, 3)


def test_module_refuses_query_shape_of_generic_model():
    """A generic module's query inputs must have the support inputs' per-point shape."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)).double()
    wrapped = fastmaml.MAML(model, inner_steps=1, backend="reference")
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(T, NS, 2, 5, 5, dtype=F64, generator=g)
    ys = torch.randn(T, NS, 2, dtype=F64, generator=g)
    xq = torch.randn(T, NQ, 2, 5, 5, dtype=F64, generator=g)
    yq = torch.randn(T, NQ, 2, dtype=F64, generator=g)
    with pytest.raises(ValueError, match=r"x_query must be \[T, Nq, 2, 5, 5\]"):
        wrapped(xs, ys, xq[..., :4], yq)
    assert wrapped(xs, ys, xq, yq).task_losses.shape == (T,)


def _gelu_net(d_out):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, d_out)).double()


@pytest.mark.parametrize("where,bad", [("y_support", 4), ("y_query", 4), ("y_query", -1)])
@pytest.mark.parametrize("call", ["forward", "adapt"])
def test_generic_model_names_a_class_out_of_range(where, bad, call):
    """A generic module's width is known only once it runs: a class out of range used to surface as the
    gather's "index 4 is out of bounds" from inside fastmaml; it is now said as for an MLP, naming the
    argument (an MLP's check runs before the call)."""
    wrapped = fastmaml.MAML(_gelu_net(4), inner_lr=0.1, loss="cross_entropy", backend="reference")
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(T, NS, 3, dtype=F64, generator=g), torch.randn(T, NQ, 3, dtype=F64, generator=g)
    ys, yq = torch.randint(0, 4, (T, NS), generator=g), torch.randint(0, 4, (T, NQ), generator=g)
    (ys if where == "y_support" else yq)[1, 2] = bad
    if call == "adapt" and where == "y_query":
        wrapped.adapt(xs, ys)  # the query is not read
        return
    with pytest.raises(ValueError, match=rf"{where} holds class {bad} but must be in \[0, 3\] \(D_out = 4 logits\)$"):
        wrapped(xs, ys, xq, yq) if call == "forward" else wrapped.adapt(xs, ys)


class _IndexesPastItsWidth(nn.Module):
    """A model whose own forward indexes out of range: its error is its own, whatever the targets."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 4)

    def forward(self, x):
        h = self.layer(x)
        return h.gather(-1, torch.tensor([0, 1, 2, 9]).expand(*h.shape[:-1], 4))  # the gather's error


def test_a_models_own_indexing_error_is_not_called_a_class():
    wrapped = fastmaml.MAML(_IndexesPastItsWidth().double(), inner_lr=0.1, loss="cross_entropy",
                            backend="reference")
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(T, NS, 3, dtype=F64, generator=g), torch.randn(T, NQ, 3, dtype=F64, generator=g)
    ys, yq = torch.randint(0, 4, (T, NS), generator=g), torch.randint(0, 4, (T, NQ), generator=g)
    with pytest.raises(RuntimeError, match="index 9 is out of bounds for dimension 1 with size 4"):
        wrapped(xs, ys, xq, yq)


def test_generic_model_refuses_mse_targets_of_another_shape():
    """torch's mse_loss broadcasts an `[N, 1]` output against `[N]` targets into `[N, N]` (with only a
    UserWarning): a generic module's targets of another shape than its output are refused, as an MLP's are."""
    wrapped = fastmaml.MAML(_gelu_net(1), inner_lr=0.1, backend="reference")
    g = torch.Generator().manual_seed(4)
    xs, xq = torch.randn(T, NS, 3, dtype=F64, generator=g), torch.randn(T, NQ, 3, dtype=F64, generator=g)
    ys, yq = torch.randn(T, NS, 1, dtype=F64, generator=g), torch.randn(T, NQ, 1, dtype=F64, generator=g)
    assert wrapped(xs, ys, xq, yq).task_losses.shape == (T,)
    with pytest.raises(ValueError, match=r"same shape, got \[6, 1\] and \[6\] per task"):
        wrapped(xs, ys, xq, yq[..., 0])


def test_module_errors_name_the_models_parameters():
    """The checks name `fastmaml.maml`'s argument (`params[2]`), which a `fastmaml.MAML` user never passed:
    through the module they name its parameters."""
    model = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 2)).double()
    model[2].float()
    kwargs = valid_call()
    with pytest.raises(TypeError, match=r"^parameter '2\.weight' has dtype torch\.float32 but parameter '0\.weight' "
                                        r"has torch\.float64: all must match$"):
        fastmaml.MAML(model)(kwargs["x_support"], kwargs["y_support"], kwargs["x_query"], kwargs["y_query"])
    model.double()
    with pytest.raises(TypeError, match=r"expected torch\.float64 \(the dtype of the model's parameters\)$"):
        fastmaml.MAML(model).adapt(kwargs["x_support"].float(), kwargs["y_support"].float())
