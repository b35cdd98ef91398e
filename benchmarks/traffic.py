"""The memory traffic of one meta-iteration, counted op by op, and the time it takes at a bandwidth.

    python benchmarks/traffic.py --methods vmap factored cpu --steps 1 5 --width 40 128
    python benchmarks/traffic.py --measured benchmarks/results/gpu-h200/throughput-ea31a13.csv --bandwidth 4.8

Runs one meta-iteration of the benchmark workload (sinusoid tasks, 1-W-W-1 MLP, second order) per
method and cell, on the CPU, under a dispatch mode that sees every ATen operation (and fastmaml's own
ops, as one operation each). Each operation that moves data is charged the bytes it reads and writes,
by its schema (`charge`): its tensor arguments as read, those it writes in place or as `out=` as
written (and read too unless it overwrites them unread), its new outputs as written. Views, aliases and
allocations move nothing and are not charged, a broadcast or overlapping input is charged its distinct
elements, and `zeros_like` and its kind only their output (they read their input's shape alone).

The sum per task, times `--scale-tasks` (65,536) and over `--bandwidth` (TB/s), is the time the method
would take if each operation went to memory once at full bandwidth: a floor for a method of many kernels
at a batch whose arrays mostly miss the cache. At T=65,536 an array of 10 points x 40 floats a task is
105 MB, twice the H200's 50 MB L2; the arrays that would fit there ([T, 40], [T, 10, 10]) carry a few
per cent of the counts.

What it is for: a method whose measured time is a large fraction of its floor is bound by its traffic,
and only fewer bytes make it faster; a fused kernel's traffic is its inputs and outputs, so its time is
set by its arithmetic and latency. With `--measured CSV` (the GPU sweep's throughput.csv) each row also
gets the measured time and the floor's share of it.

Caveats: the count is of the CPU's path. Where a GPU runs other kernels for the same operation, it
moves other bytes: the `factored` backend's low-rank products are two batched PyTorch products here and
one CUDA or Triton kernel each on a GPU, which saves the small Gram matrix between them, but the CUDA
kernel also makes an expanded operand contiguous first. So for that method the count is an estimate of
the same order, not a bound. The per-task figure is from `--tasks` (512) tasks; the parameters' own
traffic is spread over them.
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
    """The bytes of `t`'s distinct elements: a broadcast (stride 0) dimension counts once, and no view
    counts more than its storage holds (an overlapping view, as `unfold` makes)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    storage = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    return min(n * t.element_size(), max(storage, 0))


def tensors_bytes(value) -> int:
    """The distinct bytes of every tensor in `value` (a tensor, a list of them, or anything else: 0)."""
    return sum(distinct_bytes(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


# Operations that move no data but whose schemas do not say so: views without alias annotations, and
# allocations (the operation that fills the memory is charged for writing it).
NO_TRAFFIC = {"_unsafe_view", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "empty", "empty_like",
              "empty_strided", "new_empty", "new_empty_strided"}
# Operations that read only their input's shape (`zeros_like` and its kind too): their output is all they move.
SHAPE_ONLY = {"new_zeros", "new_ones", "new_full"}
# In-place operations that overwrite their first argument without reading it.
WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}


def charge(func, args, kwargs, out):
    """The bytes `func` read and wrote in this call, or None where it moves nothing (a view, an alias, an
    allocation). By its schema: an argument it writes (`Tensor(a!)`: in place, an `out=`) is charged once
    as written, and once more as read unless the operation overwrites it without reading it (`out=`,
    `copy_`, `fill_`); every other tensor argument is charged as read; each return that is no alias of an
    argument is charged as written."""
    name = func.overloadpacket.__name__
    schema = func._schema
    if name in NO_TRAFFIC:
        return None
    written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
    if schema.returns and not any(written) and all(
            r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return None  # a view or an alias of an input
    total = 0
    if not (name in SHAPE_ONLY or name.endswith("_like")):
        for i, (arg, writes) in enumerate(zip(schema.arguments, written)):
            value = args[i] if i < len(args) and not arg.kwarg_only else (kwargs or {}).get(arg.name)
            b = tensors_bytes(value)
            reads = not writes or not (arg.is_out or (i == 0 and name in WRITE_ONLY))
            total += b * (int(writes) + int(reads))
    outs = out if len(schema.returns) > 1 else (out,)
    for ret, value in zip(schema.returns, outs):
        if ret.alias_info is None:  # a new tensor (a written argument's alias was charged above)
            total += tensors_bytes(value)
    return total


class TrafficCount(TorchDispatchMode):
    """Counts, per operation name, the calls and the bytes read and written (see `charge`)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        b = charge(func, args, kwargs, out)
        if b is not None:
            name = f"{func.namespace}::{func.overloadpacket.__name__}"
            self.calls[name] += 1
            self.bytes[name] += b
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
    first_order = H.parse_order(args.order)
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
