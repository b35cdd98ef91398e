"""The MLP and the two losses, written once for the reference path, the public `mlp` and the tests.

Layout (nn.Linear): `params = [W1, b1, ..., WL, bL]`, `W_l [out, in]`, `b_l [out]`, optionally with
leading batch (task) dimensions on every tensor. Hidden layers use the activation, the last is linear.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
}
LOSSES = ("mse", "cross_entropy")


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """Evaluate the MLP. `x [..., N, D_in]` -> `[..., N, D_out]`; params may carry the same leading dims."""
    act = ACTIVATIONS[activation]
    h = x
    n_layers = len(params) // 2
    for layer in range(n_layers):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        h = torch.matmul(h, weight.transpose(-1, -2)) + bias.unsqueeze(-2)
        if layer < n_layers - 1:
            h = act(h)
    return h


def task_loss(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of one task. mse: `out, target [N, D]`, mean over points and dims; cross_entropy:
    `out [N, C]` logits, `target [N]` int64, mean over points."""
    if loss == "mse":
        if out.shape != target.shape:  # F.mse_loss would broadcast them (an [N, 1] output and [N] targets: [N, N])
            raise ValueError(f"loss='mse' needs the model's output and the targets in the same shape, got "
                             f"{list(out.shape)} and {list(target.shape)} per task (give y_support and y_query "
                             "as [T, N, D_out])")
        return F.mse_loss(out, target)
    # Same value as F.cross_entropy (mean over points), written with logsumexp and gather: under
    # torch.func.vmap, F.cross_entropy's batching rule makes it several times slower.
    picked = out.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(out, dim=-1) - picked).mean()


def init_mlp(dims: Sequence[int], generator: torch.Generator, device="cpu",
             dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """`[W1, b1, ...]` for an MLP of widths `dims`, drawn as nn.Linear's default initialisation: weights and
    biases `~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, drawn on the generator's device, then moved to `device`."""
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        for shape in ((fan_out, fan_in), (fan_out,)):
            u = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
            params.append(((2.0 * u - 1.0) * bound).to(device))
    return params
