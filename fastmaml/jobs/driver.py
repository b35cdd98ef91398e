"""The training loop every job shares: meta-steps that survive a diverging task, ranks, checkpoints and
progress, around a job's `Learner` (fastmaml/jobs/algorithms.py or a job's own) and its task sampler.

A job gives `train`:
- `learner`: `tensors` (everything meta-trained, in checkpoint order), optionally `buffers` (state that is
  not trained but must be checkpointed, e.g. batch-norm statistics), `optimizer`, `metric_names`
  (the first is the meta-loss), `set_iteration(i)` and `step(batch, i) -> ({name: 0-dim tensor}, backend)`,
  which sets the gradients;
- `sample(generator) -> batch`: one meta-batch of this rank's tasks, drawn from `generator`.

Each iteration the gradients and metrics are averaged over the ranks (one all-reduce), the step is taken
only when the meta-loss and every gradient are finite (`fastmaml.FiniteStep`: a skipped step leaves the
tensors and the optimizer's state as they were, and is counted), and the metrics are accumulated on the
device and read every `log_every` iterations (reading them each step would synchronise a GPU; a skipped
step's are left out). Rank 0
shows the progress (the metrics' moving averages: a bar on a terminal, a plain line each tenth of the run
in a log file) and writes the checkpoint. `write_json` writes the jobs' JSON files (strict: null for a
value that is not finite).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..training import FiniteStep
from . import checkpoint as ckpt
from .checks import JobError
from .ranks import Ranks


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path`, with every float that is not finite (a mean over no task that
    did not diverge, an interval from one task) written as null: Python's json would write NaN, which
    strict parsers (jq, browsers) refuse."""

    def strict(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=2, allow_nan=False)


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


@dataclass
class TrainResult:
    """What `train` returns. `history`: mean meta-loss of each block of `log_every` iterations;
    `metrics`: every metric's block means, by name."""

    tensors: list[torch.Tensor]
    backend: str
    seconds: float
    history: list[float] = field(default_factory=list)
    skipped: int = 0  # meta-steps skipped for a non-finite loss or gradient
    metrics: dict[str, list[float]] = field(default_factory=dict)


def _quiet(*args, **kwargs) -> None:
    pass


def _resume_state(path: str, ranks: Ranks) -> Optional[dict]:
    """The checkpoint at `path` as rank 0 reads it, on every rank (None where rank 0 has none): each rank
    deciding for itself, a rank on another node without the file (or with an older one) started over
    while the others resumed. A checkpoint rank 0 cannot read is every rank's `JobError`."""
    state, problem = None, None
    if ranks.is_main:
        try:
            state = ckpt.load(path)
        except JobError as err:
            problem = str(err)
    state, problem = ranks.from_main((state, problem))
    if problem is not None:
        raise JobError(problem)
    return state


