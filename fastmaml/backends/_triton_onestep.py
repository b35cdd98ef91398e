"""The one-step kernel in Triton: `maml_onestep`'s math (csrc/task/onestep.h, docs/kernels.md) for a group
of tasks a program, the products with theta_0 as one matrix product over the group's points.

Every task starts from theta_0 and takes one step, so `W1_l = W_l - rW_l D_l^T H_l`: theta_1 is never formed.
A program takes BT tasks. Their points are one block `[BT, BN, BD]` (points padded to BN, widths to BD,
powers of two >= 16, the least `tl.dot` takes), so a product with the shared W_l is one `[BT BN, BD_in] x
[BD_in, BD_out]` `tl.dot` for all of them, and each task's own products (its `[Nq, Ns]` Gram matrices and
their corrections) one batched `tl.dot` over the group. Each pass keeps its activations in registers, as a
tuple indexed by the (unrolled) layer as in `_triton_kernels.py`; at second order the later passes read the
blocks already written to the factor rows back from there (`_get`, RELOAD) instead of keeping them live from
pass to pass, which cut the spills of the sinusoid call (sm_90, 8 warps) from 1.6 KiB a thread to 200 B.
Where the layers are wide (padded above 64: `_triton_onestep_call.chunk`), the products with the shared weights
and the Gram matrices read their blocks of points from the rows, a chunk of columns a loop step (`_wprod`,
`_gram`), instead of taking them whole from registers. The blocks' loads, stores and products are
`_triton_onestep_blocks.py`'s.

Padding: weights and inputs load as zero outside their real sizes, so padded feature columns stay zero; a
padded point's activations are not (the bias and the activation make them nonzero), but the three seeds of
backward passes (the support and query losses' gradients and the loss's Hessian along the tangent) are zero
on padded points, and every quantity that reaches an output through a padded point's column of a Gram matrix
is multiplied by such a seed's row. Stores are masked to the real tasks, points and columns.

The outputs are those of the C++ op (`_onestep`'s autograd function sums the factor rows): each task's query
loss and output, and with `FACTORS` the factor rows `U_l = [D' ; Ddot ; D]`, `V_l = [H' | 1 ; -H | -1 ; -Hdot
| 0]` of every layer (layer l's block `[T, R, D_{l+1}]` / `[T, R, D_l + 1]` at `T R sum_{j<l}`) and the rates'
gradients `[T, 2 L]`.

Imported only on first use: `triton.jit` reads `TRITON_INTERPRET` when a kernel is defined (tests without a
GPU run it in the interpreter on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._onestep import factor_rows
from ._triton_onestep_blocks import (_bmm, _bmm_tn, _block, _get, _gram, _load_block, _load_targets, _store_block,
                                     _store_column, _wprod)
from ._triton_pieces import _act, _ce_points, _dmul, _layer_offsets, _load_bias
from .triton_maml import _pad, _sizes


@triton.jit
def _loss(z, y, N, DL, LOSS: tl.constexpr):
    """Each task's loss at outputs `z [BT, BN, BD]` and its gradient in z (zero on padded points and columns).
    Returns `(loss [BT], dz, p)`, p the softmax for cross-entropy (its Hessian needs it), else z. mse:
    `mean (z - y)^2` over points and outputs; cross-entropy: the mean over points, a class out of range
    giving that point NaN (as the C++ kernels do)."""
    BN: tl.constexpr = z.shape[1]
    BD: tl.constexpr = z.shape[2]
    n = tl.arange(0, BN)[None, :, None]
    c = tl.arange(0, BD)[None, None, :]
    rows = n < N
    if LOSS == 0:
        scale = 1.0 / (N * DL).to(z.dtype)
        diff = tl.where(rows & (c < DL), z - y, 0.0)
        loss = tl.sum(tl.sum(diff * diff, axis=2), axis=1) * scale
        dz = diff * (2.0 * scale)
        p = z
    else:
        scale = 1.0 / N.to(z.dtype)
        point, grad, p = _ce_points(z, y, DL, c)
        loss = tl.sum(tl.where(tl.arange(0, BN)[None, :] < N, point, 0.0), axis=1) * scale
        dz = tl.where(rows, grad, 0.0) * scale
    return loss, dz, p


@triton.jit
def _loss_hvp(zd, p, N, DL, LOSS: tl.constexpr):
    """The loss's Hessian in z times `zd` (zero on padded points): mse `2 zd / (N DL)`; cross-entropy
    `(p zd - p (p . zd)) / N` a point at a time."""
    BN: tl.constexpr = zd.shape[1]
    BD: tl.constexpr = zd.shape[2]
    mask = (tl.arange(0, BN)[None, :, None] < N) & (tl.arange(0, BD)[None, None, :] < DL)
    if LOSS == 0:
        out = tl.where(mask, zd, 0.0) * (2.0 / (N * DL).to(zd.dtype))
    else:
        pz = p * zd
        out = tl.where(mask, pz - p * tl.sum(pz, axis=2)[:, :, None], 0.0) * (1.0 / N.to(zd.dtype))
    return out


_RUNTIME_INTS = ["T", "NS", "NQ", "D0", "D1", "D2", "D3", "D4"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def onestep_kernel(
    theta, rates, xs, ys, xq, yq, cot, g_pred, losses, preds, U, V, rate_grads,
    T, NS, NQ, D0, D1, D2, D3, D4,
    DEPTH: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr,
    BD4: tl.constexpr, BNS: tl.constexpr, BNQ: tl.constexpr, BT: tl.constexpr, ACT: tl.constexpr,
    LOSS: tl.constexpr, FIRST_ORDER: tl.constexpr, HAS_COT: tl.constexpr, HAS_GPRED: tl.constexpr,
    FACTORS: tl.constexpr, RELOAD: tl.constexpr, KC: tl.constexpr,
):
    """Tasks `pid BT .. pid BT + BT - 1` of one-step MAML. theta [P] is theta_0 (W_l [out, in], b_l [out]),
    rates [2 L] (rW_l, rb_l); xs [T, NS, D0], ys [T, NS, DL] (mse) or [T, NS] classes, the same for the
    query; cot [T] and g_pred [T, NQ, DL] seed the query backward where given (else 1 and none).

    Every block of the factor rows is written as soon as it is known. With RELOAD (second order, with factors:
    the rows then hold H, D, H' and D'; or in chunks without: the rows are scratch, and the kernel stops after
    the query pass) the later passes read those blocks back from the rows instead of keeping them in registers
    from pass to pass (`_get`), a barrier between a block's store and its loads.

    KC > 0 (with RELOAD; the wide layers): every product with a shared weight matrix, and every Gram matrix of
    two blocks of points, reads its blocks of points from the rows (or the inputs) KC columns at a time
    (`_wprod`, `_gram`), so each block is stored, and a barrier passed, before its first product, and a
    program never holds a whole weight matrix or a whole block of points as a product's operand."""
    t0 = tl.program_id(0) * BT
    dims = (D0, D1, D2, D3, D4)
    pads: tl.constexpr = (BD0, BD1, BD2, BD3, BD4)
    offs = _layer_offsets(D0, D1, D2, D3, D4, DEPTH)
    DL = dims[DEPTH]
    BDL: tl.constexpr = pads[DEPTH]
    tq = t0 + tl.arange(0, BT)
    # Rows a task (R), and where each layer's U and V blocks start (in rows of one element's width).
    R = NQ
    if not FIRST_ORDER:
        R = NQ + 2 * NS
    uos = (0,)
    vos = (0,)
    for l in tl.static_range(DEPTH):
        uos = uos + (uos[l] + dims[l + 1],)
        vos = vos + (vos[l] + dims[l] + 1,)

    # The support pass at theta_0: hs[l] is layer l's input [BT, BNS, BD_l] (hs[0] = xs).
    x = _load_block(xs, t0, T, NS, D0, BT, BNS, BD0)
    hs = (x,)
    z = x
    for l in tl.static_range(DEPTH):
        b = _load_bias(theta, offs[l], dims[l + 1], dims[l], pads[l + 1])
        if l == 0:
            z = _wprod(hs[l], xs, t0, T, NS, D0, 0, NS, False, theta, offs[l], dims[l + 1], dims[l], True, BT, BNS,
                       pads[l + 1], pads[l], KC)
        else:
            z = _wprod(hs[l], _block(V, T, R, vos[l]), t0, T, NS, dims[l] + 1, NQ, R, True, theta, offs[l],
                       dims[l + 1], dims[l], True, BT, BNS, pads[l + 1], pads[l], KC)
        z = z + b[None, None, :]
        if l < DEPTH - 1:
            h = _act(z, ACT)
            hs = hs + (h,)
            if KC > 0:
                # Rows NQ.. of V_{l+1}: [-H_{l+1} | -1], read by the next layer's product.
                vb = _block(V, T, R, vos[l + 1])
                _store_block(vb, t0, T, NS, dims[l + 1], dims[l + 1] + 1, NQ, R, -h, BT, BNS, pads[l + 1])
                _store_column(vb, t0, T, NS, dims[l + 1] + 1, NQ, R, dims[l + 1], -1.0, BT, BNS)
                tl.debug_barrier()
    y = _load_targets(ys, t0, T, NS, DL, BT, BNS, BDL, LOSS)
    _, d, p_s = _loss(z, y, NS, DL, LOSS)
    # ds[l] = D_l = dL_s/dz_l [BT, BNS, BD_{l+1}].
    ds = (d,)
    for l in tl.static_range(DEPTH - 1, 0, -1):
        ub = _block(U, T, R, uos[l])
        if KC > 0:
            # Rows NQ + NS.. of U_l: D_l, read by the product below.
            _store_block(ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ + NS, R, d, BT, BNS, pads[l + 1])
            tl.debug_barrier()
        e = _wprod(d, ub, t0, T, NS, dims[l + 1], NQ + NS, R, False, theta, offs[l], dims[l + 1], dims[l], False,
                   BT, BNS, pads[l + 1], pads[l], KC)
        h_s = _get(hs[l], _block(V, T, R, vos[l]), t0, T, NS, dims[l], dims[l] + 1, NQ, R, True, KC > 0, BT, BNS,
                   pads[l])
        d = _dmul(e, h_s, ACT)
        ds = (d,) + ds
    if (FACTORS or RELOAD) and not FIRST_ORDER:
        # Rows NQ + NS.. of U_l: D_l; rows NQ.. of V_l: [-H_l | -1] (with KC, those of layers above 0 are there).
        # RELOAD without FACTORS (the chunked form's rows as scratch): D_0 only, which the query pass reads back
        # (the kernel never reads -H_0: layer 0's products take xs itself).
        for l in tl.static_range(DEPTH):
            if KC == 0 or l == 0:
                ub = _block(U, T, R, uos[l])
                _store_block(ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ + NS, R, ds[l], BT, BNS, pads[l + 1])
                if FACTORS:
                    vb = _block(V, T, R, vos[l])
                    _store_block(vb, t0, T, NS, dims[l], dims[l] + 1, NQ, R, -hs[l], BT, BNS, pads[l])
                    _store_column(vb, t0, T, NS, dims[l] + 1, NQ, R, dims[l], -1.0, BT, BNS)
        if RELOAD:
            tl.debug_barrier()

    # The query pass at theta_1: z'_l = H'_l W_l^T + b1_l - rW_l ga_l D_l, ga_l = H'_l H_l^T [BT, BNQ, BNS],
    # b1_l = b_l - rb_l sum_n D_l[n] (sds[l], the sum).
    xqb = _load_block(xq, t0, T, NQ, D0, BT, BNQ, BD0)
    hq = (xqb,)
    gas = ()
    sds = ()
    zq = xqb
    for l in tl.static_range(DEPTH):
        rw = tl.load(rates + 2 * l)
        rb = tl.load(rates + 2 * l + 1)
        b = _load_bias(theta, offs[l], dims[l + 1], dims[l], pads[l + 1])
        ub = _block(U, T, R, uos[l])
        vb = _block(V, T, R, vos[l])
        d_s = _get(ds[l], ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ + NS, R, False, RELOAD, BT, BNS, pads[l + 1])
        # H'_l (xq, or rows 0.. of V_l) and H_l (xs, or rows NQ.. of V_l, negated) where KC reads them.
        if l == 0:
            ga = _gram(hq[l], hs[l], xq, D0, 0, NQ, NQ, False, xs, D0, 0, NS, NS, False, D0, t0, T, BT, BNQ, BNS,
                       KC)
            zq = _wprod(hq[l], xq, t0, T, NQ, D0, 0, NQ, False, theta, offs[l], dims[l + 1], dims[l], True, BT, BNQ,
                        pads[l + 1], pads[l], KC)
        else:
            if KC == 0:
                h_s = _get(hs[l], vb, t0, T, NS, dims[l], dims[l] + 1, NQ, R, True, RELOAD, BT, BNS, pads[l])
            else:
                h_s = hs[l]  # not read: _gram reads H_l from the rows
            ga = _gram(hq[l], h_s, vb, dims[l] + 1, 0, R, NQ, False, vb, dims[l] + 1, NQ, R, NS, True, dims[l], t0,
                       T, BT, BNQ, BNS, KC)
            zq = _wprod(hq[l], vb, t0, T, NQ, dims[l] + 1, 0, R, False, theta, offs[l], dims[l + 1], dims[l], True,
                        BT, BNQ, pads[l + 1], pads[l], KC)
        gas = gas + (ga,)
        sd = tl.sum(d_s, axis=1)
        sds = sds + (sd,)
        zq = zq + (b[None, :] - rb * sd)[:, None, :] - rw * _bmm(ga, d_s)
        if FACTORS and (KC == 0 or l == 0):
            # Rows 0.. of V_l: [H'_l | 1] (with KC, those of layers above 0 are there already).
            _store_block(vb, t0, T, NQ, dims[l], dims[l] + 1, 0, R, hq[l], BT, BNQ, pads[l])
            _store_column(vb, t0, T, NQ, dims[l] + 1, 0, R, dims[l], 1.0, BT, BNQ)
        if l < DEPTH - 1:
            h = _act(zq, ACT)
            hq = hq + (h,)
            if KC > 0:
                # Rows 0.. of V_{l+1}: [H'_{l+1} | 1], read by the next layer's products.
                vn = _block(V, T, R, vos[l + 1])
                _store_block(vn, t0, T, NQ, dims[l + 1], dims[l + 1] + 1, 0, R, h, BT, BNQ, pads[l + 1])
                _store_column(vn, t0, T, NQ, dims[l + 1] + 1, 0, R, dims[l + 1], 1.0, BT, BNQ)
                tl.debug_barrier()
    y = _load_targets(yq, t0, T, NQ, DL, BT, BNQ, BDL, LOSS)
    loss, dq, _ = _loss(zq, y, NQ, DL, LOSS)
    tl.store(losses + tq, loss, mask=tq < T)
    _store_block(preds, t0, T, NQ, DL, DL, 0, NQ, zq, BT, BNQ, BDL)
    # Without FACTORS the call wants the losses and outputs only: no query backward, no tangents.
    if FACTORS:
        if RELOAD and KC == 0:
            # (With KC the loop below stores D'_{L-1} and passes a barrier before its first read of the rows.)
            tl.debug_barrier()
        # D'_{L-1} = cot dL_q/dz' + g_pred, then D'_{l-1} = (D'_l W_l - rW_l gb_l H_l) s'(z'_{l-1}),
        # gb_l = D'_l D_l^T; rows 0.. of U_l: D'_l; sdqs[l] = sum_q D'_l[q].
        if HAS_COT:
            dq = dq * tl.load(cot + tq, mask=tq < T, other=0.0)[:, None, None]
        if HAS_GPRED:
            dq = dq + _load_block(g_pred, t0, T, NQ, DL, BT, BNQ, BDL)
        dqs = (dq,)
        gbs = ()
        sdqs = ()
        for l in tl.static_range(DEPTH - 1, -1, -1):
            ub = _block(U, T, R, uos[l])
            vb = _block(V, T, R, vos[l])
            _store_block(ub, t0, T, NQ, dims[l + 1], dims[l + 1], 0, R, dq, BT, BNQ, pads[l + 1])
            if KC > 0:
                tl.debug_barrier()  # D'_l, stored above, is read from the rows below
                d_s = ds[l]  # not read: _gram reads D_l from the rows
            else:
                d_s = _get(ds[l], ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ + NS, R, False, RELOAD, BT, BNS,
                           pads[l + 1])
            gb = _gram(dq, d_s, ub, dims[l + 1], 0, R, NQ, False, ub, dims[l + 1], NQ + NS, R, NS, False,
                       dims[l + 1], t0, T, BT, BNQ, BNS, KC)
            gbs = (gb,) + gbs
            sdqs = (tl.sum(dq, axis=1),) + sdqs
            if l > 0:
                rw = tl.load(rates + 2 * l)
                h_s = _get(hs[l], vb, t0, T, NS, dims[l], dims[l] + 1, NQ, R, True, RELOAD, BT, BNS, pads[l])
                h_q = _get(hq[l], vb, t0, T, NQ, dims[l], dims[l] + 1, 0, R, False, RELOAD, BT, BNQ, pads[l])
                e = _wprod(dq, ub, t0, T, NQ, dims[l + 1], 0, R, False, theta, offs[l], dims[l + 1], dims[l], False,
                           BT, BNQ, pads[l + 1], pads[l], KC)
                dq = _dmul(e - rw * _bmm(gb, h_s), h_q, ACT)
                dqs = (dq,) + dqs
        # The rates' gradients: dL/drW_l = -sum(gb_l * ga_l), dL/drb_l = -(sum_n D_l[n]) . (sum_q D'_l[q]).
        for l in tl.static_range(DEPTH):
            gw = -tl.sum(tl.sum(gbs[l] * gas[l], axis=2), axis=1)
            gbias = -tl.sum(sds[l] * sdqs[l], axis=1)
            tl.store(rate_grads + tq.to(tl.int64) * (2 * DEPTH) + 2 * l, gw, mask=tq < T)
            tl.store(rate_grads + tq.to(tl.int64) * (2 * DEPTH) + 2 * l + 1, gbias, mask=tq < T)

        if not FIRST_ORDER:
            if RELOAD and KC == 0:
                # (With KC every D'_l the loop above stored was followed by a barrier.)
                tl.debug_barrier()
            # The tangents along R v at theta_0: z_dot_l = Hdot_l W_l^T + rW_l ga_l^T D'_l + rb_l sum_q D'_l[q]
            # (Hdot_0 = 0), Hdot_{l+1} = s'(z_l) z_dot_l: rows NQ + NS.. of V_l hold [-Hdot_l | 0]. With tanh,
            # rzs[l] = z_dot_l (read back from rows NQ.. of U_l, where Ddot_l goes once it is read).
            rzs = ()
            rh = x
            zd = x
            vb = _block(V, T, R, vos[0])
            _store_block(vb, t0, T, NS, D0, D0 + 1, NQ + NS, R, tl.zeros_like(x), BT, BNS, BD0)
            _store_column(vb, t0, T, NS, D0 + 1, NQ + NS, R, D0, 0.0, BT, BNS)
            for l in tl.static_range(DEPTH):
                rw = tl.load(rates + 2 * l)
                rb = tl.load(rates + 2 * l + 1)
                ub = _block(U, T, R, uos[l])
                d_q = _get(dqs[l], ub, t0, T, NQ, dims[l + 1], dims[l + 1], 0, R, False, RELOAD, BT, BNQ,
                           pads[l + 1])
                zd = rw * _bmm_tn(gas[l], d_q) + rb * sdqs[l][:, None, :]
                if l > 0:
                    zd = zd + _wprod(rh, _block(V, T, R, vos[l]), t0, T, NS, dims[l] + 1, NQ + NS, R, True, theta,
                                     offs[l], dims[l + 1], dims[l], True, BT, BNS, pads[l + 1], pads[l], KC)
                rzs = rzs + (zd,)
                if l < DEPTH - 1:
                    if ACT == 1 and RELOAD:
                        _store_block(ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ, R, zd, BT, BNS, pads[l + 1])
                    vb = _block(V, T, R, vos[l + 1])
                    h_s = _get(hs[l + 1], vb, t0, T, NS, dims[l + 1], dims[l + 1] + 1, NQ, R, True, RELOAD, BT, BNS,
                               pads[l + 1])
                    rh = _dmul(zd, h_s, ACT)
                    _store_block(vb, t0, T, NS, dims[l + 1], dims[l + 1] + 1, NQ + NS, R, -rh, BT, BNS, pads[l + 1])
                    _store_column(vb, t0, T, NS, dims[l + 1] + 1, NQ + NS, R, dims[l + 1], 0.0, BT, BNS)
                    if KC > 0:
                        tl.debug_barrier()  # -Hdot_{l+1}, read by the next layer's product
            # Ddot_{L-1} = the loss's Hessian times z_dot; Ddot_{l-1} = s'(z) (Ddot_l W_l + rW_l gb_l^T H'_l)
            # + s''(z) z_dot (D_l W_l), tanh's s'' term being -2 h z_dot D_{l-1} (ReLU's is 0). Rows NQ.. of U_l.
            rd = _loss_hvp(zd, p_s, NS, DL, LOSS)
            for l in tl.static_range(DEPTH - 1, 0, -1):
                if RELOAD and ACT == 1:
                    tl.debug_barrier()  # every read of rows NQ.. of U_l (z_dot_l) is done: Ddot_l replaces it
                ub = _block(U, T, R, uos[l])
                _store_block(ub, t0, T, NS, dims[l + 1], dims[l + 1], NQ, R, rd, BT, BNS, pads[l + 1])
                if KC > 0:
                    tl.debug_barrier()  # Ddot_l, read by the product below
                rw = tl.load(rates + 2 * l)
                vb = _block(V, T, R, vos[l])
                h_q = _get(hq[l], vb, t0, T, NQ, dims[l], dims[l] + 1, 0, R, False, RELOAD, BT, BNQ, pads[l])
                h_s = _get(hs[l], vb, t0, T, NS, dims[l], dims[l] + 1, NQ, R, True, RELOAD, BT, BNS, pads[l])
                e = _wprod(rd, ub, t0, T, NS, dims[l + 1], NQ, R, False, theta, offs[l], dims[l + 1], dims[l], False,
                           BT, BNS, pads[l + 1], pads[l], KC)
                rd_low = _dmul(e + rw * _bmm_tn(gbs[l], h_q), h_s, ACT)
                if ACT == 1:
                    lb = _block(U, T, R, uos[l - 1])
                    z_dot = _get(rzs[l - 1], lb, t0, T, NS, dims[l], dims[l], NQ, R, False, RELOAD, BT, BNS, pads[l])
                    d_s = _get(ds[l - 1], lb, t0, T, NS, dims[l], dims[l], NQ + NS, R, False, RELOAD, BT, BNS,
                               pads[l])
                    rd_low = rd_low - 2.0 * h_s * z_dot * d_s
                rd = rd_low
            if RELOAD and ACT == 1:
                tl.debug_barrier()  # the same for z_dot_0 (only tanh keeps z_dot in the rows)
            _store_block(U, t0, T, NS, D1, D1, NQ, R, rd, BT, BNS, BD1)


