"""Test configuration.

Without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; it must be switched on
before any kernel is defined, so it is set here, before fastmaml's Triton module is imported.
"""

import os

import pytest

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


def lowrank_interpreter_reason():
    """Why the factored backend's low-rank kernels cannot run CPU tensors in the Triton interpreter here,
    or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (conftest.py sets it)"
    from fastmaml.backends import _lowrank, triton_maml

    return _lowrank._triton_reason() or triton_maml.interpreter_problem()


@pytest.fixture
def kernels(monkeypatch):
    """CPU tensors through the factored backend's low-rank kernels in the Triton interpreter, and no
    batched product anywhere (tests/test_lowrank.py, tests/test_factored_reverse.py)."""
    from fastmaml.backends import _lowrank, _lowrank_backward, _lowrank_pairs

    why = lowrank_interpreter_reason()
    if why is not None:
        pytest.skip(why)

    def batched(*args):
        raise AssertionError("the batched PyTorch products ran where the kernels should have")

    monkeypatch.setattr(_lowrank, "_INTERPRET_CPU", True)
    monkeypatch.setattr(_lowrank, "_add_batched", batched)
    monkeypatch.setattr(_lowrank, "_grads_batched", batched)
    monkeypatch.setattr(_lowrank_backward, "_backward_batched", batched)
    monkeypatch.setattr(_lowrank_pairs, "_pairs_batched", batched)
