"""`fastmaml compare sinusoid`: the MAML family on the same training tasks and the same held-out tasks.

Each algorithm of `fastmaml.jobs.algorithms` is meta-trained with its paper's settings on the sinusoid job
(the same seed, so the same initialisation and task stream) and evaluated on the same held-out tasks
(`--shot` support points, 100 query points each), adapting as it was trained (its fixed rate or its
learned rates). Outputs, in `--out DIR`:

- `compare.json`: `{ALGORITHM: {"mean": {"1": float, "5": float, "10": float}, "median": {...},
  "diverged": {...}, "train_seconds": float, "backend": str, "skipped_steps": int,
  "curve": {"mean": [MSE after 0..N steps], "median": [...], "diverged": [...]}, "config": {...}}}`.
  Means are over the tasks that did not diverge (`fastmaml.sinusoid.DIVERGED_MSE`), medians over all.
- `compare.png`: mean and median query MSE against test steps, one line per algorithm.
- `compare.md`: the table, as printed.
- `models/ALGORITHM.pt`: each trained model, as `fastmaml train sinusoid` writes it (`load_model`,
  `load_inner_lr`), written as soon as it is trained.

The first three describe all the algorithms and are written at the end; an earlier run's are removed at
the start, so that a run stopped on the way leaves its finished models and no table of another run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from .. import sinusoid
from . import algorithms, driver, ranks as ranks_mod
from .checks import JobError, add_run_options, check_device, check_out_dir, non_negative_int, positive, report

STEPS = (1, 5, 10)  # the table's columns
OUTPUTS = ("compare.json", "compare.md", "compare.png")  # written once every algorithm is evaluated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmaml compare sinusoid`."""
    d = sinusoid.SinusoidConfig()
    parser.add_argument("--out", default=os.path.join("runs", "compare"),
                        help="output folder for compare.json, compare.png, compare.md (default runs/compare)")
    parser.add_argument("--algorithms", default=",".join(algorithms.ALGORITHMS),
                        help="comma-separated algorithms to compare (default: all of "
                             f"{', '.join(algorithms.ALGORITHMS)})")
    parser.add_argument("--iterations", type=non_negative_int, default=d.iterations,
                        help=f"meta-training iterations of each algorithm (default {d.iterations})")
    parser.add_argument("--shot", type=positive(int), default=5,
                        help="support points of the held-out tasks (default 5)")
    parser.add_argument("--eval-tasks", type=positive(int), default=d.eval_tasks,
                        help=f"held-out tasks (default {d.eval_tasks})")
    add_run_options(parser, backend=d.backend, seed=d.seed, threads=d.threads,
                    threads_why="as fastmaml train sinusoid")


def main(args: argparse.Namespace) -> int:
    """Run the comparison; a bad option is one line on stderr and exit code 2."""
    from .sinusoid import preflight

    try:
        names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
        for n in names:
            if n not in algorithms.ALGORITHMS:
                raise JobError(f"--algorithms: unknown {n!r}; choose from {', '.join(algorithms.ALGORITHMS)}")
        if not names:
            raise JobError("--algorithms: give at least one")
        if ranks_mod.world_size() > 1:
            raise JobError("compare runs in one process; run `fastmaml train sinusoid --algorithm NAME` under "
                           "torchrun to train one algorithm over several")
        device = check_device(args.device)
        configs = {n: sinusoid.SinusoidConfig(
            iterations=args.iterations, algorithm=n, backend=args.backend, seed=args.seed, device=str(device),
            threads=args.threads, eval_tasks=args.eval_tasks, eval_shots=(args.shot,),
        ) for n in names}
        for config in configs.values():
            preflight(config)
        check_out_dir(args.out)
    except JobError as err:
        return report("sinusoid", err, command="compare")
    compare(configs, args.out, progress=not args.no_progress and sys.stderr is not None)
    return 0


