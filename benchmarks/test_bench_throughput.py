"""pytest-benchmark cases for the main settings: the sinusoid workload at (T, K) in {(25, 1), (25, 5),
(256, 1)}, width 40, second order, for every fastmaml backend that can run here and the vmap and loop
peers. On the GPU when torch sees one, else on the CPU.

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:T,param:K --benchmark-sort=mean

Not part of the default test run (`pytest` collects `tests/` only). Each case first checks that the
method reproduces the reference backend's meta-gradient, then times it; nothing timed is asserted.
"""

import pytest
import torch

import _harness as H

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = [(25, 1), (25, 5), (256, 1)]
METHODS = [m for m in H.all_methods() if m != "higher"]


@pytest.fixture(scope="module")
def oracles():
    """The reference backend's result per setting, computed once."""
    return {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("T,K", SETTINGS)
def test_throughput(benchmark, oracles, method, T, K):
    w = H.make_workload(T, K, 40, device=DEVICE)
    why = H.why_not(method, w)
    if why is not None:
        pytest.skip(f"{method}: {why}")
    if (T, K) not in oracles:
        oracles[(T, K)] = H.reference_result(w)
    step = H.make_step(method, w)
    err = H.rel_error(step(), oracles[(T, K)])
    assert err <= H.TOLERANCE[w.dtype], f"{method} meta-gradient differs from reference: rel err {err:.2e}"

    def one_iteration():
        out = step()
        H.sync(w.device)  # time the work, not the launch
        return out

    benchmark.group = f"T={T} K={K} width=40 {DEVICE}"
    benchmark.extra_info.update(method=method, T=T, K=K, width=40, device=H.device_name(w.device))
    # The task loop takes seconds per call at T=256 on a CPU: fewer rounds keep the run short.
    benchmark.pedantic(one_iteration, rounds=3 if method == "loop" else 5, warmup_rounds=1, iterations=1)
