"""Checks a training job makes before it trains; each raises `JobError` with one line saying what to fix."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Callable, Optional

import torch

from .. import dispatch
from .._validate import make_problem


class JobError(ValueError):
    """A job's argument or environment that cannot work; the message is one line for the user."""


def positive(kind):
    """An argparse type: `kind(text)`, finite and > 0."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    return parse


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# Seeds: torch's generators take 64 bits, and the jobs derive the task streams' seeds from the job's
# (`ranks.task_stream_seed`, seed + 1 + 1,000,003 * rank), which must fit as well.
SEED_LIMIT = 2 ** 62
# Threads: a pool of 100,000 crashed the process (a segmentation fault, no message); 1,024 runs.
MAX_THREADS = 1024


def seed_int(text: str) -> int:
    """An argparse type: a whole number of magnitude at most `SEED_LIMIT`."""
    value = int(text)
    if abs(value) > SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number in [-2**62, 2**62], got {text}")
    return value


def thread_count(text: str) -> int:
    """An argparse type: an int in [0, MAX_THREADS]."""
    value = int(text)
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_THREADS}, got {text}")
    return value


def report(job: str, err: JobError, command: str = "train") -> int:
    """Print `fastmaml <command> <job>: error: <message>` to stderr and return exit code 2 (argparse's)."""
    print(f"fastmaml {command} {job}: error: {err}", file=sys.stderr)
    return 2


def add_run_options(parser: argparse.ArgumentParser, *, backend: str, seed: int, threads: int, threads_why: str) -> None:
    """The options every job shares: --backend, --seed, --device, --threads, --no-progress."""
    parser.add_argument("--backend", default=backend,
                        help=f"fastmaml backend: auto, reference, cpu, triton, cuda, factored (default {backend})")
    parser.add_argument("--seed", type=seed_int, default=seed, help=f"seed of the init and training tasks (default {seed})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=thread_count, default=threads,
                        help=f"torch CPU threads; 0: torch's default (default {threads}: {threads_why})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_device(name: str) -> torch.device:
    """`check_device(name)`; under torchrun a bare `cuda` becomes this process's `cuda:LOCAL_RANK`."""
    from . import ranks as ranks_mod

    device = check_device(name)
    if device.type == "cuda" and device.index is None and ranks_mod.world_size() > 1:
        device = check_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return device


def run_on_ranks(job: str, device: torch.device, body: Callable) -> int:
    """Join the job's process group (a world of one without torchrun), run `body(ranks)`, leave the group.
    A `JobError` raised while running (a checkpoint that does not fit the settings) is reported by rank 0;
    returns the exit code."""
    from . import ranks as ranks_mod

    ranks = ranks_mod.from_environment(device)
    try:
        body(ranks)
    except JobError as err:
        return report(job, err) if ranks.is_main else 2
    finally:
        ranks_mod.shutdown()
    return 0


def check_out_dir(path: str) -> None:
    """The output folder exists or can be made, and a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fastmaml-write-test-"):
            pass
    except OSError as err:
        raise JobError(f"--out {path!r} cannot be created or written: {err.strerror or err}") from None


def check_device(name: str) -> torch.device:
    """`name` (cpu, cuda, cuda:N or auto) as a device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise JobError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise JobError(f"--device {name!r}: {why} (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise JobError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise JobError(f"--device {name!r}: the jobs run on cpu or cuda")
    return device


def check_backend(backend: str, make_call: Callable[[], tuple], ops: tuple[str, ...] = ("maml", "adapt"),
                  **options) -> Optional[str]:
    """That `backend` can run the job's calls: `make_call()` returns `(params, x_s, y_s, x_q, y_q)` of one
    small batch of the job's shape and device; each op in `ops` is asked of the dispatcher with `options`
    (those of `fastmaml.maml`). Returns the backend `auto` picks for `maml` (or `backend` itself)."""
    if backend != "auto" and backend not in dispatch.list_backends():
        raise JobError(f"--backend {backend!r} is not one of auto, {', '.join(dispatch.list_backends())}")
    params, xs, ys, xq, yq = make_call()
    chosen = None
    for op in ops:
        try:
            if op == "maml":
                problem = make_problem(params, xs, ys, xq, yq, **options)
                with torch.enable_grad():
                    chosen = dispatch.select(problem, backend, op).name
            else:
                adapt_options = {k: v for k, v in options.items() if k not in ("first_order", "query_loss_weights")}
                problem = make_problem(params, xs, ys, need_query=False, **adapt_options)
                with torch.no_grad():
                    dispatch.select(problem, backend, op)
        except (ValueError, TypeError, RuntimeError) as err:
            raise JobError(f"--backend {backend!r} cannot run this job's {op} calls: {err}") from None
    return chosen
