"""fastmaml: MAML's inner loop and exact meta-gradient for many tasks at once, in fused kernels.

Public API (see README.md and docs/):
    maml(params, x_support, y_support, x_query, y_query, ...) -> MAMLOutput
    adapt(params, x_support, y_support, ...) -> adapted params, each [T, *shape]
    mlp(batched_params, x, activation) -> [T, N, D_out]
    reptile(params, x, y, ...) -> meta-direction, one tensor per param
    MAML(model, ...)  the drop-in nn.Module
    explain(...)      which backend `auto` picks and why
    list_backends()   the registered backend names
    TaskLoopWarning   the reference path loops over tasks because vmap cannot batch the model
    FiniteStep(opt)   an optimizer step taken only when the meta-loss and gradients are finite
    set_check_inputs(enabled), check_inputs_enabled()
                      the data-reading input checks on GPU tensors (off by default: no synchronisation)
    omniglot.load(path), sinusoid.load_model(path)   models trained by the jobs (`fastmaml train ...`)
"""

from ._validate import check_inputs_enabled, set_check_inputs
from .api import MAMLOutput, adapt, explain, maml, mlp, reptile
from .backends.reference import TaskLoopWarning
from .dispatch import list_backends
from .nn import MAML
from .training import FiniteStep

__version__ = "0.1.0"

# The jobs' modules load on first use (`fastmaml.omniglot.load(path)`), not with the library.
_LAZY = ("omniglot", "sinusoid")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastmaml' has no attribute {name!r}")

__all__ = ["FiniteStep", "MAML", "MAMLOutput", "TaskLoopWarning", "adapt", "check_inputs_enabled", "explain",
           "list_backends", "maml", "mlp", "reptile", "set_check_inputs", "__version__"]
