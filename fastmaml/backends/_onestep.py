"""One-step MAML with theta_1 never formed: the `maml_onestep` kernels (csrc/task/onestep.h).

Every task starts from theta_0 and takes one SGD step, so each adapted weight matrix is theta_0's less a
matrix of rank at most Ns, and a product with it is a product with the shared theta_0 plus a correction
through an `[Nq, Ns]` matrix of the task's own. The kernel runs one task per team (a warp on a GPU, one
thread on the CPU; the `triton` backend's form, `_triton_onestep.py`, a group of tasks a program) with theta_0
shared by every task, and returns, with each task's loss and query output,
the meta-gradient as factor rows per layer: `g[W_l | b_l] = sum_t U_lt^T V_lt` with `R = Nq + 2 Ns` rows a
task (`Nq` first order). The sum over tasks is one matrix product per layer, `[out, T R] x [T R, in + 1]`.

Each task's outer products `U_r^T V_r` are linear in the seed of its query backward. The training call's
forward runs the kernel with seed 1 for every task and sums the rows at once, chunk by chunk (at most
`MAX_FACTOR_BYTES` of rows at a time), into the gradients of the sum of the task losses: the usual
`loss.backward()` (`loss` the mean task loss, the third output) scales those sums and never reruns the kernel.
Where every task's rows fit in `MAX_FACTOR_BYTES` the forward also keeps them, so a cotangent of the task
losses scales each task's U rows; past it, and for a cotangent of the query outputs (both seeds), the backward
reruns the kernel in chunks.

Takes MLP problems with one inner step, the mse or cross-entropy loss, relu or tanh, one rate per tensor (a
number, one tensor, or `[1, 1, ...]` per tensor; learned or not: the kernel gives each task's gradient in its
2 L rates, `-<v_l, g_l>` from the same two Gram matrices), inputs and targets that need no gradient, and no
per-step query-loss weights; `reason` says which of these a call misses.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from .._mlp import ACTIVATIONS
from .._switches import env_int
from .._validate import Problem
from ._fused import flat_theta

# Factor rows the training call's forward may keep for its backward, and hold at once while summing them, in
# bytes: above it a backward with per-task cotangents reruns the kernel chunk by chunk.
# FASTMAML_ONESTEP_KEEP_MB sets it (read once, at import).
MAX_FACTOR_BYTES = env_int("FASTMAML_ONESTEP_KEEP_MB", 1024, lambda n: n >= 0, "a whole number of MiB, 0 or more") << 20

_ACTIVATION_IDS = {"relu": 0, "tanh": 1}
_LOSS_IDS = {"mse": 0, "cross_entropy": 1}
MAX_WORKSPACE_BYTES = 16 << 20  # a task's scratch (a warp's, global memory where shared memory lacks room)


def workspace_bytes(dims: list[int], ns: int, nq: int, itemsize: int, activation: str = "tanh") -> int:
    """A task's scratch: csrc/task/onestep.h's `layout` (segments rounded up to 16 elements): H, D, H', and
    D' in a place of max(Ns, Nq) points that Ddot takes after it; with tanh also h_dot and z_dot (with ReLU
    they take D's place). tests/test_onestep.py compares it with the layout's."""
    def padded(n: int) -> int:
        return (n + 15) // 16 * 16

    S, L = sum(dims[1:]), len(dims) - 1
    points = [ns, ns, nq, max(ns, nq)] + ([ns, ns] if activation == "tanh" else [])
    return itemsize * (sum(padded(n * S) for n in points) + 2 * padded(L * nq * ns) + padded(S))


def reason(problem: Problem, need_lr: bool, need_x: bool) -> Optional[str]:
    """Why the one-step kernels cannot run this call, or None. `need_lr` is taken as the other backends' checks
    take it; the kernels give the rates' gradient, so it refuses nothing."""
    if not problem.is_mlp:
        return "not an MLP"
    if torch.compiler.is_compiling():
        return "under torch.compile (maml_onestep has no fake kernel to trace)"
    if problem.inner_steps != 1:
        return f"{problem.inner_steps} inner steps (the one-step kernels take one)"
    if problem.activation not in _ACTIVATION_IDS:
        return f"the {problem.activation} activation (the one-step kernels take relu and tanh)"
    if problem.dtype not in (torch.float32, torch.float64):
        return f"dtype {problem.dtype}"
    if problem.query_loss_weights is not None:
        return "per-step query-loss weights"
    if need_x:
        return "the inputs need a gradient"
    if problem.y_support.requires_grad or problem.y_query.requires_grad:
        return "the targets need a gradient"
    if problem.n_support < 1 or problem.n_query < 1:
        return "no support or no query points"
    dims = problem.dims
    L, width_sum = len(dims) - 1, sum(dims[1:])
    ns, nq = problem.n_support, problem.n_query
    if max(ns, nq) * width_sum >= 1 << 31 or L * ns * nq >= 1 << 31:
        return "a task's activations or its [Nq, Ns] products of 2^31 elements or more"
    scratch = workspace_bytes(dims, ns, nq, problem.params[0].element_size(), problem.activation)
    if scratch > MAX_WORKSPACE_BYTES:
        return (f"{scratch >> 20} MiB of scratch a task (the one-step kernels take up to "
                f"{MAX_WORKSPACE_BYTES >> 20} MiB)")
    if problem.inner_lr_form == "list":
        for i, r in enumerate(problem.inner_lr):
            if any(size > 1 and stride != 0 for size, stride in zip(r.shape[1:], r.stride()[1:])):
                return f"inner_lr[{i}] gives each element of params[{i}] its own rate (Meta-SGD)"
    return None


