"""Tables and plots from a `throughput.csv` written by `bench_throughput.py`.

    python benchmarks/report.py DIR/throughput.csv              # the full text table
    python benchmarks/report.py DIR/throughput.csv --compact    # short: method, T, K, width, tasks/s, ratios
    python benchmarks/report.py DIR/throughput.csv --markdown   # the tables of benchmarks/RESULTS.md
    python benchmarks/report.py DIR/throughput.csv --plot DIR/throughput.png
    python benchmarks/report.py DIR/throughput.csv --ab DIR/ab  # the GPU check's A/B against this sweep

Ratios are tasks/s of a method over tasks/s of a peer in the same setting (device, T, K, width, order):
above 1 means faster than the peer.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Optional

PEERS = ("vmap", "loop", "higher")


def load(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(row: dict) -> tuple:
    return (row["device"], int(row["T"]), int(row["K"]), int(row["width"]), row["order"])


def _rate(row: dict) -> Optional[float]:
    if row.get("status") != "ok" or not row.get("tasks_per_s"):
        return None
    return float(row["tasks_per_s"])


def peer_rate(rows: list[dict], row: dict, peer: str) -> Optional[float]:
    """tasks/s of `peer` in the setting of `row` (its first row there with a rate; None if it has none)."""
    return next((rate for other in rows if other["method"] == peer and _key(other) == _key(row)
                 if (rate := _rate(other))), None)


def ratio(rows: list[dict], row: dict, peer: str) -> Optional[float]:
    """tasks/s of `row` over tasks/s of `peer` in the same setting (None if either is missing)."""
    mine, theirs = _rate(row), peer_rate(rows, row, peer)
    return mine / theirs if mine is not None and theirs else None


def _fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.1f}x" if x >= 10 else f"{x:.2f}x")


def text_table(rows: list[dict], compact: bool = False) -> str:
    """A fixed-width table, one line per row of the CSV; rows not measured say why at the end."""
    head = ["method", "T", "K", "width", "tasks/s"] + ([] if compact else ["ms"]) + ["vs vmap", "vs loop"]
    if not compact:
        head.append("peak MB")
    lines, notes = [head], [""]
    for row in rows:
        ok = row.get("status") == "ok"
        line = [row["method"], row["T"], row["K"], row["width"], _fmt_rate(_rate(row)) if ok else row.get("status", "?")]
        if not compact:
            line.append(f"{float(row['ms']):.3g}" if ok and row.get("ms") else "-")
        line += [_fmt_ratio(ratio(rows, row, "vmap")), _fmt_ratio(ratio(rows, row, "loop"))]
        if not compact:
            peak = row.get("peak_mem_mb")
            line.append(f"{float(peak):.4g}" if peak else "-")
        lines.append([str(c) for c in line])
        note = row.get("note", "") or ""
        notes.append(_short(note) if compact else note)
    return "\n".join((row + "  " + note).rstrip() for row, note in zip(_aligned(lines, left=1), notes))


def _aligned(lines: list[list[str]], left: int) -> list[str]:
    """The rows of a table as fixed-width text: the first `left` columns flush left, the rest flush right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]


def compact_table(rows: list[dict]) -> str:
    """The measured rows (and failures) as a short table, then one line per method and reason for
    the rows skipped."""
    shown = [r for r in rows if r.get("status") != "skipped"]
    lines = [text_table(shown, compact=True)] if shown else ["no row measured"]
    groups: dict[tuple, int] = {}
    for r in rows:
        if r.get("status") == "skipped":
            key = (r["method"], r.get("note", ""))
            groups[key] = groups.get(key, 0) + 1
    for (method, note), n in groups.items():
        lines.append(f"skipped {method} at {n} setting{'s' if n > 1 else ''}: {_short(note)}")
    return "\n".join(lines)


def flops_per_task(K: int, width: int, n_support: int = 10, n_query: int = 10) -> float:
    """Estimated float operations of one second-order meta-iteration per task, 1-W-W-1 MLP.

    A forward pass costs F = 2 (W^2 + 2 W) per point (multiply and add counted apart). Per inner step:
    the support forward (F per point) and backward (2 F), and in the reverse sweep their Hessian-vector
    product (about 6 F: the tangent forward and the backward of the tangent); the query forward and
    backward add 3 F per point. Total (9 K N + 3 M) F. An estimate of the essential arithmetic (no
    recomputation counted), for comparing with a card's peak rate.
    """
    F = 2.0 * (width * width + 2 * width)
    return (9.0 * K * n_support + 3.0 * n_query) * F


