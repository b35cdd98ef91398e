"""Peak memory of one meta-iteration vs inner steps K and tasks T, for fastmaml's backends and the peers,
on the sinusoid workload (see `_harness.py` for the workload and for what the number measures).

    python benchmarks/bench_memory.py --device cpu --tasks 25 256 4096 --steps 1 5 10 --out runs/mem

Every measurement runs in a fresh Python process (a clean peak: on the CPU the process's peak resident
set, reset just before the call; on CUDA `torch.cuda.max_memory_allocated`). A measurement that takes
longer than `--max-seconds` is abandoned, and the method is skipped at larger T and K. Writes
DIR/memory.csv and DIR/memory.png (peak vs T per K, and peak vs K at the largest T); prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

import _harness as H

COLUMNS = ["method", "device", "device_name", "T", "K", "width", "order", "peak_mem_mb", "status", "note",
           "torch", "triton", "fastmaml", "commit", "date"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[25, 256], help="T values")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="K values")
    ap.add_argument("--width", type=int, default=40, help="hidden width W of 1-W-W-1")
    ap.add_argument("--order", choices=["first", "second"], default="second")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/memory"), help="output folder")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time allowed to one measurement")
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = H.parse_dtype(args.dtype)
    methods = args.methods or H.all_methods()
    explicit = set(args.methods or [])
    env = H.environment(device)
    writer = H.CsvWriter(args.out / "memory.csv", COLUMNS)
    too_slow: dict[str, tuple[int, int]] = {}  # method -> (K, T) of a measurement that timed out
    rows = []
    print(f"# {env['device_name']} | torch {env['torch']} | fastmaml {env['fastmaml']} ({env['commit']})", flush=True)
    for K, T in itertools.product(sorted(args.steps), sorted(args.tasks)):
        # Only the small inputs of the workload are built here (the measurement is in the child).
        w = H.make_workload(T, K, args.width, first_order=H.parse_order(args.order), device=args.device, dtype=dtype)
        for method in methods:
            row = dict(env, method=method, T=T, K=K, width=args.width, order=w.order, status="ok", note="")
            why = H.why_not(method, w, explicit=method in explicit)
            slow = too_slow.get(method)
            if why is None and slow and K >= slow[0] and T >= slow[1]:
                why = f"timed out at K={slow[0]} T={slow[1]}"
            if why is not None:
                row.update(status="skipped", note=why)
            else:
                peak, note = H.subprocess_peak_mb(method, w, timeout_s=args.max_seconds)
                if peak is None:
                    row.update(status="skipped" if "timed out" in note else "failed", note=note)
                    if "timed out" in note:
                        too_slow[method] = (K, T)
                else:
                    row["peak_mem_mb"] = f"{peak:.4g}"
            rows.append(row)
            writer.add(row)
            shown = f"{float(row['peak_mem_mb']):10.4g} MiB" if row.get("peak_mem_mb") else f"{row['status']}: {row['note']}"
            print(f"  {method:<10} T={T:<6} K={K:<3} {shown}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("peak_mem_mb")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    Ks = sorted({int(r["K"]) for r in rows})
    styles = ["-", "--", ":", "-."]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        for i, K in enumerate(Ks):
            pts = sorted((int(r["T"]), float(r["peak_mem_mb"])) for r in ok if r["method"] == m and int(r["K"]) == K)
            if pts:
                ax_t.plot(*zip(*pts), styles[i % len(styles)], color=colors[m], marker="o", label=f"{m} K={K}")
    T_max = max((int(r["T"]) for r in ok), default=None)
    for m in methods:
        pts = sorted((int(r["K"]), float(r["peak_mem_mb"])) for r in ok if r["method"] == m and int(r["T"]) == T_max)
        if pts:
            ax_k.plot(*zip(*pts), color=colors[m], marker="o", label=m)
    ax_t.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="peak MiB", title="peak memory vs T")
    ax_k.set(yscale="log", xlabel="inner steps K", ylabel="peak MiB", title=f"peak memory vs K at T={T_max}")
    ax_k.set_xticks(Ks)
    for ax in (ax_t, ax_k):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if rows:
        fig.suptitle(f"{rows[0]['device_name']} | torch {rows[0]['torch']} | width {rows[0]['width']}, "
                     f"{rows[0]['order']} order", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print()
    print(f"{'method':<10} {'T':>6} {'K':>3}  {'peak MiB':>10}  note")
    for r in rows:
        peak = f"{float(r['peak_mem_mb']):10.4g}" if r.get("peak_mem_mb") else f"{'-':>10}"
        print(f"{r['method']:<10} {r['T']:>6} {r['K']:>3}  {peak}  {r['note']}")
    try:
        plot(rows, args.out / "memory.png")
        print(f"\nwrote {args.out / 'memory.csv'} and {args.out / 'memory.png'}")
    except Exception as err:
        print(f"\nwrote {args.out / 'memory.csv'}; plot failed: {err}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
