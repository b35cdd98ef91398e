"""The `cuda` backend: the fused CUDA C++ kernel (`csrc/cuda/`) on CUDA tensors.

The operations are those of the cpu backend, `torch.ops.fastmaml.maml_fwd / maml_bwd / maml_fwdbwd /
weighted_task_sum / maml_adapt` (one schema, csrc/fastmaml.cpp); the dispatcher runs their CUDA kernels
for CUDA tensors. A training call runs `maml_train` as on the CPU: the forward and reverse sweep in one
pass (`maml_fwdbwd_sum`), each thread block summing its chunk of tasks' gradients as it goes, so no
per-task parameter row is written; the gradient of the mean loss is those sums scaled, and any other
cotangent (of the task losses or the query output) runs the reverse sweep again (`maml_bwd`). The
kernel runs one task
per thread block at a time, with the per-task math of csrc/task/ parallel over the block's threads
(csrc/cuda/maml_cuda.h says how tasks, workspaces and the meta-gradient's partial sums are laid out).

Availability: a CUDA build of torch, a visible GPU, and a loaded C++ extension that registered CUDA
kernels (asked of the dispatcher, `cuda_kernels_registered`). The kernels come either with a prebuilt
`fastmaml/_C*.so` (no compiler needed where it is installed) or from the build on first use
(fastmaml/_ext.py), which compiles them only when nvcc is found and there is an architecture to build
for, and builds the library without them when their build fails: those matter only to explain why a
library has none. Nothing is built at import.

Size limits (`reject` names the one exceeded; `auto` then takes the next backend):
    MAX_LAYERS          8 linear layers (the network description is a fixed-size kernel argument)
    MAX_WIDTH           4096 units in any layer, input or output
    MAX_POINTS          65536 support or query points per task
    MAX_WORKSPACE_BYTES 16 MiB of scratch per thread block (global memory; shared memory when it fits
                        in what a block may opt into, 227 KiB on Hopper). A launch keeps all blocks'
                        scratch within 1 GiB by running fewer blocks: 16 MiB still leaves 64 blocks,
                        more would leave most of a GPU idle.

The preference of `auto` on CUDA tensors (dispatch.AUTO_ORDER["cuda"]: cuda before triton) is a
placeholder: no GPU run has measured the two kernels against each other yet. Set it from measured
tasks per second (benchmarks/) once there is one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._switches import env_choice, env_exact, env_int
from .._validate import Problem
from . import _onestep
from ._fused import ExtensionBackend, SizeLimits, flat_theta
from ._fused import size_limit_reason as _size_limit_reason

MAX_LAYERS = 8
MAX_WIDTH = 4096
MAX_POINTS = 65536
MAX_WORKSPACE_BYTES = 16 << 20
LIMITS = SizeLimits(MAX_LAYERS, MAX_WIDTH, MAX_POINTS, None, MAX_WORKSPACE_BYTES,
                    kernel="cuda kernel", worker="thread block")
# For a library without the CUDA maml_fwdbwd_sum (which keeps no per-task rows): above this many bytes of
# rows the training call runs forward and backward apart.
MAX_FUSED_ROWS_BYTES = 256 << 20
# FASTMAML_CUDA_ONESTEP=1: training calls with one inner step run the one-step kernel (`_onestep`: a warp
# a task, theta_1 kept low-rank) where it takes them. Off by default: on an H200 at T=65,536 it ran 1.9x and
# 3.7x the reverse sweep but below the factored backend, and T=25 and 1,024 are not measured yet (read once,
# at import; benchmarks/gpu_check.sh's A/B sets it).
ONESTEP = env_choice("FASTMAML_CUDA_ONESTEP", ("0", "1")) == "1"


def size_limit_reason(problem: Problem, op: str = "maml") -> Optional[str]:
    """Why this MLP problem is outside the CUDA kernel's size limits (`LIMITS`), or None. One thread block
    needs what one CPU thread needs: the same per-task workspace of csrc/task/drivers.h."""
    return _size_limit_reason(problem, LIMITS, op)


def build_unavailable() -> Optional[str]:
    """Why a build of the C++ extension on this machine would have no CUDA kernels (decided from torch
    and the compiler, and from the visible cards only where TORCH_CUDA_ARCH_LIST is unset), or None.

    This is the build decision (fastmaml/_ext.py, `cuda_build_unavailable`), not the backend's
    availability: a prebuilt library with CUDA kernels runs where nvcc is absent (`CudaBackend.unavailable`
    asks the loaded library instead)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (the cuda backend needs a CUDA build of torch)"
    return _ext.cuda_build_unavailable()


_REGISTERED: set[str] = set()  # ops found registered (a library's kernels do not go away once loaded)


def cuda_kernels_registered(op: str = "maml_fwd") -> bool:
    """Whether the loaded extension registered `fastmaml::<op>` under the CUDA dispatch key (asked of the
    dispatcher until it says yes: the training call asks on every call)."""
    if op in _REGISTERED:
        return True
    try:
        found = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmaml::{op}", "CUDA"))
    except RuntimeError:  # the schema itself is not registered
        return False
    if found:
        _REGISTERED.add(op)
    return found


# The training call asks this inside `fastmaml.maml`, which torch.compile traces: the dispatcher query
# cannot be traced, so dynamo calls it as a constant, like `dispatch.unavailable` (a compiled first call
# of a process broke on it: benchmarks/RESULTS.md, the H200 run of 2026-11-30).
cuda_kernels_registered._dynamo_marked_constant = True  # type: ignore[attr-defined]


