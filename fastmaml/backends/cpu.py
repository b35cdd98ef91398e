"""The `cpu` backend: the fused C++ kernel (`torch.ops.fastmaml.*`, csrc/) on CPU tensors.

One call of `maml_fwd` runs the whole inner loop and query loss of every task; its registered backward
(`maml_bwd`) runs the exact reverse sweep with Hessian-vector products, reduced over tasks in a fixed
order. When autograd will need the meta-gradient (grad mode on, an input requiring grad) and the
per-task gradient rows fit in MAX_FUSED_ROWS_BYTES, one call of `maml_fwdbwd` runs the inner loop and
the reverse sweep together and keeps each task's gradient; the backward then only weighs those rows by
the task losses' cotangents (no recompute of the inner loop). On
CPU tensors that call goes through `maml_train`, which takes the parameter list as it is and flattens it
(and splits its gradient) in C++ (docs/kernels.md).
Importing this module builds nothing: the extension is built or loaded on the first `unavailable()`
(fastmaml/_ext.py).

Size limits (`reject` names the one exceeded; `auto` then takes the next backend in its order, `factored`
before the reference):
    MAX_LAYERS          8 linear layers (the kernel's network description is a fixed-size struct)
    MAX_WIDTH           4096 units in any layer, input or output
    MAX_POINTS          65536 support or query points per task
    MAX_POINTS_X_WIDTH  32768 for (points per task) x (widest hidden layer): the kernel is built for MAML's
                        small per-task problems (its products are register-tiled loops, not BLAS); past
                        this the reference path's batched BLAS products are faster (benchmarks/RESULTS.md
                        gives the measurements that placed the bound).
    MAX_WORKSPACE_BYTES 64 MiB of scratch per thread: the backward keeps about 2K + 2 copies of the
                        parameters and K + 1 sets of activations of one task, allocated once per thread;
                        the bound keeps that (times the thread count) small next to the data.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._switches import env_choice, env_exact
from .._validate import Problem
from ._fused import ExtensionBackend, SizeLimits
from ._fused import fused_rows_bytes, workspace_bytes  # noqa: F401 (kept importable from here)

MAX_LAYERS = 8
MAX_WIDTH = 4096
MAX_POINTS = 65536
MAX_POINTS_X_WIDTH = 32768
MAX_WORKSPACE_BYTES = 64 << 20
LIMITS = SizeLimits(MAX_LAYERS, MAX_WIDTH, MAX_POINTS, MAX_POINTS_X_WIDTH, MAX_WORKSPACE_BYTES,
                    kernel="cpu kernel", worker="thread")

# The fused forward-and-backward (`maml_train`) keeps every task's own gradient rows until the backward
# (T x P parameters, T x K x P rates when they need a gradient); above this it runs forward and backward
# apart (`maml_fwd`, then `maml_bwd` recomputing the inner loop), which keeps no per-task state.
MAX_FUSED_ROWS_BYTES = 256 << 20


class CpuBackend(ExtensionBackend):
    """Fused C++ kernel for MLPs on CPU tensors, float32 and float64."""

    name = "cpu"
    device_type = "cpu"
    limits = LIMITS

    def unavailable(self) -> Optional[str]:
        # The reverse sweep's switch (read by the library per call, csrc/cpu/maml_cpu.cpp): a mistyped value
        # must not measure the default under another name.
        env_choice("FASTMAML_REVERSE_THETAS", ("auto", "keep", "recompute"))
        env_exact("FASTMAML_CPU_ISA", ("", "baseline"))  # read exactly by csrc/cpu/maml_cpu.cpp
        env_exact("FASTMAML_KEEP_ROWS", ("", "0", "1"))  # and by csrc/autograd_fwdbwd.cpp
        return _ext.unavailable()

    def max_fused_rows_bytes(self) -> int:
        return MAX_FUSED_ROWS_BYTES

    def train(self, problem: Problem, tail: tuple, need_lr: bool, need_x: bool) -> Optional[tuple]:
        # The parameter list goes to C++ as is (flattened and its gradient split there); the third output
        # is the mean loss, whose gradient alone comes from the kernel's row sums.
        return torch.ops.fastmaml.maml_train.default(problem.params, *tail, need_lr, need_x)
