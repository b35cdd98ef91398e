"""The CUDA reverse sweep's time by phase: the barrier timeline of one training call.

A task's reverse sweep runs as a chain of phases between block barriers (about 30 at K=1 and 100 at
K=5 for the 1-W-W-1 net). ncu says how busy the multiprocessor's units are over a whole kernel; this
says which phases a task's time goes to, and how much of it is waiting. One call of the `cuda` backend's
training step runs the float reverse sweep's timeline variant (`csrc/cuda/timeline.h`): in the first
`--blocks` blocks, at every barrier, each warp writes the clock (its multiprocessor's cycles) at which it
arrived, and thread 0 the call site (file and line) and the clock at which the block left. The blocks
run beside the others as in any call (same grid, same blocks a multiprocessor), so the times include
what the co-resident blocks cost each other.

Per phase (the time from one barrier's departure to the next one's):
- work: from the last departure to a warp's arrival, for its slowest and its fastest warp;
- barrier: from the last warp's arrival to the departure;
- a phase is named by the barrier that ends it (`drivers.h:287 task_backward`); the phase from a task's
  last barrier to its end by "(the task's end)".
A site's "share" is its phases' time over the tasks' time. Only whole tasks count (a block's records
stop at `--capacity`; the script says when they did). Cycles, not seconds: the clock may throttle.

Usage (on a machine with a GPU and the CUDA extension built):
    python benchmarks/phase_timeline.py --tasks 25 65536 --steps 1 5 --width 40 128 --out DIR
It prints each setting's summary and its phases by share, and writes `timeline-T<T>-K<K>-W<W>.csv`
(every site) and `.json` (the summary) to `--out`. With several task counts it ends with each setting's
phases compared between the fewest tasks (T=25: one a multiprocessor) and the most (T=65,536: as many
a multiprocessor as fit): a phase that takes as long alone as beside other tasks is bound by its own
chain of latencies, and more tasks in flight would hide it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CSRC = REPO / "csrc"
# What csrc/cuda/timeline.h says (tests/test_phase_timeline.py reads the header and compares).
WARPS = 4
WORDS = 2 + WARPS
TASK_START = 1
TASKS_END = 2
SITE_LINE_BITS = 20
TASK_END_NAME = "(the task's end)"


def file_tag(path: str) -> int:
    """timeline.h's file_tag: 32-bit FNV-1a of the name after the last '/' or '\\'."""
    h = 2166136261
    for byte in path.encode():
        if byte in (ord("/"), ord("\\")):
            h = 2166136261
        else:
            h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def site_of(tag: int, line: int) -> int:
    """timeline.h's timeline_site."""
    return (tag << SITE_LINE_BITS) | (line & ((1 << SITE_LINE_BITS) - 1))


@dataclass
class Site:
    file: str
    line: int
    function: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line} {self.function}".strip()


_FUNCTION = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_NOT_NAMES = {"if", "for", "while", "switch", "return", "sizeof", "static_cast", "reinterpret_cast",
              "FASTMAML_HD", "__launch_bounds__", "defined"}


def enclosing_function(lines: list[str], index: int) -> str:
    """The function whose body holds line `index` (0-based): the nearest line above it that starts a
    definition at the file's left margin (not a comment, preprocessor line, brace or template header)."""
    for i in range(index, -1, -1):
        text = lines[i]
        if not text or text[0] in " \t/#}{" or text.startswith(("template", "namespace", "struct", "using")):
            continue
        names = [m.group(1) for m in _FUNCTION.finditer(text) if m.group(1) not in _NOT_NAMES]
        if names:
            return names[0]
    return ""


def site_names(roots: tuple[Path, ...] = (CSRC / "task", CSRC / "cuda")) -> dict[int, Site]:
    """Every line of the kernels' headers under the site it would record: a record's site names its file
    (by tag) and line, whichever line of a call __builtin_LINE() gave."""
    sites: dict[int, Site] = {}
    for root in roots:
        for path in sorted(list(root.glob("*.h")) + list(root.glob("*.cuh"))):
            lines = path.read_text().splitlines()
            tag = file_tag(path.name)
            for i, text in enumerate(lines):
                sites[site_of(tag, i + 1)] = Site(path.name, i + 1, enclosing_function(lines, i), text.strip())
    return sites