def compare(configs: dict[str, sinusoid.SinusoidConfig], out_dir: str, progress: bool = True, log=print) -> dict:
    """Train and evaluate each algorithm's config; write compare.json, compare.png, compare.md in
    `out_dir`; return the compare.json dict."""
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:  # an earlier run's, which this one replaces: never left beside this run's models
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    results = {}
    for name, config in configs.items():
        log(f"== {algorithms.get(name).title}: {algorithms.get(name).summary}")
        with driver.torch_threads(config.threads):
            trained = sinusoid.train(config, progress=progress, log=log)
            start = time.perf_counter()
            errors = sinusoid.task_errors(trained.params, config, backend=config.backend, rates=trained.rates)
        stats = sinusoid.summarize(errors)
        os.makedirs(os.path.join(out_dir, "models"), exist_ok=True)
        sinusoid.save_model(os.path.join(out_dir, "models", f"{name}.pt"), trained.params, config, trained.rates)
        shot = str(config.eval_shots[0])
        curve = {k: stats[k][shot] for k in ("mean", "median", "diverged")}
        results[name] = {
            **{k: {str(s): curve[k][s] for s in STEPS if s < len(curve[k])} for k in ("mean", "median", "diverged")},
            "train_seconds": trained.seconds, "backend": trained.backend, "skipped_steps": trained.skipped,
            "curve": curve, "config": config.to_dict(),
        }
        log(f"   trained in {trained.seconds:.1f} s on {trained.backend!r}, evaluated in "
            f"{time.perf_counter() - start:.1f} s; skipped steps: {trained.skipped}")
    table = format_table(results, next(iter(configs.values())))
    log(table)
    driver.write_json(os.path.join(out_dir, "compare.json"), results)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    plot(os.path.join(out_dir, "compare.png"), results, next(iter(configs.values())))
    log(f"wrote {out_dir}/compare.json, compare.png, compare.md")
    return results


def format_table(results: dict, config: sinusoid.SinusoidConfig) -> str:
    """A markdown table: per algorithm, mean / median / diverged count after 1, 5 and 10 steps, and the
    training time."""
    steps = [s for s in STEPS if str(s) in next(iter(results.values()))["mean"]]
    head = ("| algorithm | " + " | ".join(f"mean {s}" for s in steps) + " | "
            + " | ".join(f"median {s}" for s in steps) + " | " + " | ".join(f"diverged {s}" for s in steps)
            + " | train time |")
    lines = [f"{config.eval_tasks} held-out {config.eval_shots[0]}-shot sinusoid tasks, query MSE after 1 / 5 / 10 "
             f"test steps ({config.iterations} meta-iterations of {config.meta_batch} tasks each):", "",
             head, "|" + "---|" * (2 + 3 * len(steps))]
    for name, r in results.items():
        cells = ([f"{r['mean'][str(s)]:.3f}" for s in steps] + [f"{r['median'][str(s)]:.3f}" for s in steps]
                 + [str(r["diverged"][str(s)]) for s in steps])
        lines.append(f"| {algorithms.get(name).title} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(path: str, results: dict, config: sinusoid.SinusoidConfig) -> None:
    """Mean (solid) and median (dotted) query MSE against test steps, one colour per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    for i, (name, r) in enumerate(results.items()):
        steps = list(range(len(r["curve"]["mean"])))
        colour = f"C{i}"
        title = algorithms.get(name).title
        ax.plot(steps, r["curve"]["mean"], marker="o", ms=4, color=colour, label=f"{title} ({r['train_seconds']:.0f} s)")
        ax.plot(steps, r["curve"]["median"], ls=":", color=colour)
        diverged = [s for s in steps if r["curve"]["diverged"][s]]
        if diverged:
            ax.scatter(diverged, [r["curve"]["mean"][s] for s in diverged], marker="x", s=60, color=colour, zorder=3)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel("query MSE")
    ax.set_title(f"sinusoid, {config.eval_shots[0]}-shot, {config.eval_tasks} held-out tasks: mean (solid, "
                 "x: some tasks diverged, left out) and median (dotted)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="algorithm (training time)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
