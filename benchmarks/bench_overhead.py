"""The cost of one small training call: how much of a meta-iteration is not kernel time.

Workload: `_harness.make_workload` (sinusoid, 1-W-W-1, 10 + 10 points, second order unless
`--first-order`). For each T (default 1 and 25) it times, interleaved in rounds (the best round of each
counts, as the machine's noise only ever adds):

  eager          `fastmaml.maml(...).loss.backward()`, gradients reset to None (optimizer excluded)
  module         the same through the drop-in `fastmaml.MAML(nn.Sequential(...))`
  eager+adam     the same with `torch.optim.Adam.step()` and `zero_grad()`: a whole meta-iteration
  compiled       the meta-loss function under `torch.compile(fullgraph=True)` (inductor), then backward
  reduce-overhead (cuda) the same with `mode="reduce-overhead"` (CUDA graphs inside torch.compile)
  graph (cuda)   the whole meta-iteration with Adam captured once in a CUDA graph and replayed
  vmap           the torch.func peer (`peers.vmap_step`), for the ratio
  floor          `(p * 2).sum().backward()` on one parameter: what any autograd call costs here
  compiled-floor a trivial function of the same arguments (the sum of every parameter) under
                 `torch.compile(fullgraph=True)`, then backward: what any compiled call of them costs here

and, with `torch.profiler`, the share of the eager call spent in fastmaml's own operations (the kernel
and its allocations) as opposed to Python, validation, autograd and dispatch.

`--compare-with PATH` runs the same measurements, in the same run, with the fastmaml package of another
checkout (PATH is put first on PYTHONPATH of a child process), e.g. a `git worktree` of an older commit:
the table then shows both. Results: a table on stdout, and `--json FILE`.

    python benchmarks/bench_overhead.py --threads 2
    git worktree add /tmp/old HEAD~5 && python benchmarks/bench_overhead.py --compare-with /tmp/old
    python benchmarks/bench_overhead.py --device cuda --tasks 25 --inner-steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fastmaml  # noqa: E402
import peers  # noqa: E402
from _harness import INNER_LR, make_workload  # noqa: E402

METHODS = ("eager", "module", "eager+adam", "compiled", "reduce-overhead", "graph", "vmap", "floor", "compiled-floor")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, w, device: torch.device) -> Optional[Callable[[], None]]:
    """One call of `method` as a no-argument function, or None where it does not apply here."""
    params = w.fresh_params()
    data = (w.x_support, w.y_support, w.x_query, w.y_query)
    opts = dict(inner_steps=w.K, inner_lr=INNER_LR, first_order=w.first_order)

    def meta_loss(params, xs, ys, xq, yq):
        return fastmaml.maml(params, xs, ys, xq, yq, **opts).loss

    def training_call(loss_fn):  # forward, backward, gradients reset (the optimizer excluded)
        def call():
            loss_fn(params, *data).backward()
            for p in params:
                p.grad = None
        return call

    def trivial(params, xs, ys, xq, yq):
        return sum(p.sum() for p in params) + xs.sum()

    if method == "eager":
        return training_call(meta_loss)
    if method == "module":
        layers = []
        for i in range(0, len(params), 2):
            linear = torch.nn.Linear(params[i].shape[1], params[i].shape[0], device=device, dtype=params[i].dtype)
            with torch.no_grad():
                linear.weight.copy_(params[i])
                linear.bias.copy_(params[i + 1])
            layers += [linear, torch.nn.ReLU()]
        maml = fastmaml.MAML(torch.nn.Sequential(*layers[:-1]), inner_lr=INNER_LR, inner_steps=w.K,
                             first_order=w.first_order)
        module_params = list(maml.parameters())

        def call():
            maml(*data).loss.backward()
            for p in module_params:
                p.grad = None
        return call
    if method == "eager+adam":
        opt = torch.optim.Adam(params, lr=1e-3)

        def call():
            meta_loss(params, *data).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return call
    if method == "compiled":
        return training_call(torch.compile(meta_loss, fullgraph=True))
    if method == "reduce-overhead":
        if device.type != "cuda":
            return None
        return training_call(torch.compile(meta_loss, mode="reduce-overhead", fullgraph=True))
    if method == "compiled-floor":
        return training_call(torch.compile(trivial, fullgraph=True))
    if method == "graph":
        if device.type != "cuda":
            return None
        opt = torch.optim.Adam(params, lr=1e-3, capturable=True)

        def iteration():
            opt.zero_grad(set_to_none=False)
            meta_loss(params, *data).backward()
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                iteration()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            iteration()

        # The replay writes the parameters, their gradients and Adam's state in place: the call must keep
        # them alive. `graph.replay` alone kept only the graph; the rest was freed when build() returned,
        # and once the memory went back to the driver (every capture calls empty_cache, so the
        # reduce-overhead method's next capture did) a replay wrote to unmapped memory: the H200's
        # "illegal memory access" of 2026-11-30.
        def replay(keep=(params, opt, iteration)):
            graph.replay()
        return replay
    if method == "vmap":
        step = peers.vmap_step(params, *data, **opts)
        return lambda: step()
    if method == "floor":
        p = params[2]
        def call():
            (p * 2).sum().backward()
            p.grad = None
        return call
    raise ValueError(method)


def time_methods(calls: dict[str, Callable[[], None]], device: torch.device, rounds: int,
                 min_seconds: float) -> dict[str, float]:
    """Best microseconds per call of each method over `rounds` interleaved rounds."""
    for name, call in calls.items():  # warm-up (compilation, caches)
        try:
            for _ in range(5):
                call()
            _sync(device)  # a kernel's asynchronous error surfaces here, under the method that ran it
        except Exception as err:
            raise RuntimeError(f"method {name!r} failed in its warm-up: {type(err).__name__}: {err}") from err
    per_round = {}
    for name, call in calls.items():  # enough calls per round for about min_seconds / rounds
        t0 = time.perf_counter()
        call()
        _sync(device)
        per_round[name] = max(10, int(min_seconds / rounds / max(time.perf_counter() - t0, 1e-6)))
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            n = per_round[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return best


def own_op_share(call: Callable[[], None]) -> float:
    """The share of an eager call's host time spent inside fastmaml's operations (torch.profiler: the
    CPU time of `fastmaml::` ops that are not nested in another fastmaml op, over the wall time)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        call()
    n = 200
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        wall = time.perf_counter() - t0
    inside = 0.0
    for event in prof.events():
        if event.name.startswith("fastmaml::") and not _nested(event):
            inside += event.cpu_time_total
    return inside / 1e6 / wall