assert set(_ACTIVATION_IDS) <= set(ACTIVATIONS)


def rates(problem: Problem) -> torch.Tensor:
    """`[2 L]`: the rate of each parameter tensor (W_0, b_0, W_1, ...) at the one step, differentiable in the
    user's rates (their gradient is the kernel's rate_grads summed over tasks, then autograd's through this)."""
    n = len(problem.params)
    if problem.inner_lr_value is not None:
        return torch.full((n,), problem.inner_lr_value, dtype=problem.dtype, device=problem.device)
    if problem.inner_lr_tensor is not None:
        return problem.inner_lr_tensor.reshape(-1)[:1].expand(n).to(problem.dtype).contiguous()
    return torch.stack([r[(0,) * r.dim()] for r in problem.inner_lr]).to(problem.dtype)


def transposed(problem: Problem) -> torch.Tensor:
    """`[P]`: theta_0 with each weight matrix transposed (`W_l^T [in, out]` in W_l's place)."""
    parts = []
    for p in problem.params:
        parts.append(p.detach().t().reshape(-1) if p.dim() == 2 else p.detach().reshape(-1))
    return torch.cat(parts)


def factor_rows(ns: int, nq: int, first_order: bool) -> int:
    """R, a task's factor rows: `Nq` query rows, and `2 Ns` more at second order (onestep.h's factor_rows)."""
    return nq if first_order else nq + 2 * ns


def row_bytes(dims: list[int], ns: int, nq: int, first_order: bool, itemsize: int) -> int:
    """Bytes of one task's factor rows: R rows of `D_{l+1} + D_l + 1` a layer."""
    return factor_rows(ns, nq, first_order) * sum(dims[l + 1] + dims[l] + 1 for l in range(len(dims) - 1)) * itemsize


