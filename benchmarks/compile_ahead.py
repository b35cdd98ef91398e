"""The first call of every setting of a sweep, for the methods that compile Triton kernels on first use, run
in parallel processes before the sweep times anything.

    python benchmarks/compile_ahead.py --device cuda --tasks 25 1024 65536 --steps 1 5 --width 40 128 \\
        --methods cuda triton factored vmap [--jobs 8] [--variant "ENV=VALUE ...|METHOD|T|STEPS|WIDTHS" ...]

Takes the throughput benchmark's arguments (`bench_throughput.py`) and keeps what selects the settings. A
Triton kernel is compiled for each set of its compile-time constants and each specialisation of its integer
and pointer arguments (divisible by 16, equal to 1), so the sweep's `triton` and `factored` rows compile
several kernels each (the training kernel took 7.5 s at width 40 and 9.0 s at width 128 for sm_90 on this
project's 2-core machine), one after another inside the sweep's time limit, on a machine whose other cores
wait. Here each (method, T, K, width) is one call in a process of its own, all cores at once; the kernels land
in Triton's on-disk cache, where the sweep's first calls then find them. The calls are made exactly as the
sweep makes them (`_harness.make_workload` and `make_step`), so their arguments specialise alike. Nothing is
timed or checked here: a call that fails is reported and the sweep reports it again.

`--variant` adds the settings of an A/B variant of the GPU check (its switches, method, T, inner steps and
widths, as `ab_variants.sh`'s `ab_resolve` gives them), whose kernels the switches change: the A/B gives each
variant about 30 s, which two or four compiles would take whole. Every call runs in a fresh process, so the
switches that are read once a process are read from that call's own environment.

Prints one line a call (its time, which is mostly compiling) and the wall time of all of them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The methods whose first call compiles Triton kernels (the `cuda` backend's kernels are in the extension,
# built before; vmap and the peers compile nothing).
COMPILING = ("triton", "factored")


Cell = tuple[str, int, int, int, tuple[tuple[str, str], ...]]  # method, T, K, width, switches


def cells(args, variants: list[str] = ()) -> list[Cell]:
    """(method, T, K, width, switches) of every setting the sweep will run for a method in COMPILING, the
    largest T first (G2's cells; where the limit stops the pool, the calls not started are the small ones),
    then those of each variant (`--variant`) of such a method."""
    methods = [m for m in (args.methods or COMPILING) if m in COMPILING]
    out = [(m, T, K, width, ()) for T in sorted(args.tasks, reverse=True) for K in sorted(args.steps)
           for width in sorted(args.width) for m in methods]
    for spec in variants:
        out += variant_cells(spec)
    return out


def variant_cells(spec: str) -> list[Cell]:
    """The cells of one A/B variant, "ENV=VALUE ...|METHOD|T|STEPS|WIDTHS" (steps and widths space-separated);
    none when its method compiles no Triton kernel."""
    try:
        setting, method, tasks, steps, widths = spec.split("|")
        env = tuple(tuple(item.split("=", 1)) for item in setting.split())
        if any(len(pair) != 2 or not pair[0] for pair in env):
            raise ValueError(setting)
        T, Ks, Ws = int(tasks), [int(k) for k in steps.split()], [int(w) for w in widths.split()]
    except ValueError:
        raise SystemExit(f"compile_ahead.py: --variant {spec!r} is not 'ENV=VALUE ...|METHOD|T|STEPS|WIDTHS'")
    if method not in COMPILING:
        return []
    return [(method, T, K, width, env) for K in sorted(Ks) for width in sorted(Ws)]


def _first_call(method: str, T: int, K: int, width: int, env: tuple, first_order: bool, device: str,
                dtype: str) -> str:
    """One call of `method` at a setting, in a fresh worker process: the status and its time."""
    os.environ.update(dict(env))  # before fastmaml is imported: its switches are read once a process
    import torch

    import _harness as H

    start = time.perf_counter()
    try:
        w = H.make_workload(T, K, width, first_order=first_order, device=device, dtype=H.parse_dtype(dtype))
        why = H.why_not(method, w, explicit=True)
        if why is not None:
            return f"skipped ({why[:120]})"
        H.make_step(method, w)()
        H.sync(w.device)
    except Exception as err:  # the sweep reports the same failure in its own row
        return f"failed ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    finally:
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return f"{time.perf_counter() - start:.1f} s"


def main(argv=None) -> int:
    import bench_throughput

    # This script's own options; the rest are the sweep's.
    own = argparse.ArgumentParser(prog="compile_ahead.py", add_help=False, allow_abbrev=False)
    own.add_argument("--jobs", type=int, default=None)
    own.add_argument("--variant", action="append", default=[])
    mine, rest = own.parse_known_args(argv)
    args = bench_throughput.parse_args(rest)
    jobs = mine.jobs
    todo = cells(args, mine.variant)
    if not todo:
        print("compile ahead: no setting of a method that compiles Triton kernels (nothing to do)")
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(jobs or cores, len(todo)))
    print(f"compile ahead: {len(todo)} first calls in {jobs} processes", flush=True)
    start = time.perf_counter()
    # spawn: a CUDA context does not survive fork, and each worker must find the kernels as a fresh process
    # of the sweep would.
    context = multiprocessing.get_context("spawn")
    first_order = args.order == "first"
    # One call a process (max_tasks_per_child): a variant's switches must not meet another call's.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_first_call, *cell[:5], first_order, args.device, args.dtype): cell for cell in todo}
        for future in as_completed(futures):
            m, T, K, width, env = futures[future]
            try:
                status = future.result()
            except Exception as err:  # a worker that died (out of memory, a crash in a kernel)
                status = f"failed (worker: {type(err).__name__})"
            switches = f" [{' '.join('='.join(pair) for pair in env)}]" if env else ""
            print(f"  {m:<10} T={T:<6} K={K} W={width:<4} {status}{switches}", flush=True)
    print(f"compile ahead: done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
