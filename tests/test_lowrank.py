"""The factored backend's low-rank products (`fastmaml/backends/_lowrank.py`): their gradients to the
second order, their Triton kernels (in the interpreter, on CPU tensors) against the batched PyTorch
products, the factored backend through the kernels against the reference, where the kernels are used,
and their register use compiled for sm_90.

On a GPU the kernels run wherever the factored backend runs CUDA tensors (test_backends.py's grid)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmaml.backends import _lowrank, _lowrank_backward, _lowrank_cuda, _lowrank_pairs, factored
from _reference_loop import assert_close

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _inputs(T, N, S, I, O, J, dtype=F64, seed=0, grad=False):
    """Fresh random `(base, x, hs, ds)` (never zeros), sizes as given."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=F64) * 2 - 1).to(dtype).requires_grad_(grad)

    return rand(T, N, O), rand(T, N, I), [rand(T, S, I) for _ in range(J)], [rand(T, S, O) for _ in range(J)]


def _interpreter_reason():
    """conftest's, imported when asked: importing conftest switches the interpreter on, which the compile
    children below (`_compile_child`) must not."""
    from conftest import lowrank_interpreter_reason

    return lowrank_interpreter_reason()


# ---- the operations' gradients (batched products: what the kernels must match) -------------------


def test_add_gradients_to_second_order():
    """`lowrank_add`'s gradients (written as the two operations) against finite differences, and their
    gradients in turn (the meta-gradient differentiates the inner loop's gradient through them), with
    and without the factors' scales."""
    base, x, hs, ds = _inputs(2, 5, 3, 7, 6, 2, grad=True)
    scales = torch.tensor([0.7, -1.3], dtype=F64, requires_grad=True)
    assert _lowrank.kernel_reason(x, 2, 3) is not None  # CPU tensors: the batched products

    def f(base, x, scales, *factors):
        return _lowrank.lowrank_add(base, x, list(factors[:2]), list(factors[2:]), scales)

    assert torch.autograd.gradcheck(f, (base, x, scales, *hs, *ds))
    assert torch.autograd.gradgradcheck(f, (base, x, scales, *hs, *ds))
    assert torch.autograd.gradcheck(lambda x, *f: _lowrank.lowrank_add(None, x, list(f[:2]), list(f[2:]), None),
                                    (x, *hs, *ds))
    # Only x needs a gradient (the factors of a first-order step are constants): the lists' gradients
    # are lists of None, as torch.library's structure check requires.
    consts = [t.detach() for t in (*hs, *ds)]
    assert torch.autograd.gradgradcheck(
        lambda x: _lowrank.lowrank_add(None, x, consts[:2], consts[2:], scales.detach()), (x,))


def test_grads_gradients_to_second_order():
    _, u, bs, _ = _inputs(2, 5, 3, 7, 6, 3, grad=True, seed=1)
    c = _inputs(2, 5, 3, 7, 6, 1, grad=True, seed=2)[0]
    scales = torch.tensor([0.7, -1.3, 2.1], dtype=F64, requires_grad=True)

    def f(u, c, scales, *bs):
        return _lowrank.lowrank_grads(u, list(bs), c, scales)

    assert torch.autograd.gradcheck(f, (u, c, scales, *bs))
    assert torch.autograd.gradgradcheck(f, (u, c, scales, *bs))
    assert torch.autograd.gradcheck(lambda u, c, *bs: _lowrank.lowrank_grads(u, list(bs), c, None), (u, c, *bs))
    consts = [b.detach() for b in bs]
    assert torch.autograd.gradgradcheck(lambda u, c: _lowrank.lowrank_grads(u, consts, c, scales), (u, c))


def test_operations_compute_the_products():
    """Each operation against its formula written per task with matmul (not the batched code it uses)."""
    base, x, hs, ds = _inputs(3, 4, 2, 5, 6, 2, seed=3)
    want = base + sum((x @ h.transpose(1, 2)) @ d for h, d in zip(hs, ds))
    assert_close(_lowrank.lowrank_add(base, x, hs, ds, None), want, 1e-12, "add")
    scales = torch.tensor([0.5, -2.0], dtype=F64)
    want = base + sum(s * (x @ h.transpose(1, 2)) @ d for s, h, d in zip(scales, hs, ds))
    assert_close(_lowrank.lowrank_add(base, x, hs, ds, scales), want, 1e-12, "add scaled")
    c = _inputs(3, 4, 2, 5, 6, 1, seed=4)[0]
    want = torch.stack([(x @ h.transpose(1, 2)).transpose(1, 2) @ c for h in hs])
    assert_close(_lowrank.lowrank_grads(x, hs, c, None), want, 1e-12, "grads")
    assert_close(_lowrank.lowrank_grads(x, hs, c, scales), want * scales.view(-1, 1, 1, 1), 1e-12, "grads scaled")