# float32 rates (non-tensor-core) of the cards the GPU check has run on, TFLOP/s, from the datasheets.
FP32_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 67.0, "NVIDIA H200": 67.0}


def flops_table(rows: list[dict]) -> list[str]:
    """Markdown lines: estimated GFLOP/s (flops_per_task x tasks/s) at the largest T of each K and width,
    and its share of the card's float32 peak when the card is known."""
    ok = [r for r in rows if r.get("status") == "ok" and _rate(r) is not None and r.get("order", "second") == "second"]
    if not ok:
        return []
    lines = ["| method | T | K | width | GFLOP/s (estimated) | of fp32 peak |", "|---|---:|---:|---:|---:|---:|"]
    for K, W in sorted({(int(r["K"]), int(r["width"])) for r in ok}):
        group = [r for r in ok if int(r["K"]) == K and int(r["width"]) == W]
        T = max(int(r["T"]) for r in group)
        for r in sorted((r for r in group if int(r["T"]) == T), key=lambda r: -_rate(r)):
            gflops = flops_per_task(K, W) * _rate(r) / 1e9
            peak = FP32_PEAK_TFLOPS.get(r.get("device_name", ""))
            share = f"{100 * gflops / (peak * 1e3):.1f}%" if peak else ""
            lines.append(f"| {r['method']} | {T} | {K} | {W} | {gflops:,.0f} | {share} |")
    return lines


def _short(note: str) -> str:
    return note if len(note) <= 90 else note[:87] + "..."


