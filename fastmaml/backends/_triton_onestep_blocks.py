"""The one-step Triton kernel's blocks (`_triton_onestep.py`): a group of tasks' padded blocks of points
`[BT, BN, BD]` loaded from and stored to the tasks' inputs and factor rows, and the products the kernel takes
of them: with a layer's shared weights (`_fw`, `_bw`, or `_wprod` reading its operand from the rows in chunks),
per task (`_bmm` and its transposes, `_gram`). Imported only with the kernels, after `TRITON_INTERPRET` is
settled.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_pieces import _load_weight
from ._triton_products import PRECISION


@triton.jit
def _fw(h, w):
    """`h [BT, BN, BI] @ w[BO, BI]^T -> [BT, BN, BO]`: a product with a shared weight matrix, one `tl.dot`
    over the group's points."""
    BT: tl.constexpr = h.shape[0]
    BN: tl.constexpr = h.shape[1]
    BI: tl.constexpr = h.shape[2]
    BO: tl.constexpr = w.shape[0]
    z = tl.dot(tl.reshape(h, [BT * BN, BI]), tl.trans(w), input_precision=PRECISION, out_dtype=h.dtype)
    return tl.reshape(z, [BT, BN, BO])


@triton.jit
def _bw(d, w):
    """`d [BT, BN, BO] @ w [BO, BI] -> [BT, BN, BI]`."""
    BT: tl.constexpr = d.shape[0]
    BN: tl.constexpr = d.shape[1]
    BO: tl.constexpr = d.shape[2]
    BI: tl.constexpr = w.shape[1]
    e = tl.dot(tl.reshape(d, [BT * BN, BO]), w, input_precision=PRECISION, out_dtype=d.dtype)
    return tl.reshape(e, [BT, BN, BI])


@triton.jit
def _bmm(a, b):
    """Per task: `a [BT, M, K] @ b [BT, K, N]`."""
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=a.dtype)


@triton.jit
def _bmm_nt(a, b):
    """Per task: `a [BT, M, K] @ b [BT, N, K]^T`."""
    return _bmm(a, tl.permute(b, (0, 2, 1)))


@triton.jit
def _bmm_tn(a, b):
    """Per task: `a [BT, K, M]^T @ b [BT, K, N]`."""
    return _bmm(tl.permute(a, (0, 2, 1)), b)


