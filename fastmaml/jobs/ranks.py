"""The processes of a training job under `torchrun` (torch.distributed): who this process is, and the
few collectives a job needs. Without torchrun (no WORLD_SIZE in the environment) a job is one rank of a
world of one, and every collective is the identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place among the job's processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes output, logs and shows the progress bar."""
        return self.rank == 0

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place, with one all-reduce of one flat buffer
        (the meta-gradient is a mean over tasks: with equal shares, the mean of the ranks' means)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t [n_rank, ...]` concatenated along dim 0 in rank order (the counts may differ by
        rank), on every rank."""
        if self.world == 1:
            return t
        counts = [None] * self.world
        dist.all_gather_object(counts, int(t.shape[0]))
        padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank (what the other ranks pass is ignored)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (the first `count % world` ranks get one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def task_stream_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s stream of training tasks in a job seeded with `seed` (rank 0's is the
    one-process run's)."""
    return seed + 1 + 1_000_003 * rank


def split(meta_batch: int, world: int) -> int:
    """Each rank's share of the global meta-batch; `JobError` unless it splits evenly."""
    if meta_batch % world:
        from .checks import JobError

        raise JobError(f"--meta-batch {meta_batch} is the global meta-batch and must split evenly over the "
                       f"{world} processes")
    return meta_batch // world


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without it); `JobError` naming the variable
    when it is not a whole number."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        from .checks import JobError

        raise JobError(f"WORLD_SIZE must be a whole number of processes (torchrun sets it), got {text!r}") from None


def from_environment(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...) with gloo on the CPU
    or NCCL on CUDA devices; a world of one without it."""
    world = world_size()
    if world <= 1:
        return Ranks()
    if device.type == "cuda":
        # The object collectives (gather_objects, from_main) move their bytes through the current device:
        # each rank must have its own, or NCCL sees two ranks on one GPU.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
