"""Which source lines and instructions of a kernel issue its instructions and collect its stall samples,
from Nsight Compute's source page.

    ncu --section SourceCounters --import-source yes -k regex:bwd_kernel -c 1 -o rep python ...
    ncu -i rep.ncu-rep --page source --print-source cuda,sass --csv > source.csv
    ncu -i rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python benchmarks/ncu_source.py source.csv --sass sass.csv --top 25 --lines-out lines.csv

Reads the CSV of the `cuda,sass` view (a "File Path" row, then per source line its totals, each followed by
the SASS instructions it compiled to, the line number empty) or of the `sass` view (instructions only). The
`cuda,sass` view lists an inlined instruction under every line and file it came from and its launches are
not told apart, so the totals come from the `sass` view where it is given (`--sass`). It prints:
- the kernel's totals: warp instructions executed, PC samples, and the samples by stall reason;
- the instruction mix: executed instructions by opcode (FFMA, LDS, BAR, ...), and the share of the
  arithmetic the kernel exists for (FP32/FP64 multiply-adds and tensor-core MMAs) among all issued;
- the source lines (or, in the `sass` view, the instructions) that issue the most instructions, and those
  with the most samples, with each one's leading stall reason.

This is what the GPU check asks of ncu for the kernels whose time is not in their products' loops (G2 in
benchmarks/RESULTS.md): a count says how many instructions a task should take; this says where the others
come from. `--lines-out` writes one row per source line (the CSV of the `cuda,sass` view holds every SASS
instruction too, tens of MB for the CUDA reverse sweep).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# ncu's column names (2024.1-2025.x; older releases said "Cycles" where these say "Samples": matched by prefix).
INST = "Instructions Executed"
SAMPLES = "Warp Stall Sampling (All Samples)"
# Opcodes whose work is the kernels' arithmetic (the rest is loads, stores, addresses, control, barriers).
MATH = {"FFMA", "DFMA", "HMMA", "DMMA", "IMMA", "HGMMA"}


@dataclass
class Row:
    """One source line (line > 0) or one instruction (line 0 in the `sass` view)."""

    file: str
    line: int
    text: str
    inst: float = 0.0
    samples: float = 0.0
    stalls: Counter = field(default_factory=Counter)


@dataclass
class Profile:
    kernels: list[str] = field(default_factory=list)
    lines: list[Row] = field(default_factory=list)
    instructions: list[Row] = field(default_factory=list)
    opcodes: Counter = field(default_factory=Counter)
    stalls: Counter = field(default_factory=Counter)
    by_file: Counter = field(default_factory=Counter)  # instructions executed, the `cuda,sass` view only
    columns: list[str] = field(default_factory=list)  # the table's header, for what could not be read

    @property
    def inst(self) -> float:
        return sum(r.inst for r in self.instructions)

    @property
    def samples(self) -> float:
        return sum(r.samples for r in self.instructions)


def _number(value: str) -> float:
    value = value.strip().replace(",", "")
    if value in ("", "-", "n/a"):
        return 0.0
    try:
        return float(value)
    except ValueError:
        return 0.0


def opcode(sass: str) -> str:
    """`@!P0 FFMA.FTZ R1, ...` -> `FFMA`: the mnemonic without its predicate and modifiers."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def _columns(header: list[str]) -> dict:
    """Where the fields are: the first `Source` after `Address` is the instruction; metric columns by name
    (the stall reasons: `stall_*` without "(Not Issued)")."""
    cols = {"line": header.index("Line No") if "Line No" in header else None, "address": header.index("Address")}
    sources = [i for i, name in enumerate(header) if name == "Source"]
    cols["line_text"] = sources[0] if cols["line"] is not None else None
    cols["sass"] = next(i for i in sources if i > cols["address"])

    def find(prefix):
        return next((i for i, name in enumerate(header) if name.startswith(prefix)), None)

    cols["inst"] = find(INST)
    cols["samples"] = find(SAMPLES.split("(")[0] + "(All")
    if cols["inst"] is None:
        raise ValueError(f"no '{INST}' column: was the report collected with --section SourceCounters?")
    cols["stalls"] = {i: name[len("stall_"):] for i, name in enumerate(header)
                      if name.startswith("stall_") and "Not Issued" not in name}
    return cols


def read(path: Path) -> Profile:
    """Parse ncu's source-page CSV (`cuda,sass` or `sass` view)."""
    prof = Profile()
    cols = None
    current_file = ""
    current_line: Row | None = None
    seen: set[str] = set()
    with open(path, newline="") as fh:
        for rec in csv.reader(fh):
            if not rec or not any(rec):
                continue
            head = rec[0]
            if head in ("Kernel Name", "Function Name"):
                name = rec[1] if len(rec) > 1 else ""
                if name and name not in prof.kernels:
                    prof.kernels.append(name)
                if head == "Kernel Name":
                    # The `sass` view of a report of several launches lists each one's table in turn: they
                    # add up. (The `cuda,sass` view repeats "Function Name" for every file of one launch,
                    # whose inlined instructions it lists under each file they came from: counted once.)
                    seen.clear()
                continue
            if head in ("File Path", "File Name"):  # the name differs between ncu releases
                current_file = rec[1] if len(rec) > 1 else ""
                current_line = None
                continue
            if head in ("Line No", "Address") and "Source" in rec:
                cols = _columns(rec)
                prof.columns = list(rec)
                continue
            if cols is None or head.startswith("=="):
                continue  # ncu's own messages before the table
            get = (lambda i: rec[i] if i is not None and i < len(rec) else "")  # noqa: E731
            stalls = Counter({name: _number(get(i)) for i, name in cols["stalls"].items() if _number(get(i))})
            if cols["line"] is not None and get(cols["line"]).strip():
                current_line = Row(current_file, int(_number(get(cols["line"]))), get(cols["line_text"]).strip(),
                                   _number(get(cols["inst"])), _number(get(cols["samples"])), stalls)
                prof.lines.append(current_line)
                continue
            sass = get(cols["sass"]).strip()
            address = get(cols["address"]).strip()
            if not sass or not address.startswith("0x") or address in seen:
                continue  # "..." elides; an instruction shared by two inlined lines is listed under both
            seen.add(address)
            row = Row(current_file, current_line.line if current_line else 0, sass, _number(get(cols["inst"])),
                      _number(get(cols["samples"])), stalls)
            prof.instructions.append(row)
            prof.opcodes[opcode(sass)] += row.inst
            prof.stalls.update(stalls)
            if cols["line"] is not None:
                prof.by_file[_short(current_file)] += row.inst
    if cols is None:
        raise ValueError(f"{path}: no source table (expected ncu --page source --csv output)")
    return prof


