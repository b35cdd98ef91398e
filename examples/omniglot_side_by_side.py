"""ANIL on Omniglot two ways: a learn2learn-style loop over tasks, and the same training with fastmaml.MAML.

    python examples/omniglot_side_by_side.py --data DIR [--style loop|fastmaml] [--iterations N]

Both meta-train the same model (a conv backbone, and a 64-64-N MLP head adapted per task, ANIL-style) with
the same tasks and settings, and compute the same meta-gradient (tests/test_examples.py checks it in
float64).
The loop is what a learn2learn or higher user writes: per task, clone the head, adapt the clone with
differentiable SGD steps, add its query loss. With fastmaml the tasks of a meta-batch are one call.

    loop (per task)                                  fastmaml (all tasks at once)
    -----------------------------------------------  ---------------------------------------------
    for t in range(T):                               maml = fastmaml.MAML(head, inner_lr=0.4,
        fast = clone(head)                                  loss="cross_entropy")
        for _ in range(K):                           fs, fq = features(x_s, x_q)
            fast = adapt(fast, loss(fast, fs[t]))    out = maml(fs, y_s, fq, y_q)
        total += loss(fast, fq[t]) / T               out.loss.backward()
    total.backward()
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml import omniglot
from fastmaml import omniglot_data as data


def make_model(ways: int, seed: int = 0, dtype=torch.float32) -> tuple[nn.Module, nn.Sequential]:
    """The backbone (four conv blocks) and the head (64-64-N MLP) of ANIL."""
    torch.manual_seed(seed)
    backbone = omniglot.backbone().to(dtype)
    head = nn.Sequential(nn.Linear(omniglot.CHANNELS, 64), nn.ReLU(), nn.Linear(64, ways)).to(dtype)
    return backbone, head


def features(backbone: nn.Module, x_s: torch.Tensor, x_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query images `[T, N, 28, 28]` -> features `[T, N, 64]`, in one pass (the backbone
    normalises each task over its support and query images)."""
    both = backbone(torch.cat([x_s, x_q], dim=1))
    return both[:, : x_s.shape[1]], both[:, x_s.shape[1]:]


# ---- the learn2learn-style loop ------------------------------------------------------------------------


def clone(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as a dict that adaptation replaces (learn2learn's `clone()`): still
    connected to the originals, so the meta-gradient reaches them."""
    return dict(module.named_parameters())


def adapt(module: nn.Module, fast: dict[str, torch.Tensor], loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """One differentiable SGD step (learn2learn's `adapt()`): create_graph keeps the second-order terms."""
    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
    return {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}


def meta_loss_loop(backbone, head, batch, inner_steps: int = 1, inner_lr: float = 0.4) -> torch.Tensor:
    x_s, y_s, x_q, y_q = batch
    f_s, f_q = features(backbone, x_s, x_q)
    total = 0.0
    for t in range(x_s.shape[0]):
        fast = clone(head)
        for _ in range(inner_steps):
            support = F.cross_entropy(torch.func.functional_call(head, fast, (f_s[t],)), y_s[t])
            fast = adapt(head, fast, support, inner_lr)
        query = F.cross_entropy(torch.func.functional_call(head, fast, (f_q[t],)), y_q[t])
        total = total + query / x_s.shape[0]
    return total


# ---- the same with fastmaml ------------------------------------------------------------------------------


def meta_loss_fastmaml(backbone, maml: fastmaml.MAML, batch) -> torch.Tensor:
    x_s, y_s, x_q, y_q = batch
    f_s, f_q = features(backbone, x_s, x_q)
    return maml(f_s, y_s, f_q, y_q).loss


# ---- training ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the Omniglot zips (see fastmaml train omniglot)")
    parser.add_argument("--style", choices=["loop", "fastmaml"], default="fastmaml")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=32)
    args = parser.parse_args()

    meta_train, _, _, _ = omniglot.load_data(args.data)
    images = data.with_rotations(meta_train.as_float())
    backbone, head = make_model(args.ways)
    maml = fastmaml.MAML(head, inner_lr=0.4, inner_steps=1, loss="cross_entropy")
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for it in range(args.iterations):
        batch = data.sample_tasks(images, args.meta_batch, args.ways, args.shots, args.shots, g)
        opt.zero_grad()
        if args.style == "loop":
            loss = meta_loss_loop(backbone, head, batch)
        else:
            loss = meta_loss_fastmaml(backbone, maml, batch)
        loss.backward()
        opt.step()
        if it % 10 == 0:
            print(f"iteration {it:>5}  meta-loss {loss.item():.4f}")
    print(f"{args.style}: {args.iterations} iterations in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