# ---- the kernels, in the interpreter -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [
    (3, 7, 5, 45, 70, 3),    # widths over one chunk of 32, not multiples of it
    (2, 10, 10, 1, 40, 1),   # a 1-wide input
    (2, 17, 3, 33, 1, 2),    # 17 points (a 32 block), a 1-wide output
], ids=["chunks", "in1", "out1"])
def test_kernels_match_the_batched_products(kernels, sizes, dtype, rtol):
    T, N, S, I, O, J = sizes
    base, x, hs, ds = _inputs(*sizes, dtype=dtype, seed=5)
    c = _inputs(*sizes, dtype=dtype, seed=6)[0]
    scales = torch.linspace(-1.5, 0.7, J, dtype=dtype)
    ref = {"add": _add_ref(base, x, hs, ds), "add_nobase": _add_ref(None, x, hs, ds),
           "add_scaled": _add_ref(base, x, hs, ds, scales),
           "grads": torch.stack([h @ x.transpose(1, 2) @ c for h in hs])}
    ref["grads_scaled"] = ref["grads"] * scales.view(-1, 1, 1, 1)
    got = {"add": _lowrank._add_impl(base, x, hs, ds, None), "add_nobase": _lowrank._add_impl(None, x, hs, ds, None),
           "add_scaled": _lowrank._add_impl(base, x, hs, ds, scales), "grads": _lowrank._grads_impl(x, hs, c, None),
           "grads_scaled": _lowrank._grads_impl(x, hs, c, scales)}
    for name in ref:
        assert got[name].dtype == dtype
        assert_close(got[name], ref[name], rtol, name)



@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_kernels_in_chunks_of_16(kernels, monkeypatch, dtype, rtol):
    """FASTMAML_FACTORED_K_CHUNK=16 (the GPU check's A/B `fchunk16`): widths of 45 and 70 in chunks of 16,
    against the same products."""
    monkeypatch.setattr(_lowrank, "K_CHUNK", 16)
    assert (_lowrank._chunk(45), _lowrank._chunk(70), _lowrank._chunk(10)) == (16, 16, 16)
    test_kernels_match_the_batched_products(None, (3, 7, 5, 45, 70, 3), dtype, rtol)

@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k_loop", ["one", "per_factor"])
def test_kernels_in_one_loop_or_a_loop_per_factor(kernels, monkeypatch, k_loop, dtype, rtol):
    """FASTMAML_FACTORED_K_LOOP forced either way (`auto` takes one loop for float32 at these sizes and a
    loop per factor for float64; the GPU check's A/B `floops` is per_factor): against the same products,
    three factors, widths past a chunk."""
    monkeypatch.setattr(_lowrank, "K_LOOP", k_loop)
    test_kernels_match_the_batched_products(None, (3, 7, 5, 45, 70, 3), dtype, rtol)


def test_auto_takes_one_loop_where_it_compiles_without_spills(monkeypatch):
    monkeypatch.setattr(_lowrank, "K_LOOP", "auto")
    assert _lowrank._one_loop(torch.float32, 10, 10, 5)
    assert not _lowrank._one_loop(torch.float32, 10, 10, 6)  # past the 5 measured (8 spilled)
    assert not _lowrank._one_loop(torch.float32, 20, 10, 2)  # 32 x 16 padded points (32 x 32 spilled)
    assert not _lowrank._one_loop(F64, 10, 10, 2)
    monkeypatch.setattr(_lowrank, "PRECISION", "tf32x3")  # 5 factors spill with tensor-core products
    assert not _lowrank._one_loop(torch.float32, 10, 10, 5)
    monkeypatch.setattr(_lowrank, "K_LOOP", "one")
    assert _lowrank._one_loop(F64, 20, 20, 8)


def _add_ref(base, x, hs, ds, scales=None):
    scales = [1.0] * len(hs) if scales is None else scales
    out = sum(s * (x @ h.transpose(1, 2)) @ d for s, h, d in zip(scales, hs, ds))
    return out if base is None else base + out


def _three_products(g, x, hs, ds, scales):
    """lowrank_add's gradients in x, hs and ds for its output's gradient g, by matmul: the three products
    `lowrank_add(None, g, ds, hs, s)`, `lowrank_grads(g, ds, x, s)` and `lowrank_grads(x, hs, g, s)`."""
    scales = [1.0] * len(hs) if scales is None else scales
    es = [s * (g @ d.transpose(1, 2)) for s, d in zip(scales, ds)]
    cs = [s * (x @ h.transpose(1, 2)) for s, h in zip(scales, hs)]
    return (sum(e @ h for e, h in zip(es, hs)), torch.stack([e.transpose(1, 2) @ x for e in es]),
            torch.stack([c.transpose(1, 2) @ g for c in cs]))


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [
    (3, 7, 5, 45, 70, 3),    # widths over one chunk of 16, not multiples of it
    (2, 10, 10, 1, 40, 1),   # a 1-wide input
    (2, 17, 3, 33, 1, 1),    # 17 points (a 32 block), a 1-wide output
    (2, 10, 10, 37, 29, 3),  # the most pairs of 10 points float64's fused kernel takes (float32's: 5)
    (3, 7, 19, 21, 13, 1),   # 19 support rows (a 32 block of S)
], ids=["chunks", "in1", "out1", "pairs3", "s19"])
def test_fused_backward_kernel_matches_the_three_products(kernels, sizes, dtype, rtol):
    """lowrank_backward's kernel (x's, the factors' gradients in one program a task) against the three
    batched products it replaces, with and without scales; the kernel itself, not its fallback."""
    T, N, S, I, O, J = sizes
    g, x, hs, ds = _inputs(*sizes, dtype=dtype, seed=9)
    assert J * _lowrank._pad(N) * _lowrank._pad(S) <= _lowrank_backward._fused_max_tiles(dtype)
    launched = []
    kernel = _lowrank._module().lowrank_backward_kernel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_lowrank._module(), "lowrank_backward_kernel",
                   type("Spy", (), {"__getitem__": lambda self, grid: launched.append(grid) or kernel[grid]})())
        mp.setattr(_lowrank, "_add_impl", None)  # the three kernels' fallback must not run
        for scales in (None, torch.linspace(-1.5, 0.7, J, dtype=dtype)):
            got = _lowrank_backward._backward_impl(g, x, hs, ds, scales)
            want = _three_products(g, x, hs, ds, scales)
            for name, a, b in zip(("g_x", "g_hs", "g_ds"), got, want):
                assert a.dtype == dtype and a.shape == b.shape, name
                assert_close(a, b, rtol, name)
    assert launched == [(T,), (T,)]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_fused_backward_past_its_bound_runs_the_three_kernels(kernels, dtype):
    """More factor pairs than the fused kernel holds (float32: 6 of 10 points; float64: 4): the three
    kernels, the same products."""
    J = 6 if dtype == torch.float32 else 4
    g, x, hs, ds = _inputs(2, 10, 10, 21, 19, J, dtype=dtype, seed=10)
    assert J * 16 * 16 > _lowrank_backward._fused_max_tiles(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_lowrank._module(), "lowrank_backward_kernel", None)
        got = _lowrank_backward._backward_impl(g, x, hs, ds, None)
    for name, a, b in zip(("g_x", "g_hs", "g_ds"), got, _three_products(g, x, hs, ds, None)):
        assert_close(a, b, 1e-12 if dtype == F64 else 1e-5, name)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rates_learned", [False, True])
