"""The built-in backends, registered in order: reference (always), then the fused kernels.

Importing a kernel backend never builds or launches anything: each one checks what it needs
(a compiler, a CUDA torch, Triton) lazily, when `unavailable()` is first asked.
"""

from ..dispatch import register_backend
from .reference import ReferenceBackend

register_backend(ReferenceBackend())

try:  # each kernel backend module is optional while the package grows
    from .cpu import CpuBackend, CudaBackend

    register_backend(CpuBackend())
    register_backend(CudaBackend())
except ImportError:  # pragma: no cover
    pass

try:
    from .triton_maml import TritonBackend

    register_backend(TritonBackend())
except ImportError:  # pragma: no cover
    pass
