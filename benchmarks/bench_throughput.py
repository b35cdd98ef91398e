"""Meta-training throughput of fastmaml's backends against the peers (per-task loop, torch.func vmap,
higher), on the sinusoid workload of the MAML paper (see `_harness.py`).

    python benchmarks/bench_throughput.py --device cpu --tasks 25 256 4096 --steps 1 5 --out runs/cpu
    python benchmarks/bench_throughput.py --device cuda --tasks 25 1024 65536 --steps 1 5 --width 40 128 --out runs/gpu

For every setting (T tasks, K inner steps, width W) and every method: the method must first reproduce
the meta-gradient of fastmaml's reference backend (else its row is `failed` and it is not timed); then
warm-up calls and timed calls, reporting the median. A method that cannot run a setting (a backend the
dispatcher rejects, a library not installed) or would take longer than `--max-seconds` (estimated from
the same method at a smaller T) is `skipped` with the reason.

Writes DIR/throughput.csv (one row per method and setting, written as it goes) and DIR/throughput.png
(tasks/s vs T, log-log, one panel per K and width); prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

import _harness as H
import report

# Tasks the meta-gradient is checked on when the reference cannot hold the full setting in memory.
CHECK_TASKS = 4096
# A method with no measurement at a smaller T is first timed on a few tasks when T is above this.
PROBE_ABOVE = 256

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[25], help="T, tasks per meta-batch (one or more)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1], help="K, inner steps (one or more)")
    ap.add_argument("--width", type=int, nargs="+", default=[40], help="hidden width W of 1-W-W-1 (one or more)")
    ap.add_argument("--order", choices=["first", "second"], default="second")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"subset of the methods (default: every fastmaml backend + {' '.join(H.PEER_NAMES)}); "
                         "a backend named here runs even where `auto` would not use it")
    ap.add_argument("--out", type=Path, default=Path("runs/throughput"), help="output folder")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the checked first call")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls (the median is reported)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="time allowed to one method at one setting; longer ones are cut or skipped")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole sweep; settings left when it runs out are skipped")
    ap.add_argument("--memory", choices=["auto", "off"], default="auto",
                    help="peak memory per row (cuda: in this process; cpu: a fresh process per row)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    ap.add_argument("--rtol", type=float, default=None, help="meta-gradient tolerance (default: per dtype)")
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = H.parse_dtype(args.dtype)
    rtol = args.rtol if args.rtol is not None else H.TOLERANCE[dtype]
    methods = args.methods or H.all_methods()
    explicit = set(args.methods or [])
    env = H.environment(device)
    writer = H.CsvWriter(args.out / "throughput.csv", H.CSV_COLUMNS)
    reported: set[str] = set()
    estimator = H.Estimator()
    rows: list[dict] = []
    deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | fastmaml "
          f"{env['fastmaml']} ({env['commit']}) | {args.order} order, {args.dtype}", flush=True)
    H.warm_up(device)

    for K, width, T in itertools.product(sorted(args.steps), sorted(args.width), sorted(args.tasks)):
        w = H.make_workload(T, K, width, first_order=H.parse_order(args.order), device=args.device, dtype=dtype)
        base = dict(env, T=T, K=K, width=width, order=w.order)
        check = None
        for method in methods:
            row = dict(base, method=method, status="ok", note="")
            note = _skip_reason(method, w, explicit, estimator, args, deadline)
            if note is not None:
                row.update(status="skipped", note=note)
            else:
                if check is None:
                    check = _oracle(w)
                row.update(_measure(method, w, check, rtol, args, estimator))
            H.release(w.device)
            row["load1"] = H.load_average()
            rows.append(row)
            writer.add(row)
            _progress(row)
            if method == "triton" and row["status"] == "ok" and w.device.type == "cuda":
                _print_new_triton_kernels(reported)
        del check, w
        H.release(torch.device(args.device))
    return rows


def _oracle(w):
    """`(workload to check on, reference result, note)`: the full setting, or, where the reference
    backend cannot hold the full setting in memory, its first CHECK_TASKS tasks."""
    try:
        return w, H.reference_result(w), ""
    except Exception as err:
        if not H.is_oom(err):
            raise
    H.release(w.device)
    small = H.head(w, min(w.T, CHECK_TASKS))
    return small, H.reference_result(small), f"checked on the first {small.T} tasks (reference out of memory at T={w.T})"


def _skip_reason(method, w, explicit, estimator, args, deadline):
    why = H.why_not(method, w, explicit=method in explicit)
    if why is not None:
        return why
    if deadline is not None and time.perf_counter() > deadline:
        return "sweep time budget spent"
    est = estimator.estimate_s(method, w)
    far = (est is not None and args.max_seconds < est <= 32 * args.max_seconds
           and estimator.largest_t(method, w) < w.T // 8)
    if w.T > PROBE_ABOVE and (est is None or far):
        # No estimate, or one that would skip the setting but comes from far smaller batches only (T=25
        # before T=65,536 in the GPU check's quick sweep: proportional to T, it overstates a batched
        # method's time by the fixed cost per call times 2,600): time the method on a 64th and a 16th of
        # the tasks, and draw the line through those. Not where even that estimate says the probe
        # itself would take long (a task loop, whose time does grow with T).
        sizes = (16, 64) if est is None else (max(w.T // 64, 1), max(w.T // 16, 1))
        try:
            estimator.probe(method, w, sizes)
        except Exception as err:  # the measurement proper will report it
            print(f"  ({method}: probe on a few tasks failed: {type(err).__name__})", flush=True)
        est = estimator.estimate_s(method, w)
    if est is not None and est > args.max_seconds:
        return f"estimated {est:.0f} s per call (> --max-seconds {args.max_seconds:g})"
    if deadline is not None and est is not None and time.perf_counter() + est > deadline:
        return f"estimated {est:.0f} s per call, past the sweep time budget"
    return None


def _measure(method, w, check, rtol, args, estimator) -> dict:
    check_w, oracle, check_note = check
    try:
        step = H.make_step(method, w)
        result = H.make_step(method, check_w)() if check_w is not w else None
        timing = H.measure(step, w.device, warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds)
    except Exception as err:  # a method that raises is a failed row, not a failed sweep
        status = "oom" if H.is_oom(err) else "failed"
        return dict(status=status, note=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    err = H.rel_error(result if result is not None else timing.result, oracle)
    out = dict(rel_err=f"{err:.2e}", repeats=timing.repeats, note=check_note, first_ms=f"{timing.first_ms:.4g}")
    estimator.add(method, w, timing.ms)
    if not err <= rtol:  # also catches NaN
        return dict(out, status="failed", note=f"meta-gradient differs from reference: rel err {err:.2e} > {rtol:g}")
    out.update(ms=f"{timing.ms:.4g}", tasks_per_s=f"{w.T / (timing.ms / 1e3):.6g}")
    del timing
    if method == "cuda":  # what the GPU made of the launch: tasks in flight explain a latency-bound speed
        out["launch"] = H.cuda_launch_note(w)
        out["note"] = "; ".join(n for n in (out["note"], out["launch"]) if n)
    if args.memory == "auto":
        if w.device.type == "cuda":
            H.release(w.device)
            try:
                out["peak_mem_mb"] = f"{H.cuda_peak_mb(step, w.device):.4g}"
            except Exception as err:  # the timing stands; only the memory figure is missing
                out["note"] = "; ".join(n for n in (out["note"], f"memory not measured ({type(err).__name__})") if n)
        else:
            # Generous: a child may have to build the C++ extension when its sources just changed.
            budget = max(180.0, 4 * float(out["ms"]) / 1e3 + 60)
            peak, note = H.subprocess_peak_mb(method, w, timeout_s=budget)
            if peak is not None:
                out["peak_mem_mb"] = f"{peak:.4g}"
            out["note"] = "; ".join(n for n in (out["note"], note) if n)
    return out


def _print_new_triton_kernels(reported: set[str]) -> None:
    """The Triton kernels compiled since the last call (registers, spills, warps), printed at once: an A/B
    run ends by its timeout more often than not, and the switches of a variant (FASTMAML_TRITON_WARPS,
    _MAXNREG) show here."""
    from fastmaml.backends import _triton_targets

    for line in _triton_targets.compiled_report():
        if line not in reported:
            reported.add(line)
            print(f"    triton kernel compiled: {line}", flush=True)


def _progress(row: dict) -> None:
    if row["status"] == "ok":
        print(f"  {row['method']:<10} T={row['T']:<6} K={row['K']} W={row['width']:<4} "
              f"{float(row['tasks_per_s']):>12,.0f} tasks/s  {float(row['ms']):>10.3f} ms  "
              f"(rel err {row['rel_err']}, {row['repeats']} runs, first call {float(row['first_ms']):,.0f} ms)",
              flush=True)
        if row.get("launch"):
            print(f"    {row['launch']}", flush=True)
    else:
        print(f"  {row['method']:<10} T={row['T']:<6} K={row['K']} W={row['width']:<4} "
              f"{row['status']}: {row['note']}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print()
    print(report.text_table(rows))
    if args.device.startswith("cuda") and any(r["method"] == "triton" and r["status"] == "ok" for r in rows):
        # What the Triton kernels that ran were compiled to (registers, spills, warps): the switches
        # of an A/B variant (FASTMAML_TRITON_WARPS, _MAXNREG) change them.
        from fastmaml.backends import _triton_targets

        print("\n".join(["", "triton kernels compiled in this run:", *_triton_targets.compiled_report()]))
    try:
        report.plot(rows, args.out / "throughput.png")
        print(f"\nwrote {args.out / 'throughput.csv'} and {args.out / 'throughput.png'}")
    except Exception as err:  # the CSV is the result; a missing plot must not hide it
        print(f"\nwrote {args.out / 'throughput.csv'}; plot failed: {err}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
