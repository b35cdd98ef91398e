"""The Omniglot job's networks (fastmaml/omniglot.py trains them): the MAML paper's MLP on the pixels, and
ANIL's conv backbone with its per-task batch norm and the MLP head adapted by the fused kernels."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import omniglot_data as data
from ._mlp import init_mlp

MLP_HIDDEN = (256, 128, 64, 64)
HEAD_HIDDEN = ()  # ANIL adapts the last layer: a linear head on the 64 features
CHANNELS = 64


class TaskBatchNorm(nn.Module):
    """Batch norm over each task's own images: `[T * N, C, H, W]` seen as T tasks of N images, each
    normalised with the mean and variance of its task (over images and positions, per channel), then
    scaled and shifted per channel. No running statistics: training and evaluation normalise alike, a task
    at a time, as the MAML paper's implementation does at test time (statistics from the task's support
    and query images together, so a task's query images are classified as a set)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, tasks: int) -> torch.Tensor:
        TN, C, H, W = x.shape
        N = TN // tasks
        # As one batch norm over N "images" of tasks * C channels: each (task, channel) pair normalised over
        # its task's images and positions. PyTorch's fused batch norm runs this 1.3x faster (forward and
        # backward of the backbone, 320 images, one CPU thread) than the same with var_mean on a 5-d view.
        y = x.view(tasks, N, C, H, W).transpose(0, 1).reshape(N, tasks * C, H, W)
        y = nn.functional.batch_norm(y, None, None, self.weight.repeat(tasks), self.bias.repeat(tasks),
                                     training=True, eps=self.eps)
        return y.view(N, tasks, C, H, W).transpose(0, 1).reshape(TN, C, H, W)


class Backbone(nn.Module):
    """Four blocks of 3x3 conv (padding 1), task batch norm, ReLU, 2x2 max-pool:
    `[T, N, 28, 28] -> [T, N, channels]`."""

    def __init__(self, channels: int = CHANNELS):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1) for i in range(4))
        self.norms = nn.ModuleList(TaskBatchNorm(channels) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, N = x.shape[:2]
        h = x.reshape(T * N, 1, *x.shape[2:])
        for conv, norm in zip(self.convs, self.norms):
            h = nn.functional.max_pool2d(torch.relu(norm(conv(h), T)), 2)
        return h.view(T, N, -1)


def backbone(channels: int = CHANNELS) -> Backbone:
    """The ANIL backbone (`Backbone`)."""
    return Backbone(channels)


class Network:
    """The model: for `anil` a backbone and the head `params`; for `mlp` only `params` (on the pixels).
    `features(x [T, N, 28, 28]) -> [T, N, D]` is what the adapted MLP sees."""

    def __init__(self, model: str, ways: int, generator: torch.Generator, device="cpu",
                 head_hidden: Sequence[int] = HEAD_HIDDEN):
        if model not in ("anil", "mlp"):
            raise ValueError(f"model must be 'anil' or 'mlp', got {model!r}")
        self.model = model
        self.backbone = None
        if model == "anil":
            # The layers' own init (on the CPU), seeded, without touching torch's RNG: the CPU generator's state
            # is restored after, and the CUDA generators are never seeded (torch.manual_seed would reseed them
            # all, which fork_rng(devices=[]) does not restore).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                self.backbone = backbone().to(device)
        dims = (CHANNELS, *head_hidden, ways) if model == "anil" else (data.SIZE * data.SIZE, *MLP_HIDDEN, ways)
        self.params = init_mlp(dims, generator, device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, N, 28, 28] -> [T, N, D]`; the backbone normalises each task over its own N images."""
        if self.backbone is None:
            return x.reshape(*x.shape[:2], -1)
        return self.backbone(x)

    def backbone_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.backbone is None:
            return [], []
        return list(self.backbone.parameters()), list(self.backbone.buffers())
