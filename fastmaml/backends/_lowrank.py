"""The factored backend's low-rank products as two operations, with Triton kernels on CUDA tensors.

A product with a task's adapted weights `W_k = W_0 + sum_j D_j^T H_j` (`factored.py`) is a product with
W_0, one matrix product over every task, plus

    lowrank_add(base, x, hs, ds, s)[t] = base[t] + sum_j s_j (x[t] hs[j][t]^T) ds[j][t]   [T, N, O]

(x [T, N, I], hs[j] [T, S, I], ds[j] [T, S, O], the factors' scales s `[J]` shared by the tasks: the
step rates, so that the factors are kept as the support pass made them, not as scaled copies; `base` and
s may be None: zeros, ones). In batched PyTorch that is
two batched products per factor, each writing its result to memory and reading it back; the kernel
(`_triton_lowrank.py`) reads x once for all the factors and keeps the `[N, S]` intermediates in registers.
Its gradients are the same kind of product and one more,

    lowrank_grads(u, bs, c, s)[j, t] = s_j (u[t] bs[j][t]^T)^T c[t]                      [J, T, S, O]

    d base = g,  d x = lowrank_add(None, g, ds, hs, s),
    d hs[j] = lowrank_grads(g, ds, x, s)[j],  d ds[j] = lowrank_grads(x, hs, g, s)[j],
    d s_j = <lowrank_grads(x, hs, g, None)[j], ds[j]>   (only where the rates need a gradient),

and the gradients of `lowrank_grads` are again these two (`_grads_backward`): both operations are
differentiable to any order, as the meta-gradient through the factored inner loop needs (its backward
differentiates the inner loop's gradient, and `create_graph=True` once more). Where x and every factor
need a gradient and the scales none, the first three come from one operation, `lowrank_backward` (one
kernel: each `[N, S]` product made once, the inputs read once or twice instead of two or three times;
`_lowrank_backward.py`), whose own gradients are again the two.

Where the kernels run (KERNELS, from FASTMAML_FACTORED_TRITON): "auto" on CUDA tensors when Triton >= 3.6
is installed and the factors' products fit in registers (`kernel_reason`); "never" keeps the batched
PyTorch products everywhere (the GPU check's A/B). CPU tensors take the batched products, unless a test
sends them through the Triton interpreter (`_INTERPRET_CPU`). On CUDA tensors lowrank_add runs the C++
extension's CUDA kernel where the extension has it and the call is within its bounds, else Triton's
(FASTMAML_FACTORED_KERNELS, LANGUAGE: `language` picks; `add_kernel_reason` gives the chosen kernel's bounds).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from .._switches import env_choice
from . import _lowrank_cuda, _triton_targets, triton_maml
from .triton_maml import _device_guard, _pad

# The kernels keep every factor's `[N, S]` intermediate in registers. Within these bounds (padded sizes,
# 4 warps) ptxas -v for sm_90 reports at most a few bytes of spills a thread (tests/test_lowrank.py
# compiles the bounds: float64's lowrank_grads spills 4-12 bytes at some factor counts, none at others).
# Past them: float32 at 32 x 32 points and 4 factors spills 128 bytes (lowrank_grads), at 64 x 64 and one
# factor 436; float64 at 16 x 16 and 16 factors 20. Widths are not bounded: both reductions and the
# output's columns run in chunks.
MAX_TILE = 1024  # padded N x padded S
MAX_TILES = 2048  # J x padded N x padded S
# How the float32 products run (tl.dot's own default on a GPU with tensor cores, plain TF32, would lose
# three digits): "ieee" (the default: FMAs on the CUDA cores) or "tf32x3" (three TF32 tensor-core
# products of the split operands, float32-accurate). Read once, at import, from
# FASTMAML_FACTORED_PRECISION, for the GPU check's A/B: these two kernels are two thirds of the factored
# backend's GPU time at T=65,536, K=5, W=128 (H200, benchmarks/RESULTS.md), and Triton's scratch layout
# measured tf32x3 14-15% faster than ieee there. float64 ignores it.
PRECISION = env_choice("FASTMAML_FACTORED_PRECISION", ("ieee", "tf32x3"))


def _precision(dtype: torch.dtype) -> str:
    return PRECISION if dtype == torch.float32 else "ieee"


def _kernels_mode() -> str:
    """FASTMAML_FACTORED_TRITON: "auto" (the default) or "never" (read once, at import)."""
    return env_choice("FASTMAML_FACTORED_TRITON", ("auto", "never"))


KERNELS = _kernels_mode()
# Tests set this to run CPU tensors through the kernels in the Triton interpreter (TRITON_INTERPRET=1).
_INTERPRET_CPU = False


# The kernels run the reduction over I and the output's columns in chunks of at most this many
# (FASTMAML_FACTORED_K_CHUNK, read once at import: 32 or 16, the smallest `tl.dot`). Smaller chunks hold
# fewer registers: Triton's FMA product keeps a whole chunk-row of both operands in each thread. sm_90,
# ptxas -v, float32, 4 warps, the 1-128-128-1 net's middle layer (benchmarks/RESULTS.md): at 32, 72 / 56
# registers (lowrank_add / lowrank_grads) with one factor pair and 124 / 154 with five in a loop per factor
# (148 / 152 in one loop, K_LOOP below), so 3 or 4 programs a multiprocessor there; at 16, 52 / 44 and
# 80 / 80 (72 / 80 in one loop), 6 to 9 programs. The factored backend's time at
# T=65,536, K=5, W=128 is two thirds these kernels, at about an eighth of the memory bandwidth their bytes
# need: whether the occupancy pays for the shorter loads is for a GPU to say (the GPU check's A/B
# `fchunk16`). With float32 FMA products (ieee, the default) both run the same FMAs in the same order,
# k ascending (Triton lowers an FMA dot to one chain per output over k), so they give the same bits.
K_CHUNK = int(env_choice("FASTMAML_FACTORED_K_CHUNK", ("32", "16")))

# How the kernels reduce over I for their J factors (FASTMAML_FACTORED_K_LOOP, read once at import): one
# loop over I's chunks that loads each chunk of every factor together ("one"), or a loop each
# ("per_factor"). The kernels wait on their loads: on the H200 they ran at an eighth of the bandwidth
# their bytes need, and one loop leaves ceil(I / 32) rounds of dependent loads before the output instead
# of J times that (8 rounds a program instead of 24 at I = O = 128, five factors). It holds every
# factor's chunk at once, though. sm_90 ptxas -v, chunks of 32, I = O = 128 (lowrank_add / lowrank_grads;
# per factor -> one loop):
#   float32, 16 x 16 padded points, 3 factors: 108 / 152 -> 96 / 118 registers; 5 factors: 124 / 156 ->
#   148 / 152; 8 factors: 168 / 168 -> 168 with 12 B of spills / 198;
#   float32, 32 x 32, 2 factors: 168 / 220 -> 255 with 4 B of spills / 186;
#   float64, 16 x 16: 3 factors 117 / 114 -> 184 / 182, 6 factors 138 / 128 -> 255 / 255, 8 factors
#   159 / 140 -> 255 with 148 / 124 B of spills;
#   float32 with tf32x3 (FASTMAML_FACTORED_PRECISION), 16 x 16, 5 factors: 243 / 219 -> 255 with 28 / 4 B.
# "auto" (the default) takes one loop where it costs no spills and few registers: float32 FMA products,
# points padded to 16 x 16, at most 5 factors (the sinusoid nets at up to 5 steps); a loop each
# elsewhere. Both sum each product's chunks in ascending k: the same bits. The GPU check's A/B `floops`
# runs "per_factor"; benchmarks/RESULTS.md has the prediction.
K_LOOP = env_choice("FASTMAML_FACTORED_K_LOOP", ("auto", "one", "per_factor"))
ONE_LOOP_MAX_FACTORS = 5

# Warps a program of the three kernels (FASTMAML_FACTORED_WARPS, read once at import): 4 (the default) or 8.
# Registers, not shared memory, bound the programs a multiprocessor: ptxas -v (sm_90a, float32, 16 x 16
# padded points, I = O = 128, chunks of 32; lowrank_add / lowrank_grads / lowrank_backward, the last in its
# chunks of 16) at five factor pairs 148 / 152 / 154 registers a thread at 4 warps, 74 / 74 / 80 at 8,
# 255 at 2 (two of them spilling): 12 warps a multiprocessor at 4, 24 at 8; at one pair 72 / 56 / 72 and 44 / 42 / 46
# (28 to 36 warps, 40 to 48). The pipelined loads' shared memory (5 to 28 KiB a program) allows more. Twice
# the warps in flight, each with half the outputs, so more shared-memory operand loads a multiply-add: for
# a GPU to decide (the GPU check's A/B `fwarps8`), after the kernels ran at about a quarter of the
# bandwidth the rest of the iteration reached (benchmarks/RESULTS.md).
WARPS = int(env_choice("FASTMAML_FACTORED_WARPS", ("4", "8")))

# Software-pipelining stages of the kernels' loops (FASTMAML_FACTORED_STAGES, read once at import): 3
# (Triton's default) or 2. Each stage holds another round of loads in flight, in shared memory and in the
# registers that address and wait on them. sm_90a, ptxas -v, float32, 16 x 16 padded points, I = O =
# 128, 4 warps, chunks of 32: lowrank_add at 1 / 3 / 5 / 8 factor pairs takes 72 / 96 / 148 / 168
# registers at 3 stages, 64 / 80 / 118 / 144 at 2 (at 1 stage 56 / 128 / 168 with 4 B of spills / 168),
# so at five pairs 4 programs a multiprocessor instead of 3. Fewer loads in flight a program, more
# programs: for a GPU to decide (the GPU check's A/B `fstages2`), after these kernels waited on their
# loads at a quarter of the bandwidth the rest of the iteration reached.
STAGES = int(env_choice("FASTMAML_FACTORED_STAGES", ("3", "2")))


# Which kernel makes lowrank_add on CUDA tensors (FASTMAML_FACTORED_KERNELS, read once at import): "auto"
# (the default) the C++ extension's CUDA kernel (`_lowrank_cuda.py` says why) where the extension loads
# with it and the call is within its bounds, else Triton's (`_triton_lowrank.py`); "triton" or "cuda"
# always that one ("cuda" raises where the extension lacks it). On an H200 (2026-12-04, T=65,536, second
# order) the CUDA kernel made the whole factored call 1.38x / 1.31x faster at K=1 (W=40 / 128) and 1.19x /
# 1.73x at K=5 (the GPU check's A/B `fcuda`, now `ftriton` the other way); its float64 gradients matched
# the reference within 1e-10 there (tests/test_lowrank.py).
LANGUAGE = env_choice("FASTMAML_FACTORED_KERNELS", ("auto", "triton", "cuda"))


def language(x: torch.Tensor, factors: int, n_support: int) -> str:
    """`"cuda"` or `"triton"`: whose kernel makes `lowrank_add(., x, hs, ds)` with `factors` pairs of
    `n_support` rows (under "auto" the CUDA one where it is built and takes the call; the first CUDA call
    loads the extension, building it if needed, as the `cuda` backend does)."""
    if LANGUAGE != "auto":
        return LANGUAGE
    if (x.device.type == "cuda" and _lowrank_cuda.reason(x, factors, n_support) is None
            and _lowrank_cuda.kernel_missing() is None):
        return "cuda"
    return "triton"


def add_kernel_reason(x: torch.Tensor, factors: int, n_support: int,
                      lang: Optional[str] = None) -> Optional[str]:
    """Why `lowrank_add(., x, hs, ds)` with `factors` pairs of `n_support` rows takes the batched PyTorch
    products, or None: the CUDA kernel's own bounds where `language` picks it (Triton's do not apply to it),
    else `kernel_reason`. `lang`: `language`'s answer for the same call where the caller has it."""
    if (lang or language(x, factors, n_support)) != "cuda":
        return kernel_reason(x, factors, n_support)
    if KERNELS == "never":
        return "FASTMAML_FACTORED_TRITON=never"
    return _lowrank_cuda.reason(x, factors, n_support)