class _Call(NamedTuple):
    theta: torch.Tensor
    theta_t: torch.Tensor
    rates: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    dims: list[int]
    activation: int
    loss: int
    first_order: bool
    # The kernel: None for the C++ op (`torch.ops.fastmaml.maml_onestep`), else a function with its
    # arguments less theta_t and its outputs (the Triton kernel's launch, `_triton_onestep_call.run`).
    kernel: Optional[Callable] = None

    def run(self, lo: int, hi: int, cot: Optional[torch.Tensor], g_pred: Optional[torch.Tensor], factors: bool):
        """The kernel on tasks lo..hi-1: (losses, preds, U, V, rate_grads)."""
        data = (self.xs[lo:hi], self.ys[lo:hi], self.xq[lo:hi], self.yq[lo:hi], cot, g_pred, self.dims,
                self.activation, self.loss, self.first_order, factors)
        if self.kernel is not None:
            return self.kernel(self.theta, self.rates, *data)
        return torch.ops.fastmaml.maml_onestep.default(self.theta, self.theta_t, self.rates, *data)

    def rows(self) -> int:
        return factor_rows(self.xs.shape[1], self.xq.shape[1], self.first_order)

    def row_bytes(self) -> int:
        """Bytes of one task's factor rows."""
        return row_bytes(self.dims, self.xs.shape[1], self.xq.shape[1], self.first_order, self.theta.element_size())

    def layer_grads(self, U: torch.Tensor, V: torch.Tensor, n_tasks: int, scale: Optional[torch.Tensor]):
        """`[out, in + 1]` per layer: sum over the tasks of `U^T V`, each task's rows times `scale[t]` (None: 1)."""
        R, d = self.rows(), self.dims
        out, uo, vo = [], 0, 0
        for l in range(len(d) - 1):
            du, dv = d[l + 1], d[l] + 1
            u = U[n_tasks * R * uo:n_tasks * R * (uo + du)]
            v = V[n_tasks * R * vo:n_tasks * R * (vo + dv)].view(n_tasks * R, dv)
            if scale is not None:
                u = (u.view(n_tasks, R * du) * scale[:, None])
            out.append(u.reshape(n_tasks * R, du).t().mm(v))
            uo, vo = uo + du, vo + dv
        return out


def _split(grads: list[torch.Tensor], shapes: list[torch.Size], needs: tuple) -> tuple:
    """The per-layer `[out, in + 1]` sums as the gradients of W_l and b_l (None where none is needed)."""
    result = []
    for l, g in enumerate(grads):
        w, b = shapes[2 * l], shapes[2 * l + 1]
        result.append(g[:, :w[1]].contiguous() if needs[2 * l] else None)
        result.append(g[:, w[1]].reshape(b).contiguous() if needs[2 * l + 1] else None)
    return tuple(result)


