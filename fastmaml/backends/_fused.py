"""What the fused backends (cpu, cuda, triton) share: flattening a problem into the flat operations of
`docs/kernels.md`, the size limits and reasons common to every kernel, the autograd formula registered
once for every forward operation, and `FusedBackend`, the base class that runs a call through them.

A fused backend adds only what is its own: the device it runs, whether it is available here, its size
limits and its operations (`FusedBackend` says which methods). The dispatcher, not shared code, sends
each tensor to its device's kernels.

The backward of `maml_fwd` is the kernel's own reverse sweep (`maml_bwd`), not autograd through the
kernel. `maml_bwd` itself is not differentiable: asking for a gradient of the meta-gradient raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._plans import autocast_enabled, forward_ad_active, functorch_active
from .._validate import Problem

ACTIVATION_IDS = {"relu": 0, "tanh": 1}
LOSS_IDS = {"mse": 0, "cross_entropy": 1}


def flat_theta(problem: Problem) -> torch.Tensor:
    """`[P]`: W1 (row-major), b1, ..., WL, bL."""
    return torch.cat([p.reshape(-1) for p in problem.params])


# The constant inputs of training calls (a float rate's [K, P] table, plain MAML's query weights), kept
# between calls: making them on every call was a tenth of the Python around the CPU kernels.
# The ops only read them. Not kept while torch.compile traces (they would be fake tensors), under
# inference_mode (an inference tensor cannot be saved for a later backward), nor while a CUDA graph is
# captured on the current stream: there the graph gets its own, made by kernels it replays. A tensor made
# under capture holds nothing until the first replay (an eager call reading it from here would read
# garbage), and a graph that captured a kept one would read freed memory once the cache is cleared.
# On CUDA they are kept per stream: a tensor is filled on the stream that made it, so a call on another
# stream could read it before the fill has run, and once the cache drops it the allocator may hand its
# memory out again on the making stream while the other one still reads it.
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 32


def _constant(key: tuple, make: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return make()
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return make()
        key = (*key, torch.cuda.current_stream(device).cuda_stream)
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
        P = problem.num_params
        value, dtype, device = problem.inner_lr_value, problem.dtype, problem.device
        return _constant(("lr", K, P, value, dtype, device),
                         lambda: torch.full((K, P), value, dtype=dtype, device=device), device)
    if problem.inner_lr_tensor is not None:  # one rate per step, shared by every parameter
        return problem.inner_lr_tensor.reshape(-1, 1).expand(K, problem.num_params).contiguous()
    # The width is given explicitly: reshape(K, -1) is ambiguous when K = 0.
    return torch.cat([r.reshape(K, p.numel()) for r, p in zip(problem.inner_lr, problem.params)], dim=1).contiguous()


def flat_query_weights(problem: Problem) -> torch.Tensor:
    """`[K + 1]`: the query-loss weights; `[0, ..., 0, 1]` for plain MAML."""
    if problem.query_loss_weights is not None:
        return problem.query_loss_weights.detach().contiguous()
    K, dtype, device = problem.inner_steps, problem.dtype, problem.device

    def make() -> torch.Tensor:
        w = torch.zeros(K + 1, dtype=dtype, device=device)
        # fill_ of a view, not `w[-1] = 1`: indexing assignment copies a CPU scalar tensor, which a CUDA
        # graph's capture refuses (H200, torch 2.11: test_cuda_graph_of_a_meta_iteration failed on it).
        w[K:].fill_(1)
        return w

    return _constant(("qw", K, dtype, device), make, device)


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


def autocast_off(device_type: str):
    """A context with autocast off on `device_type` (a no-op where it is off): for a backward that
    recomputes or sweeps a forward run without autocast, so that it differentiates the function the forward
    computed, whatever context the user calls backward in."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def common_reject(problem: Problem, op: str) -> str | None:
    """Reasons shared by every fused backend (the kernels run MLPs in float32/float64 only)."""
    if not problem.is_mlp:
        return (problem.extras.get("not_fused")
                or "the model is not an MLP of nn.Linear layers (fused kernels run MLPs only)")
    if problem.dtype not in (torch.float32, torch.float64):
        return f"dtype {problem.dtype} (fused kernels run float32 and float64)"
    if problem.query_loss_weights is not None and problem.query_loss_weights.requires_grad and torch.is_grad_enabled():
        return "query_loss_weights requires grad (the fused kernels treat it as a constant)"
    if forward_ad_active():
        # Forward-mode AD (torch.func.jvp, forward_ad.dual_level): the kernels have no forward-mode
        # formula, and their outputs would carry no tangent.
        return "forward-mode AD is active (the fused kernels have no forward-mode formula)"
    if functorch_active():
        # torch.func.grad, vjp, vmap: the kernels' autograd Functions (C++ for cpu and cuda) have no rule
        # for its transforms, which raised from inside the call.
        return "a torch.func transform is active (the fused kernels' autograd Functions have no rule for it)"
    if autocast_enabled(problem.device.type):
        return (f"autocast is enabled on {problem.device.type} (the model would compute in a lower precision; "
                "the fused kernels run the parameters' dtype)")
    if problem.targets_require_grad:
        # The kernels' reverse sweeps produce no gradient for the mse targets (docs/math.md gives it):
        # running them would leave y.grad empty where the reference fills it.
        return ("y_support or y_query requires grad (the fused kernels compute no gradient for the "
                "targets; the reference backend does)")
    if op == "adapt" and problem.requires_grad:
        return "adapt through a fused kernel is not differentiable; call it under torch.no_grad() or use reference"
    return None


