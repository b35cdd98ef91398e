"""The built-in backends, registered in order: reference (always), then the fused kernels.

Importing a kernel backend never builds or launches anything: each one checks what it needs
(a compiler, a CUDA torch, Triton) lazily, when `unavailable()` is first asked.
"""

import importlib

from ..dispatch import register_backend
from .reference import ReferenceBackend

register_backend(ReferenceBackend())

for _module, _cls in (("cpu", "CpuBackend"), ("cuda", "CudaBackend"), ("triton_maml", "TritonBackend"),
                      ("factored", "FactoredBackend")):
    try:
        _backend = getattr(importlib.import_module(f"{__name__}.{_module}"), _cls)()
    except ModuleNotFoundError as err:  # the module itself is absent (a partial checkout)
        if err.name != f"{__name__}.{_module}":
            raise
        continue
    register_backend(_backend)