def test_add_backward_in_one_operation_or_three(monkeypatch, fused, rates_learned):
    """lowrank_add's backward as `lowrank_backward` (FASTMAML_FACTORED_FUSED_BACKWARD=1, where x and every
    factor need a gradient and the scales none) or as three operations (=0, or learned scales): the same
    gradients, first and second order, against autograd through matmul."""
    monkeypatch.setattr(_lowrank_backward, "FUSED_BACKWARD", fused)
    calls = []
    real = _lowrank_backward.lowrank_backward
    monkeypatch.setattr(_lowrank_backward, "lowrank_backward", lambda *a: calls.append(1) or real(*a))
    base, x, hs, ds = _inputs(2, 6, 4, 9, 11, 3, seed=11, grad=True)
    scales = torch.tensor([0.6, -1.1, 0.3], dtype=F64, requires_grad=rates_learned)
    flat = [base, x, *hs, *ds] + ([scales] if rates_learned else [])
    w = torch.rand(2, 6, 11, dtype=F64) + 0.5

    def value(add, used):
        """The output and, of its gradients in x, hs and ds, those `used` (the others reach no loss)."""
        out = add(base, x, hs, ds, scales)
        first = (out * w + out * out).sum()  # its gradient in out depends on the inputs: the op's g needs one
        gx, *rest = torch.autograd.grad(first, [x, *hs, *ds], create_graph=True)
        ghs, gds = rest[:3], rest[3:]
        total = first
        if "x" in used:
            total = total + (gx * gx).sum()
        if "hs" in used:
            total = total + sum((gh * gh).sum() for gh in ghs)
        if "ds" in used:
            total = total + sum((gd ** 3).sum() for gd in gds)
        return total

    for used in (("x", "hs", "ds"), ("ds",), ("x",)):
        calls.clear()
        got = torch.autograd.grad(value(_lowrank.lowrank_add, used), flat)
        assert bool(calls) == (fused and not rates_learned)
        want = torch.autograd.grad(value(_add_ref, used), flat)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, 1e-11, f"input {i}, gradients of {used} used")


def test_kernels_take_strided_inputs(kernels):
    """Transposed views (apply_t passes the factors in the other roles) are read as their values."""
    base, x, hs, ds = _inputs(2, 6, 4, 9, 11, 2, seed=7)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    assert not xt.is_contiguous()
    assert_close(_lowrank._add_impl(base, xt, hs, ds, None), _add_ref(base, x, hs, ds), 1e-12, "add")


def test_kernel_gradients_match_the_batched_ones(kernels):
    """First and second derivatives through the kernels (scales included), against autograd through
    matmul."""
    leaves = _inputs(2, 6, 4, 9, 11, 2, seed=8, grad=True)
    base, x, hs, ds = leaves
    scales = torch.tensor([0.6, -1.1], dtype=F64, requires_grad=True)
    flat = [base, x, scales, *hs, *ds]
    w = torch.rand(2, 6, 11, dtype=F64) + 0.5

    def value(add):
        out = add(base, x, hs, ds, scales)
        (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        return (out * w).sum() + (gx * gx).sum()  # the second term needs the gradient's gradient

    got = torch.autograd.grad(value(_lowrank.lowrank_add), flat)
    want = torch.autograd.grad(value(_add_ref), flat)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-11, f"input {i}")