def constants(dims, n_support, n_query, tasks_per_program, activation, loss, first_order, *, has_cot=False,
              has_gpred=False, factors=True, reload=True, chunk=0) -> dict:
    """The compile-time constants of one launch (the launch's, and `_triton_targets`' compile for a GPU):
    padded sizes as the other Triton kernels pad them (`triton_maml._pad`), RELOAD where the rows hold the
    blocks to read back (second order with factors, or in the chunked form without: the rows are then scratch
    for the support and query passes), KC = `chunk` (0: the products' operands in registers; else columns a
    step of the products that read them from the rows, which needs RELOAD)."""
    consts = {f"BD{i}": _pad(d) for i, d in enumerate(_sizes(dims))}
    reload = bool((factors or chunk) and not first_order and reload)
    if chunk and (not reload or chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk {chunk}: the chunked products take a power of two >= 16 and read their operands "
                         "from the rows of a second-order launch, read back (reload)")
    consts.update(DEPTH=len(dims) - 1, BNS=_pad(n_support), BNQ=_pad(n_query), BT=tasks_per_program,
                  ACT=int(activation), LOSS=int(loss), FIRST_ORDER=bool(first_order), HAS_COT=bool(has_cot),
                  HAS_GPRED=bool(has_gpred), FACTORS=bool(factors), RELOAD=reload, KC=int(chunk))
    return consts


