"""The fused forward-and-backward of the cpu and cuda backends against their forward + reverse sweep.

A training call of `cpu` or `cuda` runs `maml_fwdbwd` (one pass per task, the per-task gradient rows
kept for the backward) when the rows fit in `fastmaml.backends.cpu.MAX_FUSED_ROWS_BYTES`; setting that
limit to 0 makes the same call run `maml_fwd` and then `maml_bwd` (which recomputes the inner loop).
This script times one meta-iteration (meta-loss and its gradient) both ways, same process, same inputs,
on the sinusoid workload of `_harness.py`, and checks that both give the same gradient.

    python benchmarks/bench_fused.py --device cpu --backend cpu --tasks 25 256 --steps 1 5
    python benchmarks/bench_fused.py --device cuda --backend cuda --tasks 25 1024 --steps 1 5 --width 40 128
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import _harness as H
from fastmaml.backends import cpu as cpu_backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="cpu or cuda (default: the device's)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[25, 256])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--width", type=int, nargs="+", default=[40])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend or ("cuda" if args.device.startswith("cuda") else "cpu")
    device = torch.device(args.device)
    limit = cpu_backend.MAX_FUSED_ROWS_BYTES
    print(f"# {H.device_name(device)} | torch {torch.__version__} | backend {backend} | second order, float32")
    print(f"{'T':>6} {'K':>2} {'W':>4} {'fused ms':>9} {'apart ms':>9} {'speed-up':>9} {'grad rel diff':>14}")
    status = 0
    for T, K, W in itertools.product(args.tasks, args.steps, args.width):
        w = H.make_workload(T, K, W, device=args.device)
        timings, results = {}, {}
        for mode, rows_limit in (("fused", limit), ("apart", 0)):
            cpu_backend.MAX_FUSED_ROWS_BYTES = rows_limit
            try:
                t = H.measure(H.make_step(backend, w), device, warmup=3, repeats=args.repeats, max_seconds=20)
            finally:
                cpu_backend.MAX_FUSED_ROWS_BYTES = limit
            timings[mode], results[mode] = t.ms, t.result
        diff = H.rel_error(results["fused"], results["apart"])
        if not diff < 1e-4:
            status = 1
        print(f"{T:>6} {K:>2} {W:>4} {timings['fused']:>9.3f} {timings['apart']:>9.3f} "
              f"{timings['apart'] / timings['fused']:>8.2f}x {diff:>14.2e}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
