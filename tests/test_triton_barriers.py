"""Block barriers of the Triton scratch layout (`fastmaml/backends/_triton_scratch.py`) and of the one-step
kernel (`fastmaml/backends/_triton_onestep.py`), checked in the interpreter.

The interpreter runs all threads of a program as one, so a missing `tl.debug_barrier()` cannot change its
results and the comparisons with the reference cannot see one. Here the interpreter is instrumented
instead: every load and store of a launch is recorded with the statement that made it (its stack of
lines in the kernel files) and the element's position in the accessed block, and each barrier starts a
new epoch. Two accesses to one address in one epoch, at least one of them a store, are a hazard unless
they come from the same statement at the same position. Only then are they certainly the same GPU
thread: one statement's block has one layout. That is stricter than a GPU needs (two statements
with the same layout may well give an element to the same thread), and the scratch layout meets it.
A read of scratch memory that nothing in the launch wrote is reported too.

The hooks are on Triton 3.6's interpreter builder (`create_masked_load`, `create_masked_store`,
`create_barrier`, `set_grid_idx`); with another Triton that lacks them the tests skip and say so.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from test_triton_onestep import CHUNKED_CASES, _compare  # the one-step kernel's cases and its launch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

_KERNEL_FILES = ("_triton_scratch.py", "_triton_pieces.py", "_triton_kernels.py", "_triton_onestep.py",
                 "_triton_onestep_blocks.py", "test_triton_barriers.py")
_HOOKS = ("create_masked_load", "create_masked_store", "create_barrier", "set_grid_idx")


class Hazards:
    """What the instrumented interpreter saw in one launch (see the module docstring)."""

    def __init__(self):
        self.epoch = 0
        self.last = {}  # address -> [write epoch, writer, read epoch, readers]
        self.scratch = []  # (start, end) byte ranges of scratch buffers
        self.keep = []  # the scratch tensors themselves: their memory is never reused within a test, where
        # a later tensor (a new_zeros output read before written) would look like unwritten scratch
        self.written = set()
        self.found = collections.Counter()
        self.unwritten = collections.Counter()

    @staticmethod
    def _statement():
        frame, lines = sys._getframe(3), []
        while frame is not None:
            name = frame.f_code.co_filename
            if name.endswith(_KERNEL_FILES):
                lines.append(f"{os.path.basename(name)}:{frame.f_lineno}")
            frame = frame.f_back
        return " <- ".join(lines)

    def access(self, store: bool, pointers, mask) -> None:
        where = self._statement()
        ptrs = np.asarray(pointers)
        flat = ptrs.reshape(-1)
        live = np.broadcast_to(np.asarray(mask), ptrs.shape).reshape(-1)
        for pos in np.nonzero(live)[0]:
            address, me = int(flat[pos]), (where, int(pos))
            entry = self.last.setdefault(address, [-1, None, -1, set()])
            if entry[0] == self.epoch and entry[1] != me:
                self.found[("write then " + ("write" if store else "read"), entry[1][0], where)] += 1
            if store:
                if entry[2] == self.epoch:
                    for reader in entry[3] - {me}:
                        self.found[("read then write", reader[0], where)] += 1
                entry[0], entry[1] = self.epoch, me
                self.written.add(address)
            else:
                if address not in self.written and any(lo <= address < hi for lo, hi in self.scratch):
                    self.unwritten[where] += 1
                if entry[2] != self.epoch:
                    entry[2], entry[3] = self.epoch, set()
                entry[3].add(me)


@pytest.fixture
def hazards(monkeypatch):
    """A `Hazards` fed by the interpreter during the test; scratch buffers (`new_empty`) start as nan."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, as conftest.py sets without a GPU)")
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    missing = [h for h in _HOOKS if not hasattr(builder, h)]
    if missing:
        pytest.skip(f"this Triton's interpreter has no {missing} to instrument")
    from fastmaml.backends import triton_maml as tm

    why = tm.interpreter_problem()
    if why is not None:
        pytest.skip(why)
    seen = Hazards()
    load, store, grid = (getattr(builder, h) for h in ("create_masked_load", "create_masked_store", "set_grid_idx"))

    def on_load(self, ptrs, mask, other, *rest):
        seen.access(False, ptrs.data, mask.data)
        return load(self, ptrs, mask, other, *rest)

    def on_store(self, ptrs, value, mask, *rest):
        seen.access(True, ptrs.data, mask.data)
        return store(self, ptrs, value, mask, *rest)

    def on_barrier(self):
        seen.epoch += 1

    def on_grid(self, *args):
        # A new program: the model is per program (scratch rows are per program).
        seen.last.clear()
        seen.written.clear()
        seen.epoch += 1
        return grid(self, *args)

    new_empty = torch.Tensor.new_empty

    def scratch_empty(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        seen.scratch.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        seen.keep.append(t)
        return t

    for name, hook in zip(_HOOKS, (on_load, on_store, on_barrier, on_grid)):
        monkeypatch.setattr(builder, name, hook)
    monkeypatch.setattr(torch.Tensor, "new_empty", scratch_empty)
    return seen


def _report(seen: Hazards) -> str:
    lines = [f"{kind}: {a}  /  {b}  ({n} elements)" for (kind, a, b), n in seen.found.most_common(10)]
    lines += [f"read before any write: {where} ({n} elements)" for where, n in seen.unwritten.most_common(10)]
    return "\n".join(lines)


# ---- the checker itself ------------------------------------------------------------------------------


def _shift_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def shift(buf, out, BARRIER: tl.constexpr):
        """Each element stores its index, then reads its neighbour's: a barrier is needed between."""
        i = tl.arange(0, 16)
        tl.store(buf + i, i.to(tl.float32))
        if BARRIER:
            tl.debug_barrier()
        tl.store(out + i, tl.load(buf + (i + 1) % 16))

    return shift


def test_the_checker_finds_a_missing_barrier(hazards):
    """A write then a neighbour's read: flagged without the barrier, clean with it (the checker can fail)."""
    shift = _shift_kernel()
    buf, out = torch.zeros(16), torch.zeros(16)
    shift[(1,)](buf, out, BARRIER=False)
    assert ("write then read" in {kind for kind, _, _ in hazards.found}), _report(hazards)
    hazards.found.clear()
    shift[(1,)](buf, out, BARRIER=True)
    assert not hazards.found, _report(hazards)


# ---- the scratch layout ---------------------------------------------------------------------------------


def _flat_problem(dims, T, NS, NQ, K, loss, seed, qw_zero):
    g = torch.Generator().manual_seed(seed)
    P = sum(dims[i + 1] * dims[i] + dims[i + 1] for i in range(len(dims) - 1))
    theta = torch.randn(P, generator=g) * 0.5
    lr = 0.05 + 0.1 * torch.rand(K, P, generator=g)
    xs, xq = torch.randn(T, NS, dims[0], generator=g), torch.randn(T, NQ, dims[0], generator=g)
    if loss == 0:
        ys, yq = torch.randn(T, NS, dims[-1], generator=g), torch.randn(T, NQ, dims[-1], generator=g)
    else:
        ys, yq = torch.randint(0, dims[-1], (T, NS), generator=g), torch.randint(0, dims[-1], (T, NQ), generator=g)
    qw = torch.linspace(0.3, 1.0, K + 1)
    if qw_zero and K >= 1:
        qw[K - 1] = 0  # a step whose query pass is skipped
    g_losses, g_preds = 1 + torch.rand(T, generator=g), torch.randn(T, NQ, dims[-1], generator=g)
    return theta, lr, xs, ys, xq, yq, qw, g_losses, g_preds


# dims, activation, loss, first order, lr grads, input grads, K, a zero query weight, (NS, NQ)
SCRATCH_CASES = [
    ((3, 20, 2), 1, 0, False, True, True, 2, True, (5, 6)),
    ((5, 3), 0, 1, False, True, True, 1, False, (17, 3)),
    ((4, 6, 5, 3), 1, 1, False, False, True, 1, False, (5, 18)),
    ((3, 5, 4, 6, 2), 0, 0, False, True, False, 2, True, (5, 6)),
    ((3, 7, 4), 1, 1, True, True, True, 2, False, (5, 6)),
    ((4, 7, 3), 0, 0, True, False, False, 2, True, (5, 6)),
    ((3, 7, 4), 0, 1, False, True, True, 0, False, (5, 6)),
]


@pytest.mark.parametrize("case", SCRATCH_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-K{c[6]}"
                         + ("-fo" if c[3] else "") + ("" if c[4] else "-nolr") + ("" if c[5] else "-nox"))
def test_scratch_layout_has_no_barrier_hazards(hazards, monkeypatch, case):
    """Forward, adapt and backward kernels of the scratch layout, two tasks in one program (the task loop's
    reuse of every buffer), every option both ways across the cases."""
    from fastmaml.backends import _triton_ops as ops
    from fastmaml.backends import triton_maml as tm

    dims, act, loss, first_order, need_lr, need_x, K, qw_zero, (NS, NQ) = case
    monkeypatch.setattr(tm, "LAYOUT", "scratch")
    monkeypatch.setattr(tm, "SCRATCH_BYTES", 1)  # one program for both tasks
    theta, lr, xs, ys, xq, yq, qw, g_losses, g_preds = _flat_problem(list(dims), 2, NS, NQ, K, loss,
                                                                     SCRATCH_CASES.index(case), qw_zero)
    losses, preds, _ = ops._forward_launch(theta, lr, xs, ys, xq, yq, qw, list(dims), act, loss, True)
    _, _, thetas = ops._forward_launch(theta, lr, xs, ys, None, None, None, list(dims), act, loss, False)
    grads = ops._bwd_impl(theta, lr, xs, ys, xq, yq, qw, g_losses, g_preds, list(dims), act, loss, first_order,
                         need_lr, need_x)
    train = ops._train_impl(theta, lr, xs, ys, xq, yq, qw, list(dims), act, loss, first_order, need_lr, need_x)
    assert not hazards.found and not hazards.unwritten, _report(hazards)
    for t in (losses, thetas, *grads, *train):
        assert torch.isfinite(t).all()
    # The training op's forward outputs are the forward kernel's (its task loss summed in reverse order:
    # float32 rounding).
    torch.testing.assert_close(train[0], losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(train[1], preds, rtol=0, atol=0)


# ---- the one-step kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [(c, True) for c in CHUNKED_CASES]
                         + [(([3, 9, 6, 4], 0, 0, True, True, 2, 0, 6, 7), False),
                            (([3, 9, 6, 4], 1, 1, True, False, 1, 0, 17, 3), False),
                            (([3, 9, 6, 4], 1, 0, False, True, 2, 0, 6, 7), True)],
                         ids=lambda c: "x".join(map(str, c[0][0])) + f"-kc{c[0][6]}" + ("-fo" if not c[1] else ""))
def test_onestep_kernel_has_no_barrier_hazards(hazards, case):
    """Every store the one-step kernel reads back (the default form at second order, and first order; the
    chunked form, whose products read every block of points from the rows) is read after a barrier, by one
    statement's own position otherwise, and no factor row is read before the launch wrote it."""
    (dims, act, loss, cot, g_pred, tasks_per_program, chunk, ns, nq), second_order = case
    _compare(dims, 5, ns, nq, act, loss, not second_order, cot, g_pred, tasks_per_program, seed=95 + act,
             chunk=chunk)
    assert not hazards.found and not hazards.unwritten, _report(hazards)


@pytest.mark.parametrize("case", CHUNKED_CASES[:4], ids=lambda c: "x".join(map(str, c[0])))
def test_onestep_chunked_kernel_without_factors_has_no_barrier_hazards(hazards, case):
    """The chunked form of a call without factors (losses and outputs only): its support and query passes read
    their blocks back from rows used as scratch, each after a barrier, and none before it was written."""
    dims, act, loss, cot, g_pred, tasks_per_program, chunk, ns, nq = case
    _compare(dims, 5, ns, nq, act, loss, False, cot, g_pred, tasks_per_program, seed=75 + act, factors=False,
             chunk=chunk)
    assert not hazards.found and not hazards.unwritten, _report(hazards)


@pytest.mark.parametrize("factors", [True, False], ids=["factors", "no-factors"])
def test_onestep_chunked_kernel_of_one_layer_has_no_barrier_hazards(hazards, factors):
    """One layer (3-70) in chunks, with and without factors: every row read back (D_0, and with factors D'_0
    and the tangents' blocks) is read after it was written and after a barrier."""
    _compare([3, 70], 5, 6, 7, 1, 0, False, True, True, 2, seed=3, factors=factors, chunk=16)
    assert not hazards.found and not hazards.unwritten, _report(hazards)
