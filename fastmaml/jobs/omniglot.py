"""`fastmaml train omniglot`: the command line of the Omniglot job (fastmaml/omniglot.py holds the job).

`add_arguments(parser)` declares its options; `main(args)` checks everything it can before training (the
data, device, backend, output folder, the meta-batch's split over processes) and runs the job, under
torchrun as one rank of a process group.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import omniglot
from .._mlp import init_mlp
from .. import omniglot_data as data
from . import algorithms, ranks as ranks_mod
from .checks import (JobError, add_run_options, check_backend, check_out_dir, job_device, non_negative_int, positive,
                     report, run_on_ranks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmaml train omniglot`."""
    d = omniglot.OmniglotConfig(iterations=1)
    parser.add_argument("--data", default=None,
                        help="folder holding Omniglot's images_background.zip and images_evaluation.zip (or the "
                             "minimal images_background_small1.zip and _small2.zip), zipped or extracted; "
                             "from https://github.com/brendenlake/omniglot (python/)")
    parser.add_argument("--train", default=None, help="the meta-training set: a set name, zip or folder "
                        "(default: images_background, else images_background_small1)")
    parser.add_argument("--test", default=None, help="the test set, whose alphabets absent from the training "
                        "set are held out (default: images_evaluation, else images_background_small2)")
    parser.add_argument("--cache", default=None,
                        help=f"folder for the decoded images (default {data.default_cache()}; '' for none)")
    parser.add_argument("--model", default=d.model, choices=["anil", "mlp"],
                        help="anil: conv backbone meta-trained through the fused head's input gradients, 64-N "
                             "linear head (hidden layers: --head-hidden) adapted per task (default); mlp: the MAML paper's 784-256-128-64-64-N network, "
                             "all adapted")
    parser.add_argument("--head-hidden", default=",".join(map(str, d.head_hidden)), metavar="W1,W2,...",
                        help="anil: hidden widths of the adapted head (default: none, a linear head, ANIL's choice, "
                             "which kept improving over more test steps where a 64-64-N head fell back)")
    parser.add_argument("--ways", type=positive(int), default=d.ways, help=f"classes per task (default {d.ways})")
    parser.add_argument("--shots", type=positive(int), default=d.shots,
                        help=f"support drawings per class (default {d.shots})")
    parser.add_argument("--queries", type=non_negative_int, default=0,
                        help="query drawings per class in meta-training (default: as many as shots, as the MAML "
                             "paper)")
    parser.add_argument("--iterations", type=non_negative_int, default=0,
                        help="meta-training iterations (default: about 15 minutes on a 2-core CPU: "
                             f"{omniglot.IMAGES_IN_15_MIN['anil']:,} images for anil, "
                             f"{omniglot.IMAGES_IN_15_MIN['mlp']:,} for mlp, over the images of a meta-batch; "
                             "the MAML paper trains 60,000 iterations)")
    parser.add_argument("--meta-batch", type=positive(int), default=d.meta_batch,
                        help=f"tasks per meta-batch (default {d.meta_batch})")
    parser.add_argument("--inner-steps", type=non_negative_int, default=d.inner_steps,
                        help=f"inner SGD steps in meta-training (default {d.inner_steps})")
    parser.add_argument("--inner-lr", type=positive(float), default=d.inner_lr,
                        help=f"inner learning rate; the initial one of learned rates (default {d.inner_lr})")
    parser.add_argument("--learn-inner-lr", action="store_true",
                        help="Meta-SGD: learn a rate per parameter of the adapted MLP, kept in (0, 1)")
    parser.add_argument("--first-order", action="store_true", help="first-order meta-gradient")
    parser.add_argument("--meta-lr", type=positive(float), default=d.meta_lr, help=f"Adam rate (default {d.meta_lr})")
    parser.add_argument("--test-steps", type=non_negative_int, default=d.test_steps,
                        help=f"inner steps of the headline figure and the predictor (default {d.test_steps})")
    add_run_options(parser, backend=d.backend, seed=d.seed, threads=d.threads,
                    threads_why="the convolutions use them")
    parser.add_argument("--eval-tasks", type=positive(int), default=d.eval_tasks,
                        help=f"held-out tasks (default {d.eval_tasks})")
    parser.add_argument("--pretrain-iterations", type=non_negative_int, default=d.pretrain_iterations,
                        help=f"iterations of the pretrained baseline's classification training "
                             f"(batches of {d.pretrain_batch}; default {d.pretrain_iterations})")
    parser.add_argument("--out", default=os.path.join("runs", "omniglot"),
                        help="output folder for results.json, accuracy.png, model.pt (default runs/omniglot)")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=0, metavar="N",
                        help="write OUT/checkpoint.pt atomically every N iterations and at the end (default 0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")