@triton.jit
def _index(t0, T, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """The group's task numbers (int64) and point and column indices, shaped to broadcast over `[BT, BN, BD]`."""
    t = (t0 + tl.arange(0, BT)).to(tl.int64)[:, None, None]
    n = tl.arange(0, BN)[None, :, None]
    c = tl.arange(0, BD)[None, None, :]
    return t, n, c


@triton.jit
def _load_block(base, t0, T, N, D, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """`[BT, BN, BD]` of the tasks' `[T, N, D]` points (zero outside)."""
    return _load_cols(base, t0, T, N, D, D, 0, N, 0, BT, BN, BD)


@triton.jit
def _load_labels(base, t0, T, N, BT: tl.constexpr, BN: tl.constexpr):
    """`[BT, BN]` class labels (int64, as given: a narrower type would wrap a label out of range into one in
    range, which `_loss` must see as out of range; 0 outside)."""
    t = (t0 + tl.arange(0, BT)).to(tl.int64)[:, None]
    n = tl.arange(0, BN)[None, :]
    return tl.load(base + t * N + n, mask=(t < T) & (n < N), other=0)


@triton.jit
def _load_targets(base, t0, T, N, DL, BT: tl.constexpr, BN: tl.constexpr, BDL: tl.constexpr, LOSS: tl.constexpr):
    """mse: `[BT, BN, BDL]` float targets; cross-entropy: `[BT, BN]` classes."""
    if LOSS == 0:
        y = _load_block(base, t0, T, N, DL, BT, BN, BDL)
    else:
        y = _load_labels(base, t0, T, N, BT, BN)
    return y


@triton.jit
def _store_block(base, t0, T, N, D, ld, row0, rows, val, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """`val [BT, BN, BD]` into task t's `[rows, ld]` block at `base + t rows ld`, points at rows row0.., columns
    0..D-1 (masked to the real tasks, points and columns)."""
    t, n, c = _index(t0, T, BT, BN, BD)
    tl.store(base + (t * rows + row0 + n) * ld + c, val, mask=(t < T) & (n < N) & (c < D))


@triton.jit
def _store_column(base, t0, T, N, ld, row0, rows, col, value, BT: tl.constexpr, BN: tl.constexpr):
    """`value` into column `col` of rows row0..row0+N-1 of each task's `[rows, ld]` block."""
    t = (t0 + tl.arange(0, BT)).to(tl.int64)[:, None]
    n = tl.arange(0, BN)[None, :]
    v = tl.zeros([BT, BN], dtype=base.dtype.element_ty) + value
    tl.store(base + (t * rows + row0 + n) * ld + col, v, mask=(t < T) & (n < N))


@triton.jit
def _get(value, base, t0, T, N, D, ld, row0, rows, NEGATED: tl.constexpr, RELOAD: tl.constexpr, BT: tl.constexpr,
         BN: tl.constexpr, BD: tl.constexpr):
    """A block the kernel has written to its factor rows: `value` (still in registers) or, with RELOAD, read back
    from the rows (negated where they hold -value). Read back, `value` is dead once the rows are written, so its
    registers are free for the passes in between; the zeros it reads on padded points stand for values that
    only ever meet zero seeds there."""
    if RELOAD:
        v = _load_cols(base, t0, T, N, D, ld, row0, rows, 0, BT, BN, BD)
        if NEGATED:
            v = -v
    else:
        v = value
    return v


@triton.jit
def _load_cols(base, t0, T, N, K, ld, row0, rows, k0, BT: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr):
    """Columns k0 .. k0 + KC - 1 of rows row0 .. row0 + N - 1 of each task's `[rows, ld]` block, as `[BT, BN, KC]`
    (zero outside the tasks, the N points and the K columns): a chunk of a block (`_wprod`, `_gram`), or with
    k0 = 0 and KC its padded width the whole block (`_get`, `_load_block`)."""
    t, n, c = _index(t0, T, BT, BN, KC)
    c = c + k0
    return tl.load(base + (t * rows + row0 + n) * ld + c, mask=(t < T) & (n < N) & (c < K), other=0.0)


@triton.jit
def _wprod(a, src, t0, T, N, ld, row0, rows, NEGATED: tl.constexpr, theta, off, DO, DI, FORWARD: tl.constexpr,
           BT: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, KC: tl.constexpr):
    """A product with a layer's shared weights `W [DO, DI]` (at `theta + off`): FORWARD `a [BT, BN, BI] @ W^T ->
    [BT, BN, BO]`, else `a [BT, BN, BO] @ W -> [BT, BN, BI]`.
    KC = 0: `a` as given, W loaded whole (`_fw`, `_bw`). KC > 0 (the wide layers): `a` read from the rows where
    the kernel stored it (`src`, `ld`, `row0`, `rows` as `_load_cols`; stored negated with NEGATED) and W from
    theta, KC values of the sum at a time, the chunks summed in order; `a` is not read. Triton's FMA products
    hold each thread's rows and columns of both operands whole along the sum: a `[16, 128] x [128, 128]`
    product, its operands in registers, spilled kilobytes a thread (sm_90 ptxas -v; benchmarks/RESULTS.md)."""
    if KC == 0:
        w = _load_weight(theta, off, DO, DI, BO, BI)
        if FORWARD:
            out = _fw(a, w)
        else:
            out = _bw(a, w)
    else:
        BM: tl.constexpr = BO if FORWARD else BI
        K = DI if FORWARD else DO
        M = DO if FORWARD else DI
        kk = tl.arange(0, KC)[:, None]
        m = tl.arange(0, BM)[None, :]
        acc = tl.zeros([BT * BN, BM], dtype=theta.dtype.element_ty)
        # Up to the real sum K, not its padded width: a chunk past it adds only zeros (W is masked there).
        for k0 in range(0, K, KC):
            av = tl.reshape(_load_cols(src, t0, T, N, K, ld, row0, rows, k0, BT, BN, KC), [BT * BN, KC])
            if FORWARD:
                wp = theta + off + m * DI + (k0 + kk)  # W[m, k]: element (k, m) of W^T
            else:
                wp = theta + off + (k0 + kk) * DI + m  # W[k, m]
            wv = tl.load(wp, mask=(k0 + kk < K) & (m < M), other=0.0)
            acc = tl.dot(av, wv, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        out = tl.reshape(acc, [BT, BN, BM])
        if NEGATED:
            out = -out  # sum (-a) W = -(sum a W) exactly: negation commutes with rounding
    return out


@triton.jit
def _gram(a, b, src_a, ld_a, row0_a, rows_a, NA, NEG_A: tl.constexpr, src_b, ld_b, row0_b, rows_b, NB,
          NEG_B: tl.constexpr, K, t0, T, BT: tl.constexpr, BNA: tl.constexpr, BNB: tl.constexpr, KC: tl.constexpr):
    """Per task `a [BT, BNA, BD] @ b [BT, BNB, BD]^T -> [BT, BNA, BNB]` (a Gram matrix of two blocks of points, BD
    their padded width, K its real part).
    KC = 0: as given (`_bmm_nt`). KC > 0: both read from the rows where the kernel stored them, KC columns at a
    time, as `_wprod` reads `a`."""
    if KC == 0:
        out = _bmm_nt(a, b)
    else:
        acc = tl.zeros([BT, BNA, BNB], dtype=src_a.dtype.element_ty)
        for k0 in range(0, K, KC):  # up to the real sum, as in `_wprod`
            av = _load_cols(src_a, t0, T, NA, K, ld_a, row0_a, rows_a, k0, BT, BNA, KC)
            bv = _load_cols(src_b, t0, T, NB, K, ld_b, row0_b, rows_b, k0, BT, BNB, KC)
            acc = tl.dot(av, tl.permute(bv, (0, 2, 1)), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        out = acc
        if NEG_A != NEG_B:
            out = -out
    return out


@triton.jit
def _block(base, T, R, off):
    """Layer block of the factor rows starting at element `T R off`."""
    return base + T.to(tl.int64) * R * off
