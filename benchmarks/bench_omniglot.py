"""Speed of one Omniglot meta-iteration (forward + exact second-order meta-gradient), fastmaml's backends
against a per-task loop and torch.func.vmap, at the two shapes of `fastmaml train omniglot`:

- mlp:  the MAML paper's 784-256-128-64-64-N network on flattened images, every layer adapted, T = 32
        tasks, K = 1 and 5 inner steps;
- anil: the conv backbone (four conv-64 blocks) on the images of all tasks, then the linear 64-N head
        adapted per task (K = 1); the time is the whole meta-iteration, backbone forward and backward
        included, so the head's method matters little;
- anil-head: the head's part alone: the MAML call on the 64 features (leaves that require grad, as the
        backbone's output is) and its backward to the head and the features.

5-way 1-shot with one query per class (the job's default), float32, cross-entropy. Every method's
meta-gradient is checked against the loop's first. Prints a table (milliseconds per meta-iteration, and
each method's speed-up over vmap and the loop) and, with --out, writes a CSV.

    python benchmarks/bench_omniglot.py [--device cpu|cuda] [--ways 5] [--shots 1] [--out FILE.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import fastmaml  # noqa: E402
from fastmaml import omniglot  # noqa: E402


def _ce(logits, y):
    return F.cross_entropy(logits, y)


def loop_head(params, fs, ys, fq, yq, K, lr):
    """learn2learn-style: per task, K differentiable SGD steps, then the query loss."""
    total = 0.0
    for t in range(fs.shape[0]):
        theta = list(params)
        for _ in range(K):
            g = torch.autograd.grad(_ce(omniglot.api.mlp([p.unsqueeze(0) for p in theta], fs[t:t + 1])[0], ys[t]),
                                    theta, create_graph=True)
            theta = [p - lr * gi for p, gi in zip(theta, g)]
        total = total + _ce(omniglot.api.mlp([p.unsqueeze(0) for p in theta], fq[t:t + 1])[0], yq[t]) / fs.shape[0]
    return total


def vmap_head(params, fs, ys, fq, yq, K, lr):
    """torch.func: vmap over tasks of a torch.func.grad inner loop."""
    from fastmaml._mlp import mlp_forward, task_loss

    def support(theta, x, y):
        return task_loss(mlp_forward(theta, x, "relu"), y, "cross_entropy")

    grad = torch.func.grad(support)

    def one(theta, x_s, y_s, x_q, y_q):
        for _ in range(K):
            theta = [p - lr * g for p, g in zip(theta, grad(theta, x_s, y_s))]
        return support(theta, x_q, y_q)

    return torch.func.vmap(one, in_dims=(None, 0, 0, 0, 0))(params, fs, ys, fq, yq).mean()


def fastmaml_head(backend):
    def run(params, fs, ys, fq, yq, K, lr):
        return fastmaml.maml(params, fs, ys, fq, yq, inner_steps=K, inner_lr=lr, loss="cross_entropy",
                             backend=backend).loss
    return run


def methods(device: torch.device) -> dict:
    out = {"loop": loop_head, "vmap": vmap_head, "auto": fastmaml_head("auto")}
    for name in fastmaml.list_backends():
        out[f"fastmaml-{name}"] = fastmaml_head(name)
    return out


def make_step(model: str, head_fn, T, K, ways, shots, device):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 20, 28, 28, generator=g)
    xs, ys, xq, yq = (t.to(device) for t in omniglot.data.sample_tasks(images, T, ways, shots, shots, g))
    net = omniglot.Network("anil" if model.startswith("anil") else model, ways, torch.Generator().manual_seed(1), device)
    params = [p.requires_grad_() for p in net.params]
    extra = list(net.backbone.parameters()) if model == "anil" else []
    if model == "anil-head":  # the backbone's output, computed once: the head's call and backward alone
        with torch.no_grad():
            both = net.features(torch.cat([xs, xq], dim=1))
        fs0, fq0 = both[:, : xs.shape[1]].requires_grad_(), both[:, xs.shape[1]:].requires_grad_()
        extra = [fs0, fq0]
    leaves = params + extra

    def step():
        if model == "anil-head":
            fs, fq = fs0, fq0
        else:
            both = net.features(torch.cat([xs, xq], dim=1))
            fs, fq = both[:, : xs.shape[1]], both[:, xs.shape[1]:]
        loss = head_fn(params, fs, ys, fq, yq, K, 0.4)
        return loss.detach(), list(torch.autograd.grad(loss, leaves))

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time budget per method and shape")
    parser.add_argument("--shapes", default="mlp:1,mlp:5,anil:1,anil-head:1",
                        help="comma-separated MODEL:K (default mlp:1,mlp:5,anil:1,anil-head:1)")
    parser.add_argument("--out", default=None, help="CSV file to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(m, int(k)) for m, k in (item.split(":") for item in args.shapes.split(","))]
    rows = []
    print(f"# {_harness.device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"T={args.tasks}, {args.ways}-way {args.shots}-shot, load {_harness.load_average()}")
    for model, K in shapes:
        oracle = None
        results = {}
        for name, fn in methods(device).items():
            step = make_step(model, fn, args.tasks, K, args.ways, args.shots, device)
            try:
                timing = _harness.measure(step, device, warmup=2, repeats=args.repeats, max_seconds=args.max_seconds)
            except (RuntimeError, ValueError, TypeError) as err:
                print(f"{model} K={K} {name}: not run ({str(err).splitlines()[0][:100]})")
                continue
            if oracle is None:
                oracle = timing.result
            err = _harness.rel_error(timing.result, oracle)
            if err > 1e-3:
                print(f"{model} K={K} {name}: meta-gradient differs from the loop's (relative error {err:.1e})")
                continue
            results[name] = timing.ms
        kind = "mlp" if model == "mlp" else "anil"
        chosen = fastmaml.explain([p for p in omniglot.Network(kind, args.ways, torch.Generator(), device).params],
                                  *_head_inputs(model, args, device), inner_steps=K, inner_lr=0.4,
                                  loss="cross_entropy").splitlines()[0]
        for name, ms in results.items():
            rows.append({"model": model, "K": K, "T": args.tasks, "method": name, "ms": round(ms, 3),
                         "x_vs_vmap": round(results["vmap"] / ms, 2), "x_vs_loop": round(results["loop"] / ms, 2),
                         "device": _harness.device_name(device)})
        print(f"\n{model}, K={K}: {chosen}")
        print("| method | ms / meta-iteration | x vmap | x loop |\n|---|---|---|---|")
        for r in rows:
            if r["model"] == model and r["K"] == K:
                print(f"| {r['method']} | {r['ms']:.1f} | {r['x_vs_vmap']:.2f} | {r['x_vs_loop']:.2f} |")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")
    return 0


def _head_inputs(model, args, device):
    """Support and query inputs of the adapted MLP (features for anil, pixels for mlp) for `explain`."""
    width = 28 * 28 if model == "mlp" else omniglot.CHANNELS
    n = args.ways * args.shots
    xs = torch.randn(args.tasks, n, width, device=device, requires_grad=model != "mlp")
    xq = torch.randn(args.tasks, n, width, device=device, requires_grad=model != "mlp")
    y = torch.arange(args.ways, device=device).repeat_interleave(args.shots).expand(args.tasks, n)
    return xs, y, xq, y


if __name__ == "__main__":
    sys.exit(main())
