"""lowrank_add's backward in x and its factors as one operation, `fastmaml::lowrank_backward`, with its
Triton kernel (`_triton_lowrank.lowrank_backward_kernel`): the factored backend's meta-gradient runs it
where x and every factor need a gradient and the rates none (`_lowrank._add_backward`).

With the output gradient g [T, N, O], x [T, N, I], hs[j] [T, S, I], ds[j] [T, S, O] and scales s [J]:

    e_j = s_j g ds[j]^T,  c_j = s_j x hs[j]^T        ([N, S] per task, each made once)
    g_x = sum_j e_j hs[j],  g_hs[j] = e_j^T x,  g_ds[j] = c_j^T g

the three products `(lowrank_add(None, g, ds, hs, s), lowrank_grads(g, ds, x, s), lowrank_grads(x, hs, g, s))`
of `_lowrank.py`, which its own gradients are again (differentiable to any order). Everything it shares
with the two operations (where the kernels run, their precision, warps and padding) is read from
`_lowrank` at call time.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._switches import env_choice
from . import _lowrank as lr

# FASTMAML_FACTORED_FUSED_BACKWARD (read once, at import): "1" (the default) takes lowrank_add's backward
# as one operation (`lowrank_backward`) where x and every factor need a gradient and the scales none; "0"
# keeps the three operations (one lowrank_add, two lowrank_grads) for the GPU check's A/B (`fbwd3`).
# Per task at K=5, W=128 (operations logged on the CPU, each counted as a kernel that reads its inputs and
# writes its outputs once): the low-rank kernels' launches 36 -> 18 a chunk of tasks, their bytes 1,439 ->
# 1,044 KB, the meta-iteration's 4,232 -> 3,736 KB (benchmarks/RESULTS.md). The kernel reads g and the h
# factors a second time (a task's own rows, just read), which that count leaves out.
FUSED_BACKWARD = env_choice("FASTMAML_FACTORED_FUSED_BACKWARD", ("1", "0")) == "1"
# The fused kernel holds the J products e_j and c_j in registers, and each e_j in the two layouts of its
# two products. In chunks of 32 that took 168 registers at one factor pair of 16 x 16 padded points and
# spilled from four (ptxas -v, sm_90a, float32, 4 warps, I = O = 128); in chunks of 16 it takes 72 at one
# pair and 154 at five, without spills (the three kernels it replaces: 56 to 152 in chunks of 32). Past
# these padded elements over all pairs the three kernels run instead: in float32 five pairs of 16 x 16
# points, or one of 32 x 32 (168 registers); in float64 three of 16 x 16 (212 registers; four took 255
# and spilled); in float32 with FASTMAML_FACTORED_PRECISION=tf32x3 three of 16 x 16 (128, 207 and 255
# registers at one to three pairs; four spilled).
FUSED_CHUNK = 16
FUSED_MAX_TILES = {torch.float32: 1280, torch.float64: 768, "tf32x3": 768}


def _fused_max_tiles(dtype: torch.dtype) -> int:
    """FUSED_MAX_TILES for the products of `dtype` as they run (PRECISION)."""
    return FUSED_MAX_TILES["tf32x3" if dtype == torch.float32 and lr._precision(dtype) == "tf32x3" else dtype]


def _backward_batched(g, x, hs, ds, scales):
    """`(g_x, g_hs [J, T, S, I], g_ds [J, T, S, O])` with each factor's two `[N, S]` products made once:
    e_j = s_j g ds_j^T and c_j = s_j x hs_j^T; g_x = sum_j e_j hs_j, g_hs_j = e_j^T x, g_ds_j = c_j^T g."""
    g_x, g_hs, g_ds = None, [], []
    for j, (h, d) in enumerate(zip(hs, ds)):
        e = torch.bmm(g, d.transpose(1, 2))  # [T, N, S]
        c = torch.bmm(x, h.transpose(1, 2))
        if scales is not None:
            e, c = e * scales[j], c * scales[j]
        g_x = torch.bmm(e, h) if g_x is None else torch.baddbmm(g_x, e, h)
        g_hs.append(torch.bmm(e.transpose(1, 2), x))
        g_ds.append(torch.bmm(c.transpose(1, 2), g))
    return g_x, torch.stack(g_hs), torch.stack(g_ds)


def _backward_impl(g, x, hs, ds, scales):
    """lowrank_backward's value: g [T, N, O], x [T, N, I], hs[j] [T, S, I], ds[j] [T, S, O], scales [J] or
    None -> (g_x [T, N, I], g_hs [J, T, S, I], g_ds [J, T, S, O]); the fused kernel where it runs and holds
    the pairs, the three kernels past its bound, the batched products elsewhere."""
    T, N, I = x.shape
    J, S, O = len(hs), hs[0].shape[1], g.shape[2]
    if lr.kernel_reason(x, J, S) is not None:
        return _backward_batched(g, x, hs, ds, scales)
    if J * lr._pad(N) * lr._pad(S) > _fused_max_tiles(x.dtype):
        # Past what the fused kernel holds in registers: the three kernels, the same numbers.
        return (lr._add_impl(None, g, ds, hs, scales), lr._grads_impl(g, ds, x, scales),
                lr._grads_impl(x, hs, g, scales))
    g, x = g.contiguous(), x.contiguous()
    hs = tuple(h.contiguous() for h in hs)
    ds = tuple(d.contiguous() for d in ds)
    g_x, g_hs, g_ds = x.new_empty(T, N, I), x.new_empty(J, T, S, I), x.new_empty(J, T, S, O)
    if T > 0:
        scales_ = scales.contiguous() if scales is not None else g_x
        with lr._device_guard(x):
            lr._module().lowrank_backward_kernel[(T,)](
                g, x, hs, ds, scales_, g_x, g_hs, g_ds, T, N, S, I, O, J=J, HAS_SCALES=scales is not None,
                PRECISION=lr._precision(x.dtype), ONE_LOOP=lr._one_loop(x.dtype, N, S, J), BN=lr._pad(N),
                BS=lr._pad(S), BK=FUSED_CHUNK, BO=FUSED_CHUNK, num_warps=lr.WARPS, num_stages=lr.STAGES,
            )
    return g_x, g_hs, g_ds


@torch.library.custom_op("fastmaml::lowrank_backward", mutates_args=())
def lowrank_backward(g: torch.Tensor, x: torch.Tensor, hs: list[torch.Tensor], ds: list[torch.Tensor],
                     scales: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lowrank_add's gradients in x, hs and ds for its output's gradient g [T, N, O], in one operation:
    `(lowrank_add(None, g, ds, hs, s), lowrank_grads(g, ds, x, s), lowrank_grads(x, hs, g, s))`, shapes
    [T, N, I], [J, T, S, I] and [J, T, S, O]."""
    return _backward_impl(g, x, hs, ds, scales)


