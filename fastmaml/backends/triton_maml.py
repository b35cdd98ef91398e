"""The `triton` backend: the fused MAML operations of `docs/kernels.md` as Triton kernels.

Custom ops `fastmaml::triton_maml_fwd / triton_maml_bwd / triton_maml_train / triton_maml_adapt`
(`_triton_ops.py`) launch the kernels of `_triton_kernels.py` and `_triton_scratch.py`; this module holds
what they read (size limits, layouts, compile-time constants, program counts) and the backend. The ops
are defined when the backend is first found available, the kernels on first use: importing fastmaml
never imports Triton, and `triton.jit` reads `TRITON_INTERPRET` only when the kernels are defined. CUDA
tensors run compiled kernels; CPU tensors run in the Triton interpreter, only when `TRITON_INTERPRET=1`
was set before first use (that is how the tests run without a GPU; it is far too slow for real work).

Size limits (`reject` says which one a call exceeds): depth <= 4 layers; float32: widths <= 64 with
up to 64 support and 64 query points per task, or widths <= 128 with up to 16; float64: widths <= 64
with up to 32 points (shared memory bounds them, see `MAX_POINTS_BY_WIDTH`). Every padded block is a
power of two >= 16, except that the register layout can keep a layer of width 1 one wide (WIDTH1).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
from types import SimpleNamespace
from typing import Optional

import torch

from .._validate import Problem
from . import _fused, _onestep

MAX_DEPTH = 4
# Most points per task (support or query) by dtype and padded width (the largest layer width rounded up
# to a power of two; widths up to 64 share the first entry). The binding limit is shared memory: the
# weights of a layer are operands of `tl.dot`, staged in shared memory, and an sm_90 block has 227 KiB.
# Measured peaks (Triton 3.6, backward kernel, depth 4, every width the largest, tanh, cross-entropy):
# float32 width 64 with 64 points and width 128 with 16 points 224 KiB, width 128 with 32 points
# 248 KiB (with 20 inputs and 5 outputs); float64 width 64 with 32 points 208 KiB, with 64 points 288
# KiB, width 128 with 16 points 352 KiB. tests/test_triton_compile.py checks every limit still fits.
MAX_POINTS_BY_WIDTH = {
    torch.float32: {64: 64, 128: 16},
    torch.float64: {64: 32},
}
MAX_WIDTH = max(max(table) for table in MAX_POINTS_BY_WIDTH.values())
MAX_POINTS = max(max(table.values()) for table in MAX_POINTS_BY_WIDTH.values())
MIN_TRITON = (3, 6)  # the oldest release tested (the kernels use tuples of tensors in jit code)
# Scratch memory (theta_k of every step, the adjoint, the partial sums) is sized per program; the number
# of programs is capped so that it stays under this budget, each program then running several tasks.
SCRATCH_BYTES = 256 * 2**20
_MIN_BLOCK = 16  # smallest reduction size of tl.dot
_COPY_BLOCK = 1024
# Which kernels run a call (`_triton_kernels.py`, every block in registers, or `_triton_scratch.py`, the
# blocks that products read in per-program scratch and the products reduced in runtime loops): "auto"
# takes the scratch layout from a padded width of SCRATCH_FROM_WIDTH, where the register layout's
# unrolled products are more code than ptxas allocates registers for (benchmarks/RESULTS.md). None: read
# FASTMAML_TRITON_LAYOUT on first use ("auto", "registers" or "scratch"); tests set it directly.
LAYOUT: Optional[str] = None
SCRATCH_FROM_WIDTH = 128
# A layer of width 1 in the register layout (the sinusoid net's input and output): "pad" (the default) pads
# it to 16 like every other width, its products `tl.dot`s over 15 zeros a term; "keep" leaves it 1 wide, its
# products broadcasts and row sums (`_triton_products._mm`). Compiled for sm_90 (1-40-40-1, ReLU, mse, 10 + 10
# points, 8 warps; cuobjdump, and ptxas -v of the PTX), the training kernel under keep against pad: 14,240
# SASS instructions against 11,376, 3,408 FFMAs against 4,479, 152 barriers against 123, 255 shuffles
# against 56, 2,112 / 2,576 B of spill stores / loads a thread against 1,948 / 2,424. keep was the default
# for a day on counts that came from a miscompiled kernel (Triton had made its width-1 sums TF32 `tl.dot`s:
# `_mm`'s docstring); counted again, it issues 25% more. Not yet measured on a GPU: the A/B's `keep1`.
# None: read FASTMAML_TRITON_WIDTH1 on first use; tests set it directly.
WIDTH1: Optional[str] = None
# The scratch layout's chunks: the reduction of an activation-sized product (KC) and the rows of a
# parameter-sized one (RC), each at most the padded size. 16 (tl.dot's least) because Triton's FMA
# products hold each thread's operand rows and columns whole along the chunk: compiled for sm_90 (ptxas
# -v, 1-128-128-1, 8 warps) the backward kernel needs 255 registers and spills 120 / 184 B a thread with
# chunks of 32, none with 16 (benchmarks/RESULTS.md).
SCRATCH_K_CHUNK = 16
SCRATCH_ROW_CHUNK = 16
# Warps a program: 0 for num_warps_for's choice, else this many. None: read FASTMAML_TRITON_WARPS on first
# use (the GPU check's A/B; tests set it directly).
WARPS: Optional[int] = None
# Registers a thread at most (Triton's `maxnreg`, ptxas's .maxnreg): 0 for ptxas's own choice. None: read
# FASTMAML_TRITON_MAXNREG on first use (the GPU check's A/B).
MAXNREG: Optional[int] = None


def _pad(n: int) -> int:
    """The padded block size of a dimension: a power of two, at least 16."""
    return max(_MIN_BLOCK, 1 << max(0, int(n) - 1).bit_length())


def _pad_feature(n: int) -> int:
    """A layer's width as the register layout pads it: 1 stays 1, others as `_pad`."""
    return 1 if n == 1 else _pad(n)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Whether Triton can be imported (asked once: a module search on every call would cost more than the
    rest of the dispatch)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _triton_version() -> Optional[tuple[int, ...]]:
    """(major, minor) of the installed Triton from its metadata, without importing it; None if unknown."""
    for dist in ("triton", "pytorch-triton"):
        try:
            text = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        parts = []
        for piece in text.split("+")[0].split(".")[:2]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts)
    return None