def train(learner, sample: Callable[[torch.Generator], tuple], tasks: torch.Generator, *, iterations: int,
          name: str, config: dict, resume_keys: Sequence[str], device: torch.device, log_every: int = 100,
          warm_batch: Optional[tuple] = None, progress: bool = True, log=print,
          checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
          ranks: Optional[Ranks] = None) -> TrainResult:
    """Run `iterations` meta-steps of `learner` on batches from `sample(tasks)`; returns the trained tensors
    (detached), the backend, the training time and the logged metrics.

    `warm_batch`: one untimed step without the update first, so the time measures training (a fused
    backend's first call may build its kernels, the reference path traces its vmap). With
    `checkpoint_every = N > 0`, `checkpoint_dir/checkpoint.pt` is written atomically every N iterations
    and at the end (tensors, optimizer and guard state, iteration, every rank's task stream, metrics,
    `config`); with `resume`, training continues from it when rank 0 has it (every rank takes rank 0's;
    its `resume_keys` of `config` must match) and ends with exactly the tensors of an uninterrupted run.
    """
    ranks = ranks or Ranks()
    if not ranks.is_main:
        progress, log = False, _quiet
    tensors, optimizer = learner.tensors, learner.optimizer
    buffers = list(getattr(learner, "buffers", ()))
    guard = FiniteStep(optimizer)
    path = os.path.join(checkpoint_dir, ckpt.CHECKPOINT) if checkpoint_dir else None
    names = tuple(learner.metric_names)
    first, seconds_before, metrics = 0, 0.0, {n: [] for n in names}
    saved_backend = None  # the checkpoint's: a resume with no step left to run reports it, not 'none'
    if path and checkpoint_every and ranks.is_main:
        ckpt.remove_leftovers(checkpoint_dir)
    state = _resume_state(path, ranks) if resume and path else None
    if state is not None:
        ckpt.check_resumable(path, state, config, resume_keys, iterations, ranks.world, tasks, job=name)
        ckpt.check_tensors(path, state, tensors, buffers)
        with torch.no_grad():
            for t, saved in zip(tensors + buffers, state["params"] + state.get("buffers", [])):
                t.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        tasks.set_state(state["tasks_rng"][ranks.rank])
        guard.load_state_dict(state["guard"])
        first, seconds_before, saved_backend = state["iteration"], state["seconds"], state.get("backend")
        metrics = {n: list(state["metrics"].get(n, [])) for n in names}
        log(f"fastmaml {name}: resuming from {path} at iteration {first}")
    elif resume:
        log(f"fastmaml {name}: no checkpoint in {checkpoint_dir} yet; starting from iteration 0")

    bar, lines_every = None, 0
    if progress and iterations > first:
        if _is_terminal(sys.stderr):
            from tqdm import tqdm

            bar = tqdm(total=iterations, initial=first, desc="meta-train", unit="it", smoothing=0.1,
                       dynamic_ncols=True)
        else:  # a log file: a bar's redrawn frames would pile up in one line; a plain line each tenth instead
            lines_every = max(1, iterations // 10)
    if warm_batch is not None and iterations > first:
        prep = time.perf_counter()
        learner.set_iteration(first)
        learner.step(warm_batch, first)
        optimizer.zero_grad(set_to_none=True)
        prep = time.perf_counter() - prep
        if prep > 1.0:
            message = f"fastmaml {name}: backend ready in {prep:.1f} s (not counted in train_seconds)"
            bar.write(message) if bar is not None else log(message)

    running = torch.zeros(len(names), device=device)
    block, taken, ema, backend, done = 0, 0, None, None, first
    start = time.perf_counter()

    def close_block() -> None:
        nonlocal block, taken, ema, done
        means = (running / taken).tolist() if taken else [float("nan")] * len(names)
        for n, v in zip(names, means):
            metrics[n].append(v)
        if taken:
            ema = means if ema is None else [0.9 * e + 0.1 * v for e, v in zip(ema, means)]
        if bar is not None:
            bar.update(block)
            if ema is not None:
                bar.set_postfix({n: f"{v:.4g}" for n, v in zip(names, ema)}, refresh=False)
        before, done = done, done + block
        if lines_every and (done // lines_every > before // lines_every or done == iterations):
            shown = "" if ema is None else ", " + ", ".join(f"{n} {v:.4g}" for n, v in zip(names, ema))
            print(f"fastmaml {name}: meta-train {done}/{iterations} ({100 * done // iterations}%), "
                  f"{seconds_before + time.perf_counter() - start:.0f} s{shown}", file=sys.stderr, flush=True)
        running.zero_()
        block = taken = 0

    def save_checkpoint(count: int) -> None:
        streams = ranks.gather_objects(tasks.get_state().cpu())
        if ranks.is_main:
            ckpt.save(path, {
                "iteration": count, "params": [t.detach().cpu() for t in tensors],
                "buffers": [b.detach().cpu() for b in buffers],
                "optimizer": optimizer.state_dict(), "tasks_rng": streams, "guard": guard.state_dict(),
                "seconds": seconds_before + time.perf_counter() - start, "metrics": metrics, "config": config,
                "backend": backend or saved_backend, "job": name,
            })

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for it in range(first, iterations):
        learner.set_iteration(it)
        values, used = learner.step(sample(tasks), it)
        step_metrics = torch.stack([values[n].reshape(()).to(running.dtype) for n in names])
        ranks.mean_([t.grad for t in tensors if t.grad is not None] + [step_metrics])
        block += 1
        if guard.step(step_metrics[0]):  # the logged metrics are the means of the steps taken
            running += step_metrics
            taken += 1
        if backend is None:
            backend = used
            message = f"fastmaml {name}: training on backend {backend!r} ({device.type})"
            if saved_backend is not None and saved_backend != backend:
                # The same function in another rounding order: the run goes on, but it no longer ends with
                # the uninterrupted run's tensors bit for bit.
                message += (f"; the checkpoint was written on {saved_backend!r}, so the result will differ from "
                            "an uninterrupted run's in rounding")
            bar.write(message) if bar is not None else log(message)  # above the bar, which a print would break
        if block == log_every or it == iterations - 1:
            close_block()
        if path and checkpoint_every and ((it + 1) % checkpoint_every == 0 or it == iterations - 1):
            if block:  # a partial logging block would be lost with the process: close it now
                close_block()
            save_checkpoint(it + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = seconds_before + time.perf_counter() - start
    if bar is not None:
        bar.close()
    if guard.skipped:
        log(f"fastmaml {name}: skipped {guard.skipped} meta-step(s) whose loss or gradient was not finite "
            "(or a gradient too large to square)")
    return TrainResult([t.detach() for t in tensors], backend or saved_backend or "none", seconds,
                       list(metrics[names[0]]), guard.skipped, metrics)
