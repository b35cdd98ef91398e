"""The plain-PyTorch reference backend: any model, every option, the oracle of every kernel.

The inner loop of one task is written with `torch.func.grad`; `torch.func.vmap` runs it for all tasks
at once (a generic module with `randomness="different"`: each task its own dropout masks). Outer
autograd differentiates through it (second order unless `first_order`, where the inner gradients are
detached). Where vmap cannot run the model (batch-norm statistics, data-dependent control flow), the
same per-task function runs in a loop over tasks with `torch.autograd.grad`, with a `TaskLoopWarning`;
so does a call through a model whose derivatives vmap gets wrong (second-order calls through a LayerNorm
with a learned scale or an affine instance or batch norm on batch statistics; every call through an
Embedding with a padding_idx): known from the model's layers (`fastmaml.nn.vmap_gradient_reason`), or
from the functions its forward called in its first batched run (`_untrusted_call`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch

from .._mlp import mlp_forward, task_loss
from .._validate import Problem, class_out_of_range

Params = list[torch.Tensor]


def _forward_fn(problem: Problem) -> Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]:
    if problem.forward is not None:
        return problem.forward
    activation = problem.activation
    return lambda params, x: mlp_forward(params, x, activation)


def _inner_loop_func(forward, loss: str, K: int, first_order: bool):
    """`run(params, rates, xs, ys) -> [theta_0, ..., theta_K]` for one task, with torch.func.grad."""

    def support_loss(theta, xs, ys):
        return task_loss(forward(theta, xs), ys, loss)

    grad_fn = torch.func.grad(support_loss)

    def run(params, rates, xs, ys):
        thetas = [list(params)]
        theta = list(params)
        for k in range(K):
            grads = grad_fn(theta, xs, ys)
            if first_order:
                grads = [g.detach() for g in grads]
            theta = [p - r[k] * g for p, r, g in zip(theta, rates, grads)]
            thetas.append(theta)
        return thetas

    return run


def _inner_loop_autograd(forward, loss: str, K: int, first_order: bool):
    """The same inner loop with `torch.autograd.grad`, for models vmap cannot batch."""

    def run(params, rates, xs, ys):
        theta = list(params)
        thetas = [theta]
        for k in range(K):
            with torch.enable_grad():
                # Leaves that need no grad still get a gradient in the inner loop.
                inner = [p if p.requires_grad else p.detach().requires_grad_() for p in theta]
                grads = torch.autograd.grad(
                    task_loss(forward(inner, xs), ys, loss),
                    inner,
                    create_graph=not first_order and torch.is_grad_enabled(),
                )
            if first_order or not torch.is_grad_enabled():
                grads = [g.detach() for g in grads]
            theta = [p - r[k] * g for p, r, g in zip(theta, rates, grads)]
            thetas.append(theta)
        return thetas

    return run


def _maml_task(problem: Problem, inner: Callable):
    forward, loss, K = _forward_fn(problem), problem.loss, problem.inner_steps
    weights = problem.query_loss_weights

    def task(params, rates, weights, xs, ys, xq, yq):
        thetas = inner(params, rates, xs, ys)
        preds = forward(thetas[-1], xq)
        final = task_loss(preds, yq, loss)
        if weights is None:
            return final, preds
        total = weights[K] * final
        for k in range(K):
            total = total + weights[k] * task_loss(forward(thetas[k], xq), yq, loss)
        return total, preds

    return task, weights


# ---- the calls whose derivatives vmap gets wrong, seen as the forward makes them ----------------------


def _arg(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _untrusted_call(func, args, kwargs) -> Optional[tuple[str, bool]]:
    """`(what, every_order)` when vmap's derivatives through this call of `func` differ from autograd's
    (the functional forms of the layers `fastmaml.nn.vmap_gradient_reason` names), else None.

    Each function is listed in the forms a forward may call: `torch.nn.functional`'s, `torch`'s and
    `torch.ops.aten`'s (the last two share an argument order, which differs from the first's)."""
    F, aten = torch.nn.functional, torch.ops.aten
    if isinstance(func, torch._ops.OpOverload):
        func = func.overloadpacket
    name = getattr(func, "__name__", "")
    if func in (F.layer_norm, torch.layer_norm, torch.native_layer_norm, aten.layer_norm, aten.native_layer_norm):
        if _arg(args, kwargs, 2, "weight") is not None:
            return f"its forward calls {name} with a learned scale", False
    elif func in (F.instance_norm, torch.instance_norm, aten.instance_norm,
                  F.batch_norm, torch.batch_norm, torch.native_batch_norm, aten.batch_norm, aten.native_batch_norm):
        # The same arguments in both: the functional forms put the running statistics before the weight;
        # the flag at 5 is instance_norm's use_input_stats (default True) or batch_norm's training (False).
        functional = func in (F.instance_norm, F.batch_norm)
        flag, default = ("use_input_stats", True) if "instance" in name else ("training", False)
        weight = _arg(args, kwargs, 3 if functional else 1, "weight")
        batch_stats = (_arg(args, kwargs, 5, flag, default)
                       or _arg(args, kwargs, 1 if functional else 3, "running_mean") is None)
        if weight is not None and batch_stats:
            return f"its forward calls {name} with affine parameters on batch statistics", False
    elif func is F.embedding:
        if _arg(args, kwargs, 2, "padding_idx") is not None:
            return "its forward calls embedding with a padding_idx", True
    elif func in (torch.embedding, aten.embedding):
        if _arg(args, kwargs, 2, "padding_idx", -1) != -1:
            return f"its forward calls {name} with a padding_idx", True
    return None


def _worse(a: tuple[Optional[str], bool], b: tuple[Optional[str], bool]) -> tuple[Optional[str], bool]:
    """Of two findings `(what, every_order)`, the one that loops more calls (every order over second)."""
    if a[0] is None or (b[0] is not None and b[1] and not a[1]):
        return b
    return a


class _SeeUntrustedCalls(torch.overrides.TorchFunctionMode):
    """Notes the calls of `_untrusted_call` made while it is active (an every-order one before a
    second-order one): `found` is `(what, every_order)` or `(None, False)`."""

    def __init__(self):
        super().__init__()
        self.found: tuple[Optional[str], bool] = (None, False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.found[1]:
            seen = _untrusted_call(func, args, kwargs)
            if seen is not None:
                self.found = _worse(self.found, seen)
        return func(*args, **kwargs)


class TaskLoopWarning(UserWarning):
    """The reference path runs a model task by task because `torch.func.vmap` cannot batch it."""


def _user_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first caller outside fastmaml and torch (the user's line)."""
    skip = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _run_batched(problem: Problem, make_vmap_task, make_loop_task, in_dims, args):
    """Run the per-task function under vmap; fall back to a task loop where vmap cannot run the model,
    with a `TaskLoopWarning` once the loop has run (`fastmaml.MAML` remembers the failure, so it warns once
    per module and mode). A call whose derivatives vmap gets wrong loops too, with its own warning: known
    from the module's layers ("vmap_untrusted"), or from the calls a generic forward made in its first
    batched run with inner steps (seen by `_SeeUntrustedCalls`, then remembered as "vmap_calls"). A model
    whose loop fails too raises the loop's error with no warning: the fault is then the model's, not
    vmap's.

    A generic module runs with `randomness="different"`: each task draws its own random numbers (dropout
    masks), as it would in a loop over tasks."""
    vmap_error = None
    second_order = not problem.first_order and torch.is_grad_enabled()

    def wrong_here(untrusted, every_order):
        return untrusted is not None and problem.inner_steps > 0 and (every_order or second_order)

    # fastmaml.MAML marks a generic module whose derivatives vmap gets wrong: by its layers
    # (`nn.vmap_gradient_reason`), else by the calls its forward made under vmap before ("vmap_calls").
    untrusted = _worse(problem.extras.get("vmap_untrusted") or (None, False),
                       problem.extras.get("vmap_calls") or (None, False))
    if not wrong_here(*untrusted) and (problem.forward is None or not problem.extras.get("no_vmap", False)):
        # A generic forward's first batched run per module and mode notes its calls: a norm or an
        # embedding called through torch.nn.functional is invisible to the module walk. Where one is
        # wrong for this call, the batched result is dropped and the loop below runs instead. Only with
        # inner steps (without, the task never differentiates the forward, and may not even call it). Not
        # while torch.compile traces (a function mode there would be traced too): the walk alone holds there.
        see = (problem.forward is not None and "vmap_calls" not in problem.extras and problem.inner_steps > 0
               and not torch.compiler.is_compiling())
        try:
            if problem.forward is None:  # the MLP draws no random numbers
                return torch.func.vmap(make_vmap_task(), in_dims=in_dims)(*args)
            if not see:
                return torch.func.vmap(make_vmap_task(), in_dims=in_dims, randomness="different")(*args)
            with _SeeUntrustedCalls() as calls:
                batched = torch.func.vmap(make_vmap_task(), in_dims=in_dims, randomness="different")(*args)
            problem.extras["vmap_calls"] = calls.found
            untrusted = _worse(untrusted, calls.found)
            if not wrong_here(*untrusted):
                return batched
            del batched
        except Exception as err:  # vmap refuses some modules (in-place buffer updates, .item(), ...)
            if problem.forward is None:
                raise
            vmap_error = err
    if wrong_here(*untrusted) and not problem.extras.get("said_untrusted"):  # once per module and mode
        which = "derivatives" if untrusted[1] else "second derivatives"
        warnings.warn(
            f"fastmaml: torch.func.vmap's {which} through this model differ from autograd's ({untrusted[0]}); "
            f"the reference path runs {'its' if untrusted[1] else 'its second-order'} calls one task at a "
            f"time: {problem.num_tasks} passes instead of one batched pass.",
            TaskLoopWarning, stacklevel=_user_stacklevel(),
        )
        problem.extras["said_untrusted"] = True
    task = make_loop_task()
    outs = []
    for t in range(problem.num_tasks):
        outs.append(task(*[a if d is None else a[t] for a, d in zip(args, in_dims)]))
    if vmap_error is not None:
        first_line = (str(vmap_error).strip().splitlines() or [type(vmap_error).__name__])[0][:300]
        warnings.warn(
            f"fastmaml: torch.func.vmap cannot batch this model over tasks ({type(vmap_error).__name__}: "
            f"{first_line}); the reference path runs it one task at a time: {problem.num_tasks} passes "
            "instead of one batched pass, each paying Python and autograd overhead. Batch-norm layers in "
            "training mode are a common cause (track_running_stats=False lets vmap batch them in first-order "
            "and no-grad calls, and in second-order ones without affine parameters; vmap's second derivatives "
            "through affine batch statistics are wrong, so those calls run task by task anyway).",
            TaskLoopWarning, stacklevel=_user_stacklevel(),
        )
        problem.extras["no_vmap"] = True
    if isinstance(outs[0], (tuple, list)):
        return type(outs[0])(_stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def _stack(parts):
    if isinstance(parts[0], (tuple, list)):
        return [torch.stack(p) for p in zip(*parts)]
    return torch.stack(parts)


_OUT_OF_BOUNDS = re.compile(r"index (-?\d+) is out of bounds for dimension \d+ with size (\d+)")


@contextlib.contextmanager
def _classes_named(problem: Problem):
    """A class index out of range for a generic module's logits, said as `check_values` says it for an MLP
    (whose width is known before the call) instead of as the gather's indexing error. On the CPU, where
    the gather raises at once; a CUDA gather out of range is a device-side assertion."""
    try:
        yield
    except RuntimeError as err:
        found = _OUT_OF_BOUNDS.search(str(err)) if problem.loss == "cross_entropy" else None
        if found is None:
            raise
        bad, logits = int(found.group(1)), int(found.group(2))
        name = next((n for n, y in (("y_support", problem.y_support), ("y_query", problem.y_query))
                     if y is not None and bool((y == bad).any())), None)
        if name is None:  # an indexing error of the model's own forward, not a class the targets hold
            raise
        raise class_out_of_range(name, bad, logits) from err


class ReferenceBackend:
    """Plain PyTorch with torch.func; supports every model, option, dtype and device."""

    name = "reference"

    def unavailable(self) -> Optional[str]:
        return None

    def reject(self, problem: Problem, op: str) -> Optional[str]:
        return None

    def maml(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        forward, loss, K, fo = _forward_fn(problem), problem.loss, problem.inner_steps, problem.first_order

        def vmap_task():
            return _maml_task(problem, _inner_loop_func(forward, loss, K, fo))[0]

        def loop_task():
            return _maml_task(problem, _inner_loop_autograd(forward, loss, K, fo))[0]

        args = (problem.params, problem.inner_lr, problem.query_loss_weights,
                problem.x_support, problem.y_support, problem.x_query, problem.y_query)
        in_dims = (None, None, None, 0, 0, 0, 0)
        with _classes_named(problem):
            task_losses, preds = _run_batched(problem, vmap_task, loop_task, in_dims, args)
        return task_losses, preds

    def adapt(self, problem: Problem) -> list[torch.Tensor]:
        forward, loss, K, fo = _forward_fn(problem), problem.loss, problem.inner_steps, problem.first_order

        def vmap_task():
            inner = _inner_loop_func(forward, loss, K, fo)
            return lambda params, rates, xs, ys: inner(params, rates, xs, ys)[-1]

        def loop_task():
            inner = _inner_loop_autograd(forward, loss, K, fo)
            return lambda params, rates, xs, ys: inner(params, rates, xs, ys)[-1]

        args = (problem.params, problem.inner_lr, problem.x_support, problem.y_support)
        with _classes_named(problem):
            out = _run_batched(problem, vmap_task, loop_task, (None, None, 0, 0), args)
        return list(out)
