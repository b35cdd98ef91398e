"""The `fastmaml` command line: `fastmaml train <job> [options]` and `fastmaml compare <job> [options]`
(also `python -m fastmaml ...`).

Jobs live in their own modules, each with `add_arguments(parser)` and `main(args) -> exit code`;
`JOBS` maps a job name to its module, `COMPARISONS` a comparison's. `fastmaml train sinusoid --help`
lists a job's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# job name -> (module under fastmaml, one-line description)
JOBS: dict[str, tuple[str, str]] = {
    "sinusoid": ("fastmaml.jobs.sinusoid", "the MAML paper's sinusoid regression: meta-train, evaluate, plot"),
    "omniglot": ("fastmaml.jobs.omniglot", "few-shot classification of Omniglot characters: ANIL or the MAML "
                                           "paper's MLP, with baselines"),
}
COMPARISONS: dict[str, tuple[str, str]] = {
    "sinusoid": ("fastmaml.jobs.compare", "MAML, FOMAML, Reptile, Meta-SGD and MAML++ on the same sinusoid tasks"),
}
COMMANDS = {"train": ("run a training job", JOBS), "compare": ("compare the MAML family on a job", COMPARISONS)}


def build_parser() -> argparse.ArgumentParser:
    """The full parser: `train` with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="fastmaml",
        description="fastmaml: MAML's inner loop and exact meta-gradient for many tasks at once.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (text, table) in COMMANDS.items():
        sub = commands.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
        jobs = sub.add_subparsers(dest="job", metavar="JOB", title="jobs")
        for name, (module, description) in table.items():
            job = jobs.add_parser(name, help=description, description=description)
            importlib.import_module(module).add_arguments(job)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `fastmaml` console script. Returns the exit code (argparse exits with 2 on
    bad usage, e.g. an unknown job name, after naming the valid choices)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 0
    if args.job is None:
        parser.parse_args([args.command, "--help"])  # prints the list of jobs and exits
    module, _ = COMMANDS[args.command][1][args.job]
    try:
        return importlib.import_module(module).main(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT, no traceback
        print(f"fastmaml {args.command} {args.job}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