@lowrank_backward.register_fake
def _backward_fake(g, x, hs, ds, scales):
    J, T, N = len(hs), x.shape[0], x.shape[1]
    S, I, O = hs[0].shape[1], x.shape[2], g.shape[2]
    return x.new_empty(T, N, I), x.new_empty(J, T, S, I), x.new_empty(J, T, S, O)


def _backward_setup(ctx, inputs, output):
    g, x, hs, ds, scales = inputs
    ctx.has_scales = scales is not None
    ctx.save_for_backward(g, x, *hs, *ds, *([scales] if scales is not None else []))
    # An output no loss reaches gets None, not zeros: its three products are then skipped (materialised
    # zeros ran all nine whatever was used).
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, a, b, c):
    """The gradients of `(g_x, g_hs, g_ds)` (cotangents a [T, N, I], b [J, T, S, I], c [J, T, S, O]) in
    g, x, hs and ds, as lowrank_add and lowrank_grads (differentiable again). The scales take none: the
    fused backward runs only where they need none."""
    g, x, *rest = ctx.saved_tensors
    scales = rest.pop() if ctx.has_scales else None
    J = len(rest) // 2
    hs, ds = list(rest[:J]), list(rest[J:])
    need_g, need_x, need_hs, need_ds, need_scales = ctx.needs_input_grad
    if scales is not None and need_scales:
        raise RuntimeError("lowrank_backward: no gradient for the scales (_add_backward keeps them apart)")
    bs = list(b.unbind(0)) if b is not None else None
    cs = list(c.unbind(0)) if c is not None else None
    need_hs, need_ds = lr._any(need_hs), lr._any(need_ds)
    # Each input's gradient: a term from each output whose cotangent is not None (an output no loss reaches
    # gets None: _backward_setup's set_materialize_grads(False)), where the input needs a gradient.
    terms = {"g": [], "x": [], "hs": [], "ds": []}
    wanted = {"g": need_g, "x": need_x, "hs": need_hs, "ds": need_ds}

    def add(name, make):
        if wanted[name]:
            terms[name].append(make())

    if a is not None:  # g_x = sum_j s_j (g ds_j^T) hs_j
        add("g", lambda: lr.lowrank_add(None, a, hs, ds, scales))
        add("ds", lambda: lr.lowrank_grads(a, hs, g, scales))
        add("hs", lambda: lr.lowrank_grads(g, ds, a, scales))
    if bs is not None:  # g_hs_j = s_j (ds_j g^T) x
        add("g", lambda: lr.lowrank_add(None, x, bs, ds, scales))
        add("x", lambda: lr.lowrank_add(None, g, ds, bs, scales))
        add("ds", lambda: lr.lowrank_grads(x, bs, g, scales))
    if cs is not None:  # g_ds_j = s_j (hs_j x^T) g
        add("g", lambda: lr.lowrank_add(None, x, hs, cs, scales))
        add("x", lambda: lr.lowrank_add(None, g, cs, hs, scales))
        add("hs", lambda: lr.lowrank_grads(g, cs, x, scales))
    total = {name: functools.reduce(torch.add, ts) if ts else None for name, ts in terms.items()}
    return (total["g"], total["x"],
            [None] * J if total["hs"] is None else list(total["hs"].unbind(0)),
            [None] * J if total["ds"] is None else list(total["ds"].unbind(0)), None)


lowrank_backward.register_autograd(_backward_backward, setup_context=_backward_setup)
