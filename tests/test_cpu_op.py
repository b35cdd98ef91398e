"""The C++ operations `torch.ops.fastmaml.*` on CPU tensors and the `cpu` backend built on them.

- `torch.library.opcheck` on maml_fwd, maml_bwd, maml_fwdbwd, weighted_task_sum and maml_adapt (schema,
  fake kernels, autograd registration, AOT dispatch) on several sample inputs; maml_fwdbwd against
  maml_fwd + maml_bwd, and a training call taking the fused path;
- torch.compile of the op and of `fastmaml.maml(backend="cpu")`;
- a second backward through the fused op raises a clear error;
- the op against the reference backend in float64 (1e-9 relative) and float32 (1e-4 relative) on every
  option, for both builds of the task loops (baseline and AVX2, `FASTMAML_CPU_ISA`);
- gradcheck in float64 through `fastmaml.maml(backend="cpu")`;
- the deterministic reduction (same bits for any thread count) and the size limits.

Every problem is fresh random data (never zeros) with sizes that are not powers of two.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import zlib

import pytest
import torch

import fastmaml
from fastmaml import _ext
from fastmaml.backends import cpu as cpu_backend
from fastmaml.backends._fused import fused_args
from fastmaml._validate import make_problem
from _reference_loop import normal_params as make_params, random_data as make_data

F32, F64 = torch.float32, torch.float64


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build or load the extension once; without a compiler the file is skipped, a build error fails."""
    has_compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    why = _ext.unavailable()
    if why is not None and not has_compiler:
        pytest.skip(f"cpu backend unavailable: {why}")
    assert why is None, f"the C++ extension should build here: {why}"


def isa_choices() -> list[str]:
    """The task-loop builds this CPU can run: baseline always, avx2 when the CPU has AVX2 and FMA."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["baseline", "avx2"] if (" avx2" in flags and " fma" in flags) else ["baseline"]


@pytest.fixture(params=isa_choices())
def isa(request, monkeypatch):
    # maml_cpu.cpp reads FASTMAML_CPU_ISA on every call; "avx2" is the default choice where available.
    if request.param == "baseline":
        monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline")
    else:
        monkeypatch.delenv("FASTMAML_CPU_ISA", raising=False)
    return request.param


# ---------------------------------------------------------------------------------------------------
# Random problems


def make_lr(form, params, K, dtype, gen):
    """The inner rate as a float, a per-step [K] tensor, or one tensor per param (Meta-SGD)."""
    if form == "float":
        return 0.07
    if form == "per_step":
        return (0.05 + 0.05 * torch.rand(K, dtype=dtype, generator=gen)).requires_grad_()
    return [(0.03 + 0.05 * torch.rand(K, *p.shape, dtype=dtype, generator=gen)).requires_grad_() for p in params]


def op_args(dims, T, ns, nq, K, loss, dtype, seed, act=0):
    """Positional arguments of maml_fwd on a random problem (flat, as the backends pass them)."""
    gen = torch.Generator().manual_seed(seed)
    params = make_params(dims, dtype, gen)
    xs, ys, xq, yq = make_data(dims, T, ns, nq, loss, dtype, gen)
    lr = [0.05 + 0.05 * torch.rand(K, *p.shape, dtype=dtype, generator=gen) for p in params]
    qw = torch.rand(K + 1, dtype=dtype, generator=gen)
    problem = make_problem(params, xs, ys, xq, yq, inner_steps=K, inner_lr=lr,
                           activation=["relu", "tanh"][act], loss=loss, query_loss_weights=qw)
    return list(fused_args(problem))


# ---------------------------------------------------------------------------------------------------
# opcheck

OPCHECK_CASES = [
    # dims, T, Ns, Nq, K, loss, dtype, activation, first_order
    ([3, 7, 2], 3, 5, 4, 0, "mse", F64, 0, False),
    ([2, 6, 5, 3], 2, 4, 3, 1, "cross_entropy", F32, 1, False),
    ([3, 5, 4], 3, 3, 5, 3, "mse", F32, 1, True),
    ([4, 9, 3], 2, 6, 2, 3, "cross_entropy", F64, 0, False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}-fo{int(c[8])}")
def test_opcheck_maml_fwd(case):
    dims, T, ns, nq, K, loss, dtype, act, fo = case
    args = op_args(dims, T, ns, nq, K, loss, dtype, seed=11, act=act)
    args[-1] = fo
    for i in (0, 1, 2, 4):  # theta, lr, x_support, x_query: the differentiable inputs
        args[i] = args[i].detach().clone().requires_grad_()
    args[6] = args[6].detach()
    torch.library.opcheck(torch.ops.fastmaml.maml_fwd.default, tuple(args))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}-fo{int(c[8])}")
@pytest.mark.parametrize("need", [(True, True), (False, False)], ids=["lr_x_grads", "theta_only"])
def test_opcheck_maml_bwd(case, need):
    dims, T, ns, nq, K, loss, dtype, act, fo = case
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args(dims, T, ns, nq, K, loss, dtype, 12, act)]
    gen = torch.Generator().manual_seed(5)
    g_losses = torch.rand(T, dtype=dtype, generator=gen)
    g_preds = torch.randn(T, nq, dims[-1], dtype=dtype, generator=gen)
    bwd_args = (*args[:7], g_losses, g_preds, *args[7:10], fo, *need)
    torch.library.opcheck(torch.ops.fastmaml.maml_bwd.default, bwd_args)


def training_args(case, need, seed):
    """maml_fwdbwd's positional arguments for an opcheck case: theta requires grad, the rates and the
    inputs as `need = (need_lr_grad, need_x_grad)` says, the query weights not; the flags appended."""
    dims, T, ns, nq, K, loss, dtype, act, fo = case
    args = op_args(dims, T, ns, nq, K, loss, dtype, seed=seed, act=act)
    args[-1] = fo
    need_lr, need_x = need
    for i, grad in ((0, True), (1, need_lr), (2, need_x), (4, need_x)):  # theta, lr, x_support, x_query
        args[i] = args[i].detach().clone().requires_grad_(grad)
    args[6] = args[6].detach()
    return [*args, *need]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}-fo{int(c[8])}")
@pytest.mark.parametrize("need", [(True, True), (False, False)], ids=["lr_x_grads", "theta_only"])
def test_opcheck_maml_fwdbwd(case, need):
    torch.library.opcheck(torch.ops.fastmaml.maml_fwdbwd.default, tuple(training_args(case, need, seed=14)))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}-fo{int(c[8])}")
@pytest.mark.parametrize("need", [(True, True), (False, False)], ids=["lr_x_grads", "theta_only"])
def test_maml_fwdbwd_sum(case, need):
    """maml_fwdbwd_sum: opcheck, maml_fwdbwd's outputs, and its sums equal to the rows summed over tasks."""
    dims, T, ns, nq, K, loss, dtype, act, fo = case
    args = op_args(dims, 19, ns, nq, K, loss, dtype, 17, act)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    args[-1] = fo
    for keep_rows in (True, False):
        torch.library.opcheck(torch.ops.fastmaml.maml_fwdbwd_sum.default, (*args, *need, keep_rows),
                              test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.fastmaml.maml_fwdbwd_sum.default(*args, *need, True)
    ref = torch.ops.fastmaml.maml_fwdbwd.default(*args, *need)
    for a, b in zip(out[:6], ref):
        assert torch.equal(a, b)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[6], ref[2].sum(0), **tol)
    torch.testing.assert_close(out[7], ref[3].sum(0) if need[0] else ref[3], **tol)
    # Without the rows: the same losses, outputs, input rows and sums; the parameter rows empty.
    lean = torch.ops.fastmaml.maml_fwdbwd_sum.default(*args, *need, False)
    assert lean[2].shape == (0,) and lean[3].shape == (0,)
    for i in (0, 1, 4, 5, 6, 7):
        assert torch.equal(lean[i], out[i])