def barrier_lines(path: Path) -> list[int]:
    """The lines of `path` that call a team's barrier (`.sync()`) or collective sum (`.sum(`)."""
    return [i + 1 for i, text in enumerate(path.read_text().splitlines())
            if re.search(r"\b\w+\.(sync\(\)|sum\()", text.split("//")[0])]


# --------------------------------------------------------------------------------------------------
# Reading the records


@dataclass
class Phase:
    site: int  # the barrier that ends it (a marker site: the task's end)
    cycles: int  # departure to departure
    slowest: int  # the slowest warp's work (last departure to its arrival)
    fastest: int
    barrier: int  # the last arrival to the departure


@dataclass
class SiteStats:
    site: int
    name: str
    text: str
    per_task: float  # phases a task ending at this site
    cycles_per_task: float
    share: float  # of the tasks' time
    cycles: float  # a phase, mean
    slowest: float
    fastest: float
    barrier: float


@dataclass
class Timeline:
    tasks: int
    blocks: int
    truncated_blocks: int
    warps: int
    cycles_per_task: list[float] = field(default_factory=list)
    sites: list[SiteStats] = field(default_factory=list)

    def summary(self) -> dict:
        c = self.cycles_per_task
        total = sum(c) or 1.0
        work = sum(s.slowest * s.per_task * self.tasks for s in self.sites)
        idle = sum((s.slowest - s.fastest) * s.per_task * self.tasks for s in self.sites)
        barrier = sum(s.barrier * s.per_task * self.tasks for s in self.sites)
        return dict(
            tasks=self.tasks, blocks=self.blocks, truncated_blocks=self.truncated_blocks, warps=self.warps,
            cycles_per_task_mean=statistics.fmean(c) if c else 0.0,
            cycles_per_task_median=statistics.median(c) if c else 0.0,
            phases_per_task=sum(s.per_task for s in self.sites),
            share_slowest_warp_work=work / total, share_barrier=barrier / total,
            share_fastest_warp_idle=idle / total,
        )


def block_tasks(rows: np.ndarray) -> tuple[list[list[Phase]], bool, int]:
    """The whole tasks of one block's records [capacity, WORDS] (-1 where unwritten), each as its list of
    phases; whether the records filled the capacity (the block's later records were dropped); and the
    number of warps that wrote arrivals."""
    written = rows[:, 0] != -1
    n = int(written.sum())
    if n and not written[:n].all():
        raise ValueError("a block's records have a gap: not a timeline buffer filled with -1 before the call")
    rows = rows[:n]
    warps = int((rows[:, 2:] != -1).any(axis=0).sum()) if n else 0
    # Full to the last record, unless that is the block's end: the block may have had more to write.
    truncated = n == written.shape[0] and int(rows[n - 1, 0]) != TASKS_END
    tasks: list[list[Phase]] = []
    current: Optional[list[Phase]] = None
    for i in range(n):
        site, depart = int(rows[i, 0]), int(rows[i, 1])
        arrive = rows[i, 2:2 + warps] if warps else np.zeros(0, dtype=np.int64)
        if site in (TASK_START, TASKS_END):
            if current is not None and i > 0:
                last = int(rows[i - 1, 1])
                work = arrive - last
                current.append(Phase(TASKS_END, depart - last, int(work.max()), int(work.min()), 0))
                tasks.append(current)
            current = [] if site == TASK_START else None
            continue
        if current is None:
            raise ValueError(f"record {i} is a barrier outside a task (no task-start marker before it)")
        last = int(rows[i - 1, 1])
        work = arrive - last
        current.append(Phase(site, depart - last, int(work.max()), int(work.min()), depart - int(arrive.max())))
    return tasks, truncated, warps


