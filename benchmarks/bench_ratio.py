"""Speed ratios of methods measured in alternation, in one process: steadier than a sweep on a machine
whose speed drifts (a shared VM runs everything 1.5-2x slower for seconds at a time; a sweep times each
method once, one after another, so a slow phase during one method's calls skews its ratio).

    python benchmarks/bench_ratio.py --tasks 256 --steps 1 --methods cpu vmap --rounds 10
    python benchmarks/bench_ratio.py --device cuda --tasks 25 --steps 5 --methods cuda vmap

The workload is `_harness.py`'s (the MAML paper's sinusoid MLP 1-W-W-1, 10 + 10 points, second order
unless --order first). Every method first reproduces the reference backend's meta-gradient (else the
script stops). Then, for each round, each method in turn runs calls for about --seconds (at least
three) and records the median of that round; a slow phase then touches every method of the round
alike. Prints each method's median over rounds and, for each other method, the ratio of its time to
the first method's, round by round: min, median, max. --out writes the rounds as CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

import _harness as H


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--tasks", type=int, default=256, help="T tasks (default 256)")
    ap.add_argument("--steps", type=int, default=1, help="K inner steps (default 1)")
    ap.add_argument("--width", type=int, default=40, help="hidden width W (default 40)")
    ap.add_argument("--order", choices=["first", "second"], default="second")
    ap.add_argument("--methods", nargs="+", default=["cpu", "vmap"],
                    help="the first is the one the others are compared with (default: cpu vmap)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of alternation (default 10)")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per method per round (default 0.5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the rounds to this CSV file")
    return ap.parse_args(argv)


def timed_call(step, device: torch.device) -> float:
    """Seconds of one call (synchronised on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    w = H.make_workload(args.tasks, args.steps, args.width, first_order=args.order == "first",
                        device=args.device)
    oracle = H.reference_result(w)
    steps = {}
    for method in args.methods:
        why = H.why_not(method, w, explicit=True)
        if why is not None:
            print(f"{method}: cannot run this setting: {why}", file=sys.stderr)
            return 2
        step = H.make_step(method, w)
        err = H.rel_error(step(), oracle)
        if err > H.TOLERANCE[w.dtype]:
            print(f"{method}: meta-gradient differs from the reference backend (rel err {err:.2e})",
                  file=sys.stderr)
            return 1
        step()  # a warm-up call
        steps[method] = step

    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        medians = {}
        for method, step in steps.items():
            times = []
            started = time.perf_counter()
            while len(times) < 3 or time.perf_counter() - started < args.seconds:
                times.append(timed_call(step, device))
            medians[method] = statistics.median(times)
        rounds.append(medians)
        print(f"round {r + 1:>2}: " + "  ".join(f"{m} {t * 1e3:.3f} ms" for m, t in medians.items()),
              flush=True)

    first = args.methods[0]
    name = H.device_name(device)
    print(f"\nT={w.T} K={w.K} width={w.width} {w.order} order, {name}, {args.rounds} rounds of "
          f"~{args.seconds} s per method, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for method in args.methods:
        ms = [rd[method] * 1e3 for rd in rounds]
        print(f"  {method:<10} median {statistics.median(ms):.3f} ms  (rounds: {min(ms):.3f}-{max(ms):.3f})")
    for method in args.methods[1:]:
        ratios = [rd[method] / rd[first] for rd in rounds]
        print(f"  {first} vs {method}: {statistics.median(ratios):.2f}x faster (rounds: "
              f"{min(ratios):.2f}x-{max(ratios):.2f}x)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["round", *[f"{m}_ms" for m in args.methods], "T", "K", "width", "order", "device",
                          "date"])
            date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for i, rd in enumerate(rounds):
                out.writerow([i + 1, *[f"{rd[m] * 1e3:.4f}" for m in args.methods], w.T, w.K, w.width, w.order,
                              name, date])
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
