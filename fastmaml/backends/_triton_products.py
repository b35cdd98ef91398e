"""The matrix products of the Triton kernels (`_triton_kernels.py`), and the two settings of how they are
computed: PRECISION and K_CHUNK, each read once from the environment when the kernels are defined (for
the A/B of `benchmarks/gpu_check.sh`; docs/kernels.md lists the switches). Imported only with the kernels,
after `TRITON_INTERPRET` is settled (see `_triton_kernels.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._switches import env_choice, env_int

# How float32 products are computed, both float32-accurate: "ieee" (FMAs on the CUDA cores) or "tf32x3"
# (three TF32 tensor-core products of the split operands, hi*hi + hi*lo + lo*hi). Plain "tf32" would
# lose about three digits and is not offered. "auto" (the default) takes ieee in the register layout
# and tf32x3 in the scratch layout:
# - register layout: every product is unrolled per thread; compiled for sm_90 (Triton 3.6, ptxas -v)
#   the sinusoid net's backward at 8 warps spills 1.8 KiB a thread with ieee and 13.8 KiB with tf32x3
#   (both at 255 registers): the split operands of the whole unrolled kernel do not fit;
# - scratch layout: one small product a loop step; tf32x3 compiles without spills (255 registers) and
#   measured 14-15% faster than ieee at width 128 (H200, T=65,536, K=1 and 5; benchmarks/RESULTS.md).
# Read once, when the kernels are defined, from FASTMAML_TRITON_PRECISION (the GPU check's A/B sets
# ieee or tf32x3 for both layouts). float64 ignores it.
_precision = env_choice("FASTMAML_TRITON_PRECISION", ("auto", "ieee", "tf32x3"))
PRECISION: tl.constexpr = tl.constexpr("ieee" if _precision == "auto" else _precision)
SCRATCH_PRECISION: tl.constexpr = tl.constexpr("tf32x3" if _precision == "auto" else _precision)


# The float32 products' reduction dimension in chunks of K_CHUNK, summed in K order (the same sums as
# one product), or in one piece (0, the default). Triton's FMA products hold whole rows of both operands
# along K in each thread; in chunks they hold K_CHUNK at a time. Compiled for sm_90 (ptxas -v, 8 warps),
# chunks of 32 against one piece: the 1-128-128-1 net's forward kernel spills 2.4 KiB per thread instead
# of 23.9 KiB (255 registers instead of ptxas's 32-register fallback), the 1-40-40-1 backward 1.2 KiB
# instead of 1.8 KiB; the 1-128-128-1 backward stays at 32 registers and ~70 KiB of spills either way.
# Not the default until a GPU measures it (the GPU check's A/B): each chunk's operands change layout
# through shared memory, which may cost more than the spills it saves. Compile time is about the same
# (the 4-layer width-128 backward: 487 s chunked, 457 s not, each beside another compile on 2 cores).
# float64 products (DMMA on sm_90, no such replication) are never chunked: they failed to compile in
# chunks. Read once, like PRECISION, from FASTMAML_TRITON_K_CHUNK.
_k_chunk = env_int("FASTMAML_TRITON_K_CHUNK", 0, lambda n: n == 0 or (n >= 16 and n & (n - 1) == 0),
                   "0 or a power of two >= 16")
K_CHUNK: tl.constexpr = tl.constexpr(_k_chunk)


@triton.jit
def _split_cols(x):
    """`x [R, C]` -> `(x[:, :C/2], x[:, C/2:])`."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [R, 2, C // 2]), [0, 2, 1]))


@triton.jit
def _split_rows(x):
    """`x [R, C]` -> `(x[:R/2], x[R/2:])`."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [2, R // 2, C]), [1, 2, 0]))


@triton.jit
def _mm(a, b):
    """`a [M, K] @ b [K, N]`; float32 with K_CHUNK > 0: K in chunks accumulated in K order (the sum's
    order is that of one product over all of K). A side under 16 (a layer of width 1, which the register
    layout leaves unpadded under FASTMAML_TRITON_WIDTH1=keep): the products broadcast and summed along K,
    since `tl.dot` takes sides of 16 or more and padding a 1 to 16 would multiply 15 zeros for every term.
    K = 1 is the outer product itself: written as a sum over K, Triton's combine pass makes it a `tl.dot`
    with TF32 inputs wherever M and N are 16 or more (the input layer's products, those through the output
    layer), whatever PRECISION says. Widths are 1 or padded to 16 (`triton_maml._pad_feature`), so no other
    K under 16 meets M, N >= 16."""
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    SMALL: tl.constexpr = M < 16 or K < 16 or N < 16
    if K == 1:
        acc = a * b
    elif SMALL:
        tl.static_assert(M < 16 or N < 16, "a sum over K < 16 with M, N >= 16 would become a TF32 tl.dot")
        acc = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        N_CHUNKS: tl.constexpr = K // K_CHUNK if (K_CHUNK > 0 and K > K_CHUNK and a.dtype == tl.float32) else 1
        pa = (a,)
        pb = (b,)
        for level in tl.static_range(6):  # halves until the chunk size (K up to 64 chunks)
            if N_CHUNKS > 1 and pa[0].shape[1] > K_CHUNK:
                na = ()
                nb = ()
                for i in tl.static_range(2 ** level):
                    a0, a1 = _split_cols(pa[i])
                    b0, b1 = _split_rows(pb[i])
                    na = na + (a0, a1)
                    nb = nb + (b0, b1)
                pa = na
                pb = nb
        acc = tl.dot(pa[0], pb[0], input_precision=PRECISION)
        for i in tl.static_range(1, N_CHUNKS):
            acc = tl.dot(pa[i], pb[i], acc, input_precision=PRECISION)
    return acc


@triton.jit
def _mm_nt(a, b):
    """`a [M, K] @ b[N, K]^T`."""
    return _mm(a, tl.trans(b))


@triton.jit
def _mm_tn(a, b):
    """`a[K, M]^T @ b [K, N]`."""
    return _mm(tl.trans(a), b)