def chunk_tasks(n_tasks: int, task_row_bytes: int) -> int:
    """Tasks a kernel run of a training call's forward (and of a rerun backward) takes: at most
    `MAX_FACTOR_BYTES` of factor rows, at least one task."""
    return max(1, min(n_tasks, MAX_FACTOR_BYTES // max(task_row_bytes, 1)))


def keeps_rows(n_tasks: int, task_row_bytes: int) -> bool:
    """Whether the training call's forward keeps every task's rows for its backward (all fit in the budget)."""
    return n_tasks * task_row_bytes <= MAX_FACTOR_BYTES


def _summed(call: _Call, cot: Optional[torch.Tensor], g_preds: Optional[torch.Tensor]):
    """The kernel over every task in chunks of at most `MAX_FACTOR_BYTES` of rows (at least one task), each
    chunk's rows summed into the layers' `[out, in + 1]` gradients as soon as it is done (in chunk order):
    `(losses, preds, layer sums, rate sums)`. `cot` None: every task's seed is 1."""
    T = call.xs.shape[0]
    chunk = chunk_tasks(T, call.row_bytes())
    losses, preds, grads, g_rates = [], [], None, None
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        c = None if cot is None else cot[lo:hi].contiguous()
        gp = None if g_preds is None else g_preds[lo:hi].contiguous()
        chunk_losses, chunk_preds, U, V, rate_grads = call.run(lo, hi, c, gp, True)
        part, part_rates = call.layer_grads(U, V, hi - lo, None), rate_grads.sum(0)
        del U, V  # the next chunk's rows take their place
        grads = part if grads is None else [a + b for a, b in zip(grads, part)]
        g_rates = part_rates if g_rates is None else g_rates + part_rates
        losses.append(chunk_losses)
        preds.append(chunk_preds)
    cat = (lambda parts: parts[0]) if len(losses) == 1 else torch.cat
    return cat(losses), cat(preds), grads, g_rates


class _OneStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, differentiable: bool, rates: torch.Tensor, *params):
        # `differentiable` comes from the caller: inside forward grad mode is off, and needs_input_grad
        # says only which inputs require grad, also under no_grad (where no backward will come). `rates`
        # is call.rates, an input here so that the user's rates get their gradient.
        #
        # A training call's forward sums every task's rows itself (seed 1: the gradients of the sum of the task
        # losses), so the usual `loss.backward()` (the mean loss's cotangent alone) only scales those sums: no
        # rows kept, no second run of the kernel at any T. Rows are kept besides where they all fit in
        # MAX_FACTOR_BYTES, for a cotangent of the task losses themselves; past it such a backward reruns the
        # kernel (as does one of the query outputs).
        T = call.xs.shape[0]
        keep = differentiable and keeps_rows(T, call.row_bytes())
        ctx.U = ctx.V = ctx.rate_grads = ctx.sums = ctx.rate_sums = None
        if keep:
            losses, preds, ctx.U, ctx.V, ctx.rate_grads = call.run(0, T, None, None, True)
            ctx.sums, ctx.rate_sums = call.layer_grads(ctx.U, ctx.V, T, None), ctx.rate_grads.sum(0)
        elif differentiable:
            losses, preds, ctx.sums, ctx.rate_sums = _summed(call, None, None)
        else:
            losses, preds = call.run(0, T, None, None, False)[:2]
        ctx.call, ctx.keep = call, keep
        ctx.shapes = [p.shape for p in params]
        ctx.set_materialize_grads(False)
        return losses, preds, losses.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_losses, g_preds, g_loss):
        call, T = ctx.call, ctx.call.xs.shape[0]
        needs = ctx.needs_input_grad[3:]
        if g_losses is None and g_preds is None and g_loss is None:
            return (None,) * (3 + len(needs))
        if g_losses is None and g_preds is None:  # `loss.backward()`: the forward's sums, scaled
            scale = g_loss / T
            grads, g_rates = [s * scale for s in ctx.sums], ctx.rate_sums * scale
        else:
            cot = g_losses if g_losses is not None else torch.zeros(T, dtype=call.theta.dtype, device=call.theta.device)
            if g_loss is not None:
                cot = cot + g_loss / T
            if ctx.keep and g_preds is None:
                grads = call.layer_grads(ctx.U, ctx.V, T, cot)
                g_rates = (ctx.rate_grads * cot[:, None]).sum(0)
            else:
                _, _, grads, g_rates = _summed(call, cot, g_preds)
        # The rows go with this backward; a second one (retain_graph) reruns the kernel or scales the sums.
        ctx.U = ctx.V = ctx.rate_grads = None
        ctx.keep = False
        return (None, None, g_rates if ctx.needs_input_grad[2] else None, *_split(grads, ctx.shapes, needs))


def maml(problem: Problem, kernel: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(task_losses [T], query_preds [T, Nq, D_out], loss [])` of a call `reason` accepts, differentiable in
    the parameters; `loss` is the task losses' mean, whose cotangent alone needs no second kernel run.
    `kernel`: `_Call.kernel` (None: the C++ op)."""
    if kernel is None:
        from .. import _ext

        _ext.load()
    rate_vector = rates(problem)
    theta = flat_theta(problem).detach()
    call = _Call(theta, transposed(problem) if kernel is None else theta, rate_vector.detach(),
                 problem.x_support.detach().contiguous(), problem.y_support.detach().contiguous(),
                 problem.x_query.detach().contiguous(), problem.y_query.detach().contiguous(),
                 list(problem.dims), _ACTIVATION_IDS[problem.activation], _LOSS_IDS[problem.loss],
                 problem.first_order, kernel)
    differentiable = torch.is_grad_enabled() and (rate_vector.requires_grad
                                                  or any(p.requires_grad for p in problem.params))
    return _OneStep.apply(call, differentiable, rate_vector, *problem.params)


__all__ = ["MAX_FACTOR_BYTES", "MAX_WORKSPACE_BYTES", "chunk_tasks", "keeps_rows", "maml", "rates", "reason",
           "row_bytes", "transposed", "workspace_bytes"]