def _lead(stalls: Counter) -> str:
    if not stalls:
        return "-"
    total = sum(stalls.values())
    name, n = stalls.most_common(1)[0]
    return f"{name} {100 * n / total:.0f}%"


def _short(path: str) -> str:
    return Path(path).name if path else "?"


def report(prof: Profile, top: int = 20, tasks: int = 0) -> list[str]:
    """The summary `main` prints; `tasks` > 0 (the launch's tasks) adds the warp instructions a task."""
    inst, samples = prof.inst, prof.samples
    out = [f"kernel: {'; '.join(prof.kernels) or '?'}",
           f"warp instructions executed: {inst:,.0f}; PC samples: {samples:,.0f}; "
           f"source lines: {len(prof.lines)}, SASS instructions: {len(prof.instructions)}"]
    if tasks > 0:
        out.append(f"warp instructions a task: {inst / tasks:,.0f} ({tasks:,} tasks)")
    if inst:
        math = sum(n for op, n in prof.opcodes.items() if op in MATH)
        out.append(f"arithmetic ({'/'.join(sorted(MATH))}) among the instructions executed: {100 * math / inst:.1f}%")
        out.append("instruction mix (share of executed): " + ", ".join(
            f"{op} {100 * n / inst:.1f}%" for op, n in prof.opcodes.most_common(14)))
    if prof.stalls:
        total = sum(prof.stalls.values())
        out.append("samples by stall reason: " + ", ".join(
            f"{name} {100 * n / total:.1f}%" for name, n in prof.stalls.most_common(10)))
    elif samples:  # said, not left out silently: another ncu release may name the columns otherwise
        out.append("samples by stall reason: none read (no 'stall_*' columns); the table's columns: "
                   + ", ".join(prof.columns))
    rows = prof.lines or prof.instructions
    what = "source lines" if prof.lines else "instructions"
    for key, label in (("inst", "instructions executed"), ("samples", "PC samples")):
        total = inst if key == "inst" else samples
        if not total:
            continue
        out.append(f"-- {what} by {label} (top {top}, with their leading stall reason)")
        for r in sorted(rows, key=lambda r: getattr(r, key), reverse=True)[:top]:
            where = f"{_short(r.file)}:{r.line}" if prof.lines else f"line {r.line}" if r.line else ""
            text = re.sub(r"\s+", " ", r.text)[:90]
            out.append(f"{100 * getattr(r, key) / total:5.1f}%  {where:28s} {_lead(r.stalls):18s} {text}")
    located = sum(prof.by_file.values())
    if located:
        out.append("-- instructions executed by file: " + ", ".join(
            f"{name} {100 * n / located:.1f}%" for name, n in prof.by_file.most_common()))
    return out


def combined(lines: Profile, sass: Profile) -> Profile:
    """The source lines (and the files' shares) of the `cuda,sass` view with the totals, instruction mix and
    stalls of the `sass` view, which lists every launch's instructions once each."""
    return Profile(sass.kernels or lines.kernels, lines.lines, sass.instructions, sass.opcodes, sass.stalls,
                   lines.by_file, sass.columns)


def write_lines(prof: Profile, path: Path) -> None:
    """One row per source line: file, line, instructions executed, samples, the leading stall reasons."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "line", "inst_executed", "samples", "stalls", "source"])
        for r in prof.lines:
            w.writerow([r.file, r.line, f"{r.inst:.0f}", f"{r.samples:.0f}",
                        " ".join(f"{k}={v:.0f}" for k, v in r.stalls.most_common(4)), r.text])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="ncu -i REPORT --page source --print-source cuda,sass --csv")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--tasks", type=int, default=0, help="tasks in the profiled launch (prints instructions a task)")
    p.add_argument("--sass", type=Path, help="the same report's `--print-source sass` page: the totals from it")
    p.add_argument("--lines-out", type=Path, help="write the per-line table here")
    args = p.parse_args(argv)
    try:
        prof = read(args.csv)
        if args.sass:
            prof = combined(prof, read(args.sass))
    except (OSError, ValueError, StopIteration) as err:
        print(f"ncu_source: {err}", file=sys.stderr)
        return 1
    print("\n".join(report(prof, args.top, args.tasks)))
    if args.lines_out and prof.lines:
        write_lines(prof, args.lines_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