def test_maml_fwdbwd_sum_bits_do_not_depend_on_the_thread_count():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args([2, 9, 3], 37, 4, 5, 2, "mse", F32, 18)]
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastmaml.maml_fwdbwd_sum.default(*args, True, False, True))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def params_of(theta, dims):
    """Flat theta -> [W1, b1, ..., WL, bL] (views)."""
    out, off = [], 0
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        out.append(theta[off:off + d_out * d_in].view(d_out, d_in))
        off += d_out * d_in
        out.append(theta[off:off + d_out])
        off += d_out
    return out


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}-fo{int(c[8])}")
@pytest.mark.parametrize("need", [(True, True), (False, False)], ids=["lr_x_grads", "theta_only"])
def test_opcheck_maml_train(case, need):
    args = training_args(case, need, seed=15)
    params = [p.clone().requires_grad_() for p in params_of(args[0].detach(), case[0])]
    torch.library.opcheck(torch.ops.fastmaml.maml_train.default, (params, *args[1:]))


@pytest.mark.parametrize("keep_rows", ["1", "0"], ids=["rows", "no_rows"])
@pytest.mark.parametrize("cotangents", ["mean", "tasks", "tasks_mean", "query"])
def test_maml_train_matches_the_flat_op(cotangents, keep_rows, monkeypatch):
    """maml_train (the parameter list) against maml_fwd of the flattened parameters under autograd: the
    outputs and every gradient (each parameter's, the rates', the inputs'), through each backward path:
    the kernel's row sums (a cotangent on the mean only), the weighted rows (on the task losses, with or
    without the mean), maml_bwd (on the query output). `no_rows`: the GPU's layout (FASTMAML_KEEP_ROWS=0:
    only the sums are kept, and every cotangent but the mean's runs maml_bwd)."""
    monkeypatch.setenv("FASTMAML_KEEP_ROWS", keep_rows)
    dims = [3, 11, 7, 2]
    args = op_args(dims, 5, 6, 4, 2, "mse", F64, seed=16, act=1)
    leaves = [args[i].detach().clone().requires_grad_() for i in (0, 1, 2, 4)]
    theta, lr, xs, xq = leaves
    params = [p.clone().requires_grad_() for p in params_of(theta.detach(), dims)]
    rest = (args[3], xq, args[5], args[6].detach(), *args[7:])
    gen = torch.Generator().manual_seed(8)
    w = torch.rand(5, dtype=F64, generator=gen)
    c = torch.randn(5, 4, 2, dtype=F64, generator=gen)

    def objective(losses, preds, mean):
        if cotangents == "mean":
            return 1.7 * mean
        if cotangents == "tasks":
            return (losses * w).sum()
        if cotangents == "tasks_mean":
            return (losses * w).sum() + 1.7 * mean
        return mean + (preds * c).sum()

    train = torch.ops.fastmaml.maml_train.default(params, lr, xs, *rest, True, True)
    losses, preds = torch.ops.fastmaml.maml_fwd.default(theta, lr, xs, *rest)
    flat = (losses, preds, losses.mean())
    for a, b in zip(train, flat):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    g_train = torch.autograd.grad(objective(*train), [*params, lr, xs, xq])
    g_flat = torch.autograd.grad(objective(*flat), [theta, lr, xs, xq])
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in g_train[:len(params)]]), g_flat[0],
                               rtol=1e-11, atol=1e-13)
    for a, b in zip(g_train[len(params):], g_flat[1:]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    with torch.no_grad():  # no gradient wanted: the forward alone (maml_fwd)
        for a, b in zip(torch.ops.fastmaml.maml_train.default(params, lr, xs, *rest, True, True), flat):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fwdbwd_matches_fwd_and_bwd():
    """maml_fwdbwd's outputs equal maml_fwd's, and its rows weighted by any cotangent equal maml_bwd's
    meta-gradient for that cotangent (float64, multi-step loss, Meta-SGD rates, cross-entropy)."""
    dims, T, ns, nq, K = [3, 7, 5, 4], 5, 6, 3, 2
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in op_args(dims, T, ns, nq, K, "cross_entropy", F64, seed=15, act=1)]
    losses, preds = torch.ops.fastmaml.maml_fwd.default(*args)
    out = torch.ops.fastmaml.maml_fwdbwd.default(*args, True, True)
    torch.testing.assert_close(out[0], losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(out[1], preds, rtol=1e-12, atol=1e-14)
    c = torch.randn(T, dtype=F64, generator=torch.Generator().manual_seed(3))
    g_theta, g_lr, g_xs, g_xq = torch.ops.fastmaml.maml_bwd.default(
        *args[:7], c, torch.zeros_like(preds), *args[7:], True, True)
    task_sum = torch.ops.fastmaml.weighted_task_sum.default
    torch.testing.assert_close(task_sum(out[2], c), g_theta, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(task_sum(out[3], c), g_lr, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(out[4] * c.view(-1, 1, 1), g_xs, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(out[5] * c.view(-1, 1, 1), g_xq, rtol=1e-11, atol=1e-13)


def test_opcheck_weighted_task_sum():
    gen = torch.Generator().manual_seed(16)
    # (9, 2500): two passes of four tasks and one left over, three column blocks of the loop.
    for shape in [(5, 7), (3, 2, 9), (1, 4), (9, 2500)]:
        rows, w = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape[0], generator=gen, dtype=F64)
        torch.testing.assert_close(torch.ops.fastmaml.weighted_task_sum.default(rows, w),
                                   torch.einsum("t...,t->...", rows, w), rtol=1e-12, atol=1e-14)
        torch.library.opcheck(torch.ops.fastmaml.weighted_task_sum.default, (rows, w),
                              test_utils=("test_schema", "test_faketensor"))


def test_weighted_task_sum_bits_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(18)
    rows, w = torch.randn(37, 5000, generator=gen), torch.randn(37, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastmaml.weighted_task_sum.default(rows, w))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], (rows.double() * w.double()[:, None]).sum(0).float(), rtol=1e-4, atol=1e-4)


def test_kernels_use_the_intra_op_threads():
    """The library runs at::parallel_for on torch's threads (a build without the parallel backend's flag,
    -fopenmp under OpenMP, silently runs every task loop on one thread)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.fastmaml_testing.parallel_probe(64) == 2
        torch.set_num_threads(1)
        assert torch.ops.fastmaml_testing.parallel_probe(64) == 1
    finally:
        torch.set_num_threads(before)


def test_training_step_uses_the_fused_forward_backward(monkeypatch):
    """A training call (grad mode, params requiring grad, small problem) runs maml_fwdbwd and no
    maml_bwd; the meta-gradient equals the one of forward + reverse sweep (MAX_FUSED_ROWS_BYTES = 0)."""
    gen = torch.Generator().manual_seed(17)
    dims = [1, 9, 7, 1]
    params = [p.requires_grad_() for p in make_params(dims, F64, gen)]
    data = make_data(dims, 6, 5, 4, "mse", F64, gen)
    out = fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="cpu")
    assert "MamlTrain" in out.task_losses.grad_fn.name()  # maml_train's C++ autograd kernel (autograd_fwdbwd.cpp)
    fused = torch.autograd.grad(out.loss, params)
    monkeypatch.setattr(cpu_backend, "MAX_FUSED_ROWS_BYTES", 0)
    out = fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="cpu")
    assert "maml_fwd" in str(out.task_losses.grad_fn) and "Maml" not in out.task_losses.grad_fn.name()
    apart = torch.autograd.grad(out.loss, params)
    for a, b in zip(fused, apart):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="cpu").loss.grad_fn is None


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[5]}-{c[6]}-K{c[4]}")
def test_opcheck_maml_adapt(case):
    dims, T, ns, nq, K, loss, dtype, act, _ = case
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args(dims, T, ns, nq, K, loss, dtype, 13, act)]
    adapt = (args[0], args[1], args[2], args[3], args[7], args[8], args[9])
    torch.library.opcheck(torch.ops.fastmaml.maml_adapt.default, adapt)


def _bad(args, i, value):
    out = list(args)
    out[i] = value
    return out


@pytest.mark.parametrize("op", ["maml_fwd", "maml_fwdbwd", "maml_bwd"])
def test_ops_refuse_bad_arguments(op):
    """The C++ argument checks (csrc/op_checks.h, shared with the CUDA binding) refuse each malformed
    argument with a message naming it, and the op still runs on good arguments afterwards."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args([3, 7, 4], 3, 5, 4, 2, "cross_entropy", F64, 30)]
    T, nq = 3, 4
    gen = torch.Generator().manual_seed(6)
    g_losses, g_preds = torch.rand(T, dtype=F64, generator=gen), torch.randn(T, nq, 4, dtype=F64, generator=gen)
    fn = getattr(torch.ops.fastmaml, op).default

    def call(a, gl=g_losses, gp=g_preds):
        if op == "maml_fwd":
            return fn(*a)
        if op == "maml_fwdbwd":
            return fn(*a, True, True)
        return fn(*a[:7], gl, gp, *a[7:], True, True)

    bad = [
        (_bad(args, 0, args[0][:-1]), "theta must be \\[P\\]"),
        (_bad(args, 1, args[1].float()), "lr has dtype"),
        (_bad(args, 2, args[2][..., :2]), "x_support must be"),
        (_bad(args, 3, args[3].clone().fill_(4)), "y_support holds class 4 but must be in \\[0, 3\\]"),
        (_bad(args, 1, _poke(args[1], -1, 58, math.nan)), "inner_lr must be finite.*params\\[3\\] at step 1"),
        (_bad(args, 1, _poke(args[1], 0, 2, math.inf)), "inner_lr must be finite.*params\\[0\\] at step 0"),
        (_bad(args, 6, _poke(args[6], 0, None, -math.inf)), "query_loss_weights must be finite"),
        (_bad(args, 5, args[5][:, :2]), "y_query must be"),
        (_bad(args, 6, args[6][:-1]), "qw must be \\[K \\+ 1\\]"),
        (_bad(args, 7, [3, 7, 5]), "theta must be \\[P\\]"),
        (_bad(args, 8, 2), "activation must be"),
    ]
    for a, message in bad:
        # Wrong data (classes, non-finite rates or weights) is a ValueError, as in Python; the rest RuntimeError.
        kind = ValueError if ("class" in message or "finite" in message) else RuntimeError
        with pytest.raises(kind, match=message):
            call(a)
    if op == "maml_bwd":
        with pytest.raises(RuntimeError, match="g_task_losses must be"):
            call(args, gl=g_losses[:-1])
        with pytest.raises(RuntimeError, match="g_query_preds has dtype"):
            call(args, gp=g_preds.float())
    call(args)


def _poke(t, i, j, value):
    """A copy of `t` with element `[i, j]` (or `[i]` when `j` is None) set to `value`."""
    t = t.clone()
    if j is None:
        t[i] = value
    else:
        t[i, j] = value
    return t


def test_weighted_task_sum_refuses_bad_arguments():
    rows, w = torch.randn(4, 6, dtype=F64), torch.randn(4, dtype=F64)
    task_sum = torch.ops.fastmaml.weighted_task_sum.default
    with pytest.raises(RuntimeError, match="weights must be \\[4\\]"):
        task_sum(rows, w[:-1])
    with pytest.raises(RuntimeError, match="weights has dtype"):
        task_sum(rows, w.float())
    with pytest.raises(RuntimeError, match="rows must be float32 or float64"):
        task_sum(rows.long(), w)
    torch.testing.assert_close(task_sum(rows, w), w @ rows)


def test_bwd_shapes_without_optional_grads():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args([3, 5, 2], 3, 4, 3, 2, "mse", F64, 3)]
    out = torch.ops.fastmaml.maml_bwd(*args[:7], torch.ones(3, dtype=F64), torch.zeros(3, 3, 2, dtype=F64),
                                      *args[7:10], False, False, False)
    P = args[0].numel()
    assert [tuple(t.shape) for t in out] == [(P,), (0,), (0,), (0,)]