def launch(theta, rates, xs, ys, xq, yq, cot, g_pred, dims, activation, loss, first_order, factors, *,
           tasks_per_program, num_warps, reload=True, chunk=0, **options):
    """`maml_onestep`'s outputs, `(losses [T], preds [T, Nq, D_out], U, V, rate_grads [T, 2 L])` (the C++ op's
    layout, `_onestep`), from one launch of `ceil(T / tasks_per_program)` programs. The caller has checked the
    arguments (`_onestep` builds them). `chunk` > 0: the products read their operands from the factor rows
    (`constants`); a call without factors then runs the support and query passes only, with those rows as
    scratch, in chunks of tasks of at most `_onestep.MAX_FACTOR_BYTES` of rows, which it drops."""
    T, ns, nq = xs.shape[0], xs.shape[1], xq.shape[1]
    scratch = bool(chunk) and not factors
    if scratch:
        from ._onestep import chunk_tasks, row_bytes

        step = chunk_tasks(T, row_bytes(dims, ns, nq, first_order, theta.element_size()))
        if T > step:
            parts = [launch(theta, rates, xs[lo:lo + step], ys[lo:lo + step], xq[lo:lo + step], yq[lo:lo + step],
                            None if cot is None else cot[lo:lo + step],
                            None if g_pred is None else g_pred[lo:lo + step], dims, activation, loss, first_order,
                            False, tasks_per_program=tasks_per_program, num_warps=num_warps, reload=reload,
                            chunk=chunk, **options) for lo in range(0, T, step)]
            return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) + parts[0][2:]
    L, dy = len(dims) - 1, dims[-1]
    rows = T * factor_rows(ns, nq, first_order) if factors or scratch else 0
    losses = theta.new_empty(T)
    preds = theta.new_empty(T, nq, dy)
    U = theta.new_empty(rows * sum(dims[1:]))
    V = theta.new_empty(rows * sum(d + 1 for d in dims[:-1]))
    rate_grads = theta.new_empty(T if factors else 0, 2 * L)
    if T == 0:
        return losses, preds, U, V, rate_grads
    consts = constants(dims, ns, nq, tasks_per_program, activation, loss, first_order, has_cot=cot is not None,
                       has_gpred=g_pred is not None, factors=factors, reload=reload, chunk=chunk)
    onestep_kernel[(triton.cdiv(T, tasks_per_program),)](
        theta, rates, xs, ys, xq, yq, theta if cot is None else cot, theta if g_pred is None else g_pred,
        losses, preds, U if rows else theta, V if rows else theta, rate_grads if factors else theta,
        T, ns, nq, *_sizes(dims), **consts, num_warps=num_warps, **options)
    if scratch:
        return losses, preds, theta.new_empty(0), theta.new_empty(0), rate_grads
    return losses, preds, U, V, rate_grads