def markdown(rows: list[dict]) -> str:
    """Per setting: tasks/s of every method that ran; every fastmaml backend's ratio to every peer;
    peak memory; then what was not measured and why."""
    settings = sorted({_key(r) for r in rows})
    listed = list(dict.fromkeys(r["method"] for r in rows))
    ran = {r["method"] for r in rows if r.get("status") in ("ok", "failed", "oom")}
    methods = [m for m in listed if m in ran]
    peers = [m for m in PEERS if m in methods]
    backends = [m for m in methods if m not in PEERS]
    by = {(_key(r), r["method"]): r for r in rows}

    def table(title_cells, cell):
        lines = ["| T | K | width | " + " | ".join(title_cells) + " |", "|---:|---:|---:|" + "---:|" * len(title_cells)]
        for key in settings:
            lines.append(f"| {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cell(key, c) for c in title_cells) + " |")
        return lines

    def rate_cell(key, m):
        r = by.get((key, m))
        if r is None:
            return ""
        return r.get("status", "?") if _rate(r) is None else _fmt_rate(_rate(r))

    def ratio_cell(key, pair):
        b, p = pair.split(" / ")
        r = by.get((key, b))
        return _fmt_ratio(ratio(rows, r, p)) if r else ""

    def mem_cell(key, m):
        r = by.get((key, m))
        return f"{float(r['peak_mem_mb']):.3g}" if r and r.get("peak_mem_mb") else ""

    out = ["Tasks per second:", ""] + table(methods, rate_cell)
    pairs = [f"{b} / {p}" for b in backends for p in peers]
    if pairs:
        out += ["", "Speed-up (tasks/s of the backend over tasks/s of the peer):", ""] + table(pairs, ratio_cell)
    if any(r.get("peak_mem_mb") for r in rows):
        out += ["", "Peak memory of one meta-iteration, MiB (what it measures: benchmarks/_harness.py):", ""]
        out += table(methods, mem_cell)
    flops = flops_table(rows) if any(r.get("device") == "cuda" for r in rows) else []
    if flops:
        out += ["", "Arithmetic rate at the largest T (estimate: `report.flops_per_task`; fp32 peak of the "
                "card without tensor cores):", ""] + flops
    notes = []
    for m in listed:
        if m not in ran:
            reasons = list(dict.fromkeys(r.get("note", "") for r in rows if r["method"] == m))
            notes.append(f"- `{m}` did not run here: {'; '.join(reasons)}")
    for r in rows:
        if r["method"] in ran and r.get("note"):
            notes.append(f"- `{r['method']}` at T={r['T']} K={r['K']} width={r['width']}: "
                         f"{'' if r.get('status') == 'ok' else r.get('status') + ', '}{r['note']}")
    busy = _busy_rows(rows)
    if busy:
        notes.append("- measured while the machine was busy (1-minute load average above its "
                     f"{os.cpu_count()} cores; timings noisy): " + ", ".join(busy))
    if notes:
        out += ["", "Notes:", ""] + notes
    return "\n".join(out)


def _busy_rows(rows: list[dict]) -> list[str]:
    """`method T=.. K=..` of the rows measured with a load average above the machine's core count."""
    cores = os.cpu_count() or 1
    out = []
    for r in rows:
        try:
            load = float(r.get("load1") or 0)
        except ValueError:
            continue
        if r.get("status") == "ok" and r.get("device") == "cpu" and load > cores + 0.5:
            out.append(f"{r['method']} T={r['T']} K={r['K']} (load {load:g})")
    return out


def update_section(md_path, name: str, body: str) -> None:
    """Replace the text between `<!-- begin NAME -->` and `<!-- end NAME -->` in a markdown file."""
    path = Path(md_path)
    text = path.read_text()
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def plot(rows: list[dict], path, value: str = "tasks_per_s", ylabel: str = "tasks / s") -> None:
    """Log-log `value` vs T, one line per method, one panel per (K, width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(int(r["K"]), int(r["width"])) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ncols = min(len(panels), 2) or 1
    nrows = (len(panels) + ncols - 1) // ncols or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (K, width) in zip(axes.flat, panels):
        for m in methods:
            pts = sorted((int(r["T"]), float(r[value])) for r in rows
                         if r["method"] == m and int(r["K"]) == K and int(r["width"]) == width
                         and r.get("status") == "ok" and r.get(value))
            if pts:
                style = "--" if m in PEERS else "-"
                ax.plot(*zip(*pts), style, marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tasks per meta-batch T")
        ax.set_ylabel(ylabel)
        ax.set_title(f"K={K}, width={width}, {rows[0]['order']} order")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if rows:
        fig.suptitle(f"{rows[0]['device_name']} | torch {rows[0]['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ab_table(sweep: list[dict], variants: dict[str, list[dict]]) -> str:
    """The GPU check's A/B (`variants`: a variant's name and the rows its run wrote) against the sweep's rows of
    the same method and setting: each row's tasks/s, the default's, their ratio (above 1: the variant is
    faster) and the variant against the sweep's vmap. A setting the sweep did not measure shows "-"."""
    head = ["variant", "method", "T", "K", "width", "variant", "default", "ratio", "vs vmap"]
    lines = [head]
    for name, rows in variants.items():
        for row in rows:
            lines.append([name, row["method"], row["T"], row["K"], row["width"],
                          _fmt_rate(_rate(row)) if row.get("status") == "ok" else row.get("status", "?"),
                          _fmt_rate(peer_rate(sweep, row, row["method"])),
                          _fmt_ratio(ratio(sweep, row, row["method"])), _fmt_ratio(ratio(sweep, row, "vmap"))])
    if len(lines) == 1:
        return "no A/B row"
    return "\n".join(line.rstrip() for line in _aligned([[str(c) for c in line] for line in lines], left=2))


def load_ab(folder: Path) -> dict[str, list[dict]]:
    """The A/B's runs under `folder` (the GPU check's ab/: one folder a variant with its throughput.csv)."""
    return {d.name: load(d / "throughput.csv") for d in sorted(Path(folder).iterdir())
            if (d / "throughput.csv").is_file()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--compact", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--update", type=Path, metavar="MD", help="write the markdown tables into this file ...")
    ap.add_argument("--section", default="cpu", help="... between <!-- begin SECTION --> and <!-- end SECTION -->")
    ap.add_argument("--preamble", default="", help="text put before the tables in that section")
    ap.add_argument("--ab", type=Path, metavar="DIR",
                    help="the A/B's folder (the GPU check's ab/): its rows against this CSV's, instead of the table")
    args = ap.parse_args(argv)
    rows = load(args.csv)
    if not rows:
        print(f"{args.csv}: no rows")
        return 1
    if args.ab:
        print(ab_table(rows, load_ab(args.ab)))
        return 0
    if args.plot:
        plot(rows, args.plot)
    if args.update:
        update_section(args.update, args.section, args.preamble + "\n\n" + markdown(rows))
        print(f"updated section {args.section!r} of {args.update}")
    if args.markdown:
        print(markdown(rows))
    else:
        print(compact_table(rows) if args.compact else text_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
