"""The `cpu` backend: the fused C++ kernel (`torch.ops.fastmaml.*`, csrc/) on CPU tensors.

One call of `maml_fwd` runs the whole inner loop and query loss of every task; its registered backward
(`maml_bwd`) runs the exact reverse sweep with Hessian-vector products, reduced over tasks in a fixed
order. When autograd will need the meta-gradient (grad mode on, an input requiring grad) and the
per-task gradient rows fit in MAX_FUSED_ROWS_BYTES, one call of `maml_fwdbwd` runs the inner loop and
the reverse sweep together and keeps each task's gradient; the backward then only weighs those rows by
the task losses' cotangents (no recompute of the inner loop: 1.2-1.3x faster at T=256 on 2 cores). On
CPU tensors that call goes through `maml_train`, which takes the parameter list as it is and flattens it
(and splits its gradient) in C++ (docs/kernels.md).
Importing this module builds nothing: the extension is built or loaded on the first `unavailable()`
(fastmaml/_ext.py).

Size limits (`reject` names the one exceeded; `auto` then takes the reference backend):
    MAX_LAYERS          8 linear layers (the kernel's network description is a fixed-size struct)
    MAX_WIDTH           4096 units in any layer, input or output
    MAX_POINTS          65536 support or query points per task
    MAX_POINTS_X_WIDTH  32768 for (points per task) x (widest hidden layer): the kernel is built for MAML's
                        small per-task problems (its products are register-tiled loops, not BLAS); past
                        this the reference path's batched BLAS products are faster. Measured on one
                        core: 10 points x width 1024, the kernel 2.3x faster; 200 x 64, 1.15x faster;
                        500 x 128, the reference 1.6x faster; 1000 x 256, the reference 2.3x faster.
    MAX_WORKSPACE_BYTES 64 MiB of scratch per thread: the backward keeps about 2K + 2 copies of the
                        parameters and K + 1 sets of activations of one task, allocated once per thread;
                        the bound keeps that (times the thread count) small next to the data.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._validate import Problem
from ._fused import adapt_args, common_reject, flat_theta, fused_tail_args, unflatten

MAX_LAYERS = 8
MAX_WIDTH = 4096
MAX_POINTS = 65536
MAX_POINTS_X_WIDTH = 32768
MAX_WORKSPACE_BYTES = 64 << 20


def workspace_bytes(dims: list[int], inner_steps: int, n_points: int, itemsize: int, op: str = "maml") -> int:
    """Bytes of scratch one thread of the kernel uses (csrc/task/drivers.h: `backward_workspace` with the
    rates' gradient, the larger case, for `maml`; `adapt_workspace` for `adapt`)."""
    P = sum(dims[i + 1] * dims[i] + dims[i + 1] for i in range(len(dims) - 1))
    width_sum = sum(dims[1:])
    if op == "adapt":
        return (n_points * (6 * width_sum + dims[-1]) + P) * itemsize
    K = inner_steps

    def padded(n: int) -> int:  # segments start on 64-byte boundaries (counts rounded up to 16)
        return (n + 15) // 16 * 16

    state = 3 * padded(n_points * width_sum) + padded(n_points * dims[-1])
    tangents = 3 * padded(n_points * width_sum)
    grads = max(K, 1)  # inner_steps = 0 still keeps one gradient buffer
    return ((K + 1) * state + tangents + (K + grads + 2) * padded(P)) * itemsize


# The fused forward-and-backward (`maml_fwdbwd`) keeps every task's own gradient rows until the backward
# (T x P parameters, T x K x P rates when they need a gradient); above this it runs forward and backward
# apart (`maml_fwd`, then `maml_bwd` recomputing the inner loop), which keeps no per-task state.
MAX_FUSED_ROWS_BYTES = 256 << 20


def fused_rows_bytes(problem: Problem, need_lr: bool) -> int:
    """Bytes of the per-task gradient rows `maml_fwdbwd` keeps for the backward."""
    P = sum(p.numel() for p in problem.params)
    T, K = problem.num_tasks, problem.inner_steps
    per_task = P * (1 + (K if need_lr else 0)) + problem.x_support[0].numel() + problem.x_query[0].numel()
    return T * per_task * problem.params[0].element_size()


def size_limit_reason(problem: Problem, op: str = "maml") -> Optional[str]:
    """Why this MLP problem is outside the kernel's size limits, or None."""
    dims = problem.dims
    if len(dims) - 1 > MAX_LAYERS:
        return f"{len(dims) - 1} layers (the cpu kernel runs at most {MAX_LAYERS})"
    if max(dims) > MAX_WIDTH:
        return f"a layer of width {max(dims)} (the cpu kernel runs widths up to {MAX_WIDTH})"
    n_points = max(problem.n_support, problem.n_query)
    if n_points > MAX_POINTS:
        return f"{n_points} points per task (the cpu kernel runs at most {MAX_POINTS})"
    hidden = max(dims[1:-1], default=max(dims))
    if n_points * hidden > MAX_POINTS_X_WIDTH:
        return (f"{n_points} points per task x width {hidden} = {n_points * hidden} (past "
                f"{MAX_POINTS_X_WIDTH} the reference backend's BLAS products are faster)")
    need = workspace_bytes(dims, problem.inner_steps, n_points, problem.params[0].element_size(), op)
    if need > MAX_WORKSPACE_BYTES:
        return (f"{need / 2**20:.0f} MiB of scratch per thread for this size and inner_steps "
                f"(the cpu kernel takes up to {MAX_WORKSPACE_BYTES >> 20} MiB)")
    return None


class CpuBackend:
    """Fused C++ kernel for MLPs on CPU tensors, float32 and float64."""

    name = "cpu"

    def unavailable(self) -> Optional[str]:
        return _ext.unavailable()

    def reject(self, problem: Problem, op: str) -> Optional[str]:
        if problem.device.type != "cpu":
            return f"tensors are on {problem.device} (the cpu backend runs CPU tensors)"
        why = common_reject(problem, op)
        if why is not None:
            return why
        return size_limit_reason(problem, op)

    def maml(self, problem: Problem) -> tuple[torch.Tensor, ...]:
        _ext.load()
        tail = fused_tail_args(problem)
        if torch.is_grad_enabled() and self.fused_forward_backward(problem):
            lr, xs, _, xq = tail[:4]
            need_lr, need_x = lr.requires_grad, xs.requires_grad or xq.requires_grad
            need_theta = any(p.requires_grad for p in problem.params)
            if (need_theta or need_lr or need_x) and fused_rows_bytes(problem, need_lr) <= MAX_FUSED_ROWS_BYTES:
                if problem.device.type == "cpu":
                    # The parameter list goes to C++ as is (flattened and its gradient split there); the
                    # third output is the mean loss, whose gradient alone comes from the kernel's row sums.
                    return torch.ops.fastmaml.maml_train.default(problem.params, *tail, need_lr, need_x)
                # CUDA: the flat op, which has run on a GPU; maml_train (device-independent C++) has not yet.
                out = torch.ops.fastmaml.maml_fwdbwd.default(flat_theta(problem), *tail, need_lr, need_x)
                return out[0], out[1]
        return torch.ops.fastmaml.maml_fwd.default(flat_theta(problem), *tail)

    def fused_forward_backward(self, problem: Problem) -> bool:
        """Whether a training call of this problem may run `maml_fwdbwd` (its device has the kernel)."""
        return problem.device.type == "cpu"

    def adapt(self, problem: Problem) -> list[torch.Tensor]:
        _ext.load()
        return unflatten(torch.ops.fastmaml.maml_adapt.default(*adapt_args(problem)), problem)
