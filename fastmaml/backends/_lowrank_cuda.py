"""The factored backend's low-rank products by the C++ extension's CUDA kernels (by default where the extension
has them and a call is within their bounds, always under FASTMAML_FACTORED_KERNELS=cuda; `_lowrank.language`):
fastmaml::lowrank_add_cuda for lowrank_add (`_lowrank.py`) and fastmaml::lowrank_pairs_cuda for the
written-out sweep's two products of a weight cotangent (`_lowrank_pairs.py`); csrc/cuda/lowrank_add.cuh has
the kernel.

Why: Triton's products of these shapes pad 10 points to 16 and read about one operand from shared memory a
multiply-add (sm_90a SASS at five pairs of 10 x 128 factors: about 1.2 MB a task, 9 bytes a useful
multiply-add, where a multiprocessor's shared memory serves 128 bytes a clock: at T=65,536 that alone is
about 2.3 ms a launch, twice what the launch's bytes take from memory). The CUDA kernel loads the factors
from global memory into registers, uses each element five times and sums over k with warp shuffles: about 1
byte a multiply-add (benchmarks/RESULTS.md). It needs the C++ extension built with CUDA and says so where it
is asked for and missing. lowrank_grads, the fused backward and the fused Triton pairs keep their Triton
kernels (the default meta-gradient, `_factored_reverse.py`, makes every product with lowrank_add and its
pairs; autograd's path and FASTMAML_FACTORED_PAIRS=fused use the others).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

MAX_PAIRS = 16  # csrc/cuda/lowrank_add.cuh: kMaxPairs
MAX_SHARED = 48 << 10  # csrc/cuda/lowrank_cuda.h: lowrank_max_shared_bytes


def reason(x: torch.Tensor, factors: int, n_support: int) -> Optional[str]:
    """Why the CUDA kernel cannot take `factors` pairs of `n_support` rows against x [T, N, I], or None."""
    if x.device.type != "cuda":
        return f"{x.device.type} tensors (FASTMAML_FACTORED_KERNELS=cuda runs CUDA tensors)"
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype}"
    rows = (x.shape[1] + 3) // 4 * 4  # the kernel's c_j in shared memory, rows padded to 4
    if factors < 1:
        return "no factor pairs"
    if factors > MAX_PAIRS or factors * n_support * rows * x.element_size() > MAX_SHARED:
        return (f"{factors} factor pairs of {x.shape[1]} x {n_support} points (the CUDA kernel takes at most "
                f"{MAX_PAIRS} pairs, their products in {MAX_SHARED // 1024} KiB of shared memory)")
    return None


def kernel_missing() -> Optional[str]:
    """Why the extension's CUDA low-rank kernels cannot run, or None (asked once, on the first call that
    wants them)."""
    return _probe()


# A constant to torch.compile, as `_lowrank._triton_reason` is: the probe loads the extension and asks the
# dispatcher, neither of which a traced call can do.
kernel_missing._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    from .. import _ext
    from .cuda import cuda_kernels_registered

    why = _ext.unavailable()
    if why is None and not cuda_kernels_registered("lowrank_add_cuda"):
        why = "the loaded fastmaml library has no CUDA kernels (built without nvcc or with a CPU-only torch)"
    return why


def _require() -> None:
    """Raises where FASTMAML_FACTORED_KERNELS=cuda cannot run: never another kernel in its place."""
    why = kernel_missing()
    if why is not None:
        raise RuntimeError(f"fastmaml: FASTMAML_FACTORED_KERNELS=cuda asks for the C++ extension's low-rank "
                           f"kernels, which cannot run here: {why}. Unset it to use the Triton kernels")


def add(base, x, hs, ds, scales) -> torch.Tensor:
    """lowrank_add (`_lowrank.py`) by the extension's CUDA kernel."""
    _require()
    return torch.ops.fastmaml.lowrank_add_cuda(base, x, hs, ds, scales)


def pairs(base_u, base_v, h, d, fa, fb, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """`_lowrank_pairs.pair_products`' u and v by the extension's CUDA kernel in one launch."""
    _require()
    return torch.ops.fastmaml.lowrank_pairs_cuda(base_u, base_v, h, d, fa, fb, scales)


__all__ = ["MAX_PAIRS", "MAX_SHARED", "add", "kernel_missing", "pairs", "reason"]