@pytest.mark.parametrize("options", [
    dict(inner_steps=3, lr_form="per_layer", query_loss_weights=True, activation="tanh"),
    dict(inner_steps=2, lr_form="per_step", loss="cross_entropy", activation="relu"),
    dict(inner_steps=2, lr_form="per_step", first_order=True, grad_inputs=False),
], ids=["so-qlw-tanh", "ce-relu", "fo-no-input-grad"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_factored_through_the_kernels_matches_the_reference(kernels, monkeypatch, options, dtype):
    """The factored backend with every product through the kernels (factors kept at every step): the
    reference's outputs and every gradient (test_backends' check: float64 1e-9, float32 1e-4)."""
    from test_backends import check_maml

    monkeypatch.setattr(factored, "DENSE", "never")
    check_maml("factored", {"dims": (3, 9, 6, 4), "tasks": 3, "seed": 61, **options}, dtype)


@pytest.mark.parametrize("dense", ["auto", "never"])
def test_memory_estimate_through_the_kernels(kernels, monkeypatch, dense):
    """`saved_bytes_per_task` with the products through the kernels (no `[N, Ns]` products kept): at
    least what autograd keeps and at most 1.4x (test_factored's check)."""
    from test_factored import test_memory_estimate_bounds_what_autograd_keeps as check

    check(monkeypatch, dense, "tanh", (1, 40, 40, 1), 3, 10, 10, "mse", False)
    check(monkeypatch, dense, "relu", (4, 24, 24, 24, 3), 3, 7, 9, "mse", True)


def test_meta_gradient_through_the_kernels_differentiated_again(kernels, monkeypatch):
    """create_graph=True through the kernels: the gradient of the meta-gradient is the reference's."""
    import fastmaml
    from _reference_loop import gradients, make_case

    monkeypatch.setattr(factored, "DENSE", "never")
    case = make_case(dims=(3, 9, 6, 4), tasks=2, inner_steps=2, lr_form="per_step", activation="tanh", seed=52)
    grads = {}
    for backend in ("reference", "factored"):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        (g,) = torch.autograd.grad(out.loss, case.params[2], create_graph=True)
        grads[backend] = gradients((g * g).sum(), case.leaves())
    assert grads["reference"]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(grads["factored"], grads["reference"], 1e-9, "grad of the meta-gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
@pytest.mark.parametrize("language", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [(3000, 10, 10, 128, 128, 4), (257, 10, 10, 40, 1, 2), (33, 17, 5, 1, 45, 1),
                                   (65, 13, 7, 132, 36, 5)],
                         ids=["w128-J4", "out1", "in1", "odd"])
def test_lowrank_on_the_gpu(monkeypatch, sizes, dtype, rtol, language):
    """The compiled kernels on CUDA tensors (chosen by `kernel_reason`, no interpreter; lowrank_add by
    Triton's kernel or the extension's CUDA one): values, first and second derivatives against autograd
    through the batched products, with scales."""
    monkeypatch.setattr(_lowrank, "LANGUAGE", language)
    T, N, S, I, O, J = sizes
    cpu = _inputs(*sizes, dtype=dtype, seed=9)
    base, x, hs, ds = [t.cuda().requires_grad_() for t in cpu[:2]] + [[t.cuda().requires_grad_() for t in ts]
                                                                      for ts in cpu[2:]]
    scales = torch.linspace(-1.2, 0.8, J, dtype=dtype, device="cuda").requires_grad_()
    assert _lowrank.kernel_reason(x, J, S) is None
    flat = [base, x, scales, *hs, *ds]
    w = torch.rand(T, N, O, dtype=dtype, device="cuda") + 0.5

    def value(add):
        out = add(base, x, hs, ds, scales)
        (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        return out, (out * w).sum() + (gx * gx).sum()

    got_out, got = value(_lowrank.lowrank_add)
    want_out, want = value(_lowrank._add_batched)
    assert_close(got_out, want_out, rtol, "lowrank_add")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, flat), torch.autograd.grad(want, flat))):
        assert_close(a, b, rtol, f"input {i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the extension's CUDA kernel)")
@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_cuda_lowrank_kernel_takes_any_alignment_and_sixteen_pairs(dtype, rtol):
    """fastmaml::lowrank_add_cuda itself: 16 pairs (past the Triton kernels' bound), inputs one element off
    16-byte alignment (its elementwise loads) and transposed views, without base and scales."""
    from fastmaml import _ext

    _ext.load()
    T, N, S, I, O, J = 40, 10, 10, 128, 64, 16
    base, x, hs, ds = (t.cuda() if torch.is_tensor(t) else [f.cuda() for f in t]
                       for t in _inputs(T, N, S, I, O, J, dtype=dtype, seed=21))
    scales = torch.linspace(-1.0, 1.5, J, dtype=dtype, device="cuda")
    want = _lowrank._add_batched(base, x, hs, ds, scales)
    got = torch.ops.fastmaml.lowrank_add_cuda(base, x, hs, ds, scales)
    assert_close(got, want, rtol, "16 pairs")
    off = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(x).copy_(x)  # 4 or 8 bytes off
    assert off.data_ptr() % 16 != 0
    got = torch.ops.fastmaml.lowrank_add_cuda(None, off, hs[:3], [d.transpose(1, 2).contiguous().transpose(1, 2)
                                                                  for d in ds[:3]], None)
    assert_close(got, _lowrank._add_batched(None, x, hs[:3], ds[:3]), rtol, "misaligned x, strided ds")
    with pytest.raises(RuntimeError, match="1 to 16 pairs"):
        torch.ops.fastmaml.lowrank_add_cuda(None, x, hs + hs[:1], ds + ds[:1], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the extension's CUDA kernel)")
@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", ["w128-bases", "odd-widths", "misaligned-h", "width-1"])
def test_cuda_pair_products_match_the_batched_ones(monkeypatch, dtype, rtol, case):
    """The sweep's two products of a weight cotangent (`_lowrank_pairs.pair_products`) in one launch of
    fastmaml::lowrank_pairs_cuda (counted: the test fails if another path made them): u and v against the
    batched products, input and output widths apart (a swap shows), with and without bases, each load
    width (16-byte, odd widths, a misaligned input, a width of 1), and u alone."""
    monkeypatch.setattr(_lowrank, "LANGUAGE", "cuda")
    monkeypatch.setattr(_lowrank, "KERNELS", "auto")
    monkeypatch.setattr(_lowrank_pairs, "FUSED", False)
    calls = []
    real = _lowrank_cuda.pairs
    monkeypatch.setattr(_lowrank_cuda, "pairs", lambda *args: calls.append(1) or real(*args))
    T, N, S, I, O, J = {"w128-bases": (300, 10, 10, 128, 36, 3), "odd-widths": (64, 13, 7, 41, 35, 2),
                        "misaligned-h": (50, 10, 10, 40, 128, 3), "width-1": (70, 10, 10, 1, 40, 3)}[case]
    g = torch.Generator(device="cuda").manual_seed(4)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device="cuda", dtype=F64).to(dtype) * 2 - 1

    h, d = rand(T, N, I), rand(T, N, O)
    if case == "misaligned-h":  # one element past 16-byte alignment, contiguous
        h = torch.empty(h.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(h).copy_(h)
        assert h.data_ptr() % 16 != 0
    fa, fb = [rand(T, S, O) for _ in range(J)], [rand(T, S, I) for _ in range(J)]
    base_u, base_v = (rand(T, N, O), rand(T, N, I)) if case != "odd-widths" else (None, None)
    scales = torch.tensor([0.7, -1.3, 0.4][:J], dtype=dtype, device="cuda")
    want = _lowrank_pairs._pairs_batched(base_u, base_v, h, d, fa, fb, scales, True)
    got = _lowrank_pairs.pair_products(base_u, base_v, h, d, fa, fb, scales, True)
    assert calls == [1], "lowrank_pairs_cuda did not make u and v"
    assert_close(got[0], want[0], rtol, "u")
    assert_close(got[1], want[1], rtol, "v")
    u, v = _lowrank_pairs.pair_products(base_u, base_v, h, d, fa, fb, scales, False)
    assert v is None
    assert_close(u, want[0], rtol, "u alone")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the extension's CUDA kernel)")
def test_factored_with_the_cuda_kernel_matches_the_reference(monkeypatch):
    """The factored backend with FASTMAML_FACTORED_KERNELS=cuda (lowrank_add and the sweep's pairs of it), at
    the sinusoid net's size in float64: every gradient against the reference."""
    import fastmaml
    from _reference_loop import gradients, make_case

    monkeypatch.setattr(_lowrank, "LANGUAGE", "cuda")
    monkeypatch.setattr(factored, "DENSE", "never")
    case = make_case(dims=(1, 40, 40, 1), tasks=37, n_support=10, n_query=10, inner_steps=3, lr_form="per_step",
                     activation="relu", seed=5).to(F64, "cuda")
    grads = {}
    for backend in ("reference", "factored"):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        grads[backend] = gradients(out.loss, case.leaves())
    assert grads["reference"]["params[2]"].abs().max() > 0, "a test that cannot fail"
    assert_close(grads["factored"], grads["reference"], 1e-10, "meta-gradient")


def test_cuda_kernel_switch_says_why_it_cannot_run(monkeypatch):
    """FASTMAML_FACTORED_KERNELS=cuda where the extension has no CUDA kernels: an error that says so,
    not the Triton kernels in its place. Where the extension has them (a CUDA build of torch, with or
    without a GPU) there is nothing to refuse: `reason` sends only CUDA tensors to the kernel, and the GPU
    tests above run it."""
    if _lowrank_cuda.kernel_missing() is None:
        pytest.skip("the extension has its CUDA low-rank kernels: nothing to refuse")
    x = torch.rand(2, 3, 4)
    with pytest.raises(RuntimeError, match="FASTMAML_FACTORED_KERNELS=cuda.*cannot run here"):
        _lowrank_cuda.add(None, x, [torch.rand(2, 5, 4)], [torch.rand(2, 5, 6)], None)
    with pytest.raises(RuntimeError, match="FASTMAML_FACTORED_KERNELS=cuda.*cannot run here"):
        _lowrank_cuda.pairs(None, None, x, torch.rand(2, 3, 6), [torch.rand(2, 5, 6)], [torch.rand(2, 5, 4)], None)


def test_where_the_cuda_kernel_runs(monkeypatch):
    """With FASTMAML_FACTORED_KERNELS=cuda, lowrank_add's own bounds (not Triton's): CUDA tensors of float32
    or float64, at most 16 pairs, their products in 48 KiB; each reason says which. With Triton's, the
    Triton kernels' reasons."""
    x = torch.zeros(2, 10, 8)
    assert _lowrank.add_kernel_reason(x, 3, 10) == _lowrank.kernel_reason(x, 3, 10)
    monkeypatch.setattr(_lowrank, "LANGUAGE", "cuda")
    assert "cpu tensors" in _lowrank.add_kernel_reason(x, 3, 10)
    meta = torch.empty(2, 10, 8, device="meta")  # a device the kernel does not take either, with no data
    assert "meta tensors" in _lowrank.add_kernel_reason(meta, 3, 10)
    if torch.cuda.is_available():
        cuda = torch.zeros(2, 10, 8, device="cuda")
        assert _lowrank.add_kernel_reason(cuda, 16, 10) is None  # past Triton's 8 pairs of 16 x 16
        assert "at most 16 pairs" in _lowrank.add_kernel_reason(cuda, 17, 10)
        assert "48 KiB" in _lowrank.add_kernel_reason(cuda.double(), 16, 48)  # 16 x 48 x 12 doubles
        assert "dtype" in _lowrank.add_kernel_reason(cuda.half(), 1, 10)
    monkeypatch.setattr(_lowrank, "KERNELS", "never")
    assert "FASTMAML_FACTORED_TRITON=never" in _lowrank.add_kernel_reason(x, 3, 10)


class _CudaLike:
    """A stand-in for a CUDA tensor of shape [T, N, I] (only what `_lowrank_cuda.reason` reads), so that
    `language`'s choice can be checked without a GPU."""

    class device:
        type = "cuda"

    def __init__(self, shape, dtype=torch.float32):
        self.shape, self.dtype = shape, dtype

    def element_size(self):
        return torch.empty(0, dtype=self.dtype).element_size()


def test_auto_takes_the_cuda_kernel_where_it_is_built_and_takes_the_call(monkeypatch):
    """FASTMAML_FACTORED_KERNELS=auto (the default): the extension's CUDA kernel for CUDA tensors where the
    extension has it and the call is within its bounds; Triton's where it is missing, past its bounds, and
    for CPU tensors; "triton" and "cuda" as asked whatever the call."""
    monkeypatch.setattr(_lowrank, "LANGUAGE", "auto")
    x = _CudaLike((2, 10, 8))
    monkeypatch.setattr(_lowrank_cuda, "kernel_missing", lambda: None)
    assert _lowrank.language(x, 5, 10) == "cuda"
    assert _lowrank.language(x, 17, 10) == "triton"  # past the CUDA kernel's 16 pairs
    assert _lowrank.language(_CudaLike((2, 10, 8), torch.float16), 1, 10) == "triton"
    assert _lowrank.language(torch.zeros(2, 10, 8), 5, 10) == "triton"
    monkeypatch.setattr(_lowrank_cuda, "kernel_missing", lambda: "built without nvcc")
    assert _lowrank.language(x, 5, 10) == "triton"
    for asked in ("triton", "cuda"):
        monkeypatch.setattr(_lowrank, "LANGUAGE", asked)
        assert _lowrank.language(x, 5, 10) == asked
        assert _lowrank.language(torch.zeros(2, 10, 8), 17, 10) == asked


def test_cuda_kernel_block_on_the_cpu(tmp_path):
    """The CUDA kernel's block code (csrc/cuda/lowrank_add.cuh) with std::threads as its lanes
    (tests/lowrank_cuda_check.cpp), under AddressSanitizer: 70 cases against a long double sum."""
    from _host_checks import build_and_run

    out = build_and_run(tmp_path, ROOT / "tests" / "lowrank_cuda_check.cpp", ["-O1", "-g", "-fsanitize=address"])
    assert "ok: 70 cases" in out


# ---- where the kernels run ---------------------------------------------------------------------------


def test_where_the_kernels_run(monkeypatch):
    """The batched products on CPU tensors, under FASTMAML_FACTORED_TRITON=never, and past the register
    bounds; each reason says which."""
    x = torch.zeros(2, 10, 8)
    assert "CPU tensors" in _lowrank.kernel_reason(x, 3, 10)
    if _interpreter_reason() is None:
        monkeypatch.setattr(_lowrank, "_INTERPRET_CPU", True)
        assert _lowrank.kernel_reason(x, 8, 10) is None  # 8 factors of 16 x 16 padded points
        assert "factor pairs" in _lowrank.kernel_reason(x, 9, 10)
        assert "factor pairs" in _lowrank.kernel_reason(torch.zeros(2, 40, 8), 1, 40)  # 64 x 64
        assert _lowrank.kernel_reason(x.double(), 8, 10) is None
        assert "dtype" in _lowrank.kernel_reason(x.half(), 1, 10)
    monkeypatch.setattr(_lowrank, "KERNELS", "never")
    assert "FASTMAML_FACTORED_TRITON=never" in _lowrank.kernel_reason(x, 3, 10)


def test_kernel_switch_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTMAML_FACTORED_TRITON", raising=False)
    assert _lowrank._kernels_mode() == "auto"
    monkeypatch.setenv("FASTMAML_FACTORED_TRITON", "NEVER")
    assert _lowrank._kernels_mode() == "never"
    monkeypatch.setenv("FASTMAML_FACTORED_TRITON", "always")
    with pytest.raises(ValueError, match="FASTMAML_FACTORED_TRITON"):
        _lowrank._kernels_mode()


def test_stages_pairs_and_kernels_switches_from_the_environment():
    """FASTMAML_FACTORED_STAGES, FASTMAML_FACTORED_PAIRS and FASTMAML_FACTORED_KERNELS are read at import (a fresh interpreter each):
    the defaults, the other values, and a bad value refused by name."""
    code = ("from fastmaml.backends import _lowrank, _lowrank_pairs; "
            "print(_lowrank.STAGES, _lowrank_pairs.FUSED, _lowrank.LANGUAGE)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMAML_FACTORED_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True)

    assert run().stdout.split() == ["3", "False", "auto"]
    assert run(FASTMAML_FACTORED_KERNELS="triton").stdout.split() == ["3", "False", "triton"]
    assert run(FASTMAML_FACTORED_STAGES="2", FASTMAML_FACTORED_PAIRS="Fused",
               FASTMAML_FACTORED_KERNELS="CUDA").stdout.split() == ["2", "True", "cuda"]
    for name, bad in (("FASTMAML_FACTORED_STAGES", "4"), ("FASTMAML_FACTORED_PAIRS", "one"),
                      ("FASTMAML_FACTORED_KERNELS", "cutlass")):
        proc = run(**{name: bad})
        assert proc.returncode != 0 and name in proc.stderr, proc.stderr[-500:]


# ---- registers, compiled for sm_90 -------------------------------------------------------------------

# At the bounds of `kernel_reason` (10 and 20 points pad to 16 and 32), and the smallest: no more than a
# few bytes of spills, and not ptxas's 32-register fallback (which spills kilobytes).
_VARIANTS = [(kind, dtype, n, j) for kind in ("add", "grads") for dtype in ("float32", "float64")
             for n, j in ((10, 1), (10, _lowrank.MAX_TILES // 256), (20, _lowrank.MAX_TILES // 1024))]


def _compile_child(variants) -> None:
    """Runs in a subprocess with TRITON_INTERPRET unset: ptxas -v of each variant, one JSON line each."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_registers import parse_ptxas

    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    for kind, dtype, n, j in variants:
        k = _lowrank.compile_for_target(kind, getattr(torch, dtype), n, n, 128, 128, j)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(k.asm["ptx"])
            proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                                  capture_output=True, text=True)
        report = list(parse_ptxas(proc.stderr).values())
        report = dict(report[0], mma=k.asm["ptx"].count("mma.sync")) if report else proc.stderr[-500:]
        print(json.dumps([kind, dtype, n, j, report]), flush=True)


def _compiled_rows(variants, **env_extra) -> list:
    if not (shutil.which("ptxas") or Path("/usr/local/cuda/bin/ptxas").exists()):
        pytest.skip("ptxas not found (the CUDA toolkit's assembler reports registers and spills)")
    if _lowrank._triton_reason() is not None:
        pytest.skip(_lowrank._triton_reason())
    env = dict(os.environ, **env_extra)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    code = f"import test_lowrank as t; t._compile_child({variants!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(rows) == len(variants), proc.stderr[-3000:]
    for kind, dtype, n, j, report in rows:
        assert isinstance(report, dict) and "registers" in report, (kind, dtype, n, j, report)
    return rows


# The fused backward at its bounds (FUSED_MAX_TILES): five pairs of 10 points and one of 20 in float32, three
# of 10 in float64.
_VARIANTS += [("backward", "float32", 10, 1), ("backward", "float32", 10, 5), ("backward", "float32", 20, 1),
              ("backward", "float64", 10, 3)]
# The written-out sweep's fused pair products at their bounds (`_lowrank_pairs.PAIRS_MAX_TILES`): five pairs
# of 10 points and one of 20 in float32, four of 10 in float64.
_VARIANTS += [("pairs", "float32", 10, 1), ("pairs", "float32", 10, 5), ("pairs", "float32", 20, 1),
              ("pairs", "float64", 10, 4)]


def test_fused_backward_bound_follows_the_precision(monkeypatch):
    """With tf32x3 products the fused kernel holds fewer pairs (three of 16 x 16 padded points, not five):
    the bound the compile test below checks at both precisions."""
    monkeypatch.setattr(_lowrank, "PRECISION", "tf32x3")
    assert _lowrank_backward._fused_max_tiles(torch.float32) == 3 * 256
    assert _lowrank_backward._fused_max_tiles(F64) == 3 * 256
    monkeypatch.setattr(_lowrank, "PRECISION", "ieee")
    assert _lowrank_backward._fused_max_tiles(torch.float32) == 5 * 256


def test_kernels_compile_for_sm90_within_registers():
    for kind, dtype, n, j, report in _compiled_rows(_VARIANTS):
        assert report["registers"] > 32 and report["spill_stores"] <= 32, (kind, dtype, n, j, report)
        if dtype == "float32":  # (float64's products are DMMA tensor-core instructions on sm_90 anyway)
            assert report["mma"] == 0, f"{kind} {dtype}: tensor-core products by default ({report})"


def test_tf32x3_switch_compiles_to_tensor_cores():
    """FASTMAML_FACTORED_PRECISION=tf32x3 (the GPU check's A/B): the float32 products become tensor-core
    instructions, without the spills of ptxas's fallback; float64 still compiles (it ignores the switch)."""
    variants = [(kind, dtype, 10, 1) for kind in ("add", "grads") for dtype in ("float32", "float64")]
    variants.append(("backward", "float32", 10, 3))  # at tf32x3's bound (FUSED_MAX_TILES)
    for kind, dtype, n, j, report in _compiled_rows(variants, FASTMAML_FACTORED_PRECISION="tf32x3"):
        assert dtype == "float64" or report["mma"] > 0, (kind, dtype, report)
        assert report["registers"] > 32 and report["spill_stores"] <= 32, (kind, dtype, n, j, report)


def test_chunks_of_16_compile_to_fewer_registers():
    """FASTMAML_FACTORED_K_CHUNK=16 (the GPU check's A/B `fchunk16`) reaches the compiled kernels: with five
    factor pairs at width 128, fewer registers a thread than the default chunks of 32, and no spills."""
    variants = [(kind, "float32", 10, 5) for kind in ("add", "grads")]
    default = {kind: report for kind, _, _, _, report in _compiled_rows(variants)}
    for kind, dtype, n, j, report in _compiled_rows(variants, FASTMAML_FACTORED_K_CHUNK="16"):
        assert report["spill_stores"] == 0 and report["registers"] < default[kind]["registers"], (
            kind, report, default[kind])


def test_two_stages_compile_to_fewer_registers():
    """FASTMAML_FACTORED_STAGES=2 (the A/B `fstages2`) reaches the compiled kernels: lowrank_add at five and
    eight factor pairs, width 128, takes fewer registers a thread than at Triton's 3 stages, without
    spills (a switch that changed nothing would pass as a run of the default)."""
    variants = [("add", "float32", 10, 5), ("add", "float32", 10, 8)]
    default = {j: report for _, _, _, j, report in _compiled_rows(variants)}
    for kind, dtype, n, j, report in _compiled_rows(variants, FASTMAML_FACTORED_STAGES="2"):
        assert report["spill_stores"] == 0 and report["registers"] < default[j]["registers"], (j, report, default[j])


def test_eight_warps_reach_the_compiled_kernels():
    """FASTMAML_FACTORED_WARPS=8 (the A/B `fwarps8`) reaches the compiled kernels: with five factor pairs at
    width 128 each of the three takes at most 96 registers a thread without spills (twice the warps a
    multiprocessor of the default 4 warps' 148 to 154)."""
    variants = [(kind, "float32", 10, 5) for kind in ("add", "grads", "backward")]
    for kind, dtype, n, j, report in _compiled_rows(variants, FASTMAML_FACTORED_WARPS="8"):
        assert report["spill_stores"] == 0 and 32 < report["registers"] <= 96, (kind, report)


def test_warps_switch_reaches_every_launch(kernels, monkeypatch):
    """Every launch of the four kernels takes WARPS (FASTMAML_FACTORED_WARPS) warps and STAGES
    (FASTMAML_FACTORED_STAGES) pipeline stages."""
    seen = []
    module = _lowrank._module()
    for name in ("lowrank_add_kernel", "lowrank_grads_kernel", "lowrank_backward_kernel", "lowrank_pairs_kernel"):
        real = getattr(module, name)
        spy = type("Spy", (), {"__getitem__": lambda self, grid, real=real: (
            lambda *a, **kw: seen.append((kw["num_warps"], kw["num_stages"])) or real[grid](*a, **kw))})()
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(_lowrank, "WARPS", 8)
    monkeypatch.setattr(_lowrank, "STAGES", 2)
    g, x, hs, ds = _inputs(2, 6, 4, 9, 11, 2, seed=12)
    _lowrank._add_impl(g, x, hs, ds, None)
    _lowrank._grads_impl(x, hs, g, None)
    _lowrank_backward._backward_impl(g, x, hs, ds, None)
    monkeypatch.setattr(_lowrank_pairs, "FUSED", True)
    _lowrank_pairs.pair_products(None, None, x, g, ds, hs, None, True)
    assert seen == [(8, 2)] * 4


def test_loop_per_factor_reaches_the_compiled_kernels():
    """FASTMAML_FACTORED_K_LOOP=per_factor (the A/B `floops`) compiles, without spills, to another kernel than
    the default's one loop for all factors: five factor pairs at width 128 take other register counts."""
    variants = [("add", "float32", 10, 5)]
    default = _compiled_rows(variants)[0][4]
    per_factor = _compiled_rows(variants, FASTMAML_FACTORED_K_LOOP="per_factor")[0][4]
    assert default["spill_stores"] == 0 and per_factor["spill_stores"] == 0, (default, per_factor)
    assert default["registers"] != per_factor["registers"], (default, per_factor)


def test_compiles_through_the_kernels(kernels, monkeypatch):
    """torch.compile(fullgraph=True, aot_eager) with the products as the two operations (their fake
    kernels give the shapes, their gradients are traced into the joint graph): the eager loss and
    meta-gradient, one graph. Factors at both steps (the `kernels` fixture fails any batched product)."""
    from test_factored import check_compiled

    monkeypatch.setattr(factored, "DENSE", "never")
    check_compiled(tasks=3, calls=1)


def test_chunks_through_the_kernels(kernels, monkeypatch):
    """Chunks of tasks through the operations (each chunk's gradient taken in the forward, and each
    chunk recomputed in the backward for the outputs' cotangents): one pass's outputs and gradients, in
    float64."""
    from test_factored import test_chunks_give_the_unchunked_result

    monkeypatch.setattr(factored, "DENSE", "never")
    test_chunks_give_the_unchunked_result(monkeypatch, "float-rate", "all")
