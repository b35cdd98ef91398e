// fastmaml: the matrix products of a team of several threads (a CUDA thread block) in register tiles.
//
// With one output element per rank, every multiply-add of a product costs two loads from the workspace
// (shared memory on a GPU): the load units, not the multipliers, bound the time. Here each rank owns a
// tile of RB rows by CB columns of the output and keeps it in registers over the whole sum, so each
// step of the sum loads RB + CB values for RB * CB multiply-adds (4 x 4: 8 loads for 16, against 32).
// Offsets inside one product are 32-bit (fewer registers): a layer's operands span fewer than 2^31
// elements.
//
// Ownership: the output [R, C] is cut into units of RB rows and CB columns; unit u (u = rank, rank +
// size, ...) holds rows rb * RB + i (i < RB) and the interleaved columns g + G * j (j < CB, G = ceil(C /
// CB) column groups), where rb = u / G and g = u mod G. Neighbouring ranks hold neighbouring columns for
// every j, so a warp's reads of B's columns are consecutive addresses. Rows and columns past the output
// are read at the last valid index (so every load is in bounds) and never written. Every element has
// one owner and sums over k in one fixed order (deterministic).
//
// Which tile: `pick_tile` weighs the loads on the slowest rank (rounds of units) with the loads of the
// whole team (what other blocks on the same multiprocessor compete for), both per step of the sum; a
// small output keeps small tiles so that the team's threads stay busy.
#pragma once

#include "config.h"
#include "team.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// Three square shapes. Each is instantiated at every product's call site, and with five (2 x 4 and 4 x
// 2 too) the CUDA reverse sweep outgrew what nvcc inlines into its kernel and spilled 0.7-1 KiB per
// thread (nvcc 13.0, sm_90a, -Xptxas -v); with these three the float32 reverse sweeps spill 0-36 bytes.
// kTileMma is not a register tile: the warps' tensor-core tiles of team_mma.h, which a team asks for
// explicitly (pick_tile never returns it).
enum TileShape : int { kTile1x1 = 0, kTile2x2 = 1, kTile4x4 = 2, kTileMma = 3 };

FASTMAML_HD inline int tile_size(int shape) { return shape == kTile4x4 ? 4 : shape == kTile2x2 ? 2 : 1; }

// The tile of a [R, C] product for a team of `size` threads (see the file comment). Cost per step of the
// sum, in loads: rounds * (RB + CB) on the slowest rank plus units * (RB + CB) / size for the team
// (compared times size, in integers).
FASTMAML_HD inline int pick_tile(int R, int C, int size) {
  int best = kTile1x1;
  int64_t best_cost = 0;
  for (int shape = kTile1x1; shape <= kTile4x4; ++shape) {
    const int t = tile_size(shape);
    const int64_t units = int64_t((R + t - 1) / t) * ((C + t - 1) / t);
    const int64_t rounds = (units + size - 1) / size;
    const int64_t cost = (rounds * size + units) * (2 * t);
    if (shape == kTile1x1 || cost < best_cost) {
      best = shape;
      best_cost = cost;
    }
  }
  return best;
}

// The sum over k = kb .. ke - 1 of one unit's tile, added to `acc`: 32-bit offsets (the unit's row and
// column offsets plus a running k offset) from two opaque base pointers. In a straight run with unit
// strides nvcc unrolls it into loads at constant offsets from one address a row or column.
template <int RB, int CB, typename T>
FASTMAML_HD inline void tile_sum(T (&acc)[RB][CB], const T* a, const int (&ar)[RB], const T* B, const int (&bc)[CB],
                                 int ak, int bk, int kb, int ke) {
  int oa = kb * ak, ob = kb * bk;
  for (int k = kb; k < ke; ++k) {
    T av[RB], bv[CB];
FASTMAML_UNROLL
    for (int i = 0; i < RB; ++i) av[i] = a[ar[i] + oa];
FASTMAML_UNROLL
    for (int j = 0; j < CB; ++j) bv[j] = B[bc[j] + ob];
FASTMAML_UNROLL
    for (int i = 0; i < RB; ++i) {
FASTMAML_UNROLL
      for (int j = 0; j < CB; ++j) acc[i][j] += av[i] * bv[j];
    }
    oa += ak;
    ob += bk;
  }
}