def analyse(records: np.ndarray, sites: Optional[dict[int, Site]] = None) -> Timeline:
    """The timeline of `records` [blocks, capacity, WORDS] (int64, -1 where unwritten): per site, the
    phases it ends a task (mean over the whole tasks of every block), their cycles, the slowest and
    fastest warp's work, the barrier's latency, and the share of the tasks' time."""
    if records.ndim != 3 or records.shape[2] != WORDS:
        raise ValueError(f"records must be [blocks, capacity, {WORDS}], got {records.shape}")
    sites = site_names() if sites is None else sites
    all_tasks: list[list[Phase]] = []
    truncated = 0
    warps = 0
    blocks = 0  # that wrote records (a grid smaller than the buffer leaves the rest empty)
    for b in range(records.shape[0]):
        tasks, cut, w = block_tasks(records[b])
        all_tasks += tasks
        truncated += cut
        warps = max(warps, w)
        blocks += bool(records[b, 0, 0] != -1)
    out = Timeline(tasks=len(all_tasks), blocks=blocks, truncated_blocks=truncated, warps=warps)
    if not all_tasks:
        return out
    out.cycles_per_task = [float(sum(p.cycles for p in task)) for task in all_tasks]
    total = sum(out.cycles_per_task)
    grouped: dict[int, list[Phase]] = {}
    for task in all_tasks:
        for p in task:
            grouped.setdefault(p.site, []).append(p)
    n = len(all_tasks)
    for site, phases in grouped.items():
        known = sites.get(site)
        if site == TASKS_END:
            name, text = TASK_END_NAME, ""
        elif known is not None:
            name, text = known.name, known.text
        else:
            name, text = f"site {site:#x} (line {site & ((1 << SITE_LINE_BITS) - 1)} of an unknown file)", ""
        cycles = sum(p.cycles for p in phases)
        out.sites.append(SiteStats(
            site=site, name=name, text=text, per_task=len(phases) / n, cycles_per_task=cycles / n,
            share=cycles / total, cycles=cycles / len(phases),
            slowest=statistics.fmean(p.slowest for p in phases), fastest=statistics.fmean(p.fastest for p in phases),
            barrier=statistics.fmean(p.barrier for p in phases)))
    out.sites.sort(key=lambda s: -s.share)
    return out


def report(tl: Timeline, title: str, top: int = 20) -> str:
    """The summary and the `top` sites by share, as text."""
    s = tl.summary()
    lines = [f"== {title}",
             f"{s['tasks']} whole tasks in {s['blocks']} blocks ({s['truncated_blocks']} cut at capacity), "
             f"{s['warps']} warps a task; cycles a task: mean {s['cycles_per_task_mean']:,.0f}, median "
             f"{s['cycles_per_task_median']:,.0f}; {s['phases_per_task']:.0f} phases a task",
             f"of the tasks' time: the slowest warp's work {100 * s['share_slowest_warp_work']:.1f}%, barriers "
             f"(last arrival to departure) {100 * s['share_barrier']:.1f}%; the fastest warp idles "
             f"{100 * s['share_fastest_warp_idle']:.1f}%",
             f"{'share':>6} {'a task':>6} {'cycles':>8} {'slowest':>8} {'fastest':>8} {'barrier':>7}  phase ending at"]
    for st in tl.sites[:top]:
        lines.append(f"{100 * st.share:5.1f}% {st.per_task:6.1f} {st.cycles:8,.0f} {st.slowest:8,.0f} "
                     f"{st.fastest:8,.0f} {st.barrier:7,.0f}  {st.name}  {st.text[:60]}")
    if len(tl.sites) > top:
        rest = sum(st.share for st in tl.sites[top:])
        lines.append(f"{100 * rest:5.1f}% in {len(tl.sites) - top} more sites")
    return "\n".join(lines)


def compare(small: Timeline, large: Timeline, title: str, top: int = 12) -> str:
    """Each site's cycles a phase in `large` (a full card: several tasks a multiprocessor) over `small`
    (a few tasks: one a multiprocessor), for `large`'s `top` sites by share. Where a task alone is as slow
    as one beside others, the sweep is bound by its own chain of latencies, not by a unit the tasks share."""
    a, b = small.summary(), large.summary()
    ratio = b["cycles_per_task_mean"] / a["cycles_per_task_mean"] if a["cycles_per_task_mean"] else float("nan")
    lines = [f"== {title}",
             f"cycles a task: {a['cycles_per_task_mean']:,.0f} with few tasks, {b['cycles_per_task_mean']:,.0f} on a "
             f"full card ({ratio:.2f}x)",
             f"{'share':>6} {'few':>8} {'full':>8} {'ratio':>6}  phase ending at"]
    by_site = {st.site: st for st in small.sites}
    for st in large.sites[:top]:
        other = by_site.get(st.site)
        few = other.cycles if other is not None else float("nan")
        grown = st.cycles / few if few else float("nan")
        lines.append(f"{100 * st.share:5.1f}% {few:8,.0f} {st.cycles:8,.0f} {grown:6.2f}  {st.name}")
    return "\n".join(lines)


