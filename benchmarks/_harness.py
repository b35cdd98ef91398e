"""What the benchmark scripts share: the workload, the methods, the correctness check, timing, peak
memory, and the CSV / table / plot output.

Workload: the sinusoid regression of the MAML paper. An MLP 1-W-W-1 with ReLU (W = `width`, 40 in the
paper), `T` tasks of 10 support and 10 query points each, mse loss, `K` inner SGD steps of rate 0.01,
second-order meta-gradient (or first order). Each task is `y = a sin(x - phase)`, `a ~ U[0.1, 5]`,
`phase ~ U[0, pi]`, `x ~ U[-5, 5]`.

Methods: every registered fastmaml backend, named by its backend name (`reference`, `cpu`, `triton`,
`cuda`), and the peers of `peers.py` (`vmap`, `loop`, `higher`). One call of a method's step is one
meta-iteration: the meta-loss and its gradient with respect to the parameters.

Peak memory (`peak_mem_mb`), what it measures:
- cuda: `torch.cuda.max_memory_allocated` during one meta-iteration minus the memory allocated just
  before it (the inputs and parameters are excluded; the returned gradients are included).
- cpu: run in a fresh Python process (glibc told to map large blocks and trim freed memory at once):
  the method is warmed up on one tiny task (libraries and the C++ extension loaded), the full inputs
  are built, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), one meta-iteration runs,
  and the result is the peak resident set (`VmHWM`) minus the resident set before the call: the
  resident-set growth of the call. Torch's CPU allocator does not cache, so large buffers count
  exactly; small ones may reuse heap freed by the warm-up, so values under ~0.1 MiB mean "negligible".
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastmaml
from fastmaml import dispatch
from fastmaml._validate import make_problem

import peers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
N_SUPPORT = 10
N_QUERY = 10
INNER_LR = 0.01
PEER_NAMES = ["vmap", "loop", "higher"]
# Relative tolerance of the meta-gradient against the reference backend (max abs error / max abs value).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}

CSV_COLUMNS = [
    "method", "device", "device_name", "T", "K", "width", "order", "tasks_per_s", "ms", "peak_mem_mb",
    "torch", "triton", "fastmaml", "commit", "date", "status", "rel_err", "repeats", "note", "load1",
    "first_ms",  # the first call: compiling (Triton, torch.compile) and the check's call, not timed
]


# --------------------------------------------------------------------------------------------------
# Workload


@dataclass
class Workload:
    """One setting's inputs. `params` are leaves that require grad; data `[T, N, 1]`."""

    T: int
    K: int
    width: int
    first_order: bool
    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def order(self) -> str:
        return "first" if self.first_order else "second"

    def fresh_params(self) -> list[torch.Tensor]:
        """Copies of the parameters, leaves that require grad (each method gets its own)."""
        return [p.detach().clone().requires_grad_(True) for p in self.params]


def head(w: Workload, n: int) -> Workload:
    """The first `n` tasks of `w`, same parameters (a smaller problem for checking a method)."""
    return Workload(T=n, K=w.K, width=w.width, first_order=w.first_order, device=w.device, dtype=w.dtype,
                    params=w.params, x_support=w.x_support[:n], y_support=w.y_support[:n],
                    x_query=w.x_query[:n], y_query=w.y_query[:n])