// store(r, c, alpha * sum_k a[r * a_row + k * a_k] * B[c * b_col + k * b_k]) for this rank's units: once
// per output element, by its owner. Each unit's sums run k = s, s + 1, ..., Kd - 1, 0, ..., s - 1 (two
// straight runs): s = 0, or with `rotate` s = (rb * RB + g) mod Kd (see team_gemm_nt). Each element's
// order is fixed (deterministic). The owner of (r, c) depends only on (R, C, the tile shape, the team),
// so two products of the same shape into one output need no sync between them.
template <int RB, int CB, typename T, typename Team, typename Store>
FASTMAML_HD inline void team_tiles(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t a_row,
                                   int64_t a_k, const T* __restrict__ B, int64_t b_col, int64_t b_k, bool rotate,
                                   const Store& store, const Team& tm) {
  if (Kd <= 0) return;
  const int G = (C + CB - 1) / CB;
  const int units = ((R + RB - 1) / RB) * G;
  const int ak = static_cast<int>(a_k), bk = static_cast<int>(b_k);
  const T* pa = opaque(a);
  const T* pb = opaque(B);
  for (int u = tm.rank(); u < units; u += tm.size()) {
    const int rb = u / G, g = u - rb * G;
    int ar[RB], bc[CB];  // offsets of the rows of a and the columns of B (32-bit: fewer registers)
FASTMAML_UNROLL
    for (int i = 0; i < RB; ++i) ar[i] = static_cast<int>((rb * RB + i < R ? rb * RB + i : R - 1) * a_row);
FASTMAML_UNROLL
    for (int j = 0; j < CB; ++j) bc[j] = static_cast<int>((g + G * j < C ? g + G * j : C - 1) * b_col);
    T acc[RB][CB];
FASTMAML_UNROLL
    for (int i = 0; i < RB; ++i) {
FASTMAML_UNROLL
      for (int j = 0; j < CB; ++j) acc[i][j] = T(0);
    }
    // Two straight runs, s .. Kd - 1 then 0 .. s - 1, through one copy of the loop (not unrolled: two
    // copies at every product's call site made the reverse sweep spill more).
    const int s = rotate ? (rb * RB + g) % Kd : 0;
    int kb = s, ke = Kd;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
    for (int run = 0; run < 2; ++run) {
#if defined(__CUDA_ARCH__)
      // Both operands in shared memory (the workspace there, theta_k past step 0): told so, nvcc loads
      // them with 32-bit shared addresses (LDS) instead of generic 64-bit ones (LD), and unrolls deeper.
      // A device team has shared_loads() (FASTMAML_CUDA_LDS=0 turns it off, for an A/B).
      if (tm.shared_loads() && __isShared(pa) && __isShared(pb)) {
        __builtin_assume(__isShared(pa));
        __builtin_assume(__isShared(pb));
        tile_sum<RB, CB>(acc, pa, ar, pb, bc, ak, bk, kb, ke);
      } else {
        tile_sum<RB, CB>(acc, pa, ar, pb, bc, ak, bk, kb, ke);
      }
#else
      tile_sum<RB, CB>(acc, pa, ar, pb, bc, ak, bk, kb, ke);
#endif
      kb = 0;
      ke = s;
    }
FASTMAML_UNROLL
    for (int i = 0; i < RB; ++i) {
      const int r = rb * RB + i;
FASTMAML_UNROLL
      for (int j = 0; j < CB; ++j) {
        const int c = g + G * j;
        if (r < R && c < C) store(r, c, alpha * acc[i][j]);
      }
    }
  }
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