def write(tl: Timeline, stem: Path, meta: dict) -> None:
    """`stem`.csv (every site) and `stem`.json (the summary and `meta`)."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        cols = list(asdict(tl.sites[0]).keys()) if tl.sites else ["site"]
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for st in tl.sites:
            writer.writerow(asdict(st))
    stem.with_suffix(".json").write_text(json.dumps({**meta, **tl.summary()}, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Running it on a GPU


def record_call(w, blocks: int, capacity: int, warmup: int = 2) -> np.ndarray:
    """The records of one training call of the `cuda` backend on workload `w` (benchmarks/_harness.py):
    warmed up first (the build, the allocations, the shared-memory opt-in), then armed and run once."""
    import torch

    import _harness

    step = _harness.make_step("cuda", w)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(w.device)
    records = torch.full((blocks, capacity, WORDS), -1, dtype=torch.int64, device=w.device)
    arm = torch.ops.fastmaml_testing.cuda_timeline_arm
    arm(records)
    try:
        step()
        torch.cuda.synchronize(w.device)
    finally:
        arm(torch.empty(0, dtype=torch.int64))
    out = records.cpu().numpy()
    if (out[:, :, 0] == -1).all():
        raise RuntimeError("the call ran no float reverse sweep (the timeline was armed but never written): "
                           "is the workload float32 on the cuda backend's training path?")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[25, 65536],
                    help="task counts; with two or more, each setting's phases are compared between the "
                         "smallest (a task alone on a multiprocessor) and the largest")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--width", type=int, nargs="+", default=[40, 128])
    ap.add_argument("--blocks", type=int, default=0,
                    help="blocks that record (default: three a multiprocessor, the first wave's worth)")
    ap.add_argument("--capacity", type=int, default=2048, help="records a block at most")
    ap.add_argument("--top", type=int, default=20, help="sites printed a setting")
    ap.add_argument("--out", type=Path, default=None, help="folder for the CSV and JSON files")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("phase_timeline: needs a CUDA GPU (the timeline is a variant of the CUDA reverse sweep)",
              file=sys.stderr)
        return 2
    import _harness

    device = torch.device("cuda")
    if (min_blocks := os.environ.get("FASTMAML_CUDA_MIN_BLOCKS", "").strip()) in ("4", "6"):
        print(f"phase_timeline: FASTMAML_CUDA_MIN_BLOCKS={min_blocks} is set, but the timeline is of the default "
              f"sweep (168 registers, 3 blocks a multiprocessor); the launch lines below describe the "
              f"{min_blocks}-block kernel")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = args.blocks or 3 * sms
    sites = site_names()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    found: dict[tuple[int, int, int], Timeline] = {}
    few, full = min(args.tasks), max(args.tasks)
    # Setting by setting, each comparison printed as soon as both of its task counts ran: a stage cut short
    # by its time limit keeps the comparisons of the settings it finished.
    for K in args.steps:
        for W in args.width:
            for T in args.tasks:
                title = f"T={T} K={K} W={W} ({_harness.device_name(device)})"
                w = _harness.make_workload(T, K, W, device="cuda")
                try:
                    tl = analyse(record_call(w, blocks, args.capacity), sites)
                except Exception as err:  # one setting's failure does not hide the others
                    print(f"== {title}: failed: {type(err).__name__}: {err}", flush=True)
                    failed += 1
                    continue
                found[(T, K, W)] = tl
                launch = _harness.cuda_launch_note(w)
                print(report(tl, title, args.top))
                print(launch, flush=True)
                if args.out is not None:
                    meta = dict(T=T, K=K, width=W, device=_harness.device_name(device), commit=_harness.commit(),
                                launch=launch)
                    write(tl, args.out / f"timeline-T{T}-K{K}-W{W}", meta)
                del w
                _harness.release(device)
            if few != full and (few, K, W) in found and (full, K, W) in found:
                print(compare(found[(few, K, W)], found[(full, K, W)], f"K={K} W={W}: T={few} against T={full}"),
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
