"""What the fused backends (cpu, cuda, triton) share: flattening a problem into the flat operations of
`docs/kernels.md`, and the autograd formula registered once for every forward operation.

The backward of `maml_fwd` is the kernel's own reverse sweep (`maml_bwd`), not autograd through the
kernel. `maml_bwd` itself is not differentiable: asking for a gradient of the meta-gradient raises.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._validate import Problem

ACTIVATION_IDS = {"relu": 0, "tanh": 1}
LOSS_IDS = {"mse": 0, "cross_entropy": 1}


def flat_theta(problem: Problem) -> torch.Tensor:
    """`[P]`: W1 (row-major), b1, ..., WL, bL."""
    return torch.cat([p.reshape(-1) for p in problem.params])


# The constant inputs of training calls (a float rate's [K, P] table, plain MAML's query weights), kept
# between calls: making them cost ~20 us a call on the CPU, a tenth of the Python around the kernels.
# The ops only read them. Not kept while torch.compile traces (they would be fake tensors) nor under
# inference_mode (an inference tensor cannot be saved for a later backward).
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 32


def _constant(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return make()
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = make()
    return t


def flat_lr(problem: Problem) -> torch.Tensor:
    """`[K, P]`: every step's rate for every scalar parameter (differentiable in the user's rates)."""
    K = problem.inner_steps
    if problem.inner_lr_value is not None:  # one number for every step and parameter: no gather needed
        P = sum(p.numel() for p in problem.params)
        value, dtype, device = problem.inner_lr_value, problem.dtype, problem.device
        return _constant(("lr", K, P, value, dtype, device),
                         lambda: torch.full((K, P), value, dtype=dtype, device=device))
    # The width is given explicitly: reshape(K, -1) is ambiguous when K = 0.
    return torch.cat([r.reshape(K, p.numel()) for r, p in zip(problem.inner_lr, problem.params)], dim=1).contiguous()


def flat_query_weights(problem: Problem) -> torch.Tensor:
    """`[K + 1]`: the query-loss weights; `[0, ..., 0, 1]` for plain MAML."""
    if problem.query_loss_weights is not None:
        return problem.query_loss_weights.detach().contiguous()
    K, dtype, device = problem.inner_steps, problem.dtype, problem.device

    def make() -> torch.Tensor:
        w = torch.zeros(K + 1, dtype=dtype, device=device)
        w[-1] = 1
        return w

    return _constant(("qw", K, dtype, device), make)


def unflatten(flat: torch.Tensor, problem: Problem) -> list[torch.Tensor]:
    """`[..., P]` -> one tensor per param, `[..., *param.shape]`."""
    out, offset = [], 0
    lead = flat.shape[:-1]
    for p in problem.params:
        n = p.numel()
        out.append(flat[..., offset:offset + n].reshape(*lead, *p.shape))
        offset += n
    return out


def fused_args(problem: Problem) -> tuple:
    """Positional arguments of `maml_fwd` for this problem."""
    return (flat_theta(problem), *fused_tail_args(problem))


def fused_tail_args(problem: Problem) -> tuple:
    """The arguments of `maml_fwd` after theta (those of `maml_train` after the parameter list)."""
    return (
        flat_lr(problem),
        problem.x_support.contiguous(),
        problem.y_support.contiguous(),
        problem.x_query.contiguous(),
        problem.y_query.contiguous(),
        flat_query_weights(problem),
        list(problem.dims),
        ACTIVATION_IDS[problem.activation],
        LOSS_IDS[problem.loss],
        problem.first_order,
    )


def adapt_args(problem: Problem) -> tuple:
    """Positional arguments of `maml_adapt` for this problem."""
    return (
        flat_theta(problem).detach(),
        flat_lr(problem).detach(),
        problem.x_support.detach().contiguous(),
        problem.y_support.detach().contiguous(),
        list(problem.dims),
        ACTIVATION_IDS[problem.activation],
        LOSS_IDS[problem.loss],
    )


def common_reject(problem: Problem, op: str) -> str | None:
    """Reasons shared by every fused backend (the kernels run MLPs in float32/float64 only)."""
    if not problem.is_mlp:
        return (problem.extras.get("not_fused")
                or "the model is not an MLP of nn.Linear layers (fused kernels run MLPs only)")
    if problem.dtype not in (torch.float32, torch.float64):
        return f"dtype {problem.dtype} (fused kernels run float32 and float64)"
    if problem.query_loss_weights is not None and problem.query_loss_weights.requires_grad and torch.is_grad_enabled():
        return "query_loss_weights requires grad (the fused kernels treat it as a constant)"
    if problem.targets_require_grad:
        # The kernels' reverse sweeps produce no gradient for the mse targets (docs/math.md gives it):
        # running them would leave y.grad empty where the reference fills it.
        return ("y_support or y_query requires grad (the fused kernels compute no gradient for the "
                "targets; the reference backend does)")
    if op == "adapt" and problem.requires_grad:
        return "adapt through a fused kernel is not differentiable; call it under torch.no_grad() or use reference"
    return None


def register_fused_autograd(fwd_op, bwd_op) -> None:
    """Register `bwd_op` (the reverse sweep) as the autograd formula of `fwd_op`."""

    def setup_context(ctx, inputs, output):
        theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order = inputs
        ctx.save_for_backward(theta, lr, xs, ys, xq, yq, qw)
        ctx.options = (list(dims), activation, loss, first_order)

    def backward(ctx, g_task_losses, g_query_preds):
        theta, lr, xs, ys, xq, yq, qw = ctx.saved_tensors
        dims, activation, loss, first_order = ctx.options
        need_lr = bool(ctx.needs_input_grad[1])
        need_x = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[4])
        if g_task_losses is None:
            g_task_losses = torch.zeros(xs.shape[0], dtype=theta.dtype, device=theta.device)
        if g_query_preds is None:
            g_query_preds = torch.zeros(xq.shape[0], xq.shape[1], dims[-1], dtype=theta.dtype, device=theta.device)
        g_theta, g_lr, g_xs, g_xq = bwd_op(
            theta, lr, xs, ys, xq, yq, qw,
            g_task_losses.contiguous(), g_query_preds.contiguous(),
            dims, activation, loss, first_order, need_lr, need_x,
        )
        return (
            g_theta if ctx.needs_input_grad[0] else None,
            g_lr if need_lr else None,
            g_xs if ctx.needs_input_grad[2] else None,
            None,
            g_xq if ctx.needs_input_grad[4] else None,
            None, None, None, None, None, None,
        )

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            "fastmaml: the fused backends compute the meta-gradient once; differentiating it again "
            "(create_graph=True through fastmaml.maml) needs backend='reference'"
        )

    torch.library.register_autograd(bwd_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


def register_task_sum_autograd(task_sum_op) -> None:
    """`weighted_task_sum` is the internal reduction in the backward of maml_fwdbwd (whose autograd kernel
    is C++, csrc/autograd_fwdbwd.cpp): differentiating it raises."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError("fastmaml: weighted_task_sum is an internal reduction of the fused backward")

    torch.library.register_autograd(task_sum_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


def run_fused(fwd: Callable, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a registered `maml_fwd` operation on a problem."""
    return fwd(*fused_args(problem))