def _one_loop(dtype: torch.dtype, n: int, s: int, factors: int) -> bool:
    """Whether the kernels for `factors` pairs of `s` rows against `n` points reduce in one loop (K_LOOP)."""
    if K_LOOP != "auto":
        return K_LOOP == "one"
    return (dtype == torch.float32 and _precision(dtype) == "ieee" and _pad(n) * _pad(s) <= 256
            and factors <= ONE_LOOP_MAX_FACTORS)


def _chunk(n: int) -> int:
    return min(_pad(n), K_CHUNK)


def _triton_reason() -> Optional[str]:
    """Why the kernels cannot be defined here, or None (asked once)."""
    return _probe_triton()


# torch.compile takes the answer as a constant, as it takes `dispatch.unavailable`'s. Traced, torch 2.11's
# dynamo went past the probe's cache into its module search (importlib.util.find_spec), which it refuses to
# trace, and a fullgraph compile of a factored call stopped there (tests/test_lowrank.py,
# test_compiles_through_the_kernels, under torch 2.11.0; torch 2.13 traces it).
_triton_reason._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _probe_triton() -> Optional[str]:
    if not triton_maml._triton_installed():
        return "Triton is not installed"
    version = triton_maml._triton_version()
    if version is not None and version < triton_maml.MIN_TRITON:
        return f"Triton {'.'.join(map(str, version))} is older than 3.6"
    return None


