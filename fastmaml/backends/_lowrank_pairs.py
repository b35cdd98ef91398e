"""Both products of a layer's weight cotangent in factors with one step's factors, in one operation: the
factored backend's written-out sweep (`_factored_reverse`) needs, for each step's factors `h [T, N, I]`
and `d [T, N, O]` and the cotangent `bar W = sum_j fa[j]^T fb[j]` (fa[j] [T, S, O], fb[j] [T, S, I]),

    u = base_u + sum_j s_j (h fb[j]^T) fa[j]   (h bar W^T)      v = base_v + sum_j s_j (d fa[j]^T) fb[j]   (d bar W)

By default these are two lowrank_add launches, which read every pair from memory twice (with
FASTMAML_FACTORED_KERNELS=cuda one launch of the extension's CUDA kernel, whose two blocks of a task are
neighbours: the second finds the pairs in L2). With
FASTMAML_FACTORED_PAIRS=fused (read once, at import; the GPU check's A/B `fpairs`) one kernel
(`_triton_lowrank.lowrank_pairs_kernel`) makes both, reading each pair twice within one program, the second
time just after the first: at K = 5, W = 128 the sweep's own low-rank bytes drop from 1,040 to 790 KB a task
(1,425 to 1,175 with the forward's; logged on the CPU, each pair counted once a program). It holds more
registers than lowrank_add, though (ptxas -v, sm_90a, float32, 16 x 16 padded points, I = O = 128, 4 warps,
chunks of 32): 114 at one pair, 255 at three and four (20 B of spills at four), 198 at five, 255 with 24 B
of spills at eight (lowrank_add: 72, 96, 118, 148, 168); in chunks of 16, 148 at five; at 8 warps in chunks
of 16, 107 at eight. Whether the reuse pays for the occupancy is for a GPU to say. Within PAIRS_MAX_TILES
(five pairs of 16 x 16 in float32, four in float64: at most a few bytes of spills) the fused kernel runs,
past it the batched products (the sweep's groups stay within it).

Not differentiated (the sweep runs outside autograd): a plain function, not an operation with a
derivative. Where the kernels run, their precision, warps and padding are `_lowrank`'s, read at call
time.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._switches import env_choice
from . import _lowrank as lr
from . import _lowrank_cuda
from .triton_maml import _device_guard, _pad

FUSED = env_choice("FASTMAML_FACTORED_PAIRS", ("two", "fused")) == "fused"
PAIRS_MAX_TILES = {torch.float32: 1280, torch.float64: 1024}


def max_tiles(dtype: torch.dtype) -> int:
    """The padded `[N, S]` elements over all pairs of one call: `_lowrank.MAX_TILES` for two lowrank_add
    launches, PAIRS_MAX_TILES for the fused kernel."""
    return PAIRS_MAX_TILES[dtype] if FUSED else lr.MAX_TILES


def _pairs_batched(base_u, base_v, h, d, fa, fb, scales, want_v):
    u = lr._add_batched(base_u, h, fb, fa, scales)
    return u, (lr._add_batched(base_v, d, fa, fb, scales) if want_v else None)


def pair_products(base_u: Optional[torch.Tensor], base_v: Optional[torch.Tensor], h: torch.Tensor, d: torch.Tensor,
                  fa: list[torch.Tensor], fb: list[torch.Tensor], scales: Optional[torch.Tensor],
                  want_v: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`(u [T, N, O], v [T, N, I] or None)` above (bases None: zeros; scales `[J]` or None: ones; v only
    where want_v)."""
    T, N, I = h.shape
    O, S, J = d.shape[2], fa[0].shape[1], len(fa)
    if not FUSED:
        if want_v and lr.language(h, J, S) == "cuda" and lr.add_kernel_reason(h, J, S, "cuda") is None:
            # both in one launch of the extension's CUDA kernel: a task's u and v by neighbouring blocks, the
            # pairs read from memory once
            return _lowrank_cuda.pairs(base_u, base_v, h, d, list(fa), list(fb), scales)
        u = lr.products(base_u, h, fb, fa, scales)
        return u, (lr.products(base_v, d, fa, fb, scales) if want_v else None)
    # past the fused kernel's register bound (one pair always fits: `kernel_reason` bounds one tile)
    if lr.kernel_reason(h, J, S) is not None or (J > 1 and J * _pad(N) * _pad(S) > max_tiles(h.dtype)):
        return _pairs_batched(base_u, base_v, h, d, fa, fb, scales, want_v)
    h, d = h.contiguous(), d.contiguous()
    fa = tuple(a.contiguous() for a in fa)
    fb = tuple(b.contiguous() for b in fb)
    u = h.new_empty(T, N, O)
    v = h.new_empty(T, N, I) if want_v else u  # (never written without WANT_V)
    if T > 0:
        with _device_guard(h):
            lr._module().lowrank_pairs_kernel[(T,)](
                h, d, fa, fb, base_u.contiguous() if base_u is not None else u,
                base_v.contiguous() if base_v is not None and want_v else v,
                scales.contiguous() if scales is not None else u, u, v, T, N, S, I, O, J=J,
                HAS_BASE_U=base_u is not None, HAS_BASE_V=base_v is not None and want_v,
                HAS_SCALES=scales is not None, WANT_V=want_v, PRECISION=lr._precision(h.dtype),
                ONE_LOOP=lr._one_loop(h.dtype, N, S, J), BN=_pad(N), BS=_pad(S), BI=lr._chunk(I), BO=lr._chunk(O),
                num_warps=lr.WARPS, num_stages=lr.STAGES,
            )
    return u, (v if want_v else None)


__all__ = ["pair_products"]
