"""The first call of every setting of a sweep, for the methods that compile Triton kernels on first use, run
in parallel processes before the sweep times anything.

    python benchmarks/compile_ahead.py --device cuda --tasks 25 1024 65536 --steps 1 5 --width 40 128 \\
        --methods cuda triton factored vmap [--jobs 8]

Takes the throughput benchmark's arguments (`bench_throughput.py`) and keeps what selects the settings. A
Triton kernel is compiled for each set of its compile-time constants and each specialisation of its integer
and pointer arguments (divisible by 16, equal to 1), so the sweep's `triton` and `factored` rows compile
several kernels each (the training kernel took 7.5 s at width 40 and 9.0 s at width 128 for sm_90 on this
project's 2-core machine), one after another inside the sweep's time limit, on a machine whose other cores
wait. Here each (method, T, K, width) is one call in a process of its own, all cores at once; the kernels land
in Triton's on-disk cache, where the sweep's first calls then find them. The calls are made exactly as the
sweep makes them (`_harness.make_workload` and `make_step`), so their arguments specialise alike. Nothing is
timed or checked here: a call that fails is reported and the sweep reports it again.

Prints one line a call (its time, which is mostly compiling) and the wall time of all of them.
"""

from __future__ import annotations

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


def cells(args) -> list[tuple[str, int, int, int]]:
    """(method, T, K, width) of every setting the sweep will run for a method in COMPILING, in the sweep's
    order (smallest first)."""
    methods = [m for m in (args.methods or COMPILING) if m in COMPILING]
    return [(m, T, K, width) for K in sorted(args.steps) for width in sorted(args.width) for T in sorted(args.tasks)
            for m in methods]


def _first_call(method: str, T: int, K: int, width: int, first_order: bool, device: str, dtype: str) -> str:
    """One call of `method` at a setting, in a worker process: the status and its time."""
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

    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = None
    if "--jobs" in argv:  # this script's own option; the rest are the sweep's
        i = argv.index("--jobs")
        jobs = int(argv[i + 1])
        del argv[i:i + 2]
    args = bench_throughput.parse_args(argv)
    todo = cells(args)
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
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_first_call, m, T, K, width, first_order, args.device, args.dtype): (m, T, K, width)
                   for m, T, K, width in todo}
        for future in as_completed(futures):
            m, T, K, width = futures[future]
            try:
                status = future.result()
            except Exception as err:  # a worker that died (out of memory, a crash in a kernel)
                status = f"failed (worker: {type(err).__name__})"
            print(f"  {m:<10} T={T:<6} K={K} W={width:<4} {status}", flush=True)
    print(f"compile ahead: done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