_MODULE = None
_DEFINED_INTERPRETED: Optional[bool] = None


def _module():
    """The kernels, defined on first use; remembers whether they were defined for the interpreter."""
    global _MODULE, _DEFINED_INTERPRETED
    if _MODULE is None:
        _DEFINED_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
        _MODULE = importlib.import_module(f"{__package__}._triton_lowrank")
    return _MODULE


def kernel_reason(x: torch.Tensor, factors: int, n_support: int) -> Optional[str]:
    """Why `lowrank_add(., x, hs, ds)` with `factors` pairs of `n_support` rows (or `lowrank_grads` with x
    as u) takes the batched PyTorch products instead of the kernels, or None."""
    if KERNELS == "never":
        return "FASTMAML_FACTORED_TRITON=never"
    if x.device.type == "cpu":
        if not _INTERPRET_CPU:
            return "CPU tensors (the kernels run CUDA tensors)"
        if os.environ.get("TRITON_INTERPRET", "0") != "1" or _DEFINED_INTERPRETED is False:
            return "the Triton interpreter is off"
    elif x.device.type != "cuda":
        return f"{x.device.type} tensors (the kernels run CUDA tensors)"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1" or _DEFINED_INTERPRETED:
        return "TRITON_INTERPRET=1 (the interpreter would run CUDA tensors on the host)"
    why = _triton_reason()
    if why is not None:
        return why
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype}"
    tile = _pad(x.shape[1]) * _pad(n_support)
    if factors < 1:
        return "no factor pairs"
    if tile > MAX_TILE or factors * tile > MAX_TILES:
        return (f"{factors} factor pairs of {x.shape[1]} x {n_support} points (the kernels keep the "
                f"padded products in registers: at most {MAX_TILE} elements, {MAX_TILES} over all factors)")
    return None


