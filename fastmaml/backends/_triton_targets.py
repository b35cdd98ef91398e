"""The `triton` backend's kernels compiled for a GPU on a machine without one, and what was compiled: the
tools of `tests/test_triton_compile.py`, `benchmarks/kernel_registers.py` and `benchmarks/gpu_check.sh`
(not used by a call of the backend). The kernels and their compile-time constants are `triton_maml`'s.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _triton_onestep_call, triton_maml


def compiled_report() -> list[str]:
    """One line per Triton kernel variant compiled for a GPU in this process: registers and spills per
    thread, shared memory, warps (the GPU check prints them beside nvcc's -Xptxas -v of the CUDA kernels).
    Empty in the interpreter."""
    kernels = triton_maml._KERNELS
    if kernels is None or kernels.interpreted:
        return []
    return ([f"{layout}: {line}" for layout, module in (("registers", kernels.module), ("scratch", kernels.scratch))
             for line in kernel_cache_report(module, ("maml_fwd_kernel", "maml_bwd_kernel"))]
            + [f"one-step: {line}" for line in kernel_cache_report(kernels.onestep, ("onestep_kernel",))])


def kernel_cache_report(module, names) -> list[str]:
    """`compiled_report`'s lines for the kernels `names` of `module`. Reads Triton's per-device kernel
    caches, whose layout Triton does not promise: what cannot be read is said, not guessed."""
    lines = []
    for name in names:
        fn = getattr(module, name, None)
        for caches in list(getattr(fn, "device_caches", {}).values()):
            cache = caches[0] if isinstance(caches, tuple) else caches
            for key, compiled in list(getattr(cache, "items", lambda: [])()):
                try:
                    compiled._init_handles()  # loads the binary: fills n_regs and n_spills
                except Exception:  # noqa: BLE001 (a report: what is missing shows as "?")
                    pass
                meta = getattr(compiled, "metadata", None)
                lines.append(f"{name} {str(key)[:160]}: {getattr(compiled, 'n_regs', '?')} registers, "
                             f"{getattr(compiled, 'n_spills', '?')} spills, shared {getattr(meta, 'shared', '?')} B, "
                             f"{getattr(meta, 'num_warps', '?')} warps")
    return lines


def ast_source(kind: str, dtype: torch.dtype, consts: dict):
    """A `triton.compiler.ASTSource` of one variant, with the argument types the launchers pass, to
    compile it for a GPU target on a machine without one (`tests/test_triton_compile.py`)."""
    from triton.compiler import ASTSource

    module = triton_maml._module("scratch" if "NSLOT" in consts else "registers")
    fn = module.maml_fwd_kernel if kind == "fwd" else module.maml_bwd_kernel
    labels = {"ys": "*i64", "yq": "*i64"} if consts["LOSS"] == 1 else {}
    signature = kernel_signature(fn, consts, module._RUNTIME_INTS, dtype, labels)
    return ASTSource(fn, signature=signature, constexprs=consts)


def kernel_signature(fn, consts: dict, runtime_ints: list[str], dtype: torch.dtype, special: dict) -> dict:
    """The argument types of a kernel launched with tensors of `dtype` (`special` names the arguments
    of other types: class labels, tuples of pointers), for `triton.compile` without a GPU."""
    pointer = {torch.float32: "*fp32", torch.float64: "*fp64"}[dtype]
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in runtime_ints:
            signature[name] = "i32"
        else:
            signature[name] = special.get(name, pointer)
    return signature


def compile_for_target(kind: str, dtype: torch.dtype, dims: list[int], n_support: int, n_query: int,
                       activation: int, loss: int, *, arch: int = 90, num_warps: int = 0, layout: str = "",
                       **options):
    """One kernel variant compiled by `triton.compile` for an NVIDIA GPU of compute capability `arch`, on a
    machine without one (the Triton interpreter must be off): what `tests/test_triton_compile.py` and
    `benchmarks/kernel_registers.py` compile. `num_warps` 0: the backend's choice; `layout` "": the one a
    call of these sizes takes (`triton_maml.layout_for`). Returns the compiled kernel (its `asm` holds the
    PTX and cubin) and the warps it was compiled for."""
    import triton
    from triton.backends.compiler import GPUTarget

    layout = layout or triton_maml.layout_for(dims)
    consts = triton_maml.kernel_constants(kind, dims, n_support, n_query, activation, loss, layout=layout,
                                          **options)
    launch = triton_maml.launch_options(dims, n_support, n_query, layout)  # FASTMAML_TRITON_MAXNREG's cap too
    warps = num_warps or launch["num_warps"]
    kernel = triton.compile(ast_source(kind, dtype, consts), target=GPUTarget("cuda", arch, 32),
                            options=dict(launch, num_warps=warps))
    return kernel, warps


def onestep_compile_for_target(dtype: torch.dtype, dims: list[int], n_support: int, n_query: int, activation: int,
                               loss: int, *, first_order: bool = False, tasks_per_program: int = 1,
                               num_warps: int = 8, arch: int = 90, chunk: Optional[int] = None):
    """The one-step kernel (`_triton_onestep.py`) of a training call, compiled by `triton.compile` for an NVIDIA
    GPU of compute capability `arch` on a machine without one (the interpreter off), with the launch's
    constants and register cap (`_triton_onestep_call.run`); `chunk` None: the backend's
    (`_triton_onestep_call.chunk`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    onestep = triton_maml._kernels().onestep
    fn = onestep.onestep_kernel
    if chunk is None:
        chunk = _triton_onestep_call.chunk(dims, first_order)
    consts = onestep.constants(dims, n_support, n_query, tasks_per_program, activation, loss, first_order,
                               chunk=chunk)
    labels = {"ys": "*i64", "yq": "*i64"} if loss == 1 else {}
    signature = kernel_signature(fn, consts, onestep._RUNTIME_INTS, dtype, labels)
    return triton.compile(ASTSource(fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, maxnreg=_triton_onestep_call.register_cap(num_warps),
                                       **({"num_stages": 1} if chunk else {})))
