"""`fastmaml train sinusoid`: the command line of the sinusoid job (fastmaml/sinusoid.py holds the job).

`add_arguments(parser)` declares its options; `main(args)` checks everything it can before training
(device, backend, output folder, the meta-batch's split over processes) and runs the job, under
torchrun as one rank of a process group.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import sinusoid
from . import algorithms
from . import ranks as ranks_mod
from .checks import (JobError, add_run_options, check_backend, check_out_dir, job_device, non_negative_int, positive,
                     report, run_on_ranks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmaml train sinusoid`."""
    d = sinusoid.SinusoidConfig()
    parser.add_argument("--iterations", type=non_negative_int, default=d.iterations,
                        help=f"meta-training iterations (default {d.iterations})")
    parser.add_argument("--out", default=os.path.join("runs", "sinusoid"),
                        help="output folder for results.json, adaptation.png, model.pt (default runs/sinusoid)")
    parser.add_argument("--meta-batch", type=positive(int), default=d.meta_batch,
                        help=f"tasks per meta-batch, over all processes under torchrun (default {d.meta_batch})")
    parser.add_argument("--shots", type=positive(int), default=d.n_support, dest="n_support",
                        help=f"support points per training task, K-shot (default {d.n_support})")
    parser.add_argument("--query", type=positive(int), default=d.n_query, dest="n_query",
                        help=f"query points per training task (default {d.n_query})")
    parser.add_argument("--algorithm", default=d.algorithm, choices=list(algorithms.ALGORITHMS),
                        help="the meta-learning algorithm, with its paper's settings unless the options below "
                             "change them (default maml): " + "; ".join(
                                 f"{a.name}: {a.summary}" for a in algorithms.ALGORITHMS.values()))
    parser.add_argument("--inner-steps", type=non_negative_int, default=None,
                        help="inner SGD steps in training (default: the algorithm's)")
    parser.add_argument("--inner-lr", type=positive(float), default=None,
                        help="inner learning rate in training and evaluation; the initial one of learned rates "
                             "(default: the algorithm's)")
    parser.add_argument("--meta-lr", type=positive(float), default=None,
                        help="outer learning rate (default: the algorithm's)")
    parser.add_argument("--first-order", action="store_true", default=None,
                        help="first-order meta-gradient (maml with it is fomaml)")
    add_run_options(parser, backend=d.backend, seed=d.seed, threads=d.threads,
                    threads_why="this net's ops are too small to gain from more, and extra threads stall each "
                                "other on a busy machine")
    parser.add_argument("--eval-tasks", type=positive(int), default=d.eval_tasks,
                        help=f"held-out tasks for the evaluation (default {d.eval_tasks})")
    parser.add_argument("--eval-steps", type=non_negative_int, default=d.eval_steps,
                        help=f"evaluate after 0..N inner steps (default {d.eval_steps})")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=0, metavar="N",
                        help="write OUT/checkpoint.pt atomically every N iterations and at the end: parameters, "
                             "Adam's state, the iteration, the task stream's RNG state (default 0: none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt when it exists (same settings; --iterations may "
                             "grow, except for reptile and mamlpp, whose schedules it sizes); the result is the "
                             "uninterrupted run's")


def main(args: argparse.Namespace) -> int:
    """Run the job from parsed `add_arguments` options. Everything that can be checked before training
    is (device, backend, output folder, the meta-batch's split over processes): a problem is one line on
    stderr and exit code 2. Under torchrun the processes join one group (gloo on the CPU, NCCL on GPUs)
    after those checks, which every process makes alike."""
    try:
        device = job_device(args.device)
        world = ranks_mod.world_size()
        ranks_mod.split(args.meta_batch, world)
        config = sinusoid.SinusoidConfig(
            iterations=args.iterations, meta_batch=args.meta_batch, n_support=args.n_support,
            n_query=args.n_query, algorithm=args.algorithm, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
            meta_lr=args.meta_lr, first_order=args.first_order, backend=args.backend, seed=args.seed,
            device=str(device), threads=args.threads, eval_tasks=args.eval_tasks,
            eval_steps=args.eval_steps,
        )
        try:
            sinusoid.check_task_streams(config, world)
        except ValueError as err:
            raise JobError(str(err)) from err
        preflight(config)
        check_out_dir(args.out)
    except JobError as err:
        return report("sinusoid", err)
    return run_on_ranks("sinusoid", device, lambda ranks: sinusoid.run(
        config, args.out, progress=not args.no_progress and sys.stderr is not None,
        checkpoint_every=args.checkpoint_every, resume=args.resume, ranks=ranks))


def preflight(config: sinusoid.SinusoidConfig) -> None:
    """That the job's backend can run its training calls (one meta-batch of its shape) and its evaluation
    calls (adapt without gradients); raises `fastmaml.JobError` saying why not."""
    device = torch.device(config.device)

    def call():
        g = sinusoid._generator(config.seed, device)
        params = [p.requires_grad_() for p in sinusoid.init_params(g, config.hidden, device)]
        return (params, *sinusoid.sample_batch(config.meta_batch, config.n_support, config.n_query, g, device))

    params = call()[0]
    try:
        learner = algorithms.Learner(config.algorithm, params, iterations=config.iterations,
                                     inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                                     first_order=config.first_order)
    except ValueError as err:  # the algorithm's own bounds (a learned rate's range): one line, not a traceback
        raise JobError(str(err)) from err
    options = learner.maml_options(config.iterations)  # second order, where derivative annealing ends
    if learner.algorithm.reptile:  # no query loss: only adapt calls, on support and query points
        options = {k: options[k] for k in ("inner_steps", "inner_lr", "activation", "loss")}
        check_backend(config.backend, call, ops=("adapt",), **options)
        return
    check_backend(config.backend, call, **options)