# ---------------------------------------------------------------------------------------------------
# The two products: batched PyTorch and the kernels
# ---------------------------------------------------------------------------------------------------


def _add_batched(base, x, hs, ds, scales=None):
    out = base
    for j, (h, d) in enumerate(zip(hs, ds)):
        c = torch.bmm(x, h.transpose(1, 2))
        if scales is not None:  # on the [N, S] product, the smallest operand
            c = c * scales[j]
        out = torch.bmm(c, d) if out is None else torch.baddbmm(out, c, d)
    return out


def _grads_batched(u, bs, c, scales=None):
    out = []
    for j, b in enumerate(bs):
        e = torch.bmm(b, u.transpose(1, 2))
        out.append(torch.bmm(e if scales is None else e * scales[j], c))
    return torch.stack(out)


def _add_impl(base: Optional[torch.Tensor], x: torch.Tensor, hs: list[torch.Tensor], ds: list[torch.Tensor],
              scales: Optional[torch.Tensor]) -> torch.Tensor:
    T, N, I = x.shape
    S, O = hs[0].shape[1], ds[0].shape[2]
    lang = language(x, len(hs), S)  # once a call: under "auto" it asks the extension's bounds
    if add_kernel_reason(x, len(hs), S, lang) is not None:
        return _add_batched(base, x, hs, ds, scales)  # at least one factor: never `base` itself
    if lang == "cuda":
        return _lowrank_cuda.add(base, x, list(hs), list(ds), scales)
    x = x.contiguous()
    hs = tuple(h.contiguous() for h in hs)
    ds = tuple(d.contiguous() for d in ds)
    out = x.new_empty(T, N, O)
    if T > 0:
        base_ = base.contiguous() if base is not None else out
        scales_ = scales.contiguous() if scales is not None else out
        with _device_guard(x):
            _module().lowrank_add_kernel[(T,)](
                base_, x, hs, ds, scales_, out, T, N, S, I, O, J=len(hs), HAS_BASE=base is not None,
                HAS_SCALES=scales is not None,
                PRECISION=_precision(x.dtype), ONE_LOOP=_one_loop(x.dtype, N, S, len(hs)), BN=_pad(N),
                BS=_pad(S), BK=_chunk(I), BO=_chunk(O), num_warps=WARPS, num_stages=STAGES,
            )
    return out


