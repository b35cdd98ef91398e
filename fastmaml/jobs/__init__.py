"""What every training job shares (`fastmaml train <job>`): checks made before training starts, the
training loop (`fastmaml.jobs.driver`: skipped non-finite steps, ranks, checkpoints, progress), the MAML
family as training rules (`fastmaml.jobs.algorithms`), checkpoints written atomically
(`fastmaml.jobs.checkpoint`), and the ranks of a job run under torchrun (`fastmaml.jobs.ranks`).

A job calls these before it trains, so that a bad argument is one clear line and exit code 2 (`JobError`,
reported by the job's `main`), never a traceback and never a failure after training.
"""

from . import algorithms, checkpoint, driver, ranks
from .checks import JobError, check_backend, check_device, check_out_dir, non_negative_int, positive, report

__all__ = ["algorithms", "checkpoint", "driver", "ranks", "JobError", "check_backend", "check_device", "check_out_dir", "non_negative_int",
           "positive", "report"]
