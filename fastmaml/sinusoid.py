"""The sinusoid regression job of the MAML paper (Finn et al. 2017, section 5.1), end to end.

`fastmaml train sinusoid` (or `python -m fastmaml train sinusoid`) meta-trains a 1-40-40-1 ReLU MLP
with `fastmaml.maml` and evaluates it on held-out tasks:

- A task is `y = A sin(x - phase)` with amplitude `A ~ U[0.1, 5]`, phase `~ U[0, pi]`, `x ~ U[-5, 5]`.
- Training: meta-batches of 25 tasks, 10 support + 10 query points each, 70,000 iterations, with one of
  the MAML family (`--algorithm`, fastmaml/jobs/algorithms.py; each with its paper's settings). The
  default, MAML: one inner SGD step with rate 0.01, exact second-order meta-gradient, Adam 1e-3.
- Evaluation: 600 tasks drawn with a fixed seed (not the training stream), 5, 10 and 20 support points,
  MSE on 100 query points after 0, 1, ..., 10 inner steps, adapting as in training (the same fixed rate,
  or the learned rates; learned per-step rates past the trained K reuse the last step's). A task whose
  MSE is not finite or above `DIVERGED_MSE` counts as diverged: means are over the other tasks, medians
  over all, and the diverged tasks are counted.

Outputs, in `--out DIR`:
- `results.json`: `{"eval": {"5": [mean MSE after 0..10 steps], "10": [...], "20": [...]},
  "eval_median": {...}, "eval_diverged": {"5": [counts], ...}, "train_seconds": float, "backend": str,
  "skipped_steps": int, "processes": int, "config": {...}}`
- `adaptation.png`: MSE against inner steps per shot count; a few tasks' curves before and after
  adaptation.
- `model.pt`: `torch.save` of `{"params": [W1, b1, W2, b2, W3, b3], "rates": ..., "config": {...}}`
  (nn.Linear layout). Load the parameters with `fastmaml.sinusoid.load_model(path)`, the rates to adapt
  them with `load_inner_lr(path, steps)`, and evaluate them with `fastmaml.adapt` and `fastmaml.mlp`.

The command line (options, checks before training, torchrun) is fastmaml/jobs/sinusoid.py, the training
loop the jobs' shared driver (fastmaml/jobs/driver.py), `fastmaml compare sinusoid` fastmaml/jobs/compare.py.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from . import api, jobs
from ._mlp import init_mlp
from .jobs import algorithms, driver
from .jobs.driver import torch_threads  # noqa: F401  (part of this module's API; omniglot and compare use it)
from .jobs.algorithms import adapted_params, inner_lr_for  # noqa: F401  (part of this module's API)

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
    algorithm: str = "maml"  # fastmaml.jobs.algorithms.ALGORITHMS; None below: the algorithm's setting
    inner_steps: Optional[int] = None
    inner_lr: Optional[float] = None
    meta_lr: Optional[float] = None
    first_order: Optional[bool] = None
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

    def __post_init__(self):
        spec = algorithms.get(self.algorithm)
        for key in ("inner_steps", "inner_lr", "meta_lr", "first_order"):
            if getattr(self, key) is None:
                setattr(self, key, getattr(spec, key))

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
    return init_mlp([1, *hidden, 1], generator, device, dtype)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _resolve_device(name: str) -> torch.device:
    return jobs.check_device(name)


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What `train` returns. `history`: mean meta-loss of each block of `log_every` iterations.
    `rates`: how the trained model adapts (`algorithms.Learner.eval_rates`): `{"inner_lr": float}`, or
    the learned rates `{"rates": [tensor per param], "per_step": bool}` (Meta-SGD, MAML++)."""

    params: list[torch.Tensor]
    backend: str
    seconds: float
    history: list[float] = field(default_factory=list)
    skipped: int = 0  # meta-steps skipped for a non-finite loss or gradient
    rates: dict = field(default_factory=dict)


