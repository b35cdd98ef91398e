"""Where one meta-iteration's GPU time goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_kernels.py --methods cuda triton vmap --tasks 65536 --steps 5 --width 128

For each cell of `--steps` x `--width` and each method: one meta-iteration (forward and
`torch.autograd.grad`) of the benchmark workload (sinusoid tasks, 1-W-W-1 MLP, second order unless
`--order first`), run `--warmup` times, then `--iters` times under torch.profiler; prints each method's
wall time per iteration and its kernels by total GPU time (calls, total, share). The figures are per
iteration. Under Nsight Compute, run it with `--no-profiler --iters 1` and a kernel filter, e.g.

    ncu --kernel-name regex:"bwd_kernel|maml_bwd" --launch-count 1 --section SpeedOfLight \\
        --section Occupancy --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_kernels.py --methods cuda --tasks 8192 --no-profiler --iters 1

`benchmarks/gpu_check.sh` runs it on G2's cell T=65,536, K=5, W=128 (PROFILE_ARGS picks others).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import _harness as H


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["cuda", "triton", "vmap"])
    p.add_argument("--tasks", type=int, default=65536)
    p.add_argument("--steps", type=int, nargs="+", default=[5], help="inner steps K (one cell each)")
    p.add_argument("--width", type=int, nargs="+", default=[128], help="hidden widths (one cell each)")
    p.add_argument("--order", choices=["first", "second"], default="second")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=8, help="kernels listed per method")
    p.add_argument("--no-profiler", action="store_true", help="only run (for ncu or nsys around it)")
    return p.parse_args(argv)


def kernel_table(prof, iters: int, top: int) -> list[str]:
    """The GPU kernels of a profile by total device time, per iteration."""
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    if not events:
        return ["  no GPU kernels recorded (a CPU device, or the profiler saw no CUDA activity)"]
    total = sum(e.device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    lines = [f"  {'kernel':<60} {'calls':>6} {'us/iter':>10} {'share':>6}"]
    for e in events[:top]:
        lines.append(f"  {e.key[:60]:<60} {e.count // max(iters, 1):>6} {e.device_time_total / iters:>10.1f} "
                     f"{100 * e.device_time_total / total:>5.1f}%")
    lines.append(f"  {'all kernels':<60} {'':>6} {total / iters:>10.1f}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch (--device cpu profiles on the CPU)")
    failed = 0
    for steps in args.steps:
        for width in args.width:
            failed += profile_cell(args, device, steps, width)
    return 1 if failed else 0


def profile_cell(args, device: torch.device, steps: int, width: int) -> int:
    """Profiles every method at one (K, W); returns how many methods failed."""
    w = H.make_workload(args.tasks, steps, width, first_order=H.parse_order(args.order), device=args.device)
    print(f"# {H.device_name(device)} | torch {torch.__version__} | T={args.tasks} K={steps} "
          f"W={width} {w.order} order | commit {H.commit()}", flush=True)
    failed = 0
    for method in args.methods:
        why = H.why_not(method, w, explicit=True)
        if why is not None:
            print(f"{method}: skipped: {why}")
            continue
        try:
            step = H.make_step(method, w)
            for _ in range(args.warmup):
                step()
            H.sync(device)
            t0 = time.perf_counter()
            if args.no_profiler:
                for _ in range(args.iters):
                    step()
                H.sync(device)
                print(f"{method}: {1e3 * (time.perf_counter() - t0) / args.iters:.2f} ms per iteration")
                continue
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.iters):
                    step()
                H.sync(device)
            wall = (time.perf_counter() - t0) / args.iters
            print(f"{method}: {1e3 * wall:.2f} ms per iteration (under the profiler)")
            print("\n".join(kernel_table(prof, args.iters, args.top)), flush=True)
        except Exception as err:  # noqa: BLE001 (one method failing must not hide the others' profiles)
            failed += 1
            print(f"{method}: failed: {type(err).__name__}: {str(err)[:300]}")
        finally:
            H.release(device)
    return failed


if __name__ == "__main__":
    sys.exit(main())
