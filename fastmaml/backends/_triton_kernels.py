"""The Triton kernels of the `triton` backend in the register layout: the flat operations of
`docs/kernels.md` for MLPs. (`_triton_scratch.py` holds the same operations for wide nets.)

Imported only on first use (by `triton_maml.py`), because `triton.jit` reads `TRITON_INTERPRET` when a
kernel is defined: tests without a GPU set it before this module is imported and the kernels then run
in the Triton interpreter on CPU tensors.

Layout. One program runs a group of tasks (`t = pid, pid + G, pid + 2G, ...`) one after the other. Within
a task, the points are one padded block `[BN, BD0]` (rows past `N` masked), each layer's weights a
padded block `[BD_l, BD_{l-1}]` loaded from the flat parameter vector, and the activations of every
layer live in registers as a tuple indexed by the (unrolled, `tl.static_range`) layer number. Every
padded size is a power of two >= 16 (the minimum side of `tl.dot`); under FASTMAML_TRITON_WIDTH1=keep a layer
of width 1 (the sinusoid net's input and output) stays 1 wide: its products are broadcasts and row sums
(`_mm`). Padded rows and columns of the weights are loaded as zero, so padded feature columns stay zero
through the network, and the loss gradient is masked to the real points, so padded point rows never reach
a parameter gradient.

Per-task state of size P (the parameters `theta_k` of each inner step, the adjoint `v`) lives in a
per-program scratch buffer in global memory (`work`, `vbuf`): it is too large for registers at width
128 and is re-read per layer from cache. `tl.debug_barrier()` separates a store to scratch from loads of
the same addresses by other threads of the program. Gradients summed over tasks are accumulated by each
program into its own row of a partial-sum buffer (`[G, P]`, `[G, K, P]`), summed afterwards by torch:
deterministic, no atomics.

Matrix products are `_triton_products.py`'s: `tl.dot`, float32-accurate, in one piece or chunks along K, or
a broadcast and a sum where a side is 1 wide; the loads, stores and activations `_triton_pieces.py`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_pieces import (_accumulate, _act, _ce_points, _copy, _dmul, _ddact, _layer_offsets, _load_layer,
                             _load_points, _load_targets, _load_weight, _store_layer, _store_points, _zero)
from ._triton_products import _mm, _mm_nt, _mm_tn

# ---------------------------------------------------------------------------------------------------
# The network, the loss, and their derivatives for one task
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _forward(wb, offs, dims, pads, x, DEPTH: tl.constexpr, ACT: tl.constexpr):
    """MLP at the parameters `wb` on points `x [BN, BD0]`.

    Returns `hs` (tuple: `h_0 = x, h_1, ..., h_{L-1}`, the inputs of each layer) and the output `z_L`.
    """
    hs = (x,)
    h = x
    for i in tl.static_range(DEPTH):
        w, b = _load_layer(wb, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        z = _mm_nt(h, w) + b[None, :]
        if i < DEPTH - 1:
            h = _act(z, ACT)
            hs = hs + (h,)
        else:
            h = z
    return hs, h


@triton.jit
def _loss_grad(z, y, N, DL, BN: tl.constexpr, BDL: tl.constexpr, LOSS: tl.constexpr):
    """Loss of one task at outputs `z [BN, BDL]` and its gradient `dloss/dz` (zero on padding).

    Returns `(loss, dz, p)`; `p` is the softmax for cross-entropy (used by the curvature), `z` for mse.
    """
    r = tl.arange(0, BN)
    c = tl.arange(0, BDL)
    rows = r < N
    mask = rows[:, None] & (c[None, :] < DL)
    if LOSS == 0:
        scale = 1.0 / (N * DL).to(z.dtype)
        diff = tl.where(mask, z - y, 0.0)
        loss = tl.sum(tl.sum(diff * diff, axis=1), axis=0) * scale
        dz = diff * (2.0 * scale)
        p = z
    else:
        scale = 1.0 / N.to(z.dtype)
        point, grad, p = _ce_points(z, y, DL, c[None, :])
        loss = tl.sum(tl.where(rows, point, 0.0), axis=0) * scale
        dz = tl.where(rows[:, None], grad, 0.0) * scale
    return loss, dz, p


@triton.jit
def _loss_hvp(rz, p, N, DL, BN: tl.constexpr, BDL: tl.constexpr, LOSS: tl.constexpr):
    """`loss''(z) rz` per task: mse `2/(N*DL) rz`; cross-entropy `(diag(p) - p p^T) rz / N` per row."""
    r = tl.arange(0, BN)
    c = tl.arange(0, BDL)
    mask = (r[:, None] < N) & (c[None, :] < DL)
    if LOSS == 0:
        out = tl.where(mask, rz, 0.0) * (2.0 / (N * DL).to(rz.dtype))
    else:
        pr = p * rz
        out = tl.where(mask, pr - p * tl.sum(pr, axis=1)[:, None], 0.0) * (1.0 / N.to(rz.dtype))
    return out


@triton.jit
def _support_pass(cur, nxt, lrk, v, g_lr_k, x, y, N, offs, dims, pads, UPDATE, ACC_LR,
                  BN: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr):
    """Forward and backward pass of the support loss at the parameters `cur` (one task).

    Where `UPDATE`: stores the SGD step `nxt = cur - lrk * g`. Where `ACC_LR`: `g_lr_k -= g * v`.
    Returns what the Hessian-vector product at `cur` needs: `hs` (each layer's input, as `_forward`),
    `ds` (`ds[i]`: dloss/dz of layer i), `bps` (tanh only: `bps[i-1] = ds[i] W_i`, the gradient before the
    activation derivative) and `p` (`_loss_grad`).
    """
    hs, out = _forward(cur, offs, dims, pads, x, DEPTH, ACT)
    loss, d, p = _loss_grad(out, y, N, dims[DEPTH], BN, pads[DEPTH], LOSS)
    ds = ()
    bps = ()
    for i in tl.static_range(DEPTH - 1, -1, -1):
        ds = (d,) + ds
        w, b = _load_layer(cur, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        gw = _mm_tn(d, hs[i])
        gb = tl.sum(d, axis=0)
        if i > 0:
            bp = _mm(d, w)
            if ACT == 1:
                bps = (bp,) + bps
            d = _dmul(bp, hs[i], ACT)
        if UPDATE:
            lw, lb = _load_layer(lrk, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
            _store_layer(nxt, offs[i], dims[i + 1], dims[i], w - lw * gw, b - lb * gb, pads[i + 1], pads[i])
        if ACC_LR:
            vw, vbias = _load_layer(v, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
            aw, ab = _load_layer(g_lr_k, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
            _store_layer(g_lr_k, offs[i], dims[i + 1], dims[i], aw - gw * vw, ab - gb * vbias,
                         pads[i + 1], pads[i])
    return hs, ds, bps, p


@triton.jit
def _support_placeholders(x, pads, BN: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr):
    """Zeros shaped like `_support_pass`'s results, for the iteration that skips it."""
    hs = (x,)
    ds = ()
    bps = ()
    for i in tl.static_range(DEPTH):
        ds = ds + (tl.zeros([BN, pads[i + 1]], dtype=x.dtype),)
        if i > 0:
            hs = hs + (tl.zeros([BN, pads[i]], dtype=x.dtype),)
            if ACT == 1:
                bps = bps + (tl.zeros([BN, pads[i]], dtype=x.dtype),)
    p = tl.zeros([BN, pads[DEPTH]], dtype=x.dtype)
    return hs, ds, bps, p


@triton.jit
def _hvp_update(cur, lrk, v_in, v_out, hs, ds, bps, p, N, offs, dims, pads,
                BN: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr):
    """`v_out = v_in - H u` with `u = lrk * v_in`, H the Hessian of the support loss at `cur`
    (forward-over-reverse, with the pass's `hs, ds, bps, p`); returns `-d/dx (g . u)`, `[BN, BD0]`."""
    # Tangents forward: rzs[i] = R z of layer i.
    rzs = ()
    for i in tl.static_range(DEPTH):
        vw, vbias = _load_layer(v_in, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        lw, lb = _load_layer(lrk, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        rz = _mm_nt(hs[i], lw * vw) + (lb * vbias)[None, :]
        if i > 0:
            w = _load_weight(cur, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
            rz += _mm_nt(_dmul(rzs[i - 1], hs[i], ACT), w)
        rzs = rzs + (rz,)
    # Tangents backward: H u layer by layer. Ordered so that at most two weight-sized blocks are live at
    # a time (at width 128 one such block takes 64 registers a thread at 8 warps): H u's weight block is
    # applied to v and dropped before W and lr * v are loaded again for the next layer's tangent.
    rd = _loss_hvp(rzs[DEPTH - 1], p, N, dims[DEPTH], BN, pads[DEPTH], LOSS)
    for i in tl.static_range(DEPTH - 1, -1, -1):
        hu_w = _mm_tn(rd, hs[i])
        if i > 0:
            hu_w += _mm_tn(ds[i], _dmul(rzs[i - 1], hs[i], ACT))
        hu_b = tl.sum(rd, axis=0)
        vw, vbias = _load_layer(v_in, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        _store_layer(v_out, offs[i], dims[i + 1], dims[i], vw - hu_w, vbias - hu_b, pads[i + 1], pads[i])
        w = _load_weight(cur, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        back = _mm(rd, w)
        uw = (_load_weight(lrk, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
              * _load_weight(v_in, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i]))
        back += _mm(ds[i], uw)
        if i > 0:
            rd_next = _dmul(back, hs[i], ACT)
            if ACT == 1:
                rd_next += bps[i - 1] * _ddact(hs[i], ACT) * rzs[i - 1]
            rd = rd_next
        else:
            gx = -back
    return gx


@triton.jit
def _backprop_accumulate(acc, wb, hs, d, offs, dims, pads, DEPTH: tl.constexpr, ACT: tl.constexpr,
                         INPUT_GRAD: tl.constexpr):
    """`acc += dtheta` (flat blocks), the parameter gradient of the network at `wb` for the output
    gradient `d [BN, BDL]`; returns the input gradient `[BN, BD0]` (zeros unless INPUT_GRAD)."""
    for i in tl.static_range(DEPTH - 1, -1, -1):
        aw, ab = _load_layer(acc, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
        aw = aw + _mm_tn(d, hs[i])
        ab = ab + tl.sum(d, axis=0)
        _store_layer(acc, offs[i], dims[i + 1], dims[i], aw, ab, pads[i + 1], pads[i])
        if i > 0 or INPUT_GRAD:
            w = _load_weight(wb, offs[i], dims[i + 1], dims[i], pads[i + 1], pads[i])
            d = _mm(d, w)
        if i > 0:
            d = _dmul(d, hs[i], ACT)
    if INPUT_GRAD:
        gx = d
    else:
        gx = tl.zeros_like(hs[0])
    return gx


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

# Sizes are runtime values: one compiled kernel serves every size with the same padded blocks, and a
# size of 1 must not turn into a compile-time constant (the code calls `.to()` on sizes).
_RUNTIME_INTS = ["T", "NS", "NQ", "P", "K", "G", "D0", "D1", "D2", "D3", "D4"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def maml_fwd_kernel(
    theta, lr, xs, ys, xq, yq, qw,          # inputs (docs/kernels.md)
    task_losses, preds, thetas_out,          # outputs: [T], [T, NQ, DL] (QUERY) or [T, P] (not QUERY)
    work,                                    # scratch [G, 2, P]
    T, NS, NQ, P, K, G,
    D0, D1, D2, D3, D4,
    DEPTH: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BD4: tl.constexpr,
    BNS: tl.constexpr, BNQ: tl.constexpr,
    ACT: tl.constexpr, LOSS: tl.constexpr, QUERY: tl.constexpr, BLOCK: tl.constexpr,
):
    """`maml_fwd` (QUERY) or `maml_adapt` (not QUERY) for tasks `pid, pid + G, ...`.

    Scratch rows 0 and 1 hold theta_k alternately (row 0 = theta_0, copied in for every task).
    """
    pid = tl.program_id(0)
    dims = (D0, D1, D2, D3, D4)
    pads: tl.constexpr = (BD0, BD1, BD2, BD3, BD4)
    offs = _layer_offsets(D0, D1, D2, D3, D4, DEPTH)
    DL = dims[DEPTH]
    BDL: tl.constexpr = pads[DEPTH]
    pid64 = pid.to(tl.int64)
    wrk = work + pid64 * 2 * P
    for t in range(pid64, T, G):
        _copy(wrk, theta, P, BLOCK)
        x = _load_points(xs + t * NS * D0, NS, D0, BNS, BD0)
        if LOSS == 0:
            y = _load_targets(ys + t * NS * DL, NS, DL, BNS, BDL, LOSS)
        else:
            y = _load_targets(ys + t * NS, NS, DL, BNS, BDL, LOSS)
        if QUERY:
            x_q = _load_points(xq + t * NQ * D0, NQ, D0, BNQ, BD0)
            if LOSS == 0:
                y_q = _load_targets(yq + t * NQ * DL, NQ, DL, BNQ, BDL, LOSS)
            else:
                y_q = _load_targets(yq + t * NQ, NQ, DL, BNQ, BDL, LOSS)
            total = tl.load(qw) * 0
        tl.debug_barrier()
        for k in range(K + 1):
            cur = wrk + (k % 2) * P
            if QUERY:
                # The query loss at theta_k where its weight is nonzero; the predictions at theta_K.
                wk = tl.load(qw + k)
                if (wk != 0) | (k == K):
                    hs_q, out_q = _forward(cur, offs, dims, pads, x_q, DEPTH, ACT)
                    lq, dq, pq = _loss_grad(out_q, y_q, NQ, DL, BNQ, BDL, LOSS)
                    total += wk * lq
                    if k == K:
                        _store_points(preds + t * NQ * DL, NQ, DL, out_q, BNQ, BDL)
            if k < K:
                _support_pass(cur, wrk + ((k + 1) % 2) * P, lr + k * P, cur, cur, x, y, NS, offs, dims, pads,
                              True, False, BNS, DEPTH, ACT, LOSS)
            tl.debug_barrier()
        if QUERY:
            tl.store(task_losses + t, total)
        else:
            _copy(thetas_out + t * P, wrk + (K % 2) * P, P, BLOCK)
        tl.debug_barrier()


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def maml_bwd_kernel(
    theta, lr, xs, ys, xq, yq, qw, g_task_losses, g_preds,    # inputs (docs/kernels.md)
    g_theta_part, g_lr_part, g_xs, g_xq,                       # outputs: [G, P], [G, K, P], [T, NS, D0], [T, NQ, D0]
    task_losses, preds,                                        # outputs with OUTPUTS: [T], [T, NQ, DL]
    work, vbuf,                                                # scratch [G, K + 1, P], [G, 2, P]
    T, NS, NQ, P, K, G,
    D0, D1, D2, D3, D4,
    DEPTH: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BD4: tl.constexpr,
    BNS: tl.constexpr, BNQ: tl.constexpr,
    ACT: tl.constexpr, LOSS: tl.constexpr,
    FIRST_ORDER: tl.constexpr, NEED_LR: tl.constexpr, NEED_X: tl.constexpr, OUTPUTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`maml_bwd` for tasks `pid, pid + G, ...`, in one loop of 2K + 1 iterations per task (one copy of
    each pass in the compiled code):

    - j < K: support pass at theta_j, storing theta_{j+1} in `work` row j + 1 (the forward saved nothing);
    - j = K: the adjoint starts at theta_K: v = c qw[K] grad L_q + the gradient of <g_preds, net(x_q)>;
    - j > K, k = 2K - j: the reverse step at theta_k: g_lr[k] -= g_k * v, v <- v - H_k (lr_k * v)
      (second order), then v += c qw[k] grad L_q(theta_k) where qw[k] != 0.

    The adjoint alternates between the rows of `vbuf` (second order; first order keeps it in row 0,
    where only the query terms change it). `g_theta_part[pid]` and `g_lr_part[pid]` must be zero on
    entry; each program adds its tasks' terms.

    With OUTPUTS (`triton_maml_train`: a training call's forward and backward in one launch) it also
    writes `maml_fwd`'s outputs, from the query passes it runs anyway: the task loss (its terms summed
    from k = K down to 0) and the query output at theta_K. Every task's cotangent must then be nonzero
    (the training call's are 1), so that the same query passes run as in `maml_fwd`.
    """
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    dims = (D0, D1, D2, D3, D4)
    pads: tl.constexpr = (BD0, BD1, BD2, BD3, BD4)
    offs = _layer_offsets(D0, D1, D2, D3, D4, DEPTH)
    DL = dims[DEPTH]
    BDL: tl.constexpr = pads[DEPTH]
    wrk = work + pid64 * (K + 1) * P
    vb = vbuf + pid64 * 2 * P
    g_theta_acc = g_theta_part + pid64 * P
    g_lr_acc = g_lr_part + pid64 * K * P
    _copy(wrk, theta, P, BLOCK)
    for t in range(pid64, T, G):
        x = _load_points(xs + t * NS * D0, NS, D0, BNS, BD0)
        x_q = _load_points(xq + t * NQ * D0, NQ, D0, BNQ, BD0)
        if LOSS == 0:
            y = _load_targets(ys + t * NS * DL, NS, DL, BNS, BDL, LOSS)
            y_q = _load_targets(yq + t * NQ * DL, NQ, DL, BNQ, BDL, LOSS)
        else:
            y = _load_targets(ys + t * NS, NS, DL, BNS, BDL, LOSS)
            y_q = _load_targets(yq + t * NQ, NQ, DL, BNQ, BDL, LOSS)
        c = tl.load(g_task_losses + t)
        gp = _load_points(g_preds + t * NQ * DL, NQ, DL, BNQ, BDL)
        gx_s = tl.zeros_like(x)
        gx_q = tl.zeros_like(x_q)
        total = c * 0
        _zero(vb, P, BLOCK, x.dtype)
        tl.debug_barrier()
        for j in range(2 * K + 1):
            k = j - (j > K) * 2 * (j - K)
            cur = wrk + k * P
            if FIRST_ORDER:
                v_in = vb
                v_out = vb
            else:
                v_in = vb + ((j + K + 1) % 2) * P
                v_out = vb + ((j + K) % 2) * P
            # The support pass at theta_k: forward steps always; reverse steps where they use it (g_lr, or
            # the Hessian-vector product of second order), not for first order without rate gradients.
            support = j < K
            if NEED_LR or not FIRST_ORDER:
                support = support | (j > K)
            if support:
                hs, ds, bps, p = _support_pass(cur, cur + P, lr + k * P, v_in, g_lr_acc + k * P, x, y, NS,
                                               offs, dims, pads, j < K, NEED_LR and j > K,
                                               BNS, DEPTH, ACT, LOSS)
            else:
                hs, ds, bps, p = _support_placeholders(x, pads, BNS, DEPTH, ACT)
            if not FIRST_ORDER:
                if j > K:
                    gx = _hvp_update(cur, lr + k * P, v_in, v_out, hs, ds, bps, p, NS, offs, dims, pads,
                                     BNS, DEPTH, ACT, LOSS)
                    if NEED_X:
                        gx_s += gx
            tl.debug_barrier()
            if j >= K:
                coef = c * tl.load(qw + k)
                if (coef != 0) | (j == K):
                    hs_q, out_q = _forward(cur, offs, dims, pads, x_q, DEPTH, ACT)
                    lq, dq, pq = _loss_grad(out_q, y_q, NQ, DL, BNQ, BDL, LOSS)
                    if OUTPUTS:
                        total += tl.load(qw + k) * lq
                        if j == K:
                            _store_points(preds + t * NQ * DL, NQ, DL, out_q, BNQ, BDL)
                    dz = coef * dq + gp * (j == K).to(gp.dtype)
                    gx_q += _backprop_accumulate(v_out, cur, hs_q, dz, offs, dims, pads, DEPTH, ACT, NEED_X)
                    tl.debug_barrier()
        _accumulate(g_theta_acc, vb + (K % 2) * (1 - FIRST_ORDER) * P, P, BLOCK)
        if NEED_X:
            _store_points(g_xs + t * NS * D0, NS, D0, gx_s, BNS, BD0)
            _store_points(g_xq + t * NQ * D0, NQ, D0, gx_q, BNQ, BD0)
        if OUTPUTS:
            tl.store(task_losses + t, total)
        tl.debug_barrier()


@triton.jit
def probe_kernel(out, N):
    """A loop with a runtime bound: what the interpreter of Triton 3.6 cannot run with numpy >= 2.4."""
    acc = tl.zeros([16], dtype=tl.float32)
    for i in range(N):
        acc += 1.0
    tl.store(out + tl.arange(0, 16), acc)
