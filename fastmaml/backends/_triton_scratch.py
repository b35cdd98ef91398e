"""The Triton kernels in the scratch layout: the same operations and formulas as `_triton_kernels.py`,
with every block that a matrix product reads kept in a per-program scratch in global memory instead of
in registers, and every product a runtime loop over chunks.

Why a second layout. In the register layout each product `tl.dot` of a `[BN, 128] x [128, 128]` block is
unrolled into every thread's full rows along K: the width-128 backward kernel is tens of thousands of
FMA instructions long and ptxas gives up on it (32 registers, tens of KiB of spills a thread, see
benchmarks/RESULTS.md). Here a product is a runtime loop whose body is one `[BN, KC] x [KC, BND]` dot
(activations out, reduced over chunks of KC) or one `[RC, BN] x [BN, BDI]` dot (a parameter-sized
gradient out, by chunks of RC rows, each finished in place: the SGD step, the adjoint's update, the
sums); its code is that body once. The price is a store and a block barrier where the register layout
kept a block in registers; the blocks are small (`[16, 128]` float32 is 8 KiB) and should stay in L1 /
L2 (not yet measured on a GPU).

Scratch per program: `work` / `vbuf` as in the register layout (theta_k, the adjoint) and `acts`,
`NSLOT` slots of `[BNM, BW]` (the most points, the widest padded width): per layer the support pass's
inputs `H`, output gradients `D`, tanh's pre-derivative gradients `BP`, the tangents' products' inputs
`T` and the tangents `RZ`, the query pass's inputs `HQ`; then the softmax `PS`, the HVP's running `RD`
and the query's running gradient `DQ`. Every slot is written as the whole padded block it is read as
(padding zero where the register layout has zeros, as `_triton_kernels.py` explains).

Selected by `triton_maml.LAYOUT` (FASTMAML_TRITON_LAYOUT): `auto` takes this layout from a padded width
of 128 up.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_kernels import _RUNTIME_INTS, _loss_grad, _loss_hvp
from ._triton_pieces import (_act, _copy, _accumulate, _dmul, _ddact, _layer_offsets, _load_points, _load_targets,
                             _store_points, _zero)
from ._triton_products import SCRATCH_PRECISION as PRECISION

# Slot kinds in `acts` (per layer: kind * DEPTH + layer; then the single slots PS, RD, DQ). Globals that
# jit code reads must be `tl.constexpr` values.
_H, _D, _BP, _T, _RZ, _HQ = (tl.constexpr(i) for i in range(6))
_PS, _RD, _DQ = (tl.constexpr(i) for i in range(6, 9))


def n_slots(depth: int) -> int:
    """Slots of `acts` a program needs for a net of `depth` layers."""
    return 6 * depth + 3


# ---------------------------------------------------------------------------------------------------
# Blocks in scratch and the two kinds of product
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _slot(acts, kind: tl.constexpr, layer: tl.constexpr, DEPTH: tl.constexpr, SLOT: tl.constexpr):
    """Pointer to slot `kind` of `layer` (kind >= 6: the single slots, layer ignored)."""
    if kind < 6:
        p = acts + (kind * DEPTH + layer) * SLOT
    else:
        p = acts + (6 * DEPTH + kind - 6) * SLOT
    return p


@triton.jit
def _get(s, BN: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr):
    """The `[BN, BD]` block of slot `s` (row stride BW)."""
    r = tl.arange(0, BN)
    c = tl.arange(0, BD)
    return tl.load(s + r[:, None] * BW + c[None, :])


@triton.jit
def _put(s, val, BN: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr):
    """Store `val [BN, BD]` in slot `s`, with a block barrier before (no thread still reads the slot's
    previous block) and after (every thread sees the new one)."""
    r = tl.arange(0, BN)
    c = tl.arange(0, BD)
    tl.debug_barrier()
    tl.store(s + r[:, None] * BW + c[None, :], val)
    tl.debug_barrier()


@triton.jit
def _rows_mm(a, b, b2, sk, sn, KD, ND, BN: tl.constexpr, BK: tl.constexpr, BND: tl.constexpr,
             BW: tl.constexpr, MUL: tl.constexpr, KC: tl.constexpr):
    """`A [BN, BK] @ B [BK, BND]` with A the slot `a` and `B[k, n] = b[k * sk + n * sn]` (zero outside
    `KD x ND`), times `b2` at the same offsets where MUL (the tangents' `lr * v`). Reduced over K in
    chunks of KC, in K order, in a runtime loop."""
    C: tl.constexpr = BK if BK < KC else KC
    r = tl.arange(0, BN)
    kk = tl.arange(0, C)
    n = tl.arange(0, BND)
    acc = tl.zeros([BN, BND], dtype=a.dtype.element_ty)
    # num_stages=1: no software pipelining of the loads; the pipelined loop's buffers made the width-128
    # backward spill more (ptxas -v, sm_90, 8 warps, chunks of 16: 592 / 1,876 B a thread against 136 /
    # 168 without), and the scratch should be cache-resident. loop_unroll_factor=1: one copy of the body.
    # Up to KD, not BK: a chunk wholly past the real sum adds only zeros (B is masked there), so the loop
    # stops at the last chunk that holds part of it (W=40, padded 64: 3 chunks of 16, not 4).
    for k0 in tl.range(0, KD, C, loop_unroll_factor=1, num_stages=1):
        ks = k0 + kk
        at = tl.load(a + r[:, None] * BW + ks[None, :])
        mask = (ks < KD)[:, None] & (n < ND)[None, :]
        off = ks[:, None] * sk + n[None, :] * sn
        bt = tl.load(b + off, mask=mask, other=0.0)
        if MUL:
            bt = bt * tl.load(b2 + off, mask=mask, other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _grad_tile(a, h, a2, h2, TWO: tl.constexpr, o0, BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
               BW: tl.constexpr, RC: tl.constexpr):
    """Rows `o0 .. o0 + R` of a layer's weight gradient `A^T H` (`[R, BI]`, plus `A2^T H2` where TWO) and
    of its bias gradient `sum_n A[n, :]` (`[R]`), A and H slots of `[BN, BO]` and `[BN, BI]`."""
    R: tl.constexpr = BO if BO < RC else RC
    r = tl.arange(0, BN)
    o = o0 + tl.arange(0, R)
    c = tl.arange(0, BI)
    at = tl.load(a + r[:, None] * BW + o[None, :])
    gw = tl.dot(tl.trans(at), tl.load(h + r[:, None] * BW + c[None, :]), input_precision=PRECISION,
                out_dtype=at.dtype)
    if TWO:
        at2 = tl.load(a2 + r[:, None] * BW + o[None, :])
        gw = tl.dot(tl.trans(at2), tl.load(h2 + r[:, None] * BW + c[None, :]), gw, input_precision=PRECISION,
                    out_dtype=at.dtype)
    gb = tl.sum(at, axis=0)
    return gw, gb


@triton.jit
def _tile_offsets(off, o0, DO, DI, BO: tl.constexpr, BI: tl.constexpr, RC: tl.constexpr):
    """Offsets and masks of weight rows `o0 .. o0 + R` (`[R, BI]`) and of their biases (`[R]`)."""
    R: tl.constexpr = BO if BO < RC else RC
    o = o0 + tl.arange(0, R)
    c = tl.arange(0, BI)
    wo = off + o[:, None] * DI + c[None, :]
    wm = (o[:, None] < DO) & (c[None, :] < DI)
    return wo, wm, off + DO * DI + o, o < DO


@triton.jit
def _support_grad(a, h, off, DO, DI, cur, nxt, lrk, v, glr, UPDATE, ACC_LR, BN: tl.constexpr, BO: tl.constexpr,
                  BI: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr):
    """One layer's support gradient g = (A^T H, sum A), finished in place: where UPDATE the SGD step
    `nxt = cur - lrk * g`; where ACC_LR `glr -= g * v`; neither: nothing (the reverse sweep without
    rate gradients needs only the pass's blocks)."""
    R: tl.constexpr = BO if BO < RC else RC
    if UPDATE | ACC_LR:
        for o0 in tl.range(0, DO, R, loop_unroll_factor=1, num_stages=1):  # rows past DO: not stored
            gw, gb = _grad_tile(a, h, a, h, False, o0, BN, BO, BI, BW, RC)
            wo, wm, bo, bm = _tile_offsets(off, o0, DO, DI, BO, BI, RC)
            if UPDATE:
                tl.store(nxt + wo, tl.load(cur + wo, mask=wm) - tl.load(lrk + wo, mask=wm) * gw, mask=wm)
                tl.store(nxt + bo, tl.load(cur + bo, mask=bm) - tl.load(lrk + bo, mask=bm) * gb, mask=bm)
            if ACC_LR:
                tl.store(glr + wo, tl.load(glr + wo, mask=wm) - gw * tl.load(v + wo, mask=wm), mask=wm)
                tl.store(glr + bo, tl.load(glr + bo, mask=bm) - gb * tl.load(v + bo, mask=bm), mask=bm)


@triton.jit
def _hvp_grad(a, h, a2, h2, TWO: tl.constexpr, off, DO, DI, v_in, v_out, BN: tl.constexpr, BO: tl.constexpr,
              BI: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr):
    """`v_out = v_in - H u` for one layer, `H u = (A^T H [+ A2^T H2], sum A)`."""
    R: tl.constexpr = BO if BO < RC else RC
    for o0 in tl.range(0, DO, R, loop_unroll_factor=1, num_stages=1):  # rows past DO: not stored
        gw, gb = _grad_tile(a, h, a2, h2, TWO, o0, BN, BO, BI, BW, RC)
        wo, wm, bo, bm = _tile_offsets(off, o0, DO, DI, BO, BI, RC)
        tl.store(v_out + wo, tl.load(v_in + wo, mask=wm) - gw, mask=wm)
        tl.store(v_out + bo, tl.load(v_in + bo, mask=bm) - gb, mask=bm)


@triton.jit
def _add_grad(a, h, off, DO, DI, acc, BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BW: tl.constexpr,
              RC: tl.constexpr):
    """`acc += (A^T H, sum A)` for one layer."""
    R: tl.constexpr = BO if BO < RC else RC
    for o0 in tl.range(0, DO, R, loop_unroll_factor=1, num_stages=1):  # rows past DO: not stored
        gw, gb = _grad_tile(a, h, a, h, False, o0, BN, BO, BI, BW, RC)
        wo, wm, bo, bm = _tile_offsets(off, o0, DO, DI, BO, BI, RC)
        tl.store(acc + wo, tl.load(acc + wo, mask=wm) + gw, mask=wm)
        tl.store(acc + bo, tl.load(acc + bo, mask=bm) + gb, mask=bm)


@triton.jit
def _bias(base, off, DO, DI, BO: tl.constexpr):
    r = tl.arange(0, BO)
    return tl.load(base + off + DO * DI + r, mask=r < DO, other=0.0)


# ---------------------------------------------------------------------------------------------------
# The passes of one task
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _forward(wb, offs, dims, pads, acts, KIND: tl.constexpr, BN: tl.constexpr, DEPTH: tl.constexpr,
             ACT: tl.constexpr, BW: tl.constexpr, SLOT: tl.constexpr, KC: tl.constexpr):
    """The MLP at `wb` on the points in slot (KIND, 0); stores each hidden layer's output in slot
    (KIND, i + 1) and returns the output `z_L` (registers)."""
    for i in tl.static_range(DEPTH):
        z = _rows_mm(_slot(acts, KIND, i, DEPTH, SLOT), wb + offs[i], wb, 1, dims[i], dims[i], dims[i + 1],
                     BN, pads[i], pads[i + 1], BW, False, KC)
        z += _bias(wb, offs[i], dims[i + 1], dims[i], pads[i + 1])[None, :]
        if i < DEPTH - 1:
            _put(_slot(acts, KIND, i + 1, DEPTH, SLOT), _act(z, ACT), BN, pads[i + 1], BW)
        else:
            out = z
    return out


@triton.jit
def _support_pass(cur, nxt, lrk, v, glr, y, N, offs, dims, pads, UPDATE, ACC_LR, acts,
                  BN: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr,
                  BW: tl.constexpr, SLOT: tl.constexpr, KC: tl.constexpr, RC: tl.constexpr):
    """Forward and backward pass of the support loss at `cur` (the points in slot H[0]). Where UPDATE:
    `nxt = cur - lrk * g`; where ACC_LR: `glr -= g * v`. Leaves in scratch what the Hessian-vector
    product needs: H (each layer's input), D (dloss/dz of each layer), BP (tanh: `D[i] W_i`) and PS
    (`_loss_grad`'s p)."""
    out = _forward(cur, offs, dims, pads, acts, _H, BN, DEPTH, ACT, BW, SLOT, KC)
    loss, d, p = _loss_grad(out, y, N, dims[DEPTH], BN, pads[DEPTH], LOSS)
    _put(_slot(acts, _PS, 0, DEPTH, SLOT), p, BN, pads[DEPTH], BW)
    _put(_slot(acts, _D, DEPTH - 1, DEPTH, SLOT), d, BN, pads[DEPTH], BW)
    for i in tl.static_range(DEPTH - 1, -1, -1):
        a = _slot(acts, _D, i, DEPTH, SLOT)
        h = _slot(acts, _H, i, DEPTH, SLOT)
        _support_grad(a, h, offs[i], dims[i + 1], dims[i], cur, nxt, lrk, v, glr, UPDATE, ACC_LR,
                      BN, pads[i + 1], pads[i], BW, RC)
        if i > 0:
            bp = _rows_mm(a, cur + offs[i], cur, dims[i], 1, dims[i + 1], dims[i], BN, pads[i + 1], pads[i],
                          BW, False, KC)
            if ACT == 1:
                _put(_slot(acts, _BP, i - 1, DEPTH, SLOT), bp, BN, pads[i], BW)
            d = _dmul(bp, _get(h, BN, pads[i], BW), ACT)
            _put(_slot(acts, _D, i - 1, DEPTH, SLOT), d, BN, pads[i], BW)


@triton.jit
def _hvp_update(cur, lrk, v_in, v_out, N, offs, dims, pads, acts,
                BN: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr,
                BW: tl.constexpr, SLOT: tl.constexpr, KC: tl.constexpr, RC: tl.constexpr):
    """`v_out = v_in - H u` with `u = lrk * v_in`, H the Hessian of the support loss at `cur`, from the
    support pass's slots; returns `-d/dx (g . u)`, `[BN, BD0]` (registers)."""
    # Tangents forward: RZ[i] = R z of layer i; T[i] = RZ[i-1] s'(H[i]), the input of W_i's product.
    for i in tl.static_range(DEPTH):
        h = _slot(acts, _H, i, DEPTH, SLOT)
        rz = _rows_mm(h, lrk + offs[i], v_in + offs[i], 1, dims[i], dims[i], dims[i + 1], BN, pads[i],
                      pads[i + 1], BW, True, KC)
        rz += (_bias(lrk, offs[i], dims[i + 1], dims[i], pads[i + 1])
               * _bias(v_in, offs[i], dims[i + 1], dims[i], pads[i + 1]))[None, :]
        if i > 0:
            t = _slot(acts, _T, i, DEPTH, SLOT)
            _put(t, _dmul(_get(_slot(acts, _RZ, i - 1, DEPTH, SLOT), BN, pads[i], BW),
                          _get(h, BN, pads[i], BW), ACT), BN, pads[i], BW)
            rz += _rows_mm(t, cur + offs[i], cur, 1, dims[i], dims[i], dims[i + 1], BN, pads[i], pads[i + 1],
                           BW, False, KC)
        if i < DEPTH - 1:
            _put(_slot(acts, _RZ, i, DEPTH, SLOT), rz, BN, pads[i + 1], BW)
    # Tangents backward: H u layer by layer, RD the running R(dloss/dz).
    rdp = _slot(acts, _RD, 0, DEPTH, SLOT)
    p = _get(_slot(acts, _PS, 0, DEPTH, SLOT), BN, pads[DEPTH], BW)
    _put(rdp, _loss_hvp(rz, p, N, dims[DEPTH], BN, pads[DEPTH], LOSS), BN, pads[DEPTH], BW)
    for i in tl.static_range(DEPTH - 1, -1, -1):
        h = _slot(acts, _H, i, DEPTH, SLOT)
        d = _slot(acts, _D, i, DEPTH, SLOT)
        _hvp_grad(rdp, h, d, _slot(acts, _T, i, DEPTH, SLOT), i > 0, offs[i], dims[i + 1], dims[i],
                  v_in, v_out, BN, pads[i + 1], pads[i], BW, RC)
        back = _rows_mm(rdp, cur + offs[i], cur, dims[i], 1, dims[i + 1], dims[i], BN, pads[i + 1], pads[i],
                        BW, False, KC)
        back += _rows_mm(d, lrk + offs[i], v_in + offs[i], dims[i], 1, dims[i + 1], dims[i], BN, pads[i + 1],
                         pads[i], BW, True, KC)
        if i > 0:
            hi = _get(h, BN, pads[i], BW)
            rd_next = _dmul(back, hi, ACT)
            if ACT == 1:
                rd_next += (_get(_slot(acts, _BP, i - 1, DEPTH, SLOT), BN, pads[i], BW) * _ddact(hi, ACT)
                            * _get(_slot(acts, _RZ, i - 1, DEPTH, SLOT), BN, pads[i], BW))
            _put(rdp, rd_next, BN, pads[i], BW)
        else:
            gx = -back
    return gx


@triton.jit
def _backprop_accumulate(acc, wb, offs, dims, pads, acts, BN: tl.constexpr, DEPTH: tl.constexpr,
                         ACT: tl.constexpr, INPUT_GRAD: tl.constexpr, BW: tl.constexpr, SLOT: tl.constexpr,
                         KC: tl.constexpr, RC: tl.constexpr):
    """`acc += dtheta` of the network at `wb` on the query points (slots HQ) for the output gradient in
    slot DQ; returns the input gradient `[BN, BD0]` (zeros unless INPUT_GRAD)."""
    dq = _slot(acts, _DQ, 0, DEPTH, SLOT)
    for i in tl.static_range(DEPTH - 1, -1, -1):
        h = _slot(acts, _HQ, i, DEPTH, SLOT)
        _add_grad(dq, h, offs[i], dims[i + 1], dims[i], acc, BN, pads[i + 1], pads[i], BW, RC)
        if i > 0 or INPUT_GRAD:
            d = _rows_mm(dq, wb + offs[i], wb, dims[i], 1, dims[i + 1], dims[i], BN, pads[i + 1], pads[i], BW,
                         False, KC)
        if i > 0:
            _put(dq, _dmul(d, _get(h, BN, pads[i], BW), ACT), BN, pads[i], BW)
    if INPUT_GRAD:
        gx = d
    else:
        gx = tl.zeros([BN, pads[0]], dtype=acc.dtype.element_ty)
    return gx


# ---------------------------------------------------------------------------------------------------
# Kernels: the arguments of `_triton_kernels.py`'s, plus `acts` and the layout's constants
# ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def maml_fwd_kernel(
    theta, lr, xs, ys, xq, yq, qw,
    task_losses, preds, thetas_out,
    work, acts,                              # scratch [G, 2, P], [G, NSLOT, BNM * BW]
    T, NS, NQ, P, K, G,
    D0, D1, D2, D3, D4,
    DEPTH: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BD4: tl.constexpr,
    BNS: tl.constexpr, BNQ: tl.constexpr,
    ACT: tl.constexpr, LOSS: tl.constexpr, QUERY: tl.constexpr, BLOCK: tl.constexpr,
    BW: tl.constexpr, BNM: tl.constexpr, NSLOT: tl.constexpr, KC: tl.constexpr, RC: tl.constexpr,
):
    """`maml_fwd` (QUERY) or `maml_adapt` (not QUERY), as `_triton_kernels.maml_fwd_kernel`."""
    pid = tl.program_id(0)
    dims = (D0, D1, D2, D3, D4)
    pads: tl.constexpr = (BD0, BD1, BD2, BD3, BD4)
    SLOT: tl.constexpr = BNM * BW
    offs = _layer_offsets(D0, D1, D2, D3, D4, DEPTH)
    DL = dims[DEPTH]
    BDL: tl.constexpr = pads[DEPTH]
    pid64 = pid.to(tl.int64)
    wrk = work + pid64 * 2 * P
    ab = acts + pid64 * NSLOT * SLOT
    # disable_licm on the task and step loops: every slot's address block is loop-invariant, and hoisted
    # out of these loops they would be live all along (the width-128 backward, chunks of 16, 8 warps:
    # 136 / 168 B of spills a thread with them hoisted, none without).
    for t in tl.range(pid64, T, G, disable_licm=True):
        _copy(wrk, theta, P, BLOCK)
        _put(_slot(ab, _H, 0, DEPTH, SLOT), _load_points(xs + t * NS * D0, NS, D0, BNS, BD0), BNS, BD0, BW)
        if LOSS == 0:
            y = _load_targets(ys + t * NS * DL, NS, DL, BNS, BDL, LOSS)
        else:
            y = _load_targets(ys + t * NS, NS, DL, BNS, BDL, LOSS)
        if QUERY:
            _put(_slot(ab, _HQ, 0, DEPTH, SLOT), _load_points(xq + t * NQ * D0, NQ, D0, BNQ, BD0), BNQ, BD0, BW)
            if LOSS == 0:
                y_q = _load_targets(yq + t * NQ * DL, NQ, DL, BNQ, BDL, LOSS)
            else:
                y_q = _load_targets(yq + t * NQ, NQ, DL, BNQ, BDL, LOSS)
            total = tl.load(qw) * 0
        for k in tl.range(K + 1, disable_licm=True):
            cur = wrk + (k % 2) * P
            if QUERY:
                wk = tl.load(qw + k)
                if (wk != 0) | (k == K):
                    out_q = _forward(cur, offs, dims, pads, ab, _HQ, BNQ, DEPTH, ACT, BW, SLOT, KC)
                    lq, dq, pq = _loss_grad(out_q, y_q, NQ, DL, BNQ, BDL, LOSS)
                    total += wk * lq
                    if k == K:
                        _store_points(preds + t * NQ * DL, NQ, DL, out_q, BNQ, BDL)
            if k < K:
                _support_pass(cur, wrk + ((k + 1) % 2) * P, lr + k * P, cur, cur, y, NS, offs, dims, pads,
                              True, False, ab, BNS, DEPTH, ACT, LOSS, BW, SLOT, KC, RC)
            tl.debug_barrier()
        if QUERY:
            tl.store(task_losses + t, total)
        else:
            _copy(thetas_out + t * P, wrk + (K % 2) * P, P, BLOCK)
        tl.debug_barrier()


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def maml_bwd_kernel(
    theta, lr, xs, ys, xq, yq, qw, g_task_losses, g_preds,
    g_theta_part, g_lr_part, g_xs, g_xq,
    task_losses, preds,                      # outputs with OUTPUTS
    work, vbuf, acts,                        # scratch [G, K + 1, P], [G, 2, P], [G, NSLOT, BNM * BW]
    T, NS, NQ, P, K, G,
    D0, D1, D2, D3, D4,
    DEPTH: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BD4: tl.constexpr,
    BNS: tl.constexpr, BNQ: tl.constexpr,
    ACT: tl.constexpr, LOSS: tl.constexpr,
    FIRST_ORDER: tl.constexpr, NEED_LR: tl.constexpr, NEED_X: tl.constexpr, OUTPUTS: tl.constexpr,
    BLOCK: tl.constexpr,
    BW: tl.constexpr, BNM: tl.constexpr, NSLOT: tl.constexpr, KC: tl.constexpr, RC: tl.constexpr,
):
    """`maml_bwd`, as `_triton_kernels.maml_bwd_kernel` (one loop of 2K + 1 iterations per task; with
    OUTPUTS also `maml_fwd`'s outputs)."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    dims = (D0, D1, D2, D3, D4)
    pads: tl.constexpr = (BD0, BD1, BD2, BD3, BD4)
    SLOT: tl.constexpr = BNM * BW
    offs = _layer_offsets(D0, D1, D2, D3, D4, DEPTH)
    DL = dims[DEPTH]
    BDL: tl.constexpr = pads[DEPTH]
    wrk = work + pid64 * (K + 1) * P
    vb = vbuf + pid64 * 2 * P
    ab = acts + pid64 * NSLOT * SLOT
    g_theta_acc = g_theta_part + pid64 * P
    g_lr_acc = g_lr_part + pid64 * K * P
    _copy(wrk, theta, P, BLOCK)
    for t in tl.range(pid64, T, G, disable_licm=True):
        _put(_slot(ab, _H, 0, DEPTH, SLOT), _load_points(xs + t * NS * D0, NS, D0, BNS, BD0), BNS, BD0, BW)
        _put(_slot(ab, _HQ, 0, DEPTH, SLOT), _load_points(xq + t * NQ * D0, NQ, D0, BNQ, BD0), BNQ, BD0, BW)
        if LOSS == 0:
            y = _load_targets(ys + t * NS * DL, NS, DL, BNS, BDL, LOSS)
            y_q = _load_targets(yq + t * NQ * DL, NQ, DL, BNQ, BDL, LOSS)
        else:
            y = _load_targets(ys + t * NS, NS, DL, BNS, BDL, LOSS)
            y_q = _load_targets(yq + t * NQ, NQ, DL, BNQ, BDL, LOSS)
        c = tl.load(g_task_losses + t)
        gp = _load_points(g_preds + t * NQ * DL, NQ, DL, BNQ, BDL)
        gx_s = tl.zeros([BNS, BD0], dtype=gp.dtype)
        gx_q = tl.zeros([BNQ, BD0], dtype=gp.dtype)
        total = c * 0
        _zero(vb, P, BLOCK, gp.dtype)
        tl.debug_barrier()
        for j in tl.range(2 * K + 1, disable_licm=True):
            k = j - (j > K) * 2 * (j - K)
            cur = wrk + k * P
            if FIRST_ORDER:
                v_in = vb
                v_out = vb
            else:
                v_in = vb + ((j + K + 1) % 2) * P
                v_out = vb + ((j + K) % 2) * P
            # As in the register layout: no support pass in reverse steps that would not use it.
            support = j < K
            if NEED_LR or not FIRST_ORDER:
                support = support | (j > K)
            if support:
                _support_pass(cur, cur + P, lr + k * P, v_in, g_lr_acc + k * P, y, NS, offs, dims, pads,
                              j < K, NEED_LR and j > K, ab, BNS, DEPTH, ACT, LOSS, BW, SLOT, KC, RC)
            if not FIRST_ORDER:
                if j > K:
                    gx = _hvp_update(cur, lr + k * P, v_in, v_out, NS, offs, dims, pads, ab,
                                     BNS, DEPTH, ACT, LOSS, BW, SLOT, KC, RC)
                    if NEED_X:
                        gx_s += gx
            tl.debug_barrier()
            if j >= K:
                coef = c * tl.load(qw + k)
                if (coef != 0) | (j == K):
                    out_q = _forward(cur, offs, dims, pads, ab, _HQ, BNQ, DEPTH, ACT, BW, SLOT, KC)
                    lq, dq, pq = _loss_grad(out_q, y_q, NQ, DL, BNQ, BDL, LOSS)
                    if OUTPUTS:
                        total += tl.load(qw + k) * lq
                        if j == K:
                            _store_points(preds + t * NQ * DL, NQ, DL, out_q, BNQ, BDL)
                    _put(_slot(ab, _DQ, 0, DEPTH, SLOT), coef * dq + gp * (j == K).to(gp.dtype), BNQ, BDL, BW)
                    gx_q += _backprop_accumulate(v_out, cur, offs, dims, pads, ab, BNQ, DEPTH, ACT, NEED_X,
                                                 BW, SLOT, KC, RC)
                    tl.debug_barrier()
        _accumulate(g_theta_acc, vb + (K % 2) * (1 - FIRST_ORDER) * P, P, BLOCK)
        if NEED_X:
            _store_points(g_xs + t * NS * D0, NS, D0, gx_s, BNS, BD0)
            _store_points(g_xq + t * NQ * D0, NQ, D0, gx_q, BNQ, BD0)
        if OUTPUTS:
            tl.store(task_losses + t, total)
        tl.debug_barrier()