def train(config: SinusoidConfig, progress: bool = True, log=print, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> TrainResult:
    """Meta-train the MLP with `config.algorithm` (`fastmaml.jobs.algorithms`). Returns the trained params
    (detached) and rates.

    Runs with `config.threads` torch CPU threads (restored afterwards) unless it is 0. The loop is the
    jobs' shared driver (`fastmaml.jobs.driver.train`): with `checkpoint_every = N > 0`,
    `checkpoint_dir/checkpoint.pt` is written atomically every N iterations and at the end (parameters
    and rates, the optimizer's state, the iteration, the task stream's RNG state, the loss history); with
    `resume`, training continues from it when it exists, and ends with exactly the parameters of an
    uninterrupted run.

    Under torchrun (`ranks`, from `fastmaml.jobs.ranks.from_environment`): each rank trains on its
    `meta_batch / world` tasks, drawn from its own stream (seeded from the seed and the rank), and the
    meta-gradient and loss are averaged over the ranks (one all-reduce a step); only rank 0 logs, shows
    the progress bar and writes the checkpoint (with every rank's task-stream state).

    A meta-step whose (averaged) loss or gradient is not finite is skipped (`fastmaml.FiniteStep`):
    parameters, rates and the optimizer's state stay as they were; `TrainResult.skipped` counts them.
    """
    with torch_threads(config.threads):
        return _train(config, progress, log, checkpoint_dir, checkpoint_every, resume, ranks)


# Settings a checkpoint must share with the run that resumes it (the others, the iteration count, threads
# and evaluation settings, may change between the two; the iteration count sizes the schedules of Reptile
# and MAML++, whose checkpoints therefore resume only to the same count).
_RESUME_KEYS = ("algorithm", "meta_batch", "n_support", "n_query", "inner_steps", "inner_lr", "meta_lr",
                "first_order", "seed", "hidden", "amplitude_range", "phase_range", "x_range", "log_every")


def _resume_keys(config: SinusoidConfig) -> tuple[str, ...]:
    spec = algorithms.get(config.algorithm)
    scheduled = spec.reptile or spec.cosine_meta_lr or spec.multi_step_loss or spec.first_order_fraction > 0
    return _RESUME_KEYS + (("iterations",) if scheduled else ())


def check_task_streams(config: SinusoidConfig, world: int) -> None:
    """Raises ValueError where a rank's training tasks would be the held-out ones (its stream's seed is
    `eval_seed`): the evaluation would then measure tasks the model was trained on."""
    for rank in range(world):
        if jobs.ranks.task_stream_seed(config.seed, rank) == config.eval_seed:
            where = "" if world == 1 else f" on rank {rank} of {world}"
            raise ValueError(f"seed {config.seed} draws the training tasks{where} from the held-out stream "
                             f"(eval_seed {config.eval_seed}): the evaluation would measure trained-on tasks; "
                             "choose another seed")


def _train(config: SinusoidConfig, progress: bool, log, checkpoint_dir: str | None = None,
           checkpoint_every: int = 0, resume: bool = False, ranks: jobs.ranks.Ranks | None = None) -> TrainResult:
    ranks = ranks or jobs.ranks.Ranks()
    per_rank = jobs.ranks.split(config.meta_batch, ranks.world)
    device = _resolve_device(config.device)
    params = [p.requires_grad_() for p in init_params(_generator(config.seed, device), config.hidden, device)]
    learner = algorithms.Learner(
        config.algorithm, params, iterations=config.iterations, inner_steps=config.inner_steps,
        inner_lr=config.inner_lr, meta_lr=config.meta_lr, first_order=config.first_order, backend=config.backend,
    )
    # A separate stream for tasks, so changing the model size does not change the tasks; one per rank
    # (rank 0's is the one-process run's). Every algorithm sees the same tasks. They are drawn on the
    # training device with one torch.rand call per meta-batch: microseconds.
    check_task_streams(config, ranks.world)
    tasks = _generator(jobs.ranks.task_stream_seed(config.seed, ranks.rank), device)
    result = driver.train(
        learner, lambda g: sample_batch(per_rank, config.n_support, config.n_query, g, device), tasks,
        iterations=config.iterations, name="sinusoid", config=config.to_dict(), resume_keys=_resume_keys(config),
        device=device, log_every=config.log_every, progress=progress, log=log,
        warm_batch=sample_batch(per_rank, config.n_support, config.n_query, _generator(config.seed + 2, device), device),
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, ranks=ranks,
    )
    return TrainResult(result.tensors[: len(params)], result.backend, result.seconds, result.history, result.skipped,
                       learner.eval_rates())


# --------------------------------------------------------------------------------------- evaluation


def held_out_tasks(config: SinusoidConfig, device) -> dict[str, torch.Tensor]:
    """The held-out tasks: `x_support [E, max_shot, 1]`, `y_support`, `x_query [E, Nq, 1]`, `y_query`,
    `amplitude [E]`, `phase [E]`. The n-shot support set is the first n support points, so the shot
    counts are compared on the same tasks; at least 20 support points are drawn whatever `eval_shots`
    holds, so every run with shot counts up to 20 sees the same tasks. They are drawn on the CPU and then
    moved to `device`: a CUDA generator of the same seed draws other numbers, and a GPU run must be scored
    on the same tasks as a CPU run."""
    max_shot = max(*config.eval_shots, 20)
    cpu = torch.device("cpu")
    x, y, amplitude, phase = (t.to(device) for t in sample_tasks(
        config.eval_tasks, max_shot + config.eval_query, _generator(config.eval_seed, cpu), cpu))
    return {
        "x_support": x[:, :max_shot], "y_support": y[:, :max_shot],
        "x_query": x[:, max_shot:], "y_query": y[:, max_shot:],
        "amplitude": amplitude, "phase": phase,
    }


# A held-out task counts as diverged when its query MSE after adaptation is not finite or above this: the
# targets are at most 5 in magnitude, so predicting 0 errs by at most 25 (12.5 on average at the largest
# amplitude); an error 4x that of the zero predictor on the hardest task means the inner SGD has run away
# (it then overflows within a few more steps). Means are over the other tasks.
DIVERGED_MSE = 100.0


@torch.no_grad()
def task_errors(params: Sequence[torch.Tensor], config: SinusoidConfig, backend: str = "auto",
                ranks: jobs.ranks.Ranks | None = None, rates: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Query MSE of every held-out task after 0, 1, ..., `eval_steps` inner steps, per shot count, adapting
    at `config.inner_lr` or with the learned `rates` (`TrainResult.rates`).

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
        if data["x_support"].shape[0] == 0:  # fewer tasks than ranks: this one has none, the gather still runs
            none = torch.empty(0, config.eval_steps + 1, dtype=params[0].dtype, device=device)
            errors[str(shot)] = ranks.gather_rows(none).t().cpu()
            continue
        xs, ys = data["x_support"][:, :shot], data["y_support"][:, :shot]
        rows = []
        # One adapt call per step count: the library runs the inner loop, the query points are scored
        # here with fastmaml.mlp. Steps beyond the training K are the point of this evaluation.
        for steps in range(config.eval_steps + 1):
            lr = inner_lr_for(rates, steps, config.inner_lr)
            theta = adapted_params(params, xs, ys, steps, lr, backend)
            preds = api.mlp(theta, data["x_query"])
            rows.append(((preds - data["y_query"]) ** 2).mean(dim=(1, 2)))
        errors[str(shot)] = ranks.gather_rows(torch.stack(rows).t().contiguous()).t().cpu()
    return errors


def summarize(errors: dict[str, torch.Tensor]) -> dict[str, dict[str, list]]:
    """Per shot count and step count: `"mean"` over the tasks that did not diverge (`DIVERGED_MSE`; nan
    when all did), `"median"` over all tasks (a diverged one counts as +inf) and the `"diverged"` count.
    `errors` as `task_errors` returns them; one task whose SGD overflows would make a plain mean nan."""
    out = {"mean": {}, "median": {}, "diverged": {}}
    for shot, e in errors.items():
        e = e.double()
        ok = torch.isfinite(e) & (e <= DIVERGED_MSE)
        count = ok.sum(dim=1)
        mean = torch.where(ok, e, torch.zeros_like(e)).sum(dim=1) / count.clamp(min=1)
        out["mean"][shot] = torch.where(count > 0, mean, torch.full_like(mean, math.nan)).tolist()
        out["median"][shot] = torch.where(ok | ~torch.isnan(e), e, math.inf).median(dim=1).values.tolist()
        out["diverged"][shot] = (~ok).sum(dim=1).tolist()
    return out


def evaluate(params: Sequence[torch.Tensor], config: SinusoidConfig, backend: str = "auto",
             rates: Optional[dict] = None) -> dict[str, list[float]]:
    """Mean query MSE over the held-out tasks (those that did not diverge, `summarize`) after 0, 1, ...,
    `eval_steps` inner steps, per shot count. Returns `{"5": [eval_steps + 1 floats], "10": [...], ...}`."""
    return summarize(task_errors(params, config, backend, rates=rates))["mean"]


def format_spread(summary: dict[str, dict[str, list]]) -> str:
    """Median task and diverged count after the last step, per shot count (`summarize`'s output)."""
    parts = []
    for shot, median in summary["median"].items():
        text = f"{shot}-shot median {median[-1]:.3f}"
        if summary["diverged"][shot][-1]:
            text += f" ({summary['diverged'][shot][-1]} task(s) diverged, left out of the mean)"
        parts.append(text)
    steps = len(next(iter(summary["median"].values()))) - 1
    return f"after {steps} steps: " + ", ".join(parts)


def format_table(results: dict[str, list[float]], paper: dict[int, dict[int, float]] = PAPER_MSE) -> str:
    """The evaluation as a text table: one row per step count, ours and (when `paper` has figures) the
    MAML paper's MSE per shot count."""
    shots = list(results)
    head = "steps " + "".join(f"| {s + '-shot':>8} {'paper':>6} " if paper else f"| {s + '-shot':>8} " for s in shots)
    lines = [head, "-" * len(head)]
    for steps in range(len(results[shots[0]])):
        row = f"{steps:>5} "
        for s in shots:
            ref = paper.get(int(s), {}).get(steps)
            row += f"| {results[s][steps]:>8.3f} "
            if paper:
                row += f"{'-' if ref is None else f'~{ref:.2f}':>6} "
        lines.append(row)
    if paper:
        lines.append("paper: approximate values read off Finn et al. 2017, Figure 3 (no table in the paper)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots


def plot(
    path: str, params: Sequence[torch.Tensor], results: dict[str, list[float]], config: SinusoidConfig,
    num_tasks: int = 3, shot: int = 5, backend: str = "auto", rates: Optional[dict] = None,
) -> None:
    """Write the figure: left, MSE against inner steps per shot count (log scale); right, `num_tasks`
    held-out tasks with their `shot` support points, the true curve and the predictions before
    adaptation and after 1 and `eval_steps` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    num_tasks = min(num_tasks, config.eval_tasks)  # --eval-tasks 1 or 2: as many panels (it failed here)
    fig = plt.figure(figsize=(12, 6), layout="constrained")
    grid = fig.add_gridspec(num_tasks, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[:, 0])
    steps = list(range(config.eval_steps + 1))
    for s, curve in results.items():
        ax.plot(steps, curve, marker="o", ms=4, label=f"{s}-shot")
    for s, points in (PAPER_MSE if config.algorithm == "maml" else {}).items():
        ax.scatter(list(points), list(points.values()), marker="x", s=60, color="black", zorder=3,
                   label=f"paper, {s}-shot (approx.)")
    ax.set_yscale("log")
    # Plain numbers at 1, 2, 5 x 10^n on the log axis: "0.5" reads better than "5 x 10^-1".
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel(f"query MSE (mean over {config.eval_tasks} tasks)")
    ax.set_title(f"{algorithms.get(config.algorithm).title} (trained with K={config.inner_steps}, "
                 f"{config.n_support} shots)")
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
            theta = adapted_params(params, xs, ys, k, inner_lr_for(rates, k, config.inner_lr), backend)
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


def save_model(path: str, params: Sequence[torch.Tensor], config: SinusoidConfig,
               rates: Optional[dict] = None) -> None:
    """`torch.save` of `{"params": [W1, b1, ...], "rates": TrainResult.rates, "config": {...}}` (tensors on
    the CPU)."""
    if rates and "rates" in rates:
        rates = {**rates, "rates": [r.detach().cpu() for r in rates["rates"]]}
    torch.save({"params": [p.detach().cpu() for p in params], "rates": rates or {"inner_lr": config.inner_lr},
                "config": config.to_dict()}, path)


def load_model(path: str, map_location="cpu") -> list[torch.Tensor]:
    """The meta-learned params `[W1 [40, 1], b1 [40], W2 [40, 40], b2 [40], W3 [1, 40], b3 [1]]` from a
    `model.pt` written by this job; use them with `fastmaml.adapt` / `fastmaml.mlp`, e.g.
    `fastmaml.mlp(fastmaml.adapt(params, xs, ys, inner_steps=5), xq)`."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or "params" not in checkpoint:
        raise ValueError(f"{path} is not a fastmaml sinusoid model (expected a dict with 'params')")
    return list(checkpoint["params"])


def load_inner_lr(path: str, steps: int, map_location="cpu"):
    """The `inner_lr` argument that adapts like the model in `path` for `steps` steps: its fixed rate, or
    its learned rates (Meta-SGD, MAML++; per-step rates past the trained K reuse the last step's), e.g.
    `fastmaml.adapt(params, xs, ys, inner_steps=5, inner_lr=load_inner_lr(path, 5))`."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    config = checkpoint.get("config", {})
    default = config.get("inner_lr") or algorithms.get(config.get("algorithm", "maml")).inner_lr
    return inner_lr_for(checkpoint.get("rates"), steps, default)


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
    errors = task_errors(trained.params, config, backend=config.backend, ranks=ranks, rates=trained.rates)
    stats = summarize(errors)
    results = stats["mean"]
    rate = f"lr {config.inner_lr}" if "rates" not in trained.rates else "learned rates"
    log(f"{config.algorithm}: evaluation on {config.eval_tasks} held-out tasks, mean query MSE after n inner "
        f"steps ({rate}; {time.perf_counter() - start:.1f} s):")
    log(format_table(results, PAPER_MSE if config.algorithm == "maml" else {}))
    log(format_spread(stats))
    summary = {
        "eval": results,
        "eval_median": stats["median"],
        "eval_diverged": stats["diverged"],
        "train_seconds": trained.seconds,
        "backend": trained.backend,
        "skipped_steps": trained.skipped,
        "processes": ranks.world,
        "config": config.to_dict(),
    }
    if not ranks.is_main:
        return summary
    driver.write_json(os.path.join(out_dir, "results.json"), summary)
    save_model(os.path.join(out_dir, "model.pt"), trained.params, config, trained.rates)
    plot(os.path.join(out_dir, "adaptation.png"), trained.params, results, config, backend=config.backend,
         rates=trained.rates)
    log(f"wrote {out_dir}/results.json, model.pt, adaptation.png")
    return summary
