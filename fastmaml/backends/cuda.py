"""The `cuda` backend: the fused CUDA C++ kernel (`csrc/cuda/`) on CUDA tensors.

The operations are the cpu backend's `torch.ops.fastmaml.maml_fwd / maml_bwd / maml_fwdbwd /
weighted_task_sum / maml_adapt` (one schema, csrc/fastmaml.cpp); the dispatcher runs their CUDA kernels
for CUDA tensors, so `maml` (a training call runs the fused `maml_fwdbwd`, see fastmaml/backends/cpu.py)
and `adapt` are inherited from `CpuBackend` and only availability and limits differ here. The kernel runs one task per
thread block at a time, with the per-task math of csrc/maml_task.h parallel over the block's threads
(csrc/cuda/maml_cuda.h says how tasks, workspaces and the meta-gradient's partial sums are laid out).

Availability: a CUDA build of torch, nvcc (the CUDA kernels are compiled with the rest of the C++
extension on first use, fastmaml/_ext.py), and a visible GPU. Nothing is built at import.

Size limits (`reject` names the one exceeded; `auto` then takes the next backend):
    MAX_LAYERS          8 linear layers (the network description is a fixed-size kernel argument)
    MAX_WIDTH           4096 units in any layer, input or output
    MAX_POINTS          65536 support or query points per task
    MAX_WORKSPACE_BYTES 16 MiB of scratch per thread block (global memory; shared memory when it fits
                        in 44 KiB). A launch keeps all blocks' scratch within 1 GiB by running fewer
                        blocks: 16 MiB still leaves 64 blocks, more would leave most of a GPU idle.

The preference of `auto` on CUDA tensors (dispatch.AUTO_ORDER["cuda"]: cuda before triton) is a
placeholder: no GPU run has measured the two kernels against each other yet. Set it from measured
tasks per second (benchmarks/) once there is one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._validate import Problem
from ._fused import common_reject
from .cpu import CpuBackend, workspace_bytes

MAX_LAYERS = 8
MAX_WIDTH = 4096
MAX_POINTS = 65536
MAX_WORKSPACE_BYTES = 16 << 20


def size_limit_reason(problem: Problem, op: str = "maml") -> Optional[str]:
    """Why this MLP problem is outside the CUDA kernel's size limits, or None."""
    dims = problem.dims
    if len(dims) - 1 > MAX_LAYERS:
        return f"{len(dims) - 1} layers (the cuda kernel runs at most {MAX_LAYERS})"
    if max(dims) > MAX_WIDTH:
        return f"a layer of width {max(dims)} (the cuda kernel runs widths up to {MAX_WIDTH})"
    n_points = max(problem.n_support, problem.n_query if op == "maml" else 0)
    if n_points > MAX_POINTS:
        return f"{n_points} points per task (the cuda kernel runs at most {MAX_POINTS})"
    # One thread block needs what one CPU thread needs: the same per-task workspace of csrc/maml_task.h.
    need = workspace_bytes(dims, problem.inner_steps, n_points, problem.params[0].element_size(), op)
    if need > MAX_WORKSPACE_BYTES:
        return (f"{need / 2**20:.0f} MiB of scratch per thread block for this size and inner_steps "
                f"(the cuda kernel takes up to {MAX_WORKSPACE_BYTES >> 20} MiB)")
    return None


def build_unavailable() -> Optional[str]:
    """Why this machine cannot build the CUDA kernels (decided from torch and the compiler, not from
    whether a GPU is visible), or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (the cuda backend needs a CUDA build of torch)"
    reason = _ext.cuda_build_unavailable()
    if reason is not None:
        return reason
    return None


def cuda_kernels_registered(op: str = "maml_fwd") -> bool:
    """Whether the loaded extension registered `fastmaml::<op>` under the CUDA dispatch key."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmaml::{op}", "CUDA"))
    except RuntimeError:  # the schema itself is not registered
        return False


class CudaBackend(CpuBackend):
    """Fused CUDA C++ kernel for MLPs on CUDA tensors, float32 and float64."""

    name = "cuda"

    def fused_forward_backward(self, problem: Problem) -> bool:
        # Training calls take maml_fwdbwd as on the CPU (one kernel per task instead of two, no recompute
        # of the inner loop) when the build has its CUDA kernel.
        return problem.device.type == "cuda" and cuda_kernels_registered("maml_fwdbwd")

    def unavailable(self) -> Optional[str]:
        why = build_unavailable()
        if why is not None:
            return why
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        why = _ext.unavailable()
        if why is not None:
            return why
        if not cuda_kernels_registered():
            path = _ext.library_path() or "the loaded fastmaml library"
            return (f"{path} was built without the CUDA kernels (rebuild with nvcc and a CUDA torch: "
                    "remove the cached build or the prebuilt fastmaml/_C*.so)")
        return None

    def reject(self, problem: Problem, op: str) -> Optional[str]:
        if problem.device.type != "cuda":
            return f"tensors are on {problem.device} (the cuda backend runs CUDA tensors)"
        why = common_reject(problem, op)
        if why is not None:
            return why
        return size_limit_reason(problem, op)

    # maml() and adapt(): inherited. They call torch.ops.fastmaml.*, which the dispatcher sends to the
    # CUDA kernels for CUDA tensors.

