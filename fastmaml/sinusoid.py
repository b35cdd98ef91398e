"""The sinusoid regression job of the MAML paper (Finn et al. 2017, section 5.1), end to end.

`fastmaml train sinusoid` (or `python -m fastmaml train sinusoid`) meta-trains a 1-40-40-1 ReLU MLP
with `fastmaml.maml` and evaluates it on held-out tasks:

- A task is `y = A sin(x - phase)` with amplitude `A ~ U[0.1, 5]`, phase `~ U[0, pi]`, `x ~ U[-5, 5]`.
- Training: meta-batches of 25 tasks, 10 support + 10 query points each, one inner SGD step with rate
  0.01, exact second-order meta-gradient, Adam with rate 1e-3, 70,000 iterations.
- Evaluation: 600 tasks drawn with a fixed seed (not the training stream), 5, 10 and 20 support points,
  MSE on 100 query points after 0, 1, ..., 10 inner steps (same rate as in training).

Outputs, in `--out DIR`:
- `results.json`: `{"eval": {"5": [mse after 0..10 steps], "10": [...], "20": [...]},
  "train_seconds": float, "backend": str, "skipped_steps": int, "processes": int, "config": {...}}`
- `adaptation.png`: MSE against inner steps per shot count; a few tasks' curves before and after
  adaptation.
- `model.pt`: `torch.save` of `{"params": [W1, b1, W2, b2, W3, b3], "config": {...}}` (nn.Linear
  layout). Load the parameters with `fastmaml.sinusoid.load_model(path)` and evaluate them with
  `fastmaml.mlp` or `fastmaml.adapt`.

The command line (options, checks before training, torchrun) is fastmaml/jobs/sinusoid.py.
Tasks are sampled on the training device with one `torch.rand` call per meta-batch, so sampling costs
microseconds and the time goes to the MAML op itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from . import api, jobs
from .training import FiniteStep

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
HIDDEN = (40, 40)

# MSE of MAML on this job in Finn et al. 2017. The paper gives no table for the sinusoid job: its
# Figure 3 plots the test MSE against the number of inner steps for K = 5 and K = 10 support points.
# Only values that can be read off that plot without doubt are listed (approximate); "-" elsewhere.
# shot count -> {inner steps: MSE}
PAPER_MSE: dict[int, dict[int, float]] = {
    5: {1: 0.7},
}


@dataclass
class SinusoidConfig:
    """Every setting of the job; stored in results.json and model.pt."""

    iterations: int = 70_000
    meta_batch: int = 25
    n_support: int = 10
    n_query: int = 10
    inner_steps: int = 1
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = False
    backend: str = "auto"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads on the CPU; 0: torch's default
    hidden: tuple = HIDDEN
    eval_tasks: int = 600
    eval_seed: int = 20_170_703  # fixed and independent of `seed`: every run sees the same test tasks
    eval_shots: tuple = (5, 10, 20)
    eval_steps: int = 10
    eval_query: int = 100
    log_every: int = 100
    amplitude_range: tuple = AMPLITUDE_RANGE
    phase_range: tuple = PHASE_RANGE
    x_range: tuple = X_RANGE

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------- data


def sample_tasks(
    num_tasks: int,
    num_points: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `num_tasks` sinusoids and `num_points` points on each, with one `torch.rand` call.

    Returns `(x [T, N, 1], y [T, N, 1], amplitude [T], phase [T])`; the generator must live on `device`.
    """
    u = torch.rand(num_tasks, num_points + 2, generator=generator, device=device, dtype=dtype)
    amplitude = AMPLITUDE_RANGE[0] + (AMPLITUDE_RANGE[1] - AMPLITUDE_RANGE[0]) * u[:, 0]
    phase = PHASE_RANGE[0] + (PHASE_RANGE[1] - PHASE_RANGE[0]) * u[:, 1]
    x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u[:, 2:]
    y = amplitude[:, None] * torch.sin(x - phase[:, None])
    return x.unsqueeze(-1), y.unsqueeze(-1), amplitude, phase


