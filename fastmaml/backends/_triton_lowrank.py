"""Triton kernels of the factored backend's low-rank products (`_lowrank.py` says what they compute).

Imported only on first use (by `_lowrank.py`), because `triton.jit` reads `TRITON_INTERPRET` when a
kernel is defined.

One program per task. Points and support points are one register tile each, padded to a power of two
>= 16 (the smallest `tl.dot`; `_lowrank.kernel_reason` bounds them); widths are read in chunks of at
most 32 columns, so any width runs in the same compiled variant. The J factor pairs come as tuples of
pointers (one per step), so the lists autograd keeps are read where they lie: stacking them first would
copy every factor on every call, as many bytes again as the kernel reads.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes are runtime values: one compiled variant serves every size with the same padded blocks.
_RUNTIME_INTS = ["T", "N", "S", "I", "O"]


@triton.jit
def _tile(ptr, rows, cols, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """The `[BR, BC]` tile of a row-major `[R, C]` matrix at `ptr`, zero outside."""
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _inner(a, b, rows_a, rows_b, RA, RB, K, BRA: tl.constexpr, BRB: tl.constexpr, BK: tl.constexpr,
           PRECISION: tl.constexpr):
    """`a b^T` `[BRA, BRB]` of row-major `a [RA, K]` and `b [RB, K]`, K in chunks of BK read from memory.

    In one piece, Triton's FMA product holds a whole K-row of both operands in each thread (256
    registers at K = 128); chunks of BK bound that (the chunks of x hit the cache for every factor)."""
    acc = tl.zeros([BRA, BRB], dtype=a.dtype.element_ty)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        ta = _tile(a, rows_a, rk, RA, K, BRA, BK)
        tb = _tile(b, rows_b, rk, RB, K, BRB, BK)
        acc = tl.dot(ta, tl.trans(tb), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_add_kernel(
    base, x, hs, ds, scales, out,  # [T, N, O] (if HAS_BASE), [T, N, I], J x [T, S, I], J x [T, S, O],
    T, N, S, I, O,                 # [J] (if HAS_SCALES) -> [T, N, O]
    J: tl.constexpr, HAS_BASE: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    """`out[t] = base[t] + sum_j s_j (x[t] hs[j][t]^T) ds[j][t]` for the task t of this program.

    First every factor's `c_j = s_j x hs[j]^T` (`[N, S]`, I in chunks of BK), kept in registers; then the
    output in column chunks of BO, each `base + sum_j c_j ds[j]` over its columns."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    xt = x + t * N * I
    cs = ()
    for j in tl.static_range(J):
        c = _inner(xt, hs[j] + t * S * I, rn, rs, N, S, I, BN, BS, BK, PRECISION)
        if HAS_SCALES:
            c = c * tl.load(scales + j)
        cs = cs + (c,)
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        if HAS_BASE:
            acc = _tile(base + t * N * O, rn, ro, N, O, BN, BO)
        else:
            acc = tl.zeros([BN, BO], dtype=x.dtype.element_ty)
        for j in tl.static_range(J):
            d = _tile(ds[j] + t * S * O, rs, ro, S, O, BS, BO)
            acc = tl.dot(cs[j], d, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        mask = (rn[:, None] < N) & (ro[None, :] < O)
        tl.store(out + t * N * O + rn[:, None] * O + ro[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_grads_kernel(
    u, bs, c, scales, out,         # [T, N, I], J x [T, S, I], [T, N, O], [J] (if HAS_SCALES) -> [J, T, S, O]
    T, N, S, I, O,
    J: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    """`out[j, t] = s_j (u[t] bs[j][t]^T)^T c[t]` for the task t of this program: every factor's
    `e_j = s_j bs[j] u^T` (`[S, N]`, I in chunks of BK) kept in registers, then `e_j c` in column chunks of
    BO (cheaper than `bs[j] (u^T c)`, whose `[I, O]` middle is a width squared per task)."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    ut = u + t * N * I
    es = ()
    for j in tl.static_range(J):
        e = _inner(bs[j] + t * S * I, ut, rs, rn, S, N, I, BS, BN, BK, PRECISION)
        if HAS_SCALES:
            e = e * tl.load(scales + j)
        es = es + (e,)
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        ct = _tile(c + t * N * O, rn, ro, N, O, BN, BO)
        mask = (rs[:, None] < S) & (ro[None, :] < O)
        for j in tl.static_range(J):
            res = tl.dot(es[j], ct, input_precision=PRECISION, out_dtype=ct.dtype)  # [BS, BO]
            tl.store(out + (j * T + t) * S * O + rs[:, None] * O + ro[None, :], res, mask=mask)
