"""The peers fastmaml is measured against, written in plain PyTorch independently of fastmaml.

Each peer computes one meta-iteration of MAML on an MLP: the mean over tasks of the query loss after
`inner_steps` SGD steps on each task's support set, and the meta-gradient of that loss with respect to
the shared parameters (exact second order, or first order: the inner gradients treated as constants).

- `loop`:   a Python loop over tasks, the inner gradients from `torch.autograd.grad(create_graph=True)`,
            one backward per task accumulated into the meta-gradient. This is what learn2learn's and
            higher's MAML examples do.
- `vmap`:   `torch.func.vmap` over tasks of a per-task inner loop written with `torch.func.grad`, the
            meta-gradient by `torch.autograd.grad` through it: the fastest plain PyTorch.
- `higher`: the `higher` library (`innerloop_ctx` with a differentiable SGD), a loop over tasks; only
            when `higher` is installed and works with this torch.

Shapes: `params = [W1, b1, ..., WL, bL]` (nn.Linear layout, `W_l [D_l, D_{l-1}]`), `x_support
[T, Ns, D_in]`, `y_support [T, Ns, D_out]`, `x_query [T, Nq, D_in]`, `y_query [T, Nq, D_out]`; mse loss,
ReLU on the hidden layers. Every peer returns `(loss [], grads)`, `grads[i]` shaped like `params[i]`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Step = Callable[[], tuple[Tensor, list[Tensor]]]


def mlp(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """`x [..., N, D_in]` -> `[..., N, D_out]`; ReLU between layers, the last layer linear."""
    h = x
    n_layers = len(params) // 2
    for layer in range(n_layers):
        h = h @ params[2 * layer].transpose(-1, -2) + params[2 * layer + 1]
        if layer < n_layers - 1:
            h = torch.relu(h)
    return h


def loop_step(params: list[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *,
              inner_steps: int, inner_lr: float, first_order: bool) -> Step:
    """The per-task loop peer. `params` must be leaves that require grad."""
    T = xs.shape[0]

    def step():
        grads = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        for t in range(T):
            theta = list(params)
            for _ in range(inner_steps):
                support = F.mse_loss(mlp(theta, xs[t]), ys[t])
                g = torch.autograd.grad(support, theta, create_graph=not first_order)
                theta = [p - inner_lr * gi for p, gi in zip(theta, g)]
            query = F.mse_loss(mlp(theta, xq[t]), yq[t]) / T
            # One backward per task (as learn2learn does): memory stays that of one task.
            for acc, g in zip(grads, torch.autograd.grad(query, params)):
                acc.add_(g)
            total = total + query.detach()
        return total, grads

    return step


def vmap_step(params: list[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *,
              inner_steps: int, inner_lr: float, first_order: bool) -> Step:
    """The torch.func peer: vmap over tasks of a torch.func.grad inner loop; the meta-gradient by
    torch.autograd through it. `params` must be leaves that require grad. (Differentiating with
    torch.func.grad_and_value instead gives the same numbers and was 25-30% slower on the CPU with
    torch 2.13 at T = 25..1024: the peer takes the faster way.)"""

    def support_loss(theta, x, y):
        return F.mse_loss(mlp(theta, x), y)

    inner_grad = torch.func.grad(support_loss)

    def task_loss(theta, x_s, y_s, x_q, y_q):
        for _ in range(inner_steps):
            g = inner_grad(theta, x_s, y_s)
            if first_order:
                g = [gi.detach() for gi in g]  # cuts the outer graph through the inner gradient only
            theta = [p - inner_lr * gi for p, gi in zip(theta, g)]
        return F.mse_loss(mlp(theta, x_q), y_q)

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def step():
        loss = batched(params, xs, ys, xq, yq).mean()
        return loss.detach(), list(torch.autograd.grad(loss, params))

    return step


def higher_unavailable() -> Optional[str]:
    """Why the `higher` peer cannot run here, or None."""
    try:
        import higher  # noqa: F401
    except Exception as err:  # ImportError, or an incompatibility with this torch at import time
        return f"the higher library is not usable ({type(err).__name__}: {err}); pip install higher"
    return None


def higher_step(params: list[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *,
                inner_steps: int, inner_lr: float, first_order: bool) -> Step:
    """The `higher` peer: a module holding copies of `params`, `innerloop_ctx` per task with a
    differentiable SGD. First order: the inner gradients are detached by `grad_callback`."""
    import higher

    dims = [params[0].shape[1]] + [params[2 * i].shape[0] for i in range(len(params) // 2)]
    layers: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device=params[0].device, dtype=params[0].dtype)
    with torch.no_grad():
        for mine, given in zip(model.parameters(), params):
            mine.copy_(given)
    model_params = list(model.parameters())
    opt = torch.optim.SGD(model_params, lr=inner_lr)
    T = xs.shape[0]
    callback = (lambda gs: [g.detach() for g in gs]) if first_order else None

    def step():
        for p in model_params:
            p.grad = None
        total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        for t in range(T):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]), grad_callback=callback)
                query = F.mse_loss(fmodel(xq[t]), yq[t]) / T
                query.backward()
            total = total + query.detach()
        return total, [p.grad for p in model_params]

    return step


PEERS: dict[str, Callable[..., Step]] = {"vmap": vmap_step, "loop": loop_step, "higher": higher_step}


def peer_unavailable(name: str) -> Optional[str]:
    """Why a peer cannot run at all here, or None."""
    if name == "higher":
        return higher_unavailable()
    return None
