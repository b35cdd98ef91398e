"""The `triton` backend's custom ops and their launches: `fastmaml::triton_maml_fwd / triton_maml_bwd /
triton_maml_train / triton_maml_adapt`, defined in Python with fake kernels and the autograd formulas of
`_fused.py`, each launching a kernel of `_triton_kernels.py` (the register layout) or `_triton_scratch.py`
(the scratch layout). What the launches read (layouts, compile-time constants, program counts, size
limits) is `triton_maml`'s, looked up there at each call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from . import _fused
from . import triton_maml as tm


def _forward_launch(theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, query: bool):
    """Shared launch of `maml_fwd_kernel` for `maml_fwd` (query) and `maml_adapt` (not query)."""
    layout = tm.layout_for(dims)
    k = tm._module(layout)
    T, NS, D0 = xs.shape
    K, P = lr.shape[0], theta.shape[0]
    DL = dims[-1]
    NQ = xq.shape[1] if query else 1
    consts = tm.kernel_constants("fwd", dims, NS, NQ, activation, loss, query=query, layout=layout)
    launch = tm.launch_options(dims, NS, NQ, layout)
    G, scratch = tm._programs_and_acts(consts, theta, T, 2, launch["num_warps"])
    work = theta.new_empty(G, 2, P)
    if query:
        task_losses = theta.new_empty(T)
        preds = theta.new_empty(T, NQ, DL)
        thetas = theta  # unused
    else:
        task_losses, preds = theta, theta  # unused
        thetas = theta.new_empty(T, P)
        xq, yq, qw = xs, ys, theta  # unused
    with tm._device_guard(theta):
        k.maml_fwd_kernel[(G,)](
            theta, lr, xs, ys, xq, yq, qw, task_losses, preds, thetas, work, *scratch,
            T, NS, NQ, P, K, G, *tm._sizes(dims), **consts, **launch,
        )
    return task_losses, preds, thetas


def _fwd_impl(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order):
    _check_flat(theta, lr, x_support, x_query, dims)
    task_losses, preds, _ = _forward_launch(
        theta.contiguous(), lr.contiguous(), x_support.contiguous(), y_support.contiguous(),
        x_query.contiguous(), y_query.contiguous(), qw.contiguous(), list(dims), activation, loss, True,
    )
    return task_losses, preds


def _adapt_impl(theta, lr, x_support, y_support, dims, activation, loss):
    _check_flat(theta, lr, x_support, None, dims)
    _, _, thetas = _forward_launch(
        theta.contiguous(), lr.contiguous(), x_support.contiguous(), y_support.contiguous(),
        None, None, None, list(dims), activation, loss, False,
    )
    return thetas


def _backward_launch(theta, lr, xs, ys, xq, yq, qw, g_task_losses, g_query_preds, dims, activation, loss,
                     first_order, need_lr_grad, need_x_grad, outputs: bool) -> tuple:
    """Shared launch of `maml_bwd_kernel`: `(g_theta, g_lr, g_xs, g_xq, task_losses, preds)`, the last two
    written only with `outputs` (`maml_train`); gradients not asked for are empty."""
    dims = list(dims)
    layout = tm.layout_for(dims)
    k = tm._module(layout)
    theta, lr = theta.contiguous(), lr.contiguous()
    xs, ys, xq, yq = (t.contiguous() for t in (xs, ys, xq, yq))
    T, NS, D0 = xs.shape
    NQ = xq.shape[1]
    K, P = lr.shape[0], theta.shape[0]
    consts = tm.kernel_constants("bwd", dims, NS, NQ, activation, loss, first_order=first_order,
                              need_lr_grad=need_lr_grad, need_x_grad=need_x_grad, outputs=outputs, layout=layout)
    launch = tm.launch_options(dims, NS, NQ, layout)
    G, scratch = tm._programs_and_acts(consts, theta, T, (K + 1) + 2 + 1 + (K if need_lr_grad else 0),
                                       launch["num_warps"])
    work = theta.new_empty(G, K + 1, P)
    vbuf = theta.new_empty(G, 2, P)
    g_theta_part = theta.new_zeros(G, P)
    g_lr_part = theta.new_zeros(G, K, P) if need_lr_grad else theta  # theta: unused placeholder
    if need_x_grad:
        g_xs, g_xq = torch.empty_like(xs), torch.empty_like(xq)
    else:
        g_xs = g_xq = theta  # unused
    if outputs:
        task_losses, preds = theta.new_empty(T), theta.new_empty(T, NQ, dims[-1])
    else:
        task_losses = preds = theta  # unused
    with tm._device_guard(theta):
        k.maml_bwd_kernel[(G,)](
            theta, lr, xs, ys, xq, yq, qw.contiguous(), g_task_losses.contiguous(), g_query_preds.contiguous(),
            g_theta_part, g_lr_part, g_xs, g_xq, task_losses, preds, work, vbuf, *scratch,
            T, NS, NQ, P, K, G, *tm._sizes(dims), **consts, **launch,
        )
    # Outputs must not alias each other: a fresh empty tensor for each one not asked for.
    g_theta = g_theta_part.sum(0)
    g_lr = g_lr_part.sum(0) if need_lr_grad else theta.new_empty(0)
    if not need_x_grad:
        g_xs, g_xq = theta.new_empty(0), theta.new_empty(0)
    if not outputs:
        task_losses, preds = theta.new_empty(0), theta.new_empty(0)
    return g_theta, g_lr, g_xs, g_xq, task_losses, preds


def _bwd_impl(theta, lr, x_support, y_support, x_query, y_query, qw, g_task_losses, g_query_preds,
              dims, activation, loss, first_order, need_lr_grad, need_x_grad):
    _check_flat(theta, lr, x_support, x_query, dims)
    return _backward_launch(theta, lr, x_support, y_support, x_query, y_query, qw, g_task_losses, g_query_preds,
                            dims, activation, loss, first_order, need_lr_grad, need_x_grad, False)[:4]


def _train_impl(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order,
                need_lr_grad, need_x_grad):
    """A training call's forward and backward in one launch: the task losses, the query output, their mean,
    and the gradients of the *sum* of the task losses (every task's cotangent 1; the autograd formula
    scales them by the mean's cotangent / T)."""
    _check_flat(theta, lr, x_support, x_query, dims)
    T, NQ = x_query.shape[0], x_query.shape[1]
    ones = theta.new_ones(T)
    no_query_cotangent = theta.new_zeros(T, NQ, dims[-1])
    g_theta, g_lr, g_xs, g_xq, task_losses, preds = _backward_launch(
        theta, lr, x_support, y_support, x_query, y_query, qw, ones, no_query_cotangent, dims, activation, loss,
        first_order, need_lr_grad, need_x_grad, True)
    return task_losses, preds, task_losses.mean(), g_theta, g_lr, g_xs, g_xq


def _check_flat(theta, lr, xs, xq, dims) -> None:
    """Sizes a direct caller of the ops could get wrong (the public API has checked them already)."""
    reason = tm.size_limits(list(dims), xs.shape[1], 0 if xq is None else xq.shape[1], theta.dtype)
    if reason is not None:
        raise ValueError(f"fastmaml triton: {reason}")
    P = sum(dims[i + 1] * dims[i] + dims[i + 1] for i in range(len(dims) - 1))
    if theta.shape != (P,) or lr.dim() != 2 or lr.shape[1] != P:
        raise ValueError(f"fastmaml triton: theta must be [P] = [{P}] and lr [K, {P}] for dims {list(dims)}, "
                         f"got {list(theta.shape)} and {list(lr.shape)}")


# ---------------------------------------------------------------------------------------------------
# Custom ops (defined when the backend is first found available)
# ---------------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, "
               "Tensor qw, int[] dims, int activation, int loss, bool first_order) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, "
               "Tensor qw, Tensor g_task_losses, Tensor g_query_preds, int[] dims, int activation, int loss, "
               "bool first_order, bool need_lr_grad, bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor)")
