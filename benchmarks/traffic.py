"""The memory traffic of one meta-iteration, counted op by op, and the time it takes at a bandwidth.

    python benchmarks/traffic.py --methods vmap factored cpu --steps 1 5 --width 40 128
    python benchmarks/traffic.py --measured results/gpu-h200/throughput-ea31a13.csv --bandwidth 4.8

Runs one meta-iteration of the benchmark workload (sinusoid tasks, 1-W-W-1 MLP, second order) per
method and cell, on the CPU, under a dispatch mode that sees every ATen operation (and fastmaml's own
ops, as one operation each). Each operation that moves data is charged the bytes of its tensor inputs
(read) and outputs (written); views, aliases and allocations move nothing and are not charged, a
broadcast input is charged its distinct elements only, and `zeros_like` and its kind only their output
(they read their input's shape alone). The sum per task, times `--scale-tasks` (65,536) and over
`--bandwidth` (TB/s), is the time the method would take if each operation went to memory once at full
bandwidth: a floor for an unfused method at a batch whose arrays do not fit in the cache (at T=65,536
every array of a task's worth of rows is tens of MB or more).

What it is for: a method whose measured time is a large fraction of its floor is bound by its traffic,
and only fewer bytes make it faster; a fused kernel's floor is its inputs and gradients alone, so its
time is set by its arithmetic and latency. With `--measured CSV` (the GPU sweep's throughput.csv)
each row also gets the measured time and the share of the bandwidth it reached.

Caveats: the count is of the CPU's path. Where a GPU runs one kernel for what the CPU does in several
operations (the `factored` backend's low-rank products are batched PyTorch products here, one CUDA or
Triton kernel each on a GPU), the GPU moves fewer bytes, so this is an upper bound for that method. The
per-task figure is from `--tasks` (512) tasks; the parameters' own traffic is spread over them.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import _harness as H


def distinct_bytes(t: torch.Tensor) -> int:
    """The bytes of `t`'s distinct elements: a broadcast (stride 0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


# Operations that move no data but whose schemas do not say so: a view without alias annotations, and
# allocations (the operation that fills the memory is charged for writing it).
NO_TRAFFIC = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def moves_data(func) -> bool:
    """False for views and aliases (every output an alias of an input, none written) and allocations."""
    if func.overloadpacket.__name__ in NO_TRAFFIC:
        return False
    returns = func._schema.returns
    if not returns:
        return True
    return not all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class TrafficCount(TorchDispatchMode):
    """Counts, per operation name, the calls and the bytes read and written (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if moves_data(func):
            name = f"{func.namespace}::{func.overloadpacket.__name__}"
            # zeros_like and its kind read only their input's shape: their output is all they move.
            charged = out if name.endswith("_like") else (args, kwargs, out)
            tensors = [t for t in tree_flatten(charged)[0] if isinstance(t, torch.Tensor)]
            self.calls[name] += 1
            self.bytes[name] += sum(distinct_bytes(t) for t in tensors)
        return out


def count(method: str, T: int, K: int, width: int, first_order: bool) -> TrafficCount:
    """The traffic of one meta-iteration of `method` (after two uncounted ones: caches, plans)."""
    w = H.make_workload(T, K, width, first_order=first_order)
    step = H.make_step(method, w)
    step()
    step()
    counter = TrafficCount()
    with counter:
        step()
    return counter


def measured_ms(path: Path, scale_tasks: int) -> dict:
    """(method, K, width, order) -> the measured ms of a meta-iteration at T = scale_tasks."""
    out = {}
    for row in H.read_csv(path):
        if row.get("status") == "ok" and int(row["T"]) == scale_tasks and row.get("ms"):
            out[(row["method"], int(row["K"]), int(row["width"]), row["order"])] = float(row["ms"])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["vmap", "factored", "cpu"])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps K (one cell each)")
    p.add_argument("--width", type=int, nargs="+", default=[40, 128], help="hidden widths (one cell each)")
    p.add_argument("--order", choices=["first", "second"], default="second")
    p.add_argument("--tasks", type=int, default=512, help="tasks counted (the per-task figure is over them)")
    p.add_argument("--scale-tasks", type=int, default=65536, help="the batch the floor is given for")
    p.add_argument("--bandwidth", type=float, default=4.8, help="memory bandwidth in TB/s (H200: 4.8)")
    p.add_argument("--measured", type=Path, help="a throughput CSV: adds the measured ms and share")
    p.add_argument("--top", type=int, default=0, help="operations listed per row by bytes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    first_order = args.order == "first"
    measured = measured_ms(args.measured, args.scale_tasks) if args.measured else {}
    print(f"one meta-iteration, {args.order} order, counted at T={args.tasks} on the CPU; floor = bytes at "
          f"T={args.scale_tasks} / {args.bandwidth:g} TB/s")
    head = f"{'method':<10} {'K':>2} {'W':>4} {'ops':>6} {'KB/task':>9} {'floor ms':>9}"
    if measured:
        head += f" {'measured ms':>12} {'share':>6}"
    print(head)
    for K in args.steps:
        for width in args.width:
            for method in args.methods:
                c = count(method, args.tasks, K, width, first_order)
                per_task = sum(c.bytes.values()) / args.tasks
                floor_ms = per_task * args.scale_tasks / (args.bandwidth * 1e12) * 1e3
                line = f"{method:<10} {K:>2} {width:>4} {sum(c.calls.values()):>6} {per_task / 1e3:>9.1f} " \
                       f"{floor_ms:>9.2f}"
                ms = measured.get((method, K, width, args.order))
                if measured:
                    line += f" {ms:>12.2f} {100 * floor_ms / ms:>5.0f}%" if ms else f" {'-':>12} {'':>6}"
                print(line, flush=True)
                for name, b in c.bytes.most_common(args.top):
                    print(f"    {name:<34} {c.calls[name]:>5} calls {b / args.tasks / 1e3:>9.1f} KB/task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