# ---------------------------------------------------------------------------------------------------
# torch.compile and double backward


def test_compile_op_fullgraph():
    args = op_args([2, 9, 3], 4, 5, 3, 2, "mse", F32, 21)
    theta = args[0].detach().clone().requires_grad_()

    def meta_loss(theta, *rest):
        losses, preds = torch.ops.fastmaml.maml_fwd(theta, *rest)
        return losses.mean() + 0.1 * preds.square().mean()

    rest = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]]
    eager = torch.autograd.grad(meta_loss(theta, *rest), theta)[0]
    compiled_fn = torch.compile(meta_loss, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_fn(theta, *rest), theta)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_maml_cpu_backend():
    """fastmaml.maml(backend="cpu") under torch.compile: same loss and meta-gradient as eager."""
    gen = torch.Generator().manual_seed(22)
    dims = [1, 13, 11, 1]
    params = [p.requires_grad_() for p in make_params(dims, F32, gen)]
    xs, ys, xq, yq = make_data(dims, 5, 7, 6, "mse", F32, gen)

    def step(params, xs, ys, xq, yq):
        return fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05, backend="cpu").loss

    eager_loss = step(params, xs, ys, xq, yq)  # also loads the extension (its lock is not traceable)
    eager = torch.autograd.grad(eager_loss, params)
    # One graph: validation of an mse call with a float rate has no data-dependent branch.
    compiled_step = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled_step(params, xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_second_backward_raises():
    gen = torch.Generator().manual_seed(23)
    dims = [2, 6, 3]
    params = [p.requires_grad_() for p in make_params(dims, F64, gen)]
    out = fastmaml.maml(params, *make_data(dims, 3, 4, 5, "mse", F64, gen), inner_steps=1, backend="cpu")
    grads = torch.autograd.grad(out.loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)


# ---------------------------------------------------------------------------------------------------
# Against the reference backend, every option

DIMS_BY_DEPTH = {1: [3, 4], 2: [3, 7, 5], 3: [2, 6, 5, 3], 4: [3, 9, 6, 5, 4]}
LR_FORMS = ["float", "per_step", "per_param"]


def option_grid():
    """loss x activation x first_order x K covered fully; depth, rate form, query weights and the
    input gradients rotate through the grid so that each value meets both losses and both orders."""
    cases = []
    for i, (loss, act, fo, K) in enumerate(itertools.product(
            ["mse", "cross_entropy"], ["relu", "tanh"], [False, True], [0, 1, 3])):
        depth = 1 + i % 4
        lr_form = LR_FORMS[(i // 2) % 3] if K > 0 else "float"
        qw = (i // 3) % 2 == 1
        cases.append((loss, act, fo, K, depth, lr_form, qw))
    return cases


def run_maml(backend, params, data, K, lr, loss, act, fo, qw, cotangent_seed):
    """The loss, task losses, predictions and the gradients of a fixed scalar of the outputs with
    respect to params, the rate tensors and both inputs."""
    xs, ys, xq, yq = data
    xs = xs.detach().clone().requires_grad_()
    xq = xq.detach().clone().requires_grad_()
    out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, inner_lr=lr, first_order=fo, activation=act,
                        loss=loss, query_loss_weights=qw, backend=backend)
    assert out.backend == backend
    gen = torch.Generator().manual_seed(cotangent_seed)
    # Drawn in float64 then cast, so float32 and float64 runs weigh the outputs alike.
    w_tasks = torch.rand(out.task_losses.shape, dtype=F64, generator=gen).to(out.loss.dtype)
    w_preds = torch.randn(out.query_preds.shape, dtype=F64, generator=gen).to(out.loss.dtype)
    objective = 1.5 * out.loss + (w_tasks * out.task_losses).sum() + 0.3 * (w_preds * out.query_preds).sum()
    rates = [lr] if isinstance(lr, torch.Tensor) else ([] if isinstance(lr, float) else list(lr))
    inputs = list(params) + rates + [xs, xq]
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    return [out.loss, out.task_losses, out.query_preds, *grads]


def assert_all_close(got, want, rtol, what):
    names = ["loss", "task_losses", "query_preds"] + [f"grad[{i}]" for i in range(len(want) - 3)]
    for name, g, w in zip(names, got, want):
        scale = w.detach().abs().max().item()
        err = (g.detach().to(w.dtype) - w.detach()).abs().max().item()
        assert err <= rtol * max(scale, 1e-30), f"{what}: {name} differs by {err:.3e} (scale {scale:.3e})"


def check_float64_case(case, what):
    """One case of option_grid in float64 on the cpu backend against the reference."""
    loss, act, fo, K, depth, lr_form, with_qw = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    dims = DIMS_BY_DEPTH[depth]
    params = [p.requires_grad_() for p in make_params(dims, F64, gen)]
    data = make_data(dims, 5, 7, 6, loss, F64, gen)
    lr = make_lr(lr_form, params, K, F64, gen)
    qw = torch.rand(K + 1, dtype=F64, generator=gen) if with_qw else None
    want = run_maml("reference", params, data, K, lr, loss, act, fo, qw, 7)
    got = run_maml("cpu", params, data, K, lr, loss, act, fo, qw, 7)
    assert_all_close(got, want, 1e-9, f"float64 {case} ({what})")


@pytest.mark.parametrize("case", option_grid(), ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_float64(case, isa):
    check_float64_case(case, isa)


@pytest.mark.parametrize("case", [c for c in option_grid() if c[3] >= 2], ids=lambda c: "-".join(map(str, c)))
def test_recomputed_thetas_match_reference_float64(case, isa, monkeypatch):
    """The reverse sweep rebuilding each theta_k from theta_{k+1} and a recomputed g_k instead of keeping
    K rows (FASTMAML_REVERSE_THETAS=recompute, what the CUDA kernels do above 74 KiB of workspace), every
    option at K = 3."""
    monkeypatch.setenv("FASTMAML_REVERSE_THETAS", "recompute")
    check_float64_case(case, f"{isa}, thetas recomputed")


def test_recomputed_thetas_move_only_the_last_bits(monkeypatch):
    """In float32 the rebuilt theta_k come back within a rounding, so results differ from the kept rows'
    in some last bits (the switch reaches the kernel), and both are within float32 accuracy of the float64
    reference. The sinusoid net at K = 5 with learned per-parameter rates (their gradient reads each g_k)."""
    gen = torch.Generator().manual_seed(71)
    dims = [1, 40, 40, 1]
    params = make_params(dims, F64, gen)
    data = make_data(dims, 16, 10, 10, "mse", F64, gen)
    lr = [0.05 * r for r in make_lr("per_parameter", params, 5, F64, gen)]
    runs = {}
    for mode in ("keep", "recompute"):
        # The kernel ignores case and spaces, as the backend's check of the value does.
        monkeypatch.setenv("FASTMAML_REVERSE_THETAS", " Recompute" if mode == "recompute" else mode)
        runs[mode] = run_maml("cpu", [p.float().requires_grad_() for p in params], [d.float() if d.is_floating_point()
                              else d for d in data], 5, [r.float().requires_grad_() for r in lr], "mse", "relu", False,
                              None, 9)
    want = run_maml("reference", [p.requires_grad_() for p in params], data, 5, [r.requires_grad_() for r in lr],
                    "mse", "relu", False, None, 9)
    assert any(bool((a != b).any()) for a, b in zip(runs["keep"], runs["recompute"])), "the same bits: not recomputed?"
    for mode, got in runs.items():
        assert_all_close(got, want, 2e-5, f"float32, thetas {mode}")


@pytest.mark.skipif(isa_choices() == ["baseline"], reason="this CPU lacks AVX2 or FMA: only the baseline loops run")
def test_the_avx2_loops_run_where_the_cpu_has_them(monkeypatch):
    """The [avx2] cases compare the default build with the reference; this checks that the default is
    the AVX2 build: in float32 its fused multiply-adds round differently from the baseline loops, so the
    two give other bits (a default that ran the baseline loops would give the same), both within float32
    accuracy of the float64 reference."""
    gen = torch.Generator().manual_seed(72)
    dims = [1, 40, 40, 1]
    params = make_params(dims, F64, gen)
    data = make_data(dims, 16, 10, 10, "mse", F64, gen)
    runs = {}
    for isa_name in ("baseline", "avx2"):
        if isa_name == "baseline":
            monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline")
        else:
            monkeypatch.delenv("FASTMAML_CPU_ISA", raising=False)
        runs[isa_name] = run_maml("cpu", [p.float().requires_grad_() for p in params],
                                  [d.float() if d.is_floating_point() else d for d in data], 2, 0.05, "mse", "relu",
                                  False, None, 9)
    want = run_maml("reference", [p.requires_grad_() for p in params], data, 2, 0.05, "mse", "relu", False, None, 9)
    assert any(bool((a != b).any()) for a, b in zip(runs["baseline"], runs["avx2"])), "the same bits: no AVX2 loops?"
    for isa_name, got in runs.items():
        assert_all_close(got, want, 2e-5, f"float32, {isa_name} loops")


@pytest.mark.parametrize("case", option_grid()[::4], ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_float32(case, isa):
    """float32 kernel against the float64 reference on the same (float32-rounded) inputs."""
    loss, act, fo, K, depth, lr_form, with_qw = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) + 1)
    dims = DIMS_BY_DEPTH[depth]
    params32 = make_params(dims, F32, gen)
    data32 = make_data(dims, 4, 6, 5, loss, F32, gen)
    lr32 = make_lr(lr_form, params32, K, F32, gen)
    qw32 = torch.rand(K + 1, dtype=F32, generator=gen) if with_qw else None

    def to64(x):
        if isinstance(x, list):
            return [to64(r) for r in x]
        if isinstance(x, torch.Tensor):
            y = x.detach().double() if x.is_floating_point() else x
            return y.requires_grad_() if x.requires_grad else y
        return x

    want = run_maml("reference", [p.double().requires_grad_() for p in params32], to64(list(data32)), K,
                    to64(lr32), loss, act, fo, to64(qw32), 8)
    got = run_maml("cpu", [p.requires_grad_() for p in params32], data32, K, lr32, loss, act, fo, qw32, 8)
    assert_all_close(got, want, 1e-4, f"float32 {case} ({isa})")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_adapt_matches_reference(loss, isa):
    gen = torch.Generator().manual_seed(31)
    dims = [3, 10, 6, 4]
    params = make_params(dims, F64, gen)
    xs, ys, _, _ = make_data(dims, 6, 9, 1, loss, F64, gen)
    lr = [0.02 + 0.05 * torch.rand(4, *p.shape, dtype=F64, generator=gen) for p in params]
    with torch.no_grad():
        got = fastmaml.adapt(params, xs, ys, inner_steps=4, inner_lr=lr, activation="tanh", loss=loss, backend="cpu")
        want = fastmaml.adapt(params, xs, ys, inner_steps=4, inner_lr=lr, activation="tanh", loss=loss,
                              backend="reference")
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# gradcheck through the public function


@pytest.mark.parametrize("loss,act", [("mse", "tanh"), ("cross_entropy", "relu")])
def test_gradcheck_maml_cpu(loss, act):
    gen = torch.Generator().manual_seed(41)
    dims = [2, 5, 3]
    params = [p.requires_grad_() for p in make_params(dims, F64, gen)]
    xs, ys, xq, yq = make_data(dims, 3, 4, 3, loss, F64, gen)
    xs.requires_grad_()
    xq.requires_grad_()
    lr = (0.1 + 0.1 * torch.rand(2, dtype=F64, generator=gen)).requires_grad_()
    qw = torch.rand(3, dtype=F64, generator=gen)

    def f(*inputs):
        *ps, xs_, xq_, lr_ = inputs
        out = fastmaml.maml(ps, xs_, ys, xq_, yq, inner_steps=2, inner_lr=lr_, activation=act, loss=loss,
                            query_loss_weights=qw, backend="cpu")
        return out.loss, out.query_preds

    assert torch.autograd.gradcheck(f, (*params, xs, xq, lr), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Determinism and limits


def test_reduction_does_not_depend_on_thread_count():
    args = op_args([3, 11, 5], 37, 6, 4, 2, "mse", F32, 51)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    gen = torch.Generator().manual_seed(52)
    g_losses = torch.rand(37, generator=gen)
    g_preds = torch.randn(37, 4, 5, generator=gen)
    bwd = (*args[:7], g_losses, g_preds, *args[7:10], False, True, True)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastmaml.maml_bwd(*bwd))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_size_limits_reject_and_auto_falls_back():
    gen = torch.Generator().manual_seed(61)
    dims = [2] + [3] * cpu_backend.MAX_LAYERS + [2]  # one layer too deep
    params = make_params(dims, F64, gen)
    data = make_data(dims, 2, 3, 3, "mse", F64, gen)
    problem = make_problem(params, *data, inner_steps=1)
    assert "layers" in cpu_backend.CpuBackend().reject(problem, "maml")
    with pytest.raises(ValueError, match="layers"):
        fastmaml.maml(params, *data, backend="cpu")
    assert fastmaml.maml(params, *data).backend == "reference"
    wide = make_problem(make_params([2, cpu_backend.MAX_WIDTH + 1, 2], F32, gen), *make_data([2, 1, 2], 1, 2, 2, "mse", F32, gen),
                        inner_steps=1)
    assert "width" in cpu_backend.CpuBackend().reject(wide, "maml")


def test_workspace_bytes_matches_kernel_formula():
    """cpu.workspace_bytes (the Python size limit) follows csrc/task/drivers.h's backward_workspace: a run
    at the limit's edge must not be rejected for the wrong reason, and the formula must grow with K."""
    small = cpu_backend.workspace_bytes([1, 40, 40, 1], 5, 10, 4)
    P = 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1  # 1761, padded to 1776 (segments on 64-byte boundaries)
    state = 2 * 816 + 16  # z (h written over it), d of 10 x 81 (810 -> 816) and the 10 outputs (-> 16)
    assert (P, (P + 15) // 16 * 16) == (1761, 1776)
    # 5 support states; the tangents (3 x 816), which the query state shares; 12 rows of P.
    assert small == (5 * state + 3 * 816 + 12 * 1776) * 4
    assert cpu_backend.workspace_bytes([1, 40, 40, 1], 6, 10, 4) > small


def test_constant_inputs_kept_between_calls_are_safe():
    """The float rate's table and the query weights kept between calls (_fused._constant): a call under
    inference_mode does not leave an inference tensor for a later training call, and another rate or
    step count gets its own table."""
    gen = torch.Generator().manual_seed(24)
    dims = [1, 12, 9, 1]
    params = [p.requires_grad_() for p in make_params(dims, F64, gen)]
    data = make_data(dims, 4, 5, 6, "mse", F64, gen)
    with torch.inference_mode():
        fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="cpu")
    out = fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="cpu")
    torch.autograd.grad(out.loss, params)
    ref = fastmaml.maml(params, *data, inner_steps=2, inner_lr=0.03, backend="reference")
    torch.testing.assert_close(out.task_losses, ref.task_losses, rtol=1e-10, atol=0)
    for K, lr in ((2, 0.05), (3, 0.03)):
        out = fastmaml.maml(params, *data, inner_steps=K, inner_lr=lr, backend="cpu")
        ref = fastmaml.maml(params, *data, inner_steps=K, inner_lr=lr, backend="reference")
        torch.testing.assert_close(out.task_losses, ref.task_losses, rtol=1e-10, atol=0)


def test_constants_are_not_kept_while_a_cuda_graph_is_captured(monkeypatch):
    """Under CUDA graph capture (faked here on a CUDA device object: no GPU needed) each
    call makes its own constants and keeps none: a tensor made under capture holds nothing until the
    graph's first replay, and a graph that read a kept one would read freed memory once the cache is
    cleared. Outside capture the same key gives the kept tensor."""
    from fastmaml.backends import _fused

    cuda = torch.device("cuda", 0)
    made = []

    def make():
        made.append(torch.ones(2))
        return made[-1]

    monkeypatch.setattr(_fused, "_CONSTANTS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a = _fused._constant(("t", 1), make, cuda)
    b = _fused._constant(("t", 1), make, cuda)
    assert a is not b and len(made) == 2 and _fused._CONSTANTS == {}
    cpu = torch.device("cpu")
    assert _fused._constant(("t", 1), make, cpu) is _fused._constant(("t", 1), make, cpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(7))
    c = _fused._constant(("t", 2), make, cuda)
    assert _fused._constant(("t", 2), make, cuda) is c


def test_constants_copy_nothing_from_the_host():
    """The constants a fused call makes (the float rate's table, plain MAML's query weights) are made by
    kernels alone: no tensor lifted from a Python number and copied in. On CUDA such a copy is a host-to-device
    copy, which a CUDA graph's capture refuses (`w[-1] = 1` failed test_cuda_graph_of_a_meta_iteration on an
    H200). The ops are recorded on CPU tensors, which dispatch the same ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastmaml.backends import _fused

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(25)
    dims = [1, 12, 9, 1]
    params = make_params(dims, F64, gen)
    problem = make_problem(params, *make_data(dims, 4, 5, 6, "mse", F64, gen), inner_steps=3, inner_lr=0.03)
    for make in (_fused.flat_lr, _fused.flat_query_weights):
        _fused._CONSTANTS.clear()
        with Record() as rec:
            made = make(problem)
        assert not {"aten.copy_.default", "aten.lift_fresh.default", "aten.index_put_.default"} & set(rec.ops), (
            make.__name__, rec.ops)
        assert torch.isfinite(made).all()
    assert _fused.flat_query_weights(problem).tolist() == [0, 0, 0, 1]


class _FakeStream:
    def __init__(self, handle: int):
        self.cuda_stream = handle


def test_constants_are_kept_per_cuda_stream(monkeypatch):
    """A constant is filled on the stream that made it: a call on another stream gets its own (faked streams
    on a CUDA device object: no GPU needed; the GPU test below uses real ones). Shared, a call on the other
    stream could read it before its fill has run."""
    from fastmaml.backends import _fused

    cuda = torch.device("cuda", 0)
    current = [_FakeStream(1)]
    made = []

    def make():
        made.append(torch.ones(2))
        return made[-1]

    monkeypatch.setattr(_fused, "_CONSTANTS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    a = _fused._constant(("t", 1), make, cuda)
    assert _fused._constant(("t", 1), make, cuda) is a
    current[0] = _FakeStream(2)
    b = _fused._constant(("t", 1), make, cuda)
    assert b is not a and _fused._constant(("t", 1), make, cuda) is b
    current[0] = _FakeStream(1)
    assert _fused._constant(("t", 1), make, cuda) is a and len(made) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real streams)")
def test_constants_are_kept_per_cuda_stream_on_the_gpu(monkeypatch):
    from fastmaml.backends import _fused

    cuda = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setattr(_fused, "_CONSTANTS", {})

    def make():
        return torch.full((3, 5), 0.25, device=cuda)

    a = _fused._constant(("t", 1), make, cuda)
    side = torch.cuda.Stream(cuda)
    with torch.cuda.stream(side):
        b = _fused._constant(("t", 1), make, cuda)
        assert _fused._constant(("t", 1), make, cuda) is b
    assert b is not a and _fused._constant(("t", 1), make, cuda) is a
    side.synchronize()
    assert torch.equal(a, b)