_KERNELS: Optional[SimpleNamespace] = None


def _kernels() -> SimpleNamespace:
    """Import (and so define) the kernels of both layouts, once; remember whether they were defined
    interpreted."""
    global _KERNELS
    if _KERNELS is None:
        module = importlib.import_module(f"{__package__}._triton_kernels")
        scratch = importlib.import_module(f"{__package__}._triton_scratch")
        onestep = importlib.import_module(f"{__package__}._triton_onestep")
        _KERNELS = SimpleNamespace(module=module, scratch=scratch, onestep=onestep, interpreted=_interpreter_on())
    return _KERNELS


def layout_for(dims: list[int]) -> str:
    """"registers" or "scratch": the kernels that run a net of `dims` (see LAYOUT)."""
    global LAYOUT
    if LAYOUT is None:
        from .._switches import env_choice

        LAYOUT = env_choice("FASTMAML_TRITON_LAYOUT", ("auto", "registers", "scratch"))
    if LAYOUT != "auto":
        return LAYOUT
    return "scratch" if max(_pad(d) for d in dims) >= SCRATCH_FROM_WIDTH else "registers"


def width1() -> str:
    """"pad" or "keep": how the register layout takes a layer of width 1 (see WIDTH1)."""
    global WIDTH1
    if WIDTH1 is None:
        from .._switches import env_choice

        WIDTH1 = env_choice("FASTMAML_TRITON_WIDTH1", ("pad", "keep"))
    return WIDTH1


def _module(layout: str):
    kernels = _kernels()
    return kernels.scratch if layout == "scratch" else kernels.module


# ---------------------------------------------------------------------------------------------------
# What a launch reads (the launches are _triton_ops.py's)
# ---------------------------------------------------------------------------------------------------


def _sizes(dims: list[int]) -> list[int]:
    """D0..D4 as the kernels take them (layers past the depth: 1, unused)."""
    return list(dims) + [1] * (MAX_DEPTH + 1 - len(dims))


