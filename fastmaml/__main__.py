"""`python -m fastmaml ...` runs the `fastmaml` command line (see `fastmaml.cli`)."""

import sys

from .cli import main

sys.exit(main())
