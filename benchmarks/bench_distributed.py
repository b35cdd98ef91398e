"""Meta-iterations per second of the sinusoid training step for 1, 2, ... processes at a fixed global
meta-batch, with the all-reduce time shown apart.

    python benchmarks/bench_distributed.py --processes 1 2 --meta-batch 50 --iterations 300
    python benchmarks/bench_distributed.py --device cuda --processes 1 2 4 8 --meta-batch 4096

Each setting runs under `torchrun --standalone --nproc_per_node N` (gloo on the CPU, NCCL on GPUs) the
training step of `fastmaml train sinusoid`: every rank samples its `meta_batch / N` tasks, runs
`fastmaml.maml` and its backward, averages gradient and loss over the ranks (one all-reduce of one flat
buffer, `fastmaml.jobs.ranks.Ranks.mean_`) and steps Adam. On the CPU each process gets
`cores / N` torch threads (`--threads` overrides), so every setting uses the same cores. Rank 0 times
--iterations steps after --warmup untimed ones (a barrier before and after) and the all-reduce of each
step alone; the table gives iterations/s, the speed-up over the first setting and the all-reduce share.
--out writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    ap.add_argument("--meta-batch", type=int, default=50, help="global meta-batch (default 50)")
    ap.add_argument("--steps", type=int, default=1, help="inner steps K (default 1)")
    ap.add_argument("--iterations", type=int, default=300, help="timed meta-iterations (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed meta-iterations first (default 20)")
    ap.add_argument("--backend", default="auto", help="fastmaml backend (default auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default cores / N)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows to this CSV file")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # set for the ranks
    return ap.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One rank: time the training steps; rank 0 writes a JSON line to args.worker."""
    import torch.distributed as dist

    import fastmaml
    from fastmaml import jobs, sinusoid

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
    ranks = jobs.ranks.from_environment(device)
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks.world)
    torch.set_num_threads(threads)
    per_rank = args.meta_batch // ranks.world
    params = [p.requires_grad_() for p in sinusoid.init_params(torch.Generator(device).manual_seed(0),
                                                                 device=device)]
    tasks = torch.Generator(device).manual_seed(1 + 1_000_003 * ranks.rank)
    opt = torch.optim.Adam(params, lr=1e-3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(times: list[float] | None):
        batch = sinusoid.sample_batch(per_rank, 10, 10, tasks, device)
        out = fastmaml.maml(params, *batch, inner_steps=args.steps, inner_lr=0.01, backend=args.backend)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        loss = out.loss.detach().clone()
        if times is not None:
            sync()
            start = time.perf_counter()
        ranks.mean_([p.grad for p in params] + [loss.view(1)])
        if times is not None:
            sync()
            times.append(time.perf_counter() - start)
        opt.step()
        return out.backend

    for _ in range(args.warmup):
        backend = step(None)
    if ranks.world > 1:
        dist.barrier()
    sync()
    reduce_times: list[float] = []
    start = time.perf_counter()
    for _ in range(args.iterations):
        step(reduce_times)
    sync()
    if ranks.world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if ranks.is_main:
        row = {"processes": ranks.world, "threads": threads, "backend": backend, "seconds": seconds,
               "its_per_s": args.iterations / seconds, "allreduce_ms": 1e3 * sum(reduce_times) / len(reduce_times)}
        args.worker.write_text(json.dumps(row))
    jobs.ranks.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        print("torchrun is not installed beside this Python", file=sys.stderr)
        return 2
    for n in args.processes:
        if args.meta_batch % n:
            print(f"--meta-batch {args.meta_batch} does not split evenly over {n} processes", file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            result = Path(tmp) / f"n{n}.json"
            cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(n), __file__, "--worker", str(result),
                   "--device", args.device, "--meta-batch", str(args.meta_batch), "--steps", str(args.steps),
                   "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--backend", args.backend,
                   "--threads", str(args.threads)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0 or not result.exists():
                print(f"{n} process(es) failed:\n{run.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(result.read_text()))
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"sinusoid 1-40-40-1, global meta-batch {args.meta_batch}, K={args.steps}, second order, "
          f"{args.iterations} timed iterations, {name}, torch {torch.__version__}")
    print(f"{'processes':>9} {'threads':>7} {'backend':>9} {'it/s':>9} {'speed-up':>8} {'all-reduce':>12} {'share':>6}")
    base = rows[0]["its_per_s"]
    for r in rows:
        step_ms = 1e3 / r["its_per_s"]
        print(f"{r['processes']:>9} {r['threads']:>7} {r['backend']:>9} {r['its_per_s']:>9.1f} "
              f"{r['its_per_s'] / base:>7.2f}x {r['allreduce_ms']:>9.3f} ms {r['allreduce_ms'] / step_ms:>6.1%}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(args.out, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow([*rows[0], "meta_batch", "steps", "device", "date"])
            for r in rows:
                out.writerow([*r.values(), args.meta_batch, args.steps, name, date])
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