def sample_batch(
    num_tasks: int, n_support: int, n_query: int, generator: torch.Generator, device, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A meta-batch: `(x_support [T, Ns, 1], y_support, x_query [T, Nq, 1], y_query)`, disjoint points
    of the same tasks."""
    x, y, _, _ = sample_tasks(num_tasks, n_support + n_query, generator, device, dtype)
    return x[:, :n_support], y[:, :n_support], x[:, n_support:], y[:, n_support:]


def init_params(
    generator: torch.Generator, hidden: Sequence[int] = HIDDEN, device="cpu", dtype=torch.float32
) -> list[torch.Tensor]:
    """`[W1, b1, ..., WL, bL]` for a 1-hidden...-1 MLP, drawn as nn.Linear's default initialisation:
    weights and biases `~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`."""
    dims = [1, *hidden, 1]
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        for shape in ((fan_out, fan_in), (fan_out,)):
            u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
            params.append((2.0 * u - 1.0) * bound)
    return params


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch CPU threads (0: leave torch's setting), restored afterwards.

    The ops of a 1-40-40-1 net on a few dozen tasks are far too small to gain from intra-op threads,
    and on a busy machine the threads stall each other (a loaded 2-core machine ran the reference path's
    training iterations several times faster with one thread than with two).
    """
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_device(name: str) -> torch.device:
    return jobs.check_device(name)


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What `train` returns. `history`: mean meta-loss of each block of `log_every` iterations."""

    params: list[torch.Tensor]
    backend: str
    seconds: float
    history: list[float] = field(default_factory=list)
    skipped: int = 0  # meta-steps skipped for a non-finite loss or gradient


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    # The fused Adam updates the six small tensors in one pass instead of a loop of small ops, which
    # matters when the MAML step itself takes about a millisecond.
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def train(config: SinusoidConfig, progress: bool = True, log=print, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> TrainResult:
    """Meta-train the MLP with `fastmaml.maml` and Adam. Returns the trained params (detached).

    Runs with `config.threads` torch CPU threads (restored afterwards) unless it is 0. With
    `checkpoint_every = N > 0`, `checkpoint_dir/checkpoint.pt` is written atomically every N iterations
    and at the end (parameters, Adam's state, the iteration, the task stream's RNG state, the loss
    history); with `resume`, training continues from it when it exists, and ends with exactly the
    parameters of an uninterrupted run.

    Under torchrun (`ranks`, from `fastmaml.jobs.ranks.from_environment`): each rank trains on its
    `meta_batch / world` tasks, drawn from its own stream (seeded from the seed and the rank), and the
    meta-gradient and loss are averaged over the ranks (one all-reduce a step); only rank 0 logs, shows
    the progress bar and writes the checkpoint (with every rank's task-stream state).

    A meta-step whose (averaged) loss or gradient is not finite is skipped (`fastmaml.FiniteStep`):
    parameters and Adam's state stay as they were; `TrainResult.skipped` counts them.
    """
    with torch_threads(config.threads):
        return _train(config, progress, log, checkpoint_dir, checkpoint_every, resume, ranks)


# Settings a checkpoint must share with the run that resumes it (the others, the iteration count, threads
# and evaluation settings, may change between the two).
_RESUME_KEYS = ("meta_batch", "n_support", "n_query", "inner_steps", "inner_lr", "meta_lr", "first_order",
                "seed", "hidden", "amplitude_range", "phase_range", "x_range", "log_every")


def _restore(path: str, config: SinusoidConfig, params, optimizer, tasks, ranks) -> dict:
    """Load the checkpoint at `path` into params, optimizer and task stream; returns its bookkeeping."""
    state = jobs.checkpoint.load(path)
    jobs.checkpoint.check_resumable(path, state, config.to_dict(), _RESUME_KEYS, config.iterations, ranks.world)
    with torch.no_grad():
        for p, q in zip(params, state["params"]):
            p.copy_(q)
    optimizer.load_state_dict(state["optimizer"])
    tasks.set_state(state["tasks_rng"][ranks.rank])
    return state


def _train(config: SinusoidConfig, progress: bool, log, checkpoint_dir: str | None = None,
           checkpoint_every: int = 0, resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> TrainResult:
    ranks = ranks or jobs.ranks.Ranks()
    per_rank = jobs.ranks.split(config.meta_batch, ranks.world)
    if not ranks.is_main:
        progress, log = False, (lambda *a, **k: None)
    device = _resolve_device(config.device)
    params = [p.requires_grad_() for p in init_params(_generator(config.seed, device), config.hidden, device)]
    # A separate stream for tasks, so changing the model size does not change the tasks; one per rank
    # (rank 0's is the one-process run's).
    tasks = _generator(config.seed + 1 + 1_000_003 * ranks.rank, device)
    optimizer = _adam(params, config.meta_lr)
    guard = FiniteStep(optimizer)
    ckpt_path = os.path.join(checkpoint_dir, jobs.checkpoint.CHECKPOINT) if checkpoint_dir else None
    first, seconds_before, history = 0, 0.0, []
    if resume and ckpt_path and os.path.exists(ckpt_path):
        state = _restore(ckpt_path, config, params, optimizer, tasks, ranks)
        guard.load_state_dict(state.get("guard", guard.state_dict()))
        first, seconds_before, history = state["iteration"], state["seconds"], list(state["history"])
        log(f"fastmaml sinusoid: resuming from {ckpt_path} at iteration {first}")
    elif resume:
        log(f"fastmaml sinusoid: no checkpoint in {checkpoint_dir} yet; starting from iteration 0")

    bar = None
    if progress and config.iterations > first:
        from tqdm import tqdm

        bar = tqdm(total=config.iterations, initial=first, desc="meta-train", unit="it", smoothing=0.1,
                   dynamic_ncols=True)
    ema = None
    backend = None
    # The loss is accumulated on the device and read every `log_every` iterations: reading it every
    # step would synchronise a GPU and cost a Python round trip per iteration.
    running = torch.zeros((), device=device)
    block = 0

    def save_checkpoint(done: int) -> None:
        streams = ranks.gather_objects(tasks.get_state().cpu())
        if ranks.is_main:
            jobs.checkpoint.save(ckpt_path, {
                "iteration": done, "params": [p.detach().cpu() for p in params],
                "optimizer": optimizer.state_dict(), "tasks_rng": streams, "guard": guard.state_dict(),
                "seconds": seconds_before + time.perf_counter() - start, "history": list(history),
                "config": config.to_dict(),
            })

    if config.iterations > first:
        # One untimed step without the update, so that train_seconds measures training: the first call
        # of a fused backend may build or load its kernels, the reference one traces its vmap.
        prep = time.perf_counter()
        warm = sample_batch(per_rank, config.n_support, config.n_query,
                            _generator(config.seed + 2, device), device)
        api.maml(params, *warm, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                 first_order=config.first_order, backend=config.backend).loss.backward()
        optimizer.zero_grad(set_to_none=True)
        prep = time.perf_counter() - prep
        if prep > 1.0:
            log(f"fastmaml sinusoid: backend ready in {prep:.1f} s (not counted in train_seconds)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for it in range(first, config.iterations):
        xs, ys, xq, yq = sample_batch(per_rank, config.n_support, config.n_query, tasks, device)
        out = api.maml(
            params, xs, ys, xq, yq, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
            first_order=config.first_order, backend=config.backend,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        loss = out.loss.detach().clone()
        ranks.mean_([p.grad for p in params] + [loss.view(1)])
        guard.step(loss)
        running += loss
        block += 1
        if backend is None:
            backend = out.backend
            message = f"fastmaml sinusoid: training on backend {backend!r} ({device.type})"
            if bar is not None:
                bar.write(message)  # above the bar, which a plain print would break
            else:
                log(message)
        if block == config.log_every or it == config.iterations - 1:
            mean = running.item() / block
            history.append(mean)
            ema = mean if ema is None else 0.9 * ema + 0.1 * mean
            if bar is not None:
                bar.update(block)
                bar.set_postfix(meta_loss=f"{ema:.4f}", refresh=False)
            running.zero_()
            block = 0
        if ckpt_path and checkpoint_every and ((it + 1) % checkpoint_every == 0 or it == config.iterations - 1):
            if block:  # a partial logging block would be lost with the process: close it now
                history.append(running.item() / block)
                running.zero_()
                block = 0
            save_checkpoint(it + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = seconds_before + time.perf_counter() - start
    if bar is not None:
        bar.close()
    if guard.skipped:
        log(f"fastmaml sinusoid: skipped {guard.skipped} meta-step(s) whose loss or gradient was not finite")
    return TrainResult([p.detach() for p in params], backend or "none", seconds, history, guard.skipped)


# --------------------------------------------------------------------------------------- evaluation


def held_out_tasks(config: SinusoidConfig, device) -> dict[str, torch.Tensor]:
    """The held-out tasks: `x_support [E, max_shot, 1]`, `y_support`, `x_query [E, Nq, 1]`, `y_query`,
    `amplitude [E]`, `phase [E]`. The n-shot support set is the first n support points, so the shot
    counts are compared on the same tasks."""
    max_shot = max(config.eval_shots)
    gen = _generator(config.eval_seed, torch.device(device))
    x, y, amplitude, phase = sample_tasks(config.eval_tasks, max_shot + config.eval_query, gen, device)
    return {
        "x_support": x[:, :max_shot], "y_support": y[:, :max_shot],
        "x_query": x[:, max_shot:], "y_query": y[:, max_shot:],
        "amplitude": amplitude, "phase": phase,
    }


def adapted_params(
    params: Sequence[torch.Tensor], x_support: torch.Tensor, y_support: torch.Tensor,
    steps: int, inner_lr: float, backend: str = "auto",
) -> list[torch.Tensor]:
    """Per-task params after `steps` inner SGD steps, each `[T, *shape]` (steps = 0: the meta-learned
    params repeated for every task)."""
    if steps == 0:
        T = x_support.shape[0]
        return [p.unsqueeze(0).expand(T, *p.shape) for p in params]
    return api.adapt(params, x_support, y_support, inner_steps=steps, inner_lr=inner_lr, backend=backend)


@torch.no_grad()
def task_errors(params: Sequence[torch.Tensor], config: SinusoidConfig, backend: str = "auto",
                ranks: jobs.ranks.Ranks | None = None) -> dict[str, torch.Tensor]:
    """Query MSE of every held-out task after 0, 1, ..., `eval_steps` inner steps, per shot count.

    Returns `{"5": [eval_steps + 1, eval_tasks], "10": ..., ...}` (tensors on the CPU). Under torchrun
    (`ranks`) each rank scores its share of the tasks and every rank gets all of them, in task order.
    """
    ranks = ranks or jobs.ranks.Ranks()
    device = params[0].device
    data = held_out_tasks(config, device)
    if ranks.world > 1:
        share = ranks.share(config.eval_tasks)
        data = {k: v[share] for k, v in data.items()}
    errors = {}
    for shot in config.eval_shots:
        xs, ys = data["x_support"][:, :shot], data["y_support"][:, :shot]
        rows = []
        # One adapt call per step count: the library runs the inner loop, the query points are scored
        # here with fastmaml.mlp. Steps beyond the training K are the point of this evaluation.
        for steps in range(config.eval_steps + 1):
            theta = adapted_params(params, xs, ys, steps, config.inner_lr, backend)
            preds = api.mlp(theta, data["x_query"])
            rows.append(((preds - data["y_query"]) ** 2).mean(dim=(1, 2)))
        errors[str(shot)] = ranks.gather_rows(torch.stack(rows).t().contiguous()).t().cpu()
    return errors


def evaluate(params: Sequence[torch.Tensor], config: SinusoidConfig, backend: str = "auto") -> dict[str, list[float]]:
    """Mean query MSE over the held-out tasks after 0, 1, ..., `eval_steps` inner steps, per shot count.

    Returns `{"5": [eval_steps + 1 floats], "10": [...], ...}`.
    """
    return {shot: e.mean(dim=1).tolist() for shot, e in task_errors(params, config, backend).items()}


def format_spread(errors: dict[str, torch.Tensor]) -> str:
    """Median and worst task after the last step, per shot count: a few tasks whose inner loop
    diverges at this rate can dominate the mean."""
    parts = []
    for shot, e in errors.items():
        last = e[-1]
        finite = torch.isfinite(last)
        worst = last[finite].max().item() if bool(finite.any()) else float("nan")
        text = f"{shot}-shot {last.nanmedian().item():.3f} / {worst:.3g}"
        if not bool(finite.all()):
            # A task whose SGD overflowed makes the mean nan/inf; say how many instead of hiding it.
            text += f" ({int((~finite).sum())} task(s) overflowed)"
        parts.append(text)
    return f"after {len(next(iter(errors.values()))) - 1} steps, median / worst finite task: " + ", ".join(parts)


def format_table(results: dict[str, list[float]], paper: dict[int, dict[int, float]] = PAPER_MSE) -> str:
    """The evaluation as a text table: one row per step count, ours and the paper's MSE per shot count."""
    shots = list(results)
    head = "steps " + "".join(f"| {s + '-shot':>8} {'paper':>6} " for s in shots)
    lines = [head, "-" * len(head)]
    for steps in range(len(results[shots[0]])):
        row = f"{steps:>5} "
        for s in shots:
            ref = paper.get(int(s), {}).get(steps)
            row += f"| {results[s][steps]:>8.3f} {'-' if ref is None else f'~{ref:.2f}':>6} "
        lines.append(row)
    lines.append("paper: approximate values read off Finn et al. 2017, Figure 3 (no table in the paper)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots


def plot(
    path: str, params: Sequence[torch.Tensor], results: dict[str, list[float]], config: SinusoidConfig,
    num_tasks: int = 3, shot: int = 5, backend: str = "auto",
) -> None:
    """Write the figure: left, MSE against inner steps per shot count (log scale); right, `num_tasks`
    held-out tasks with their `shot` support points, the true curve and the predictions before
    adaptation and after 1 and `eval_steps` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig = plt.figure(figsize=(12, 6), layout="constrained")
    grid = fig.add_gridspec(num_tasks, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[:, 0])
    steps = list(range(config.eval_steps + 1))
    for s, curve in results.items():
        ax.plot(steps, curve, marker="o", ms=4, label=f"{s}-shot")
    for s, points in PAPER_MSE.items():
        ax.scatter(list(points), list(points.values()), marker="x", s=60, color="black", zorder=3,
                   label=f"paper, {s}-shot (approx.)")
    ax.set_yscale("log")
    # Plain numbers at 1, 2, 5 x 10^n on the log axis: "0.5" reads better than "5 x 10^-1".
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel(f"query MSE (mean over {config.eval_tasks} tasks)")
    ax.set_title(f"adaptation (trained with K={config.inner_steps}, {config.n_support} shots)")
    ax.axvline(config.inner_steps, color="grey", lw=0.8, ls=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()

    device = params[0].device
    with torch.no_grad():
        data = held_out_tasks(config, device)
        xs, ys = data["x_support"][:num_tasks, :shot], data["y_support"][:num_tasks, :shot]
        grid_x = torch.linspace(*X_RANGE, 200, device=device).expand(num_tasks, 200).unsqueeze(-1)
        truth = data["amplitude"][:num_tasks, None] * torch.sin(grid_x[..., 0] - data["phase"][:num_tasks, None])
        curves = {}
        for k in (0, 1, config.eval_steps):
            theta = adapted_params(params, xs, ys, k, config.inner_lr, backend)
            curves[k] = api.mlp(theta, grid_x)[..., 0].cpu()
    gx = grid_x[0, :, 0].cpu()
    styles = {0: dict(color="tab:grey", ls=":"), 1: dict(color="tab:green", ls="--"),
              config.eval_steps: dict(color="tab:blue", ls="-")}
    for t in range(num_tasks):
        a = fig.add_subplot(grid[t, 1])
        a.plot(gx, truth[t].cpu(), color="tab:red", lw=2, alpha=0.6, label="true")
        for k, pred in curves.items():
            a.plot(gx, pred[t], label="before adaptation" if k == 0 else f"after {k} step{'s' * (k > 1)}", **styles[k])
        a.scatter(xs[t, :, 0].cpu(), ys[t, :, 0].cpu(), color="black", zorder=3, s=20, label=f"{shot} support points")
        a.set_ylabel(f"A={data['amplitude'][t]:.2f}, phase={data['phase'][t]:.2f}", fontsize=8)
        if t == 0:
            # Above the panels, where it hides no curve.
            a.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=3,
                     title=f"held-out tasks, {shot} support points each", title_fontsize=9)
        if t == num_tasks - 1:
            a.set_xlabel("x")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the model


def save_model(path: str, params: Sequence[torch.Tensor], config: SinusoidConfig) -> None:
    """`torch.save` of `{"params": [W1, b1, ...] (on the CPU), "config": {...}}`."""
    torch.save({"params": [p.detach().cpu() for p in params], "config": config.to_dict()}, path)


def load_model(path: str, map_location="cpu") -> list[torch.Tensor]:
    """The meta-learned params `[W1 [40, 1], b1 [40], W2 [40, 40], b2 [40], W3 [1, 40], b3 [1]]` from a
    `model.pt` written by this job; use them with `fastmaml.adapt` / `fastmaml.mlp`, e.g.
    `fastmaml.mlp(fastmaml.adapt(params, xs, ys, inner_steps=5), xq)`."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or "params" not in checkpoint:
        raise ValueError(f"{path} is not a fastmaml sinusoid model (expected a dict with 'params')")
    return list(checkpoint["params"])


# ---------------------------------------------------------------------------------------- the job


def run(config: SinusoidConfig, out_dir: str, progress: bool = True, log=print, checkpoint_every: int = 0,
        resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> dict:
    """Train, evaluate, write `results.json`, `adaptation.png` and `model.pt` in `out_dir`; return the
    results dict. `checkpoint_every` and `resume`: see `train` (the checkpoint is `out_dir/checkpoint.pt`).
    Under torchrun (`ranks`), training and evaluation are shared by the ranks and rank 0 writes."""
    ranks = ranks or jobs.ranks.Ranks()
    if ranks.is_main:
        os.makedirs(out_dir, exist_ok=True)
    else:
        log = lambda *a, **k: None  # noqa: E731
    with torch_threads(config.threads):
        return _run(config, out_dir, progress, log, checkpoint_every, resume, ranks)


def _run(config: SinusoidConfig, out_dir: str, progress: bool, log, checkpoint_every: int = 0,
         resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> dict:
    ranks = ranks or jobs.ranks.Ranks()
    trained = _train(config, progress, log, out_dir, checkpoint_every, resume, ranks)
    log(f"fastmaml sinusoid: trained {config.iterations} iterations in {trained.seconds:.1f} s "
        f"on backend {trained.backend!r}")
    start = time.perf_counter()
    errors = task_errors(trained.params, config, backend=config.backend, ranks=ranks)
    results = {shot: e.mean(dim=1).tolist() for shot, e in errors.items()}
    log(f"evaluation on {config.eval_tasks} held-out tasks, mean query MSE after n inner steps "
        f"(lr {config.inner_lr}; {time.perf_counter() - start:.1f} s):")
    log(format_table(results))
    log(format_spread(errors))
    summary = {
        "eval": results,
        "train_seconds": trained.seconds,
        "backend": trained.backend,
        "skipped_steps": trained.skipped,
        "processes": ranks.world,
        "config": config.to_dict(),
    }
    if not ranks.is_main:
        return summary
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    save_model(os.path.join(out_dir, "model.pt"), trained.params, config)
    plot(os.path.join(out_dir, "adaptation.png"), trained.params, results, config, backend=config.backend)
    log(f"wrote {out_dir}/results.json, model.pt, adaptation.png")
    return summary
