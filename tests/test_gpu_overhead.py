"""The GPU training call without host overhead (G3): no synchronisation, CUDA graphs, reduce-overhead.

On a GPU, for each fused backend (cuda, triton), and for factored where it applies (below):
- with the data checks off (the default outside the tests), a planned training call (forward and
  backward) makes no host-device synchronisation: `torch.cuda.set_sync_debug_mode("error")` raises on
  any; a class out of range then gives a nan task loss instead of a wrong one;
- with them on, bad data is refused with ValueError before anything runs;
- a whole meta-iteration (`fastmaml.maml`, backward, Adam) captured in a CUDA graph and replayed on new
  data gives the eager parameters, and so does `torch.compile(mode="reduce-overhead")`.
Skipped without a GPU (run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastmaml
from fastmaml import dispatch
from _reference_loop import normal_params, random_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED = ["cuda", "triton"]
# factored (PyTorch, its low-rank products Triton kernels on a GPU): it must not synchronise either and
# must replay in a CUDA graph. Its class out of range is PyTorch's device assert (as on the reference),
# and its reduce-overhead compile is left to tests/test_factored.py (the capture, on the CPU): inductor's
# compile of its graph would take a minute of the GPU check.
BACKENDS = FUSED + ["factored"]


def _backend_or_skip(name):
    why = dispatch.unavailable(name)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")


def make_call(T=25, dims=(1, 40, 40, 1), loss="mse", seed=0):
    """Params that require grad and `[x_support, y_support, x_query, y_query]`, on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    params = [p.cuda().requires_grad_() for p in normal_params(dims, torch.float32, gen)]
    return params, [t.cuda() for t in random_data(dims, T, 10, 10, loss, torch.float32, gen)]


@pytest.fixture
def checks_off():
    previous = fastmaml.set_check_inputs(False)
    yield
    fastmaml.set_check_inputs(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,lr", [("mse", "float"), ("cross_entropy", "tensor")])
def test_training_call_never_synchronises(backend, loss, lr, checks_off):
    _backend_or_skip(backend)
    params, data = make_call(loss=loss, dims=(1, 40, 40, 5) if loss == "cross_entropy" else (1, 40, 40, 1))
    rate = 0.01 if lr == "float" else torch.tensor([0.01, 0.02], device="cuda", requires_grad=True)
    call = dict(inner_steps=2, inner_lr=rate, loss=loss, backend=backend)
    fastmaml.maml(params, *data, **call).loss.backward()  # plans the call, builds and loads the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            fastmaml.maml(params, *data, **call).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", FUSED)
def test_class_out_of_range(backend, checks_off):
    _backend_or_skip(backend)
    params, (xs, ys, xq, yq) = make_call(T=4, dims=(1, 12, 3), loss="cross_entropy")
    for label in (-1, 2**32 + 1, 3):  # the last stays for the checks below; 2**32 + 1 is class 1 in int32
        yq[2, 5] = label
        out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=1, loss="cross_entropy", backend=backend)
        assert torch.isnan(out.task_losses[2]) and torch.isfinite(out.task_losses[[0, 1, 3]]).all(), label
    fastmaml.set_check_inputs(True)
    with pytest.raises(ValueError, match=r"y_query holds class 3 but must be in \[0, 2\]"):
        fastmaml.maml(params, xs, ys, xq, yq, inner_steps=1, loss="cross_entropy", backend=backend)
    with pytest.raises(ValueError, match="inner_lr must be finite"):
        fastmaml.maml(params, xs, ys, xq, torch.zeros_like(yq), inner_steps=1, loss="cross_entropy",
                      inner_lr=torch.tensor(math.nan, device="cuda"), backend=backend)


def _iteration(params, data, opt, backend):
    opt.zero_grad(set_to_none=False)
    loss = fastmaml.maml(params, *data, inner_steps=5, inner_lr=0.01, backend=backend).loss
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_of_a_meta_iteration(backend, checks_off):
    """Capture once, replay on three new batches: the parameters follow the eager run's."""
    _backend_or_skip(backend)
    params, data = make_call()
    eager_params = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3, capturable=True)
    eager_opt = torch.optim.Adam(eager_params, lr=1e-3, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up, mirrored on the eager copy
            _iteration(params, data, opt, backend)
            _iteration(eager_params, data, eager_opt, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _iteration(params, data, opt, backend)
    for seed in (1, 2, 3):
        fresh = make_call(seed=seed)[1]
        for static, new in zip(data, fresh):
            static.copy_(new)
        graph.replay()
        eager_loss = _iteration(eager_params, fresh, eager_opt, backend)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_reduce_overhead(backend, checks_off):
    _backend_or_skip(backend)
    torch._dynamo.reset()
    params, data = make_call()

    def meta_loss(params, xs, ys, xq, yq):
        return fastmaml.maml(params, xs, ys, xq, yq, inner_steps=5, inner_lr=0.01, backend=backend).loss

    compiled = torch.compile(meta_loss, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3, 4):
        data = make_call(seed=seed)[1]
        got = compiled(params, *data)
        got_grads = torch.autograd.grad(got, params)
        want = meta_loss(params, *data)
        want_grads = torch.autograd.grad(want, params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
