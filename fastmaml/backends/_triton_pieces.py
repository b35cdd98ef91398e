"""The small pieces of the Triton kernels (`_triton_kernels.py`), inlined by Triton: the activation and
its derivatives, each layer's offsets in the flat parameters, loads and stores of a task's padded blocks
(weights, points, targets; zero outside the real sizes), and flat copies. Imported only with the kernels,
after `TRITON_INTERPRET` is settled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The hidden activation s(z): 0 = relu, 1 = tanh."""
    if ACT == 0:
        h = tl.where(z < 0, 0.0, z)  # torch's relu: NaN stays NaN (a diverged task must not look finite)
    else:
        # tanh from exp(-2|z|), which cannot overflow.
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        h = tl.where(z < 0, -t, t)
    return h


@triton.jit
def _dmul(x, h, ACT: tl.constexpr):
    """`x s'(z)` written with h = s(z): relu as torch's threshold_backward, 0 where h <= 0, else x (a choice,
    not a product with a mask: 0 * inf would be NaN, and a NaN h passes x); tanh x (1 - h^2)."""
    if ACT == 0:
        y = tl.where(h <= 0, 0.0, x)
    else:
        y = x * (1.0 - h * h)
    return y


@triton.jit
def _ddact(h, ACT: tl.constexpr):
    """s''(z) written with h = s(z): relu 0, tanh -2 h (1 - h^2)."""
    if ACT == 0:
        spp = tl.zeros_like(h)
    else:
        spp = -2.0 * h * (1.0 - h * h)
    return spp


@triton.jit
def _ce_points(z, y, DL, c):
    """Cross-entropy point by point, the classes along the last axis of the logits `z [..., BD]` (`c`, the
    class numbers, broadcast to it; columns from `DL` are padding), `y [...]` the labels. Returns each point's
    loss `[...]`, its gradient in z `[..., BD]` (softmax - onehot) and the softmax. A class out of range (possible
    where the data checks are off: GPU tensors by default) makes the point's loss and gradient NaN, as in the
    CUDA kernels, instead of a silently wrong finite loss."""
    zm = tl.where(c < DL, z, float("-inf"))
    m = tl.max(zm, axis=-1)
    e = tl.exp(zm - tl.expand_dims(m, -1))
    s = tl.sum(e, axis=-1)
    p = e / tl.expand_dims(s, -1)
    onehot = c == tl.expand_dims(y, -1)
    zy = tl.sum(tl.where(onehot, z, 0.0), axis=-1)
    lse = m + tl.log(s)
    valid = (y >= 0) & (y < DL)
    point = tl.where(valid, lse - zy, float("nan"))
    grad = tl.where(tl.expand_dims(valid, -1), p - onehot.to(z.dtype), float("nan"))
    return point, grad, p


@triton.jit
def _layer_offsets(D0, D1, D2, D3, D4, DEPTH: tl.constexpr):
    """Offsets of each layer's W in the flat parameters (`b_l` follows `W_l`), as a tuple."""
    dims = (D0, D1, D2, D3, D4)
    offs = (0,)
    for i in tl.static_range(DEPTH):
        offs = offs + (offs[i] + dims[i + 1] * dims[i] + dims[i + 1],)
    return offs


@triton.jit
def _load_layer(base, off, DO, DI, BO: tl.constexpr, BI: tl.constexpr):
    """`W [BO, BI]`, `b [BO]` of one layer (zero outside `[DO, DI]`)."""
    return _load_weight(base, off, DO, DI, BO, BI), _load_bias(base, off, DO, DI, BO)


@triton.jit
def _load_weight(base, off, DO, DI, BO: tl.constexpr, BI: tl.constexpr):
    """`W [BO, BI]` of one layer (zero outside `[DO, DI]`)."""
    r = tl.arange(0, BO)
    c = tl.arange(0, BI)
    mask = (r[:, None] < DO) & (c[None, :] < DI)
    return tl.load(base + off + r[:, None] * DI + c[None, :], mask=mask, other=0.0)


@triton.jit
def _load_bias(base, off, DO, DI, BO: tl.constexpr):
    """`b [BO]` of one layer (zero outside DO): the layer's W `[DO, DI]` starts at `off`, b follows it."""
    r = tl.arange(0, BO)
    return tl.load(base + off + DO * DI + r, mask=r < DO, other=0.0)


@triton.jit
def _store_layer(base, off, DO, DI, w, b, BO: tl.constexpr, BI: tl.constexpr):
    r = tl.arange(0, BO)
    c = tl.arange(0, BI)
    mask = (r[:, None] < DO) & (c[None, :] < DI)
    tl.store(base + off + r[:, None] * DI + c[None, :], w, mask=mask)
    tl.store(base + off + DO * DI + r, b, mask=r < DO)


@triton.jit
def _load_points(base, N, D, BN: tl.constexpr, BD: tl.constexpr):
    """`[BN, BD]` block of a task's `[N, D]` points or targets (zero outside)."""
    r = tl.arange(0, BN)
    c = tl.arange(0, BD)
    mask = (r[:, None] < N) & (c[None, :] < D)
    return tl.load(base + r[:, None] * D + c[None, :], mask=mask, other=0.0)


@triton.jit
def _store_points(base, N, D, val, BN: tl.constexpr, BD: tl.constexpr):
    r = tl.arange(0, BN)
    c = tl.arange(0, BD)
    mask = (r[:, None] < N) & (c[None, :] < D)
    tl.store(base + r[:, None] * D + c[None, :], val, mask=mask)


@triton.jit
def _load_targets(base, N, DL, BN: tl.constexpr, BDL: tl.constexpr, LOSS: tl.constexpr):
    """mse: `[BN, BDL]` float targets; cross-entropy: `[BN]` int32 classes, -1 for a label out of range."""
    if LOSS == 0:
        y = _load_points(base, N, DL, BN, BDL)
    else:
        r = tl.arange(0, BN)
        y = tl.load(base + r, mask=r < N, other=0)
        # Judged in int64, as given: narrowed first, a label past int32 (2**32 + 1) would wrap into a class in
        # range and give a finite, wrong loss where `_ce_points` promises NaN.
        y = tl.where((y >= 0) & (y < DL), y, -1).to(tl.int32)
    return y


@triton.jit
def _copy(dst, src, P, BLOCK: tl.constexpr):
    """`dst[:P] = src[:P]` (flat)."""
    for s in range(0, P, BLOCK):
        o = s + tl.arange(0, BLOCK)
        tl.store(dst + o, tl.load(src + o, mask=o < P), mask=o < P)


@triton.jit
def _accumulate(dst, src, P, BLOCK: tl.constexpr):
    """`dst[:P] += src[:P]` (flat)."""
    for s in range(0, P, BLOCK):
        o = s + tl.arange(0, BLOCK)
        m = o < P
        tl.store(dst + o, tl.load(dst + o, mask=m) + tl.load(src + o, mask=m), mask=m)


@triton.jit
def _zero(dst, P, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    for s in range(0, P, BLOCK):
        o = s + tl.arange(0, BLOCK)
        tl.store(dst + o, tl.zeros([BLOCK], dtype=DTYPE), mask=o < P)