def main(args: argparse.Namespace) -> int:
    """Run the job from parsed options; a problem found before training is one line on stderr, exit 2."""
    try:
        if args.data is None:
            raise JobError(f"--data DIR is required: {data.DOWNLOAD}")
        device = job_device(args.device)
        ranks_mod.split(args.meta_batch, ranks_mod.world_size())
        try:
            meta_train, held_out, train_path, test_path = omniglot.load_data(args.data, args.train, args.test,
                                                                            args.cache)
        except data.OmniglotError as err:
            raise JobError(str(err)) from None
        try:
            head_hidden = tuple(int(w) for w in args.head_hidden.split(",") if w.strip())
        except ValueError:
            raise JobError(f"--head-hidden {args.head_hidden!r}: give comma-separated widths, e.g. 64,64") from None
        if any(w <= 0 for w in head_hidden):
            raise JobError(f"--head-hidden {args.head_hidden!r}: widths must be positive")
        config = omniglot.OmniglotConfig(
            model=args.model, head_hidden=head_hidden, ways=args.ways, shots=args.shots, queries=args.queries, iterations=args.iterations,
            meta_batch=args.meta_batch, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
            learn_inner_lr=args.learn_inner_lr, first_order=args.first_order, meta_lr=args.meta_lr,
            test_steps=args.test_steps, backend=args.backend, seed=args.seed, device=str(device),
            threads=args.threads, eval_tasks=args.eval_tasks, pretrain_iterations=args.pretrain_iterations,
            train_set=os.path.basename(train_path), test_set=os.path.basename(test_path),
        )
        _check_sizes(config, meta_train, held_out)
        preflight(config)
        check_out_dir(args.out)
    except JobError as err:
        return report("omniglot", err)
    return run_on_ranks("omniglot", device, lambda ranks: omniglot.run(
        config, meta_train, held_out, args.out, progress=not args.no_progress and sys.stderr is not None,
        checkpoint_every=args.checkpoint_every, resume=args.resume, ranks=ranks))


def _check_sizes(config: omniglot.OmniglotConfig, meta_train, held_out) -> None:
    for name, chars, queries, factor in (("meta-training", meta_train, config.queries, 4),
                                         ("held-out", held_out, config.eval_queries, 1)):
        if config.ways > factor * len(chars):
            raise JobError(f"--ways {config.ways}: the {name} set has {factor * len(chars)} classes")
        if config.shots + queries > data.DRAWINGS:
            raise JobError(f"--shots {config.shots} + {queries} queries exceed the {data.DRAWINGS} drawings of a "
                           f"character ({name} tasks)")


def preflight(config: omniglot.OmniglotConfig) -> None:
    """That the backend can run the job's training and evaluation calls; `JobError` saying why not."""
    device = torch.device(config.device)
    width = omniglot.CHANNELS if config.model == "anil" else data.SIZE * data.SIZE

    def call():
        g = torch.Generator().manual_seed(0)
        dims = (width, *(config.head_hidden if config.model == "anil" else omniglot.MLP_HIDDEN), config.ways)
        params = [p.requires_grad_() for p in init_mlp(dims, g, device)]
        T, ns, nq = 2, config.ways * config.shots, config.ways * config.queries
        xs = torch.randn(T, ns, width, device=device, requires_grad=config.model == "anil")
        xq = torch.randn(T, nq, width, device=device, requires_grad=config.model == "anil")
        ys = torch.randint(0, config.ways, (T, ns), device=device)
        yq = torch.randint(0, config.ways, (T, nq), device=device)
        return params, xs, ys, xq, yq

    try:  # the algorithm's own bounds (a learned rate's range, steps to learn them by): one line, not a traceback
        algorithms.Learner("metasgd" if config.learn_inner_lr else "maml", call()[0], iterations=config.iterations,
                           inner_steps=config.inner_steps, inner_lr=config.inner_lr, first_order=config.first_order,
                           inner_lr_range=config.inner_lr_range)
    except ValueError as err:
        raise JobError(str(err)) from err
    check_backend(config.backend, call, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                  first_order=config.first_order, loss="cross_entropy")