def _reverse_sweep(bwd_op, saved, options, g_task_losses, g_query_preds, need_lr: bool, need_x: bool):
    """`bwd_op` on the saved `(theta, lr, xs, ys, xq, yq, qw)` for these output cotangents (None: zeros):
    `(g_theta, g_lr, g_xs, g_xq)`."""
    theta, lr, xs, ys, xq, yq, qw = saved
    dims, activation, loss, first_order = options
    if g_task_losses is None:
        g_task_losses = torch.zeros(xs.shape[0], dtype=theta.dtype, device=theta.device)
    if g_query_preds is None:
        g_query_preds = torch.zeros(xq.shape[0], xq.shape[1], dims[-1], dtype=theta.dtype, device=theta.device)
    return bwd_op(theta, lr, xs, ys, xq, yq, qw, g_task_losses.contiguous(), g_query_preds.contiguous(),
                  dims, activation, loss, first_order, need_lr, need_x)


def register_fused_autograd(fwd_op, bwd_op) -> None:
    """Register `bwd_op` (the reverse sweep) as the autograd formula of `fwd_op`."""

    def setup_context(ctx, inputs, output):
        theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order = inputs
        ctx.save_for_backward(theta, lr, xs, ys, xq, yq, qw)
        ctx.options = (list(dims), activation, loss, first_order)

    def backward(ctx, g_task_losses, g_query_preds):
        need_lr = bool(ctx.needs_input_grad[1])
        need_x = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[4])
        g_theta, g_lr, g_xs, g_xq = _reverse_sweep(bwd_op, ctx.saved_tensors, ctx.options, g_task_losses,
                                                   g_query_preds, need_lr, need_x)
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
            "fastmaml: the cpu, cuda and triton kernels compute the meta-gradient once; differentiating it "
            "again (create_graph=True through fastmaml.maml) needs backend='reference' or 'factored', which "
            "differentiate through the inner loop"
        )

    torch.library.register_autograd(bwd_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


def register_train_autograd(train_op, bwd_op) -> None:
    """The autograd formula of a Python backend's `maml_train` (`triton_maml_train`), as the C++ one of
    csrc/autograd_fwdbwd.cpp: the op returns `(task_losses, preds, mean, g_theta, g_lr, g_xs, g_xq)`, the
    last four the gradients of the sum of the task losses. When only the mean has a cotangent (a
    training loop's `loss.backward()`), the gradients are those scaled by `g_mean / T`; any other
    cotangent, or create_graph=True (whose second derivative `bwd_op` refuses), runs `bwd_op`'s reverse
    sweep again."""

    def setup_context(ctx, inputs, output):
        theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order, need_lr, need_x = inputs
        ctx.mark_non_differentiable(*output[3:])
        ctx.set_materialize_grads(False)  # an unused output's cotangent arrives as None, not zeros
        ctx.save_for_backward(theta, lr, xs, ys, xq, yq, qw, *output[3:])
        ctx.options = (list(dims), activation, loss, first_order)
        ctx.flags = (need_lr, need_x)

    def backward(ctx, g_task_losses, g_query_preds, g_mean, *_):
        saved, (s_theta, s_lr, s_xs, s_xq) = ctx.saved_tensors[:7], ctx.saved_tensors[7:]
        need_lr, need_x = ctx.flags
        T = saved[2].shape[0]
        want = ctx.needs_input_grad
        want_lr = need_lr and bool(want[1])
        want_xs, want_xq = need_x and bool(want[2]), need_x and bool(want[4])
        if g_task_losses is None and g_query_preds is None and not torch.is_grad_enabled():
            w = g_mean / T
            g_theta, g_lr, g_xs, g_xq = s_theta * w, s_lr * w, s_xs * w, s_xq * w
        else:
            c = g_task_losses
            if g_mean is not None:
                c = g_mean.expand(T) / T if c is None else c + g_mean / T
            g_theta, g_lr, g_xs, g_xq = _reverse_sweep(bwd_op, saved, ctx.options, c, g_query_preds, want_lr,
                                                       want_xs or want_xq)
        return (g_theta if want[0] else None, g_lr if want_lr else None, g_xs if want_xs else None, None,
                g_xq if want_xq else None, *(None,) * 8)

    torch.library.register_autograd(train_op, backward, setup_context=setup_context)


def register_task_sum_autograd(task_sum_op) -> None:
    """`weighted_task_sum` is the internal reduction in the backward of maml_fwdbwd (whose autograd kernel
    is C++, csrc/autograd_fwdbwd.cpp): differentiating it raises."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError("fastmaml: weighted_task_sum is an internal reduction of the fused backward")

    torch.library.register_autograd(task_sum_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


@dataclass(frozen=True)
class SizeLimits:
    """The sizes a fused kernel runs; `size_limit_reason` names the one a call exceeds.

    max_layers:          linear layers (the kernel's network description has a fixed size)
    max_width:           units in any layer, input or output
    max_points:          support or query points per task
    max_points_x_width:  (points per task) x (widest hidden layer), or None for no such bound
    max_workspace_bytes: scratch of one worker (`workspace_bytes`: a CPU thread, a CUDA thread block)
    kernel, worker:      how the reasons name the kernel and its worker
    """

    max_layers: int
    max_width: int
    max_points: int
    max_points_x_width: Optional[int]
    max_workspace_bytes: int
    kernel: str
    worker: str


def workspace_bytes(dims: list[int], inner_steps: int, n_points: int, itemsize: int, op: str = "maml") -> int:
    """Bytes of scratch one worker of the C++/CUDA kernels uses for one task (csrc/task/drivers.h:
    `backward_workspace` with the rates' gradient, the larger case, for `maml`; `adapt_workspace` for
    `adapt`)."""
    P = sum(dims[i + 1] * dims[i] + dims[i + 1] for i in range(len(dims) - 1))
    width_sum = sum(dims[1:])
    if op == "adapt":
        return (n_points * (2 * width_sum + dims[-1]) + P) * itemsize
    K = inner_steps

    def padded(n: int) -> int:  # segments start on 64-byte boundaries (counts rounded up to 16)
        return (n + 15) // 16 * 16

    state = 2 * padded(n_points * width_sum) + padded(n_points * dims[-1])  # z (h in place), d, p
    tangents = 3 * padded(n_points * width_sum)  # in turn with the query state (tangents_or_query_size)
    grads = K  # g_0 .. g_{K-1} for the rates' gradient
    return (K * state + max(tangents, state) + (K + grads + 2) * padded(P)) * itemsize


def size_limit_reason(problem: Problem, limits: SizeLimits, op: str = "maml") -> Optional[str]:
    """Why this MLP problem is outside `limits`, or None."""
    dims, kernel = problem.dims, limits.kernel
    if len(dims) - 1 > limits.max_layers:
        return f"{len(dims) - 1} layers (the {kernel} runs at most {limits.max_layers})"
    if max(dims) > limits.max_width:
        return f"a layer of width {max(dims)} (the {kernel} runs widths up to {limits.max_width})"
    n_points = max(problem.n_support, problem.n_query if op == "maml" else 0)
    if n_points > limits.max_points:
        return f"{n_points} points per task (the {kernel} runs at most {limits.max_points})"
    hidden = max(dims[1:-1], default=max(dims))
    if limits.max_points_x_width is not None and n_points * hidden > limits.max_points_x_width:
        return (f"{n_points} points per task x width {hidden} = {n_points * hidden} (past "
                f"{limits.max_points_x_width} the reference backend's BLAS products are faster)")
    need = workspace_bytes(dims, problem.inner_steps, n_points, problem.params[0].element_size(), op)
    if need > limits.max_workspace_bytes:
        return (f"{need / 2**20:.0f} MiB of scratch per {limits.worker} for this size and inner_steps "
                f"(the {kernel} takes up to {limits.max_workspace_bytes >> 20} MiB)")
    return None


def fused_rows_bytes(problem: Problem, need_lr: bool) -> int:
    """Bytes of the per-task gradient rows a fused forward-and-backward keeps for the backward (`T x P`
    for theta, `T x K x P` for the rates when they need a gradient, and the inputs' rows)."""
    P = problem.num_params
    T, K = problem.num_tasks, problem.inner_steps
    per_task = P * (1 + (K if need_lr else 0)) + (problem.x_support.numel() + problem.x_query.numel()) // max(T, 1)
    return T * per_task * problem.params[0].element_size()


class FusedBackend:
    """The base of the fused backends: `reject` and `maml` / `adapt` through the flat operations.

    A subclass sets `name` and `device_type` and provides:
      unavailable()                  why it cannot run at all here (not built, no Triton, no GPU), or None
      limits, or size_limit_reason(problem, op)
                                     its kernels' sizes (`SizeLimits`), or why a call exceeds them
      forward_op(), adapt_op()       its `maml_fwd` and `maml_adapt` operations (flat arguments;
                                     `ExtensionBackend` gives the C++ library's)
    and may override:
      device_reason(problem)         why it cannot take tensors on this device (default: not its device)
      train(problem, tail, need_lr, need_x)
                                     a fused forward-and-backward for training calls, or None (default:
                                     none; the forward op with its reverse-sweep backward serves)
      max_fused_rows_bytes()         the per-task rows `train` may keep (fused_rows_bytes) before the
                                     forward op is used instead
    """

    name: str = ""
    device_type: str = ""
    limits: Optional[SizeLimits] = None

    def unavailable(self) -> Optional[str]:
        raise NotImplementedError

    def size_limit_reason(self, problem: Problem, op: str) -> Optional[str]:
        return size_limit_reason(problem, self.limits, op)

    def forward_op(self) -> Callable:
        raise NotImplementedError

    def adapt_op(self) -> Callable:
        raise NotImplementedError

    def device_reason(self, problem: Problem) -> Optional[str]:
        if problem.device.type != self.device_type:
            return f"tensors are on {problem.device} (the {self.name} backend runs {self.device_type.upper()} tensors)"
        return None

    def reject(self, problem: Problem, op: str) -> Optional[str]:
        return self.device_reason(problem) or common_reject(problem, op) or self.size_limit_reason(problem, op)

    def train(self, problem: Problem, tail: tuple, need_lr: bool, need_x: bool) -> Optional[tuple]:
        return None

    def max_fused_rows_bytes(self) -> int:
        return 0

    def maml(self, problem: Problem) -> tuple[torch.Tensor, ...]:
        """`(task_losses [T], query_preds [T, Nq, D_out])`, or with the mean loss third when `train` gives it."""
        tail = fused_tail_args(problem)
        if torch.is_grad_enabled():
            lr, xs, _, xq = tail[:4]
            need_lr, need_x = lr.requires_grad, xs.requires_grad or xq.requires_grad
            needed = need_lr or need_x or any(p.requires_grad for p in problem.params)
            limit = self.max_fused_rows_bytes() if needed else 0
            if limit and fused_rows_bytes(problem, need_lr) <= limit:
                out = self.train(problem, tail, need_lr, need_x)
                if out is not None:
                    return out
        return self.forward_op()(flat_theta(problem), *tail)

    def adapt(self, problem: Problem) -> list[torch.Tensor]:
        """The adapted parameters, each `[T, *param.shape]` (under no_grad: `common_reject` refuses
        differentiable calls)."""
        return unflatten(self.adapt_op()(*adapt_args(problem)), problem)


class ExtensionBackend(FusedBackend):
    """A fused backend whose operations are the C++ library's (`torch.ops.fastmaml.*`, one schema for
    every device: the dispatcher runs the kernels of the tensors' device)."""

    def forward_op(self) -> Callable:
        from .. import _ext

        _ext.load()
        return torch.ops.fastmaml.maml_fwd.default

    def adapt_op(self) -> Callable:
        from .. import _ext

        _ext.load()
        return torch.ops.fastmaml.maml_adapt.default