_TRAIN_SCHEMA = ("(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, "
                 "Tensor qw, int[] dims, int activation, int loss, bool first_order, bool need_lr_grad, "
                 "bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_ADAPT_SCHEMA = ("(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, int[] dims, int activation, "
                 "int loss) -> Tensor")

_OPS: Optional[SimpleNamespace] = None


def ops() -> SimpleNamespace:
    """The four custom ops (`fwd`, `bwd`, `train`, `adapt`), defined and registered on first call."""
    global _OPS
    if _OPS is not None:
        return _OPS
    fwd = torch.library.custom_op("fastmaml::triton_maml_fwd", _fwd_impl, mutates_args=(), schema=_FWD_SCHEMA)
    bwd = torch.library.custom_op("fastmaml::triton_maml_bwd", _bwd_impl, mutates_args=(), schema=_BWD_SCHEMA)
    train = torch.library.custom_op(
        "fastmaml::triton_maml_train", _train_impl, mutates_args=(), schema=_TRAIN_SCHEMA
    )
    adapt = torch.library.custom_op(
        "fastmaml::triton_maml_adapt", _adapt_impl, mutates_args=(), schema=_ADAPT_SCHEMA
    )

    @fwd.register_fake
    def _fwd_fake(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order):
        T, NQ = x_query.shape[0], x_query.shape[1]
        return theta.new_empty(T), theta.new_empty(T, NQ, dims[-1])

    @bwd.register_fake
    def _bwd_fake(theta, lr, x_support, y_support, x_query, y_query, qw, g_task_losses, g_query_preds,
                  dims, activation, loss, first_order, need_lr_grad, need_x_grad):
        return (
            theta.new_empty(theta.shape),
            lr.new_empty(lr.shape) if need_lr_grad else theta.new_empty(0),
            x_support.new_empty(x_support.shape) if need_x_grad else theta.new_empty(0),
            x_query.new_empty(x_query.shape) if need_x_grad else theta.new_empty(0),
        )

    @train.register_fake
    def _train_fake(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order,
                    need_lr_grad, need_x_grad):
        T, NQ = x_query.shape[0], x_query.shape[1]
        grads = _bwd_fake(theta, lr, x_support, y_support, x_query, y_query, qw, None, None, dims, activation,
                          loss, first_order, need_lr_grad, need_x_grad)
        return (theta.new_empty(T), theta.new_empty(T, NQ, dims[-1]), theta.new_empty(()), *grads)

    @adapt.register_fake
    def _adapt_fake(theta, lr, x_support, y_support, dims, activation, loss):
        return theta.new_empty(x_support.shape[0], theta.shape[0])

    _fused.register_fused_autograd(fwd, bwd)
    _fused.register_train_autograd(train, bwd)
    _OPS = SimpleNamespace(fwd=fwd, bwd=bwd, train=train, adapt=adapt)
    return _OPS
