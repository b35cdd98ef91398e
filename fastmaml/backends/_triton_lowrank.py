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
def _inner_all(a, bs, rows_a, rows_b, RA, RB, K, J: tl.constexpr, TRANSPOSED: tl.constexpr, BRA: tl.constexpr,
               BRB: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """For each of the J row-major `bs[j] [RB, K]`, `a bs[j]^T` `[BRA, BRB]` (or with TRANSPOSED its
    transpose `bs[j] a^T` `[BRB, BRA]`) of the row-major `a [RA, K]`: a tuple of J.

    One loop over K in chunks of BK for all the factors: each step loads a's chunk once and every
    factor's chunk together, so that a step's loads can all be in flight at once. A loop over K per factor
    waits on J times as many rounds of loads, one after the other; on the H200 these kernels ran at an
    eighth of the bandwidth their bytes need. In one piece, Triton's FMA product would hold a whole
    K-row of both operands in each thread (256 registers at K = 128); chunks of BK bound that. Each
    product sums its chunks in ascending k, as a loop per factor does: the same bits."""
    accs = ()
    for j in tl.static_range(J):
        if TRANSPOSED:
            accs = accs + (tl.zeros([BRB, BRA], dtype=a.dtype.element_ty),)
        else:
            accs = accs + (tl.zeros([BRA, BRB], dtype=a.dtype.element_ty),)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        ta = _tile(a, rows_a, rk, RA, K, BRA, BK)
        stepped = ()
        for j in tl.static_range(J):
            tb = _tile(bs[j], rows_b, rk, RB, K, BRB, BK)
            if TRANSPOSED:
                acc = tl.dot(tb, tl.trans(ta), accs[j], input_precision=PRECISION, out_dtype=ta.dtype)
            else:
                acc = tl.dot(ta, tl.trans(tb), accs[j], input_precision=PRECISION, out_dtype=ta.dtype)
            stepped = stepped + (acc,)
        accs = stepped
    return accs


@triton.jit
def _factor_products(a, bs, offset, scales, rows_a, rows_b, RA, RB, K, J: tl.constexpr, TRANSPOSED: tl.constexpr,
                     HAS_SCALES: tl.constexpr, ONE_LOOP: tl.constexpr, BRA: tl.constexpr, BRB: tl.constexpr,
                     BK: tl.constexpr, PRECISION: tl.constexpr):
    """`_inner_all` of `a` and this task's factors (`bs[j] + offset`), each times its scale (HAS_SCALES):
    in one loop over K for all J (ONE_LOOP), or in a loop each (the A/B's other value)."""
    if ONE_LOOP:
        tasks = ()
        for j in tl.static_range(J):
            tasks = tasks + (bs[j] + offset,)
        products = _inner_all(a, tasks, rows_a, rows_b, RA, RB, K, J, TRANSPOSED, BRA, BRB, BK, PRECISION)
    accs = ()
    for j in tl.static_range(J):
        if ONE_LOOP:
            acc = products[j]
        else:  # each product scaled as soon as it is done (fewer registers than scaling all at the end)
            acc = _inner_all(a, (bs[j] + offset,), rows_a, rows_b, RA, RB, K, 1, TRANSPOSED, BRA, BRB, BK,
                             PRECISION)[0]
        if HAS_SCALES:
            acc = acc * tl.load(scales + j)
        accs = accs + (acc,)
    return accs


@triton.jit
def _store_sum(cs, ds, offset, base, out, rn, rs, N, S, O, J: tl.constexpr, HAS_BASE: tl.constexpr, BN: tl.constexpr,
               BS: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr):
    """Stores `base + sum_j cs[j] (ds[j] + offset)` (`cs[j] [BN, BS]` in registers, `ds[j] [S, O]` row-major)
    to the row-major `out [N, O]`, in column chunks of BO (`base [N, O]` read only with HAS_BASE)."""
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        if HAS_BASE:
            acc = _tile(base, rn, ro, N, O, BN, BO)
        else:
            acc = tl.zeros([BN, BO], dtype=cs[0].dtype)
        for j in tl.static_range(J):
            d = _tile(ds[j] + offset, rs, ro, S, O, BS, BO)
            acc = tl.dot(cs[j], d, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        tl.store(out + rn[:, None] * O + ro[None, :], acc, mask=(rn[:, None] < N) & (ro[None, :] < O))


@triton.jit
def _add_task(t, base, x, hs, ds, scales, out, N, S, I, O, J: tl.constexpr, HAS_BASE: tl.constexpr,
              HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr, BN: tl.constexpr,
              BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr):
    """lowrank_add for task t: every `c_j = s_j x hs[j]^T` in registers, then the output (`_store_sum`)."""
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    cs = _factor_products(x + t * N * I, hs, t * S * I, scales, rn, rs, N, S, I, J, False, HAS_SCALES, ONE_LOOP,
                          BN, BS, BK, PRECISION)
    _store_sum(cs, ds, t * S * O, base + t * N * O, out + t * N * O, rn, rs, N, S, O, J, HAS_BASE, BN, BS, BO,
               PRECISION)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_add_kernel(
    base, x, hs, ds, scales, out,  # [T, N, O] (if HAS_BASE), [T, N, I], J x [T, S, I], J x [T, S, O],
    T, N, S, I, O,                 # [J] (if HAS_SCALES) -> [T, N, O]
    J: tl.constexpr, HAS_BASE: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    """`out[t] = base[t] + sum_j s_j (x[t] hs[j][t]^T) ds[j][t]` for the task t of this program.

    First every factor's `c_j = s_j x hs[j]^T` (`[N, S]`, I in chunks of BK; with ONE_LOOP one loop over I
    for all J), kept in registers; then the output in column chunks of BO, each `base + sum_j c_j ds[j]`
    over its columns."""
    _add_task(tl.program_id(0).to(tl.int64), base, x, hs, ds, scales, out, N, S, I, O, J, HAS_BASE, HAS_SCALES,
              PRECISION, ONE_LOOP, BN, BS, BK, BO)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_grads_kernel(
    u, bs, c, scales, out,         # [T, N, I], J x [T, S, I], [T, N, O], [J] (if HAS_SCALES) -> [J, T, S, O]
    T, N, S, I, O,
    J: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    """`out[j, t] = s_j (u[t] bs[j][t]^T)^T c[t]` for the task t of this program: every factor's
    `e_j = s_j bs[j] u^T` (`[S, N]`, I in chunks of BK; with ONE_LOOP one loop for all J) kept in
    registers, then `e_j c` in column chunks of BO (cheaper than `bs[j] (u^T c)`, whose `[I, O]` middle
    is a width squared per task)."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    es = _factor_products(u + t * N * I, bs, t * S * I, scales, rn, rs, N, S, I, J, True, HAS_SCALES, ONE_LOOP,
                          BN, BS, BK, PRECISION)
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        ct = _tile(c + t * N * O, rn, ro, N, O, BN, BO)
        mask = (rs[:, None] < S) & (ro[None, :] < O)
        for j in tl.static_range(J):
            res = tl.dot(es[j], ct, input_precision=PRECISION, out_dtype=ct.dtype)  # [BS, BO]
            tl.store(out + (j * T + t) * S * O + rs[:, None] * O + ro[None, :], res, mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_backward_kernel(
    g, x, hs, ds, scales,          # [T, N, O], [T, N, I], J x [T, S, I], J x [T, S, O], [J] (if HAS_SCALES)
    g_x, g_hs, g_ds,               # -> [T, N, I], [J, T, S, I], [J, T, S, O]
    T, N, S, I, O,
    J: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    """lowrank_add's gradients in x, hs and ds for the output's gradient g, for the task t of this program:
    with `e_j = s_j g ds[j]^T` and `c_j = s_j x hs[j]^T` (`[N, S]` each, in registers),

        g_x = sum_j e_j hs[j],   g_hs[j] = e_j^T x,   g_ds[j] = c_j^T g.

    Four passes: the e_j over O; g_x over I; g_hs[j] over I, summing c_j from the same chunks of x and
    hs[j]; g_ds[j] over O. So g and hs are read twice, x and ds once (g_x's pass apart from g_hs[j]'s:
    in one pass each e_j was held in the layouts of both its products, and the kernel spilled). The three
    kernels this replaces (one lowrank_add, two lowrank_grads) read g three times and x, hs and ds twice,
    and made every `[N, S]` product twice. Each product sums its chunks in ascending k as they do."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    es = _factor_products(g + t * N * O, ds, t * S * O, scales, rn, rs, N, S, O, J, False, HAS_SCALES, ONE_LOOP,
                          BN, BS, BO, PRECISION)
    cs = ()
    for j in tl.static_range(J):
        cs = cs + (tl.zeros([BN, BS], dtype=x.dtype.element_ty),)
    for i0 in range(0, I, BK):
        ri = i0 + tl.arange(0, BK)
        acc = tl.zeros([BN, BK], dtype=x.dtype.element_ty)
        for j in tl.static_range(J):
            h = _tile(hs[j] + t * S * I, rs, ri, S, I, BS, BK)
            acc = tl.dot(es[j], h, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        tl.store(g_x + t * N * I + rn[:, None] * I + ri[None, :], acc, mask=(rn[:, None] < N) & (ri[None, :] < I))
    for i0 in range(0, I, BK):
        ri = i0 + tl.arange(0, BK)
        xt = _tile(x + t * N * I, rn, ri, N, I, BN, BK)
        summed = ()
        for j in tl.static_range(J):
            h = _tile(hs[j] + t * S * I, rs, ri, S, I, BS, BK)
            gh = tl.dot(tl.trans(es[j]), xt, input_precision=PRECISION, out_dtype=xt.dtype)  # [BS, BK]
            tl.store(g_hs + (j * T + t) * S * I + rs[:, None] * I + ri[None, :], gh,
                     mask=(rs[:, None] < S) & (ri[None, :] < I))
            summed = summed + (tl.dot(xt, tl.trans(h), cs[j], input_precision=PRECISION, out_dtype=xt.dtype),)
        cs = summed
    if HAS_SCALES:
        scaled = ()
        for j in tl.static_range(J):
            scaled = scaled + (cs[j] * tl.load(scales + j),)
        cs = scaled
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        gt = _tile(g + t * N * O, rn, ro, N, O, BN, BO)
        mask = (rs[:, None] < S) & (ro[None, :] < O)
        for j in tl.static_range(J):
            res = tl.dot(tl.trans(cs[j]), gt, input_precision=PRECISION, out_dtype=gt.dtype)  # [BS, BO]
            tl.store(g_ds + (j * T + t) * S * O + rs[:, None] * O + ro[None, :], res, mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lowrank_pairs_kernel(
    h, d, fa, fb, base_u, base_v, scales,  # [T, N, I], [T, N, O], J x [T, S, O], J x [T, S, I],
    u, v,                                  # [T, N, O] / [T, N, I] (if HAS_BASE_*), [J] -> [T, N, O], [T, N, I]
    T, N, S, I, O,
    J: tl.constexpr, HAS_BASE_U: tl.constexpr, HAS_BASE_V: tl.constexpr, HAS_SCALES: tl.constexpr,
    WANT_V: tl.constexpr, PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    BI: tl.constexpr, BO: tl.constexpr,
):
    """Both products of a layer's weight cotangent `bar W = sum_j fa[j]^T fb[j]` with one step's factors
    (`_lowrank_pairs.py`), for the task t of this program:

        u = base_u + sum_j s_j (h fb[j]^T) fa[j]       v = base_v + sum_j s_j (d fa[j]^T) fb[j]

    u first: each `h fb[j]^T` over I in chunks of BI (with ONE_LOOP one loop for all J), then u in column
    chunks of BO; then each `d fa[j]^T` over O and v over I. So each pair is read twice within the
    program, fa[j] in two passes one after the other, where two lowrank_add launches read every pair
    twice from memory. The first products are dead before the second are made, yet the compiled kernel
    holds more registers than lowrank_add (`_lowrank_pairs.py` has ptxas's counts)."""
    t = tl.program_id(0).to(tl.int64)
    _add_task(t, base_u, h, fb, fa, scales, u, N, S, I, O, J, HAS_BASE_U, HAS_SCALES, PRECISION, ONE_LOOP, BN, BS, BI,
              BO)
    if WANT_V:
        rn = tl.arange(0, BN)
        rs = tl.arange(0, BS)
        es = _factor_products(d + t * N * O, fa, t * S * O, scales, rn, rs, N, S, O, J, False, HAS_SCALES,
                              ONE_LOOP, BN, BS, BO, PRECISION)
        _store_sum(es, fb, t * S * I, base_v + t * N * I, v + t * N * I, rn, rs, N, S, I, J, HAS_BASE_V, BN, BS,
                   BI, PRECISION)
