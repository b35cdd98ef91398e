"""Test configuration.

Without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; it must be switched on
before any kernel is defined, so it is set here, before fastmaml's Triton module is imported.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The data-reading input checks on GPU tensors are off by default (they synchronise); the tests run with
# them on, so that bad input is refused there as on the CPU (tests/test_gpu_overhead.py switches them off
# to check the call that never synchronises).
os.environ.setdefault("FASTMAML_CHECK_INPUTS", "1")
