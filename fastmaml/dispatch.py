"""Backend registry and the `auto` choice.

A backend is an object with a `name`, `unavailable()` (why it cannot run at all here: not built, no
Triton, ...) and `reject(problem, op)` (why it cannot take this call: device, sizes, options), both
returning a reason string or `None`, and the methods `maml(problem)` and `adapt(problem)`.
`auto` walks the preference order of the problem's device and takes the first backend that accepts;
`explain` reports, for every backend, whether it was chosen and why not. An explicit backend that
cannot run raises `ValueError` with its reason: the dispatcher never silently changes the math.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional, Protocol

import torch

from ._validate import Problem

log = logging.getLogger("fastmaml")

# Preference of `auto`, per device type: fastest first. Backends absent from a device's list are never
# chosen automatically there (e.g. Triton on CPU tensors runs only in the slow interpreter).
# `factored` comes before the reference where its low-rank form holds (`factored.auto_reason`).
AUTO_ORDER: dict[str, list[str]] = {
    "cuda": ["cuda", "triton", "factored", "reference"],
    "cpu": ["cpu", "factored", "reference"],
}

# `auto` skips the GPU kernels where the reference (torch.func.vmap over cuBLAS) measured faster: the
# kernels run one task per thread block, so they win on few tasks and lose once the batch fills the GPU
# for the batched matrix products. On an H100 (benchmarks/RESULTS.md, GPU; 1-W-W-1, 10 + 10 points,
# second order) the crossover lies between T * W^2 = 1.6e6 and 1.7e7; the limit sits at their geometric
# middle. An explicit backend="cuda" or "triton" still runs any size.
GPU_KERNEL_AUTO_WORK = 5e6
_GPU_KERNELS = ("cuda", "triton")


def _auto_skip(name: str, problem: Problem) -> Optional[str]:
    """Why `auto` passes over a backend that could run this call (a speed choice), or None."""
    if name in _GPU_KERNELS and problem.device.type == "cuda" and problem.dims is not None:
        work = problem.num_tasks * max(problem.dims) ** 2
        if work > GPU_KERNEL_AUTO_WORK:
            return (f"slower than the reference at this size on a GPU (tasks x width^2 = {work:.3g} > "
                    f"{GPU_KERNEL_AUTO_WORK:.3g}, measured on an H100); ask for it explicitly to use it")
    if name == "factored" and problem.dims is not None:
        from .backends.factored import auto_reason

        return auto_reason(problem)
    return None


class Backend(Protocol):
    name: str

    def unavailable(self) -> Optional[str]: ...

    def reject(self, problem: Problem, op: str) -> Optional[str]: ...

    def maml(self, problem: Problem) -> tuple[torch.Tensor, ...]:
        """Returns `(task_losses [T], query_preds [T, Nq, D_out])`, differentiable, optionally followed by
        the mean of the task losses (the meta-loss) when the backend computes it with its own gradient."""
        ...

    def adapt(self, problem: Problem) -> list[torch.Tensor]:
        """Returns the adapted parameters, each `[T, *param.shape]`."""
        ...


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under `backend.name`."""
    from . import _plans

    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)
    _plans.clear()  # a remembered choice may name the backend replaced, or miss the new one


def list_backends() -> list[str]:
    """Names of the registered backends (available or not)."""
    _load_builtin()
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    _load_builtin()
    return _REGISTRY[name]


def _load_builtin() -> None:
    if not _REGISTRY:
        importlib.import_module("fastmaml.backends")  # registers the built-in backends


# Why each backend cannot run at all in this process (None: it can), asked once: it depends on the
# installation and the machine (a build, Triton, a GPU), not on the call.
_UNAVAILABLE: dict[str, Optional[str]] = {}


def unavailable(name: str) -> Optional[str]:
    """Why the registered backend `name` cannot run at all here (not built, no Triton, no GPU), or None;
    decided on the first call in a process and remembered."""
    if name not in _UNAVAILABLE:
        _UNAVAILABLE[name] = _REGISTRY[name].unavailable()
    return _UNAVAILABLE[name]