def _grads_impl(u: torch.Tensor, bs: list[torch.Tensor], c: torch.Tensor,
                scales: Optional[torch.Tensor]) -> torch.Tensor:
    T, N, I = u.shape
    S, O = bs[0].shape[1], c.shape[2]
    if kernel_reason(u, len(bs), S) is not None:
        return _grads_batched(u, bs, c, scales)
    u, c = u.contiguous(), c.contiguous()
    bs = tuple(b.contiguous() for b in bs)
    out = u.new_empty(len(bs), T, S, O)
    if T > 0:
        scales_ = scales.contiguous() if scales is not None else out
        with _device_guard(u):
            _module().lowrank_grads_kernel[(T,)](
                u, bs, c, scales_, out, T, N, S, I, O, J=len(bs), HAS_SCALES=scales is not None,
                PRECISION=_precision(u.dtype), ONE_LOOP=_one_loop(u.dtype, N, S, len(bs)), BN=_pad(N),
                BS=_pad(S), BK=_chunk(I), BO=_chunk(O), num_warps=WARPS, num_stages=STAGES,
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Custom ops and their gradients
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmaml::lowrank_add", mutates_args=())
def lowrank_add(base: Optional[torch.Tensor], x: torch.Tensor, hs: list[torch.Tensor], ds: list[torch.Tensor],
                scales: Optional[torch.Tensor]) -> torch.Tensor:
    """`base + sum_j s_j (x hs[j]^T) ds[j]` per task: x [T, N, I], hs[j] [T, S, I], ds[j] [T, S, O], base
    [T, N, O] or None, scales `[J]` or None (ones) -> [T, N, O]."""
    return _add_impl(base, x, hs, ds, scales)


@torch.library.custom_op("fastmaml::lowrank_grads", mutates_args=())
def lowrank_grads(u: torch.Tensor, bs: list[torch.Tensor], c: torch.Tensor,
                  scales: Optional[torch.Tensor]) -> torch.Tensor:
    """`s_j (u bs[j]^T)^T c` per task and j: u [T, N, I], bs[j] [T, S, I], c [T, N, O], scales `[J]` or
    None (ones) -> [J, T, S, O]."""
    return _grads_impl(u, bs, c, scales)


@lowrank_add.register_fake
def _add_fake(base, x, hs, ds, scales):
    return x.new_empty(x.shape[0], x.shape[1], ds[0].shape[2])


@lowrank_grads.register_fake
def _grads_fake(u, bs, c, scales):
    return u.new_empty(len(bs), u.shape[0], bs[0].shape[1], c.shape[2])


def _add_setup(ctx, inputs, output):
    base, x, hs, ds, scales = inputs
    ctx.has_base, ctx.has_scales = base is not None, scales is not None
    ctx.save_for_backward(x, *hs, *ds, *([scales] if scales is not None else []))


def _add_backward(ctx, g):
    x, *rest = ctx.saved_tensors
    scales = rest.pop() if ctx.has_scales else None
    J = len(rest) // 2
    hs, ds = rest[:J], rest[J:]
    need_base, need_x, need_hs, need_ds, need_scales = ctx.needs_input_grad
    need_scales = scales is not None and need_scales
    if _lowrank_backward.FUSED_BACKWARD and need_x and _all(need_hs) and _all(need_ds) and not need_scales:
        # The three products of the backward in one operation (`_lowrank_backward.lowrank_backward`): each
        # `[N, S]` product made once, x and the ds read once, g and the hs twice.
        g_x, g_hs, g_ds = _lowrank_backward.lowrank_backward(g, x, list(hs), list(ds), scales)
        return (g if ctx.has_base and need_base else None), g_x, list(g_hs.unbind(0)), list(g_ds.unbind(0)), None
    g_x = lowrank_add(None, g, ds, hs, scales) if need_x else None
    # A list input's gradient is a list, None per element not needed (a bare None breaks torch.library's
    # check that the gradients have the inputs' structure).
    g_hs = list(lowrank_grads(g, ds, x, scales).unbind(0)) if _any(need_hs) else [None] * J
    # s_j multiplies (x hs[j]^T) ds[j], whose inner product with g is <(x hs[j]^T)^T g, ds[j]>: with the
    # rates' gradient asked for, the unscaled product once, scaled for ds' gradient.
    g_scales, g_ds = None, [None] * J
    if need_scales:
        unscaled = lowrank_grads(x, hs, g, None)
        g_scales = _scale_grads(unscaled, ds)
        if _any(need_ds):
            g_ds = list((unscaled * scales.view(J, 1, 1, 1)).unbind(0))
    elif _any(need_ds):
        g_ds = list(lowrank_grads(x, hs, g, scales).unbind(0))
    return (g if ctx.has_base and need_base else None), g_x, g_hs, g_ds, g_scales


def _scale_grads(unscaled: torch.Tensor, factors) -> torch.Tensor:
    """`[J]`: the gradient of each scale, `<unscaled[j], factors[j]>` summed over the tasks."""
    return torch.stack([torch.vdot(unscaled[j].reshape(-1), f.reshape(-1)) for j, f in enumerate(factors)])


def _grads_setup(ctx, inputs, output):
    u, bs, c, scales = inputs
    ctx.has_scales = scales is not None
    ctx.save_for_backward(u, c, *bs, *([scales] if scales is not None else []))


def _grads_backward(ctx, g):
    u, c, *bs = ctx.saved_tensors
    scales = bs.pop() if ctx.has_scales else None
    gs = list(g.unbind(0))
    need_u, need_bs, need_c, need_scales = ctx.needs_input_grad
    g_u = lowrank_add(None, c, gs, bs, scales) if need_u else None
    # A list input's gradient is a list, None per element not needed (a bare None breaks torch.library's
    # check that the gradients have the inputs' structure).
    g_bs = list(lowrank_grads(c, gs, u, scales).unbind(0)) if _any(need_bs) else [None] * len(bs)
    g_c = lowrank_add(None, u, bs, gs, scales) if need_c else None
    # s_j multiplies out[j] = (u bs[j]^T)^T c: its gradient is <g[j], out[j] at s_j = 1>.
    g_scales = _scale_grads(lowrank_grads(u, bs, c, None), gs) if scales is not None and need_scales else None
    return g_u, g_bs, g_c, g_scales


def _all(flag) -> bool:
    """`needs_input_grad` of a list input: every element's flag."""
    return all(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _any(flag) -> bool:
    """`needs_input_grad` of a list input: one flag, or one per element."""
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


lowrank_add.register_autograd(_add_backward, setup_context=_add_setup)
lowrank_grads.register_autograd(_grads_backward, setup_context=_grads_setup)

# lowrank_add's backward as one operation (_add_backward takes it where it can): after the two operations,
# which its own gradients are.
from . import _lowrank_backward  # noqa: E402


def products(base: Optional[torch.Tensor], x: torch.Tensor, hs: list[torch.Tensor], ds: list[torch.Tensor],
             scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`base + sum_j s_j (x hs[j]^T) ds[j]`: through the kernel where `kernel_reason` allows, else
    batched PyTorch products (which autograd differentiates as they are)."""
    if add_kernel_reason(x, len(hs), hs[0].shape[1]) is None:
        return lowrank_add(base, x, list(hs), list(ds), scales)
    return _add_batched(base, x, hs, ds, scales)


def compiled_report() -> list[str]:
    """One line per kernel variant compiled for a GPU in this process (registers, spills, shared memory,
    warps), as `_triton_targets.compiled_report`; empty in the interpreter or before any launch."""
    if _MODULE is None or _DEFINED_INTERPRETED:
        return []
    return _triton_targets.kernel_cache_report(_MODULE, ("lowrank_add_kernel", "lowrank_grads_kernel",
                                                         "lowrank_backward_kernel", "lowrank_pairs_kernel"))


def compile_for_target(kind: str, dtype: torch.dtype, n: int, s: int, i: int, o: int, factors: int, *,
                       has_base: bool = True, arch: int = 90, num_warps: int = 0):
    """One variant of `lowrank_add_kernel` (kind "add"), `lowrank_grads_kernel` ("grads"),
    `lowrank_backward_kernel` ("backward") or `lowrank_pairs_kernel` ("pairs") compiled by `triton.compile`
    for an NVIDIA GPU of compute capability `arch`, on a machine without one (the interpreter must be off),
    at `num_warps` (0: WARPS, as launched) and STAGES: for `benchmarks/kernel_registers.py`'s register and
    spill report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _module()
    blocks = dict(BN=_pad(n), BS=_pad(s), BK=_chunk(i), BO=_chunk(o), J=factors, PRECISION=_precision(dtype),
                  ONE_LOOP=_one_loop(dtype, n, s, factors))
    if kind == "add":
        fn, consts, lists = module.lowrank_add_kernel, dict(blocks, HAS_BASE=has_base, HAS_SCALES=True), ("hs", "ds")
    elif kind == "grads":
        fn, consts, lists = module.lowrank_grads_kernel, dict(blocks, HAS_SCALES=True), ("bs",)
    elif kind == "backward":
        fn, lists = module.lowrank_backward_kernel, ("hs", "ds")
        consts = dict(blocks, BK=_lowrank_backward.FUSED_CHUNK, BO=_lowrank_backward.FUSED_CHUNK, HAS_SCALES=True)
    elif kind == "pairs":
        fn, lists = module.lowrank_pairs_kernel, ("fa", "fb")
        consts = {**{k: v for k, v in blocks.items() if k != "BK"}, "BI": blocks["BK"], "HAS_BASE_U": has_base,
                  "HAS_BASE_V": has_base, "HAS_SCALES": True, "WANT_V": True}
    else:
        raise ValueError(f"kind must be 'add', 'grads', 'backward' or 'pairs', got {kind!r}")
    pointer = {torch.float32: "*fp32", torch.float64: "*fp64"}[dtype]
    signature = _triton_targets.kernel_signature(fn, consts, module._RUNTIME_INTS, dtype,
                                             {name: (pointer,) * factors for name in lists})
    source = ASTSource(fn, signature=signature, constexprs=consts)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps or WARPS, "num_stages": STAGES})


__all__ = ["KERNELS", "LANGUAGE", "add_kernel_reason", "compile_for_target", "compiled_report", "kernel_reason",
           "language", "lowrank_add", "lowrank_grads", "products"]