def _nested(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("fastmaml::"):
            return True
        parent = parent.cpu_parent
    return False


def measure(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for T in args.tasks:
        w = make_workload(T, args.inner_steps, args.width, first_order=args.first_order, device=args.device)
        calls, skipped = {}, {}
        for m in methods:
            try:
                call = build(m, w, device)
            except Exception as err:  # a method this checkout or machine cannot run: say why, go on
                skipped[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                continue
            if call is None:
                continue
            try:
                call()
                _sync(device)
                calls[m] = call
            except Exception as err:
                skipped[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        times = time_methods(calls, device, args.rounds, args.seconds)
        share = own_op_share(calls["eager"]) if "eager" in calls and device.type == "cpu" else None
        rows.append({"T": T, "us": times, "skipped": skipped, "own_op_share": share,
                     "fastmaml": str(Path(fastmaml.__file__).resolve().parent.parent)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=lambda s: [int(t) for t in s.split(",")], default=[1, 25])
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per method and T, all rounds")
    parser.add_argument("--compare-with", help="another checkout whose fastmaml is measured too")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args)))
        return 0
    results = {"this": measure(args)}
    if args.compare_with:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(args.compare_with).resolve()),
                                                          os.environ.get("PYTHONPATH", "")]))
        child = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = child.index("--compare-with")
        del child[i:i + 2]
        child = [a for a in child if not a.startswith("--compare-with=")]
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child, "--child"], env=env,
                             capture_output=True, text=True, check=True)
        results["other"] = json.loads(out.stdout.strip().splitlines()[-1])
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                               "results": results}, indent=1))
    return 0


def report(results: dict, args) -> None:
    print(f"# fastmaml training-call overhead: {args.device}, {args.threads} threads, 1-{args.width}-"
          f"{args.width}-1, 10 + 10 points, K={args.inner_steps}, "
          f"{'first' if args.first_order else 'second'} order; best of {args.rounds} rounds, us per call")
    for which, rows in results.items():
        print(f"\n## {which}: fastmaml from {rows[0]['fastmaml']}")
        names = [m for m in METHODS if any(m in r["us"] for r in rows)]
        print("| T | " + " | ".join(names) + " | vmap / eager | fastmaml ops' share of eager |")
        print("|---:|" + "---:|" * (len(names) + 2))
        for r in rows:
            cells = [f"{r['us'][m]:.1f}" if m in r["us"] else "-" for m in names]
            ratio = (f"{r['us']['vmap'] / r['us']['eager']:.1f}x" if "vmap" in r["us"] and "eager" in r["us"]
                     else "-")
            share = "-" if r["own_op_share"] is None else f"{100 * r['own_op_share']:.0f}%"
            print(f"| {r['T']} | " + " | ".join(cells) + f" | {ratio} | {share} |")
            for m, why in r["skipped"].items():
                print(f"  ({m} did not run: {why})")


if __name__ == "__main__":
    sys.exit(main())