def kernel_constants(kind: str, dims: list[int], n_support: int, n_query: int, activation: int, loss: int, *,
                     query: bool = True, first_order: bool = False, need_lr_grad: bool = True,
                     need_x_grad: bool = True, outputs: bool = False, layout: str = "registers") -> dict:
    """The compile-time constants of one launch of `kind` ("fwd" or "bwd") in `layout`: they select the
    compiled variant (padded blocks, depth, activation, loss, options). `query=False` is `maml_adapt`,
    `outputs=True` the backward of `maml_train` (which also writes the forward's outputs)."""
    if not 1 <= len(dims) - 1 <= MAX_DEPTH:
        raise ValueError(f"fastmaml triton: depth {len(dims) - 1} layers (the kernels run 1 to {MAX_DEPTH})")
    # The register layout keeps a layer of width 1 (the sinusoid net's input and output) 1 wide (WIDTH1): its
    # products are then broadcasts and row sums, not `tl.dot`s padded to 16 along it. The scratch layout's
    # slots and loops take every width padded to 16.
    pad = _pad_feature if layout == "registers" and width1() == "keep" else _pad
    consts = {f"BD{i}": pad(d) for i, d in enumerate(_sizes(dims))}
    consts.update(DEPTH=len(dims) - 1, BNS=_pad(n_support), BNQ=_pad(n_query if query else 1),
                  ACT=int(activation), LOSS=int(loss), BLOCK=_COPY_BLOCK)
    if kind == "fwd":
        consts["QUERY"] = bool(query)
    elif kind == "bwd":
        consts.update(FIRST_ORDER=bool(first_order), NEED_LR=bool(need_lr_grad), NEED_X=bool(need_x_grad),
                      OUTPUTS=bool(outputs))
    else:
        raise ValueError(f"kind must be 'fwd' or 'bwd', got {kind!r}")
    if layout == "scratch":
        consts.update(BW=max(_pad(d) for d in dims), BNM=max(consts["BNS"], consts["BNQ"]),
                      NSLOT=_kernels().scratch.n_slots(len(dims) - 1), KC=SCRATCH_K_CHUNK, RC=SCRATCH_ROW_CHUNK)
    elif layout != "registers":
        raise ValueError(f"layout must be 'registers' or 'scratch', got {layout!r}")
    return consts


