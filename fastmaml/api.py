"""The public functions: `maml`, `adapt`, `mlp`, `reptile`, `explain`.

Each validates its arguments into a `Problem`, lets the dispatcher pick a backend, and returns plain
tensors. Shapes: `T` tasks, `Ns` support and `Nq` query points per task, `D_in` inputs, `D_out` outputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _plans, dispatch
from ._mlp import mlp_forward
from ._validate import check_choice, check_params, check_values, make_problem, planned_problem, values_checked_here
from ._mlp import ACTIVATIONS

LR = Union[float, torch.Tensor, Sequence[torch.Tensor]]


class MAMLOutput(NamedTuple):
    """What `maml` and `MAML.forward` return.

    loss:        scalar, the mean over tasks of the query loss after adaptation (differentiable)
    task_losses: `[T]`, each task's query loss (the weighted sum over steps with `query_loss_weights`)
    query_preds: `[T, Nq, D_out]`, the adapted models' predictions (mse) or logits (cross_entropy)
    backend:     the name of the backend that ran the call
    """

    loss: torch.Tensor
    task_losses: torch.Tensor
    query_preds: torch.Tensor
    backend: str


def maml(
    params: Sequence[torch.Tensor],
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: LR = 0.01,
    first_order: bool = False,
    activation: str = "relu",
    loss: str = "mse",
    query_loss_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> MAMLOutput:
    """Adapt an MLP to every task with `inner_steps` SGD steps on its support set; return the query loss.

    Args:
        params: `[W1, b1, ..., WL, bL]` in nn.Linear layout, `W_l [D_l, D_{l-1}]`, `b_l [D_l]`.
        x_support: `[T, Ns, D_in]`. y_support: `[T, Ns, D_out]` float (mse) or `[T, Ns]` int64
            class indices (cross_entropy).
        x_query: `[T, Nq, D_in]`. y_query: `[T, Nq, D_out]` or `[T, Nq]`.
        inner_steps: K >= 0 SGD steps per task.
        inner_lr: a float; a tensor broadcast to `[K]` (per-step rates); or one tensor per param,
            tensor i broadcast to `[K, *params[i].shape]` (Meta-SGD, per-layer per-step rates).
            Tensors that require grad receive the meta-gradient.
        first_order: FOMAML: the inner gradients are treated as constants.
        activation: "relu" or "tanh" on the hidden layers (the last layer is linear).
        loss: "mse" (mean over points and outputs) or "cross_entropy" (mean over points).
        query_loss_weights: optional `[K + 1]`: the task loss becomes
            `sum_k w_k * L_query(theta_k)` (MAML++ multi-step loss). The fused kernels skip a step
            k < K whose weight is 0 (they never evaluate its query loss), so where that loss is inf or
            NaN the task loss stays what the other steps make it; the reference's `0 * inf` is NaN.
            The last step's loss is always evaluated, on every backend.
        backend: "auto", "reference", "cpu", "triton", "cuda" or "factored" (see `fastmaml.explain`).

    Returns:
        `MAMLOutput(loss, task_losses [T], query_preds [T, Nq, D_out], backend)`; `loss` is
        differentiable w.r.t. params, rate tensors, `x_support` and `x_query` (exact second order
        unless `first_order`), and float (mse) targets and `query_loss_weights` that require grad:
        those calls run on the `factored` or reference backend (the other fused kernels compute no
        gradient for them and refuse them). What the
        result does not depend on gets no gradient (None, as through autograd): the rates at K = 0,
        the support set at K = 0 or with `first_order`.

    Every tensor of `params` is adapted, whatever its `requires_grad` (which says only whether it gets a
    gradient: a detached copy still adapts); to hold one fixed, give it a zero rate (a per-parameter
    `inner_lr`), as `fastmaml.MAML` does for parameters with `requires_grad=False`.
    """
    # A training loop repeats one signature: validation and dispatch run once for it (fastmaml/_plans.py).
    signature = None if torch.compiler.is_compiling() else _plans.key(
        "maml", params, (x_support, y_support, x_query, y_query), inner_steps, inner_lr,
        (first_order, activation, loss, query_loss_weights, backend))
    plan = _plans.get(signature)
    if plan is None:
        problem = make_problem(
            params, x_support, y_support, x_query, y_query,
            inner_steps=inner_steps, inner_lr=inner_lr, first_order=first_order,
            activation=activation, loss=loss, query_loss_weights=query_loss_weights,
        )
        chosen = dispatch.select(problem, backend, "maml")
        _plans.remember(signature, _plans.Plan(chosen, problem.dims))
    else:
        chosen = plan.backend
        problem = planned_problem(params, x_support, y_support, x_query, y_query, inner_steps, inner_lr,
                                  first_order, activation, loss, query_loss_weights, plan.dims)
    if values_checked_here(problem, chosen.name):
        check_values(problem)
    out = chosen.maml(problem)
    task_losses, query_preds = out[0], out[1]
    loss = out[2] if len(out) > 2 else task_losses.mean()
    return MAMLOutput(loss, task_losses, query_preds, chosen.name)


def adapt(
    params: Sequence[torch.Tensor],
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: LR = 0.01,
    activation: str = "relu",
    loss: str = "mse",
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Run the inner loop only: the adapted parameters of every task.

    Args as `maml` (`x_support [T, Ns, D_in]`, `y_support [T, Ns, D_out]` or `[T, Ns]`).
    Returns one tensor per param, `[T, *params[i].shape]`; evaluate them with `fastmaml.mlp`.
    Differentiable on the reference and `factored` backends; the fused kernels (`cpu`, `cuda`, `triton`)
    serve it under `torch.no_grad()` (evaluation with more steps than training), and `auto` picks
    accordingly.
    """
    return adapt_on(params, x_support, y_support, inner_steps=inner_steps, inner_lr=inner_lr,
                    activation=activation, loss=loss, backend=backend)[0]