def make_workload(T: int, K: int, width: int, *, first_order: bool = False, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> Workload:
    """Random sinusoid tasks and an nn.Linear-initialised 1-W-W-1 MLP (generated on the CPU with a
    fixed seed, so every device sees the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    dims = [1, width, width, 1]
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init bound
        params.append((torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        params.append((torch.rand(d_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(T, 1, 1, generator=gen, dtype=torch.float64)
    x = 10 * torch.rand(T, N_SUPPORT + N_QUERY, 1, generator=gen, dtype=torch.float64) - 5
    y = amp * torch.sin(x - phase)
    to = dict(device=device, dtype=dtype)
    return Workload(
        T=T, K=K, width=width, first_order=first_order, device=torch.device(device), dtype=dtype,
        params=[p.to(**to).requires_grad_(True) for p in params],
        x_support=x[:, :N_SUPPORT].to(**to).contiguous(), y_support=y[:, :N_SUPPORT].to(**to).contiguous(),
        x_query=x[:, N_SUPPORT:].to(**to).contiguous(), y_query=y[:, N_SUPPORT:].to(**to).contiguous(),
    )


# --------------------------------------------------------------------------------------------------
# Methods

Step = Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]


def all_methods() -> list[str]:
    """The registered fastmaml backends, then the peers."""
    return list(fastmaml.list_backends()) + PEER_NAMES


def why_not(method: str, w: Workload, explicit: bool = False) -> Optional[str]:
    """Why `method` cannot run this setting (None: it can). A fastmaml backend gives its own reason
    (unavailable, or the call rejected); one that runs but is not meant for this device (Triton's
    interpreter on CPU tensors: `auto` takes it on another device, not this one) is skipped unless
    `explicit` (named on the command line). A backend `auto` takes on no device yet (`factored`, until a
    GPU measures it) is measured everywhere it runs. `auto`'s speed preferences do not skip a backend."""
    if method in PEER_NAMES:
        return peers.peer_unavailable(method)
    if method not in fastmaml.list_backends():
        return f"unknown method (fastmaml backends: {fastmaml.list_backends()}, peers: {PEER_NAMES})"
    problem = make_problem(w.params, w.x_support, w.y_support, w.x_query, w.y_query,
                           inner_steps=w.K, inner_lr=INNER_LR, first_order=w.first_order)
    backend = dispatch.get_backend(method)
    why = backend.unavailable() or backend.reject(problem, "maml")
    # Measured wherever it can run on a device it is meant for, also where `auto` prefers another
    # backend for speed (that preference is what these measurements decide).
    device_specific = any(method in order for order in dispatch.AUTO_ORDER.values())
    if (why is None and not explicit and device_specific
            and method not in dispatch.AUTO_ORDER.get(problem.device.type, [])):
        why = (f"not meant for {problem.device.type} tensors (not in auto's order there; name it with "
               "--methods to run it)")
    return why


def make_step(method: str, w: Workload) -> Step:
    """A callable running one meta-iteration of `method` on `w`: returns `(loss, grads)`."""
    params = w.fresh_params()
    opts = dict(inner_steps=w.K, inner_lr=INNER_LR, first_order=w.first_order)
    data = (w.x_support, w.y_support, w.x_query, w.y_query)
    if method in PEER_NAMES:
        return peers.PEERS[method](params, *data, **opts)

    def step():
        out = fastmaml.maml(params, *data, backend=method, **opts)
        return out.loss.detach(), list(torch.autograd.grad(out.loss, params))

    return step


def reference_result(w: Workload) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The oracle: fastmaml's reference backend on this setting."""
    return make_step("reference", w)()


def cuda_launch_note(w: Workload) -> str:
    """How the cuda backend's training call lays out `w` on its GPU: blocks, threads, the workspace and
    where it lives, the reverse sweep's registers and local (spill) bytes a thread, and how many blocks
    one multiprocessor holds at once (the tasks in flight), and the support states kept apart from the
    workspace (FASTMAML_CUDA_STATES=global). '' off a CUDA device; a short reason where
    the library has no such report."""
    if w.device.type != "cuda":
        return ""
    from fastmaml.backends import _onestep, cuda as cuda_backend

    if cuda_backend.ONESTEP and w.K == 1:  # the training call's kernel is the one-step kernel
        try:
            warps, blocks, shared, staged, in_shared, work, regs, local, per_sm, form, *mma = (int(x) for x in (
                torch.ops.fastmaml_testing.cuda_onestep_launch(w.params[0].detach(), [1, w.width, w.width, 1],
                                                               w.x_support.shape[1], w.x_query.shape[1], w.T)))
        except Exception as err:  # an older build: the timing stands without it
            return f"one-step launch report unavailable ({type(err).__name__})"
        task_bytes = _onestep.row_bytes([1, w.width, w.width, 1], w.x_support.shape[1], w.x_query.shape[1],
                                        w.first_order, w.params[0].element_size())
        chunks = -(-w.T // _onestep.chunk_tasks(w.T, task_bytes))
        kept = _onestep.keeps_rows(w.T, task_bytes)
        rows = f"summed in {chunks} chunk{'s' if chunks > 1 else ''}, {'kept' if kept else 'not kept'}"
        return (f"one-step launch: {blocks} blocks of {warps} warps (a task each), {shared / 1024:.1f} KiB shared "
                f"a block, theta_0 {'staged' if staged else 'from global memory'}, scratch {work / 1024:.1f} KiB a "
                f"task in {'shared' if in_shared else 'global'} memory, {regs} registers and {local} B local a "
                f"thread, {per_sm} blocks a multiprocessor, the {'shared-operand' if form else 'generic'} form"
                f"{', products on tensor cores' if mma and mma[0] else ''}; "
                f"factor rows {rows}")
    try:
        v = torch.ops.fastmaml_testing.cuda_training_launch(
            w.params[0].detach(), [1, w.width, w.width, 1], w.x_support.shape[1], w.x_query.shape[1], w.K, w.T,
            False)
        threads, blocks, chunk, shared, work_bytes, rebuilt, mma, regs, local, per_sm, states = (int(x) for x in v)
    except Exception as err:  # an older build, or no CUDA kernels: the timing stands without it
        return f"launch report unavailable ({type(err).__name__})"
    extras = "".join([", theta_k rebuilt" if rebuilt else "", ", tensor cores" if mma else "",
                      f", support states {states / 1024:.1f} KiB apart in global memory" if states else ""])
    return (f"launch: {blocks} blocks of {threads} threads, {chunk} tasks a block, workspace "
            f"{work_bytes / 1024:.1f} KiB in {'shared' if shared else 'global'} memory, {regs} registers and "
            f"{local} B local a thread, {per_sm} blocks a multiprocessor{extras}")


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release(device: torch.device) -> None:
    """Give cached device memory back between methods, so each starts from the same state."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_error(result, oracle) -> float:
    """Max abs error of the meta-gradient (and loss) over the max abs value of the oracle's."""
    loss, grads = result
    ref_loss, ref_grads = oracle
    scale = max(g.abs().max().item() for g in ref_grads) or 1.0
    err = max((g.to(r.dtype) - r).abs().max().item() for g, r in zip(grads, ref_grads)) / scale
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
    return max(err, loss_err)


# --------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device, seconds: float = 0.5) -> None:
    """Keeps a GPU busy for `seconds` before the first timed cell. A GPU at rest may run at low clocks for
    a while after work arrives, and a run's first cell is a sub-millisecond one (T=25) timed over a few
    calls. On the H200 (a75ae00) that first cell, cuda at K=1, W=40, took 970 us a call where K=5 took 438
    and W=128 713: the one figure of the sweep out of line with its neighbours, which a cold card would
    explain; warmed up, the next run says whether it was that. A CPU needs none."""
    if device.type != "cuda":
        return
    a = torch.randn(2048, 2048, device=device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(8):
            a = torch.tanh(a @ a)  # bounded values, so the loop never overflows into slow paths
        torch.cuda.synchronize(device)


def time_call(step: Step, device: torch.device):
    """Run `step` once; returns `(result, milliseconds)`. CUDA: events around the call (the queue is
    drained first); CPU: perf_counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = step()
    return out, (time.perf_counter() - t0) * 1e3


@dataclass
class Timing:
    ms: float                       # median over the timed repeats
    repeats: int
    first_ms: float                 # the first call (the correctness check; includes compilation)
    result: tuple = field(repr=False)


def measure(step: Step, device: torch.device, *, warmup: int, repeats: int, max_seconds: float) -> Timing:
    """The first call (its result is returned for the correctness check; it may include compilation),
    then `warmup` untimed and up to `repeats` timed calls, cut to fit in `max_seconds` after the first
    call (at least one timed call)."""
    result, first_ms = time_call(step, device)
    started = time.perf_counter()
    last = first_ms
    for i in range(warmup):
        # The first warm-up runs unless the first call alone took a third of the budget (slow methods
        # do not compile: their first call is already a fair estimate of a warm one).
        if i == 0 and first_ms / 1e3 > max_seconds / 3:
            break
        if i and time.perf_counter() - started + last / 1e3 > max_seconds:
            break
        _, last = time_call(step, device)
    times: list[float] = []
    while len(times) < max(repeats, 1):
        times.append(time_call(step, device)[1])
        if time.perf_counter() - started + times[-1] / 1e3 > max_seconds:
            break  # the next call would overrun the budget
    return Timing(ms=statistics.median(times), repeats=len(times), first_ms=first_ms, result=result)


class Estimator:
    """Estimates the time of one call at a larger T from the same method's measurements at smaller T
    (same K, width, order), to skip what would take too long: a straight line through the two largest
    measured T (fixed cost + cost per task), or proportional to T from a single one (an upper bound
    for batched methods, about right for task loops)."""

    def __init__(self):
        self._seen: dict[tuple, dict[int, float]] = {}

    def add(self, method: str, w: Workload, ms: float) -> None:
        self._seen.setdefault((method, w.K, w.width, w.order), {})[w.T] = ms

    def estimate_s(self, method: str, w: Workload) -> Optional[float]:
        pts = sorted(item for item in self._seen.get((method, w.K, w.width, w.order), {}).items() if item[0] <= w.T)
        if not pts:
            return None
        T2, ms2 = pts[-1]
        if len(pts) == 1:
            return ms2 / 1e3 * w.T / T2
        T1, ms1 = pts[-2]
        slope = max(ms2 - ms1, 0.0) / (T2 - T1)
        return (ms2 + slope * (w.T - T2)) / 1e3

    def largest_t(self, method: str, w: Workload) -> int:
        """The largest T measured for this method at w's K, width and order, up to w.T (0: none)."""
        return max((T for T in self._seen.get((method, w.K, w.width, w.order), {}) if T <= w.T), default=0)

    def probe(self, method: str, w: Workload, sizes=(16, 64)) -> None:
        """Time `method` on the first tasks of `w` (after one untimed call), so that a large first
        setting has an estimate too."""
        for n in sizes:
            small = head(w, min(n, w.T))
            step = make_step(method, small)
            step()
            self.add(method, small, time_call(step, w.device)[1])


# --------------------------------------------------------------------------------------------------
# Peak memory


def cuda_peak_mb(step: Step, device: torch.device) -> float:
    """Peak CUDA memory of one call above what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child_peak(method: str, T: int, K: int, width: int, first_order: bool, device: str, dtype: str,
                threads: int) -> dict:
    """In the fresh child process: warm up on one tiny task, then the peak of one call on T tasks."""
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    # The warm-up loads libraries and the C++ extension; it is tiny (1 task, width 3) so that the heap it
    # leaves behind does not hide the working memory of the measured call.
    small = make_workload(1, K, 3, first_order=first_order, device=device, dtype=dt, seed=1)
    make_step(method, small)()
    w = make_workload(T, K, width, first_order=first_order, device=device, dtype=dt)
    step = make_step(method, w)
    if device.startswith("cuda"):
        return {"peak_mb": cuda_peak_mb(step, w.device), "how": "cuda max_memory_allocated"}
    import gc
    gc.collect()
    how = "VmHWM reset via clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set mark to the current resident set
    except OSError:
        how = "VmHWM not resettable: peak since process start"
    rss = _proc_status_kb("VmRSS")
    out = step()
    peak = _proc_status_kb("VmHWM") - rss
    del out
    return {"peak_mb": peak / 1024, "how": how}


def subprocess_peak_mb(method: str, w: Workload, timeout_s: float) -> tuple[Optional[float], str]:
    """Peak memory of one meta-iteration, measured in a fresh Python process. Returns `(MiB or None,
    note)`."""
    args = [sys.executable, str(HERE / "_harness.py"), "--peak-child", json.dumps(dict(
        method=method, T=w.T, K=w.K, width=w.width, first_order=w.first_order,
        device=str(w.device), dtype=str(w.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
    ))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    # glibc: a fixed mmap threshold (no dynamic raise) and immediate trimming, so that the resident set
    # follows the live memory: large blocks are mapped and unmapped, freed heap tops are returned.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"memory not measured (child timed out after {timeout_s:.0f} s)"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"memory not measured (child failed: {tail[0][:120]})"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["peak_mb"], ""


# --------------------------------------------------------------------------------------------------
# Environment and output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'s' if n > 1 else ''})"


def load_average() -> str:
    """The 1-minute load average (other processes on the cores make timings noisy), or ''."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return ""


def commit() -> str:
    """The git commit of the repository, `+dirty` where git sees fastmaml's sources (fastmaml, csrc,
    benchmarks) differ from it. FASTMAML_COMMIT names the commit for a copy of the tree without .git; where
    git works, a given name gets `+dirty` too (once): rows from a changed tree never carry a clean name.
    benchmarks/gpu_check.sh labels its files by this function."""
    given = os.environ.get("FASTMAML_COMMIT")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return given or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastmaml", "csrc", "benchmarks"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return given or "unknown"
    name = given or rev.stdout.strip()
    return name + "+dirty" if dirty and not name.endswith("+dirty") else name


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "triton": triton_version, "fastmaml": fastmaml.__version__, "commit": commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class CsvWriter:
    """Writes rows as they come (a sweep cut short by a timeout keeps what it measured)."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=columns).writeheader()

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_order(order: str) -> bool:
    """`first` -> True (first_order)."""
    return order == "first"


def parse_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--peak-child":
    spec = json.loads(sys.argv[2])
    print(json.dumps(_child_peak(**spec)))