def _programs_and_acts(consts: dict, theta: torch.Tensor, T: int, rows: int,
                       num_warps: int = 8) -> tuple[int, tuple]:
    """The program count for T tasks (each program with `rows` scratch rows of P, `num_warps` warps) and the
    scratch layout's `acts` buffer, as the kernel arguments it adds (none in the register layout)."""
    itemsize = theta.element_size()
    acts_bytes = consts["NSLOT"] * consts["BNM"] * consts["BW"] * itemsize if "NSLOT" in consts else 0
    G = _programs(T, rows, theta.shape[0], itemsize, acts_bytes, _sms(theta), programs_per_sm(num_warps))
    return G, ((theta.new_empty(G, acts_bytes // itemsize),) if acts_bytes else ())


def programs_per_sm(num_warps: int) -> int:
    """Programs of `num_warps` warps one multiprocessor holds by registers (64 K of them; with the cap at
    least 64 registers a thread, at most 32 warps: never past the 64 a multiprocessor runs): 1 where
    ptxas chooses the registers (234-255 a thread at the sweep's sizes: one program of 8 warps
    fills them, and the count of fewer warps is not known before the compile), else by
    FASTMAML_TRITON_MAXNREG's cap, allocated in steps of 8 registers a thread."""
    cap = max_registers()
    if not cap:
        return 1
    regs = -(-cap // 8) * 8
    return max(1, 65536 // (regs * 32 * num_warps))


def max_registers() -> int:
    """FASTMAML_TRITON_MAXNREG: registers a thread at most in every kernel of the fused Triton backend, 0
    (unset) for what ptxas gives them. The kernels of the sweep's sizes take 234 to 255 registers a
    thread, so a program of 8 warps fills a multiprocessor's registers and runs alone there; capped at
    128, two such programs share one (with 4 warps, four), and what no longer fits spills to local
    memory: compiled for sm_90 (ptxas -v, the training kernel of the scratch layout, float32, 10 + 10
    points), 152 / 204 B of spill stores / loads a thread at width 40 and 8 warps, 352 / 896 B at width
    128 (benchmarks/RESULTS.md). A switch for the GPU check's A/B until a GPU weighs the two."""
    global MAXNREG
    if MAXNREG is None:
        from .._switches import env_int

        MAXNREG = env_int("FASTMAML_TRITON_MAXNREG", 0, lambda n: n == 0 or 64 <= n <= 255,
                          "0 (ptxas's choice) or a register count from 64 to 255")
    return MAXNREG


def launch_options(dims: list[int], n_support: int, n_query: int, layout: str) -> dict:
    """The launch options of a fused Triton kernel: its warps (num_warps_for) and, where
    FASTMAML_TRITON_MAXNREG sets one, its register cap."""
    options = {"num_warps": num_warps_for(dims, n_support, n_query, layout)}
    if max_registers():
        options["maxnreg"] = max_registers()
    return options


def num_warps_for(dims: list[int], n_support: int, n_query: int, layout: str = "registers") -> int:
    """Warps per program, from the largest register tile (points x width or width x width).

    Chosen from ptxas reports (no GPU timings yet): for the sinusoid net (1-40-40-1, 10 points) the
    backward kernel uses 255 registers with 2 KiB of spills at 8 warps, but at 2 or 4 warps ptxas falls
    back to 32 registers with 40-90 KiB of spills, and compiles 2-6x slower. The scratch layout: 8
    warps (at 4 its width-128 backward spills 124 / 148 B a thread, at 8 none). At 255 registers a thread
    8 warps make one program a multiprocessor: FASTMAML_TRITON_WARPS=4 or 2 (WARPS) gives two or four,
    each with fewer threads on its task; the scratch layout at width 40 compiles at 4 warps without spills
    and at 2 with 116 / 148 B (benchmarks/RESULTS.md), for the GPU check's A/B.
    """
    if warps_switch():
        return WARPS
    if layout == "scratch":
        return 8
    bn = max(_pad(n_support), _pad(n_query))
    pads = [_pad(d) for d in dims]
    largest = max(max(bn * p for p in pads), max(a * b for a, b in zip(pads[1:], pads[:-1])))
    return 4 if largest <= 1024 else 8


def warps_switch() -> int:
    """FASTMAML_TRITON_WARPS (read once; 0: the backend's choice)."""
    global WARPS
    if WARPS is None:
        from .._switches import env_int

        WARPS = env_int("FASTMAML_TRITON_WARPS", 0, lambda n: n in (0, 1, 2, 4, 8, 16),
                        "0 (the backend's choice) or a power of two from 1 to 16")
    return WARPS


def _programs(T: int, rows_per_program: int, P: int, itemsize: int, extra_bytes: int = 0, sms: int = 0,
              per_sm: int = 1) -> int:
    """How many programs (each with `rows_per_program` scratch rows of P, and `extra_bytes`) to launch for
    T tasks on a GPU of `sms` multiprocessors (0: not a GPU) that hold `per_sm` programs each.

    Each program loops over its share of the tasks, so programs that wait for a multiprocessor make a
    second wave of the same length: at width 128, K = 5 (1.1 MiB of scratch a program, one program a
    multiprocessor by registers) the budget alone gives 240 programs, 132 then 108 on an H100 or H200.
    Past one wave (sms x per_sm programs) the count is rounded down to a multiple of it."""
    per_program = max(1, rows_per_program * P * itemsize + extra_bytes)
    G = max(1, min(T, SCRATCH_BYTES // per_program))
    wave = sms * max(1, per_sm)
    if sms > 0 and G > wave:
        G -= G % wave
    return G


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    """Multiprocessors of `t`'s GPU (asked once per device), 0 for other tensors."""
    if t.device.type != "cuda":
        return 0
    return _multiprocessors(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run the kernels here, or None (probed once by running a
    loop with a runtime bound: Triton 3.6's interpreter fails on it with numpy >= 2.4)."""
    try:
        kernels = _kernels()
        out = torch.zeros(16)
        kernels.module.probe_kernel[(1,)](out, 3)
        if not bool((out == 3).all()):
            return "the Triton interpreter computed a wrong result in a self-test"
    except Exception as err:  # the interpreter raises its own error types
        import numpy

        return (f"the Triton interpreter fails here ({type(err).__name__}: {err}); Triton 3.6's interpreter "
                f"needs numpy < 2.4 (installed: {numpy.__version__})")
    return None


def size_limits(dims: list[int], n_support: int, n_query: int, dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why these sizes are out of the kernels' range (`MAX_DEPTH`, `MAX_POINTS_BY_WIDTH`), or None."""
    depth = len(dims) - 1
    if not 1 <= depth <= MAX_DEPTH:
        return f"depth {depth} layers (the Triton kernels run 1 to {MAX_DEPTH})"
    table = MAX_POINTS_BY_WIDTH.get(dtype)
    if table is None:
        return f"dtype {dtype} (the Triton kernels run {list(MAX_POINTS_BY_WIDTH)})"
    width = max(dims)
    fits = [w for w in sorted(table) if w >= width]
    if not fits:
        return (f"width {width} in dims {list(dims)} (the Triton kernels run widths up to {max(table)} "
                f"in {dtype})")
    limit = table[fits[0]]
    for n, what in ((n_support, "support"), (n_query, "query")):
        if n > limit:
            return (f"{n} {what} points per task (the Triton kernels run up to {limit} with widths up to "
                    f"{fits[0]} in {dtype}: {_points_table(dtype)})")
    return None


def _points_table(dtype: torch.dtype) -> str:
    return ", ".join(f"width <= {w}: {n} points" for w, n in sorted(MAX_POINTS_BY_WIDTH[dtype].items()))


def _cpu_reason() -> Optional[str]:
    """Why CPU tensors cannot run here: only the interpreter runs them, and it must work."""
    if not _interpreter_on():
        return ("CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 before the "
                "first Triton call (the tests do; it is slow, for testing only)")
    if _KERNELS is not None and not _KERNELS.interpreted:
        return "the Triton kernels were defined before TRITON_INTERPRET=1 was set (compiled kernels need CUDA)"
    return interpreter_problem()


# Probing the interpreter imports and runs a kernel, which torch.compile cannot trace: the answer is a
# constant of the process, and dynamo calls it as one (as `dispatch.unavailable`).
_cpu_reason._dynamo_marked_constant = True  # type: ignore[attr-defined]


class TritonBackend(_fused.FusedBackend):
    """Fused Triton kernels: one program per task (or a group of tasks), MLPs within `size_limits`."""

    name = "triton"
    device_type = "cuda"

    def unavailable(self) -> Optional[str]:
        if not _triton_installed():
            return "Triton is not installed (pip install triton)"
        version = _triton_version()
        if version is not None and version < MIN_TRITON:
            return (f"Triton {'.'.join(map(str, version))} is too old "
                    f"(the kernels need {'.'.join(map(str, MIN_TRITON))} or newer)")
        # Define the custom ops now: this answer is computed eagerly even under torch.compile (a traced
        # constant, `dispatch.unavailable`), while defining an op inside a traced call cannot be traced.
        _triton_ops.ops()
        _triton_onestep_call.settings()  # a mistyped switch is refused here, not measured as the default
        width1()
        return None

    def device_reason(self, problem: Problem) -> Optional[str]:
        # CUDA tensors run compiled kernels; CPU tensors only the interpreter (the tests without a GPU).
        device = problem.device.type
        if device == "cpu":
            return _cpu_reason()
        if device == "cuda":
            if _interpreter_on() or (_KERNELS is not None and _KERNELS.interpreted):
                return "TRITON_INTERPRET=1: the Triton interpreter would run CUDA tensors on the host"
            return None
        return f"{device} tensors (the Triton kernels run CUDA tensors)"

    def size_limit_reason(self, problem: Problem, op: str) -> Optional[str]:
        return size_limits(problem.dims, problem.n_support, problem.n_query, problem.dtype)

    def max_fused_rows_bytes(self) -> int:
        return 1 << 62  # the training op keeps no per-task rows: only the sums and the inputs' gradients

    def train(self, problem: Problem, tail: tuple, need_lr: bool, need_x: bool) -> Optional[tuple]:
        if _triton_onestep_call.settings()[0] and _triton_onestep_call.reason(problem, need_lr, need_x) is None:
            return _onestep.maml(problem, _triton_onestep_call.run)
        # One launch of the backward kernel that also writes the forward's outputs, instead of the forward
        # kernel now and the backward (which runs the same inner loop again) at backward time: the forward
        # was 22% of the GPU time at T=65,536, K=5, W=128 (H200, benchmarks/RESULTS.md).
        out = _triton_ops.ops().train(_fused.flat_theta(problem), *tail, need_lr, need_x)
        return out[0], out[1], out[2]

    def forward_op(self):
        return _triton_ops.ops().fwd

    def adapt_op(self):
        return _triton_ops.ops().adapt


# Last: these modules read this module's names when they run, so they are imported once the names exist.
from . import _triton_onestep_call, _triton_ops  # noqa: E402