def adapt_on(params, x_support, y_support, *, inner_steps=1, inner_lr=0.01, activation="relu", loss="mse",
             backend="auto") -> tuple[list[torch.Tensor], str]:
    """`adapt`, and the name of the backend that ran it."""
    problem = make_problem(
        params, x_support, y_support, inner_steps=inner_steps, inner_lr=inner_lr,
        activation=activation, loss=loss, need_query=False,
    )
    chosen = dispatch.select(problem, backend, "adapt")
    if values_checked_here(problem, chosen.name):
        check_values(problem)
    return chosen.adapt(problem), chosen.name


def mlp(batched_params: Sequence[torch.Tensor], x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Evaluate per-task MLPs: `batched_params[i] [T, *shape_i]` (as `adapt` returns), `x [T, N, D_in]`
    -> `[T, N, D_out]`."""
    activation = check_choice("activation", activation, tuple(ACTIVATIONS))
    batched_params = list(batched_params)
    if not batched_params or not all(isinstance(p, torch.Tensor) for p in batched_params):
        raise TypeError("batched_params must be a non-empty sequence of tensors [T, *param.shape]")
    T = batched_params[0].shape[0] if batched_params[0].dim() else 0
    for i, p in enumerate(batched_params):
        if p.dim() < 2 or p.shape[0] != T:
            raise ValueError(
                f"batched_params[{i}] must be [T, *param.shape] with T = {T}, got shape {list(p.shape)}"
            )
    dims = check_params([p[0] for p in batched_params])
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] != T or x.shape[2] != dims[0]:
        raise ValueError(f"x must be [T, N, D_in] = [{T}, N, {dims[0]}], got shape {list(x.shape)}")
    if x.dtype != batched_params[0].dtype:
        raise TypeError(f"x has dtype {x.dtype}, expected {batched_params[0].dtype} (the dtype of the params)")
    return mlp_forward(batched_params, x, activation)


def reptile(
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    inner_steps: int = 5,
    inner_lr: LR = 0.01,
    activation: str = "relu",
    loss: str = "mse",
    backend: str = "auto",
) -> list[torch.Tensor]:
    """The Reptile meta-direction `params - mean_t theta_K(t)`, one tensor per param.

    `x [T, N, D_in]`, `y [T, N, D_out]` or `[T, N]`. Put the result in `.grad` and step an optimizer:
    `for p, d in zip(params, fastmaml.reptile(...)): p.grad = d`.
    """
    with torch.no_grad():
        adapted = adapt(
            [p.detach() for p in params], x.detach(), y, inner_steps=inner_steps,
            inner_lr=_detach_lr(inner_lr), activation=activation, loss=loss, backend=backend,
        )
        return [p.detach() - a.mean(0) for p, a in zip(params, adapted)]


def _detach_lr(inner_lr: LR) -> LR:
    if isinstance(inner_lr, torch.Tensor):
        return inner_lr.detach()
    if isinstance(inner_lr, (list, tuple)):
        return [r.detach() if isinstance(r, torch.Tensor) else r for r in inner_lr]
    return inner_lr


def explain(
    params: Sequence[torch.Tensor],
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: Optional[torch.Tensor] = None,
    y_query: Optional[torch.Tensor] = None,
    **options,
) -> str:
    """Which backend `auto` would pick for this `maml` call (or `adapt`, without query data), and why
    each other backend was rejected. Takes the same arguments as `maml`; returns a printable report.

    `params` may also be a `fastmaml.MAML` module (`explain(maml_module, x_s, y_s, x_q, y_q)`): the
    report then also says what in the model keeps it off the fused kernels; the module's settings are
    its own (only `query_loss_weights`, and `inner_steps` for adapt, may be given). With `backend=` a
    name (or a module made with one), the report also says whether that backend runs the call."""
    if isinstance(params, torch.nn.Module):
        from .nn import MAML

        if not isinstance(params, MAML):
            raise TypeError(f"explain takes params or a fastmaml.MAML module, got {type(params).__name__}")
        other = sorted(set(options) - {"query_loss_weights", "inner_steps"})
        if other:  # the module's own settings decide them: a report with them dropped would describe another call
            raise TypeError(f"explain(module, ...) takes query_loss_weights and (for adapt) inner_steps; "
                            f"{', '.join(other)}: the module's own settings decide them")
        return params.explain(x_support, y_support, x_query, y_query, options.get("query_loss_weights"),
                              options.get("inner_steps"))
    requested = options.pop("backend", "auto")
    need_query = x_query is not None
    if not need_query:
        options.pop("first_order", None)
        options.pop("query_loss_weights", None)
    problem = make_problem(params, x_support, y_support, x_query, y_query, need_query=need_query, **options)
    return dispatch.explain_problem(problem, "maml" if need_query else "adapt", requested=requested)