# torch.compile traces `unavailable` as the constant it returns (asking may build and load the extension,
# which cannot be traced). This is what `torch.compiler.assume_constant_result` does; the decorator
# itself imports torch._dynamo (and with it Triton): two seconds added to `import fastmaml`.
# tests/test_overhead.py (test_compile_as_the_first_call) fails if a torch release changes the marker.
unavailable._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _reason(backend: Backend, problem: Problem, op: str) -> Optional[str]:
    why = unavailable(backend.name) if _REGISTRY.get(backend.name) is backend else backend.unavailable()
    if why is None:
        why = backend.reject(problem, op)
    return why


def candidates(problem: Problem, op: str = "maml") -> list[tuple[str, Optional[str]]]:
    """Every registered backend with the reason it cannot take this call (`None`: it can)."""
    _load_builtin()
    order = AUTO_ORDER.get(problem.device.type, ["reference"])
    out = []
    for name, backend in _REGISTRY.items():
        why = _reason(backend, problem, op)
        if why is None and name not in order:
            why = f"not chosen automatically for {problem.device.type} tensors (ask for it explicitly)"
        if why is None:
            why = _auto_skip(name, problem)
        out.append((name, why))
    rank = {name: i for i, name in enumerate(order)}
    out.sort(key=lambda item: rank.get(item[0], len(rank)))
    return out


def select(problem: Problem, backend: str = "auto", op: str = "maml") -> Backend:
    """The backend that runs this call: the named one (or an error saying why it cannot), or the
    first that accepts in the device's preference order for `auto`."""
    _load_builtin()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        # In preference order, stopping at the first that accepts: the backends after it are not asked
        # (asking may cost more than the call's own dispatch, e.g. whether Triton is installed). `explain`
        # asks them all.
        rejected = []
        for name in AUTO_ORDER.get(problem.device.type, ["reference"]):
            chosen = _REGISTRY.get(name)
            if chosen is None:
                continue
            why = _reason(chosen, problem, op) or _auto_skip(name, problem)
            if why is None:
                if rejected:
                    log.debug("fastmaml %s: backend %r chosen; %s", op, name, "; ".join(rejected))
                return chosen
            rejected.append(f"{name}: {why}")
        rejected = [f"{name}: {why}" for name, why in candidates(problem, op)]
        raise RuntimeError("fastmaml: no backend can run this call: " + "; ".join(rejected))
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {list(_REGISTRY)}, got {backend!r}")
    chosen = _REGISTRY[backend]
    why = _reason(chosen, problem, op)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run this call: {why}")
    return chosen


def explain_problem(problem: Problem, op: str = "maml", requested: str = "auto") -> str:
    """A short report: which backend `auto` picks for this call and why each other one was not; with
    `requested` a backend's name (a `fastmaml.MAML` made with `backend=`), whether that one runs it."""
    lines = []
    chosen = None
    reasons = candidates(problem, op)
    if requested != "auto":
        asked = _REGISTRY.get(requested)
        why = f"no backend is named {requested!r}" if asked is None else _reason(asked, problem, op)
        lines.append(f"  backend={requested!r} was asked for: "
                     + ("it runs this call" if why is None else f"the call raises ({why})")
                     + "; auto would pick as below")
    for name, why in reasons:
        if why is None and chosen is None:
            chosen = name
            lines.append(f"  {name:<10} chosen")
        elif why is None:
            lines.append(f"  {name:<10} can run it (lower preference)")
        else:
            lines.append(f"  {name:<10} rejected: {why}")
    head = f"fastmaml.{op} on {problem.device.type}, T={problem.num_tasks}, K={problem.inner_steps}"
    if problem.dims is not None:
        head += f", dims={problem.dims}"
    return "\n".join([head] + lines)
