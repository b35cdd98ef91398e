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