class CudaBackend(ExtensionBackend):
    """Fused CUDA C++ kernel for MLPs on CUDA tensors, float32 and float64."""

    name = "cuda"
    device_type = "cuda"
    limits = LIMITS

    def max_fused_rows_bytes(self) -> int:
        if cuda_kernels_registered("maml_fwdbwd_sum"):
            return 1 << 62  # no per-task parameter rows: only the inputs' gradients, which any path makes
        return MAX_FUSED_ROWS_BYTES if cuda_kernels_registered("maml_fwdbwd") else 0

    def train(self, problem: Problem, tail: tuple, need_lr: bool, need_x: bool) -> Optional[tuple]:
        if ONESTEP and _onestep.reason(problem, need_lr, need_x) is None and cuda_kernels_registered("maml_onestep"):
            return _onestep.maml(problem)
        if cuda_kernels_registered("maml_fwdbwd_sum"):
            # As on the CPU: the parameter list goes to C++, the third output is the mean loss, whose
            # gradient alone comes from the kernel's sums (csrc/autograd_fwdbwd.cpp).
            return torch.ops.fastmaml.maml_train.default(problem.params, *tail, need_lr, need_x)
        out = torch.ops.fastmaml.maml_fwdbwd.default(flat_theta(problem), *tail, need_lr, need_x)
        return out[0], out[1]

    def unavailable(self) -> Optional[str]:
        # The kernels' team-size switch (read by the library, csrc/cuda/maml_cuda.cu, plan): a mistyped value
        # must not measure the default under another name.
        env_choice("FASTMAML_CUDA_THREADS", ("128", "64", "32"))
        for name in ("FASTMAML_CUDA_TILES", "FASTMAML_CUDA_LDS", "FASTMAML_CUDA_MMA"):  # read exactly (env_is)
            env_exact(name, ("", "0", "1"))
        blocks = env_choice("FASTMAML_CUDA_MIN_BLOCKS", ("0", "4", "6"))  # the float reverse sweep's residency
        states = env_choice("FASTMAML_CUDA_STATES", ("workspace", "global"))  # where the reverse sweep keeps K states
        if states == "global" and blocks == "0":
            # Only the 4- and 6-block sweeps stage the states (csrc/cuda/kernels.cuh, bwd_kernel): with the
            # default sweep the switch would measure the default under another name.
            raise ValueError("FASTMAML_CUDA_STATES=global takes effect only in the float reverse sweeps compiled "
                             "for 4 or 6 blocks a multiprocessor: set FASTMAML_CUDA_MIN_BLOCKS=4 or 6 with it, "
                             "or unset FASTMAML_CUDA_STATES")
        env_choice("FASTMAML_REVERSE_THETAS", ("auto", "keep", "recompute"))  # plan()'s rebuilt thetas
        env_choice("FASTMAML_ONESTEP_WARPS", ("", "2", "4", "8", "16"))  # the one-step kernel's warps a block
        env_exact("FASTMAML_ONESTEP_SHARED", ("", "0", "1"))  # its scratch in shared memory (0: global)
        env_exact("FASTMAML_ONESTEP_FORM", ("", "shared", "generic"))  # its shared-operand form (generic: not)
        env_exact("FASTMAML_ONESTEP_PRODUCTS", ("", "ffma", "mma"))  # its float products (mma: tensor cores)
        # The shared workspace's cap in KiB (csrc/cuda/binding.cpp, shared_limit): C++ reads it with atoll,
        # which makes any text 0, every workspace in global memory.
        env_int("FASTMAML_CUDA_SHARED_KB", 0, lambda kb: kb >= 0, "a whole number of KiB, 0 or more")
        # Decided from torch, the GPU and the kernels the loaded library registered, not from nvcc: a
        # prebuilt library with CUDA kernels runs where no compiler is installed. nvcc only explains why
        # a library built on first use has none.
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (the cuda backend needs a CUDA build of torch)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        why = _ext.unavailable()
        if why is not None:
            return why
        if cuda_kernels_registered():
            return None
        path = _ext.library_path()
        build_why = build_unavailable()
        if path is None:
            return ("the loaded fastmaml library has no CUDA kernels (it was loaded before fastmaml loaded its "
                    "own); load one built with nvcc and a CUDA build of torch")
        if _ext.library_is_prebuilt():
            return (f"the loaded library has no CUDA kernels: {path} is the prebuilt library shipped with the "
                    "package, built where torch was CPU-only or nvcc was not found. Reinstall with "
                    "FASTMAML_BUILD_EXT=1 pip install --no-build-isolation on a machine with nvcc and a CUDA "
                    "build of torch, or delete it to have the extension built on first use"
                    + ("" if build_why is None else f" (here without CUDA kernels either: {build_why})"))
        cuda_error = _ext.cuda_build_error()
        if cuda_error is not None:
            return f"the loaded library has no CUDA kernels: their build failed here: {cuda_error}"
        if build_why is not None:
            return (f"the loaded library has no CUDA kernels: {path} was built on first use without them: "
                    f"{build_why}. Once that is fixed, the next process builds them")
        return (f"the loaded library has no CUDA kernels: {path} was built without them although nvcc is "
                "found now; remove its folder to have it rebuilt")
