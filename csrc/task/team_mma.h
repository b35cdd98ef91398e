// fastmaml: the team products on tensor cores (float32, sm_80 and later): each warp of the team computes
// units of 16 x 16 outputs, two tiles of mma.sync m16n8k8 on TF32 inputs side by side, three products
// per step of 8 along the sum ("3xTF32"), which keeps close to float32's accuracy; where at most 4 of
// the sum are left, its last step is one of 4 (m16n8k4).
//
// Why. The register tiles of team_tiles.h spend 35-70 instructions of a lane on 16-32 multiply-adds in
// their loops (sm_90 SASS, benchmarks/RESULTS.md), and the reverse sweep issues hundreds of thousands of
// instructions a task. A step of 8 of a unit here is 6 mma (2,048 multiply-adds of the warp) and 46
// other instructions of each lane from shared memory, 62 from generic addresses: loads, TF32 splits,
// addresses. Padding costs some of it back: a unit's rows past the output (10 points fill 10 of 16 rows)
// and steps past the sum are computed too. The step of 4 halves the padding of short sums: a sum over 10
// points takes 8 + 4 instead of 8 + 8, a sum of length 1 (a first layer's input) 4 instead of 8.
//
// 3xTF32. x = hi + lo with hi = x rounded to TF32 (10 mantissa bits) and lo = x - hi, of which the
// tensor core reads 10 mantissa bits: together about 21 bits of x. a b = a_hi b_hi + a_hi b_lo + a_lo
// b_hi up to about 2^-21 of a b (float32 rounds to 2^-24), summed in float32 by the tensor core, the
// main term apart from the two small ones. The order of the sum inside an mma is the hardware's, fixed
// for a GPU: the results are deterministic, but not the FFMA tiles' bits.
//
// Ownership: the output [R, C] is cut into units of 16 rows and 16 columns, unit u = rt * ceil(C / 16) +
// ct; warp w of the team takes u = w, w + warps, ... Within a unit, lane l holds the four elements of
// each mma tile's accumulator fragment (rows l / 4 and l / 4 + 8, columns 2 (l mod 4) and 2 (l mod 4) +
// 1 of the tile). As in team_tiles.h, rows and columns past the output are read at the last valid index
// and never written, and the owner of (r, c) depends on (R, C) and the team only. Steps of the sum past
// Kd read as zero. The steps: Kd / 8 whole steps of 8, then what is left (Kd mod 8) in one step of 4 if
// it is at most 4, else in one step of 8.
//
// On the host (tests/cuda_team_check.cpp) each rank emulates its lane: it loads the fragments of all 32
// lanes of its warp exactly as the device's lanes load theirs, places them where PTX's description of
// m16n8k8 and m16n8k4 put them (written out separately below), multiplies, and keeps its own lane's
// results. A wrong fragment index then gives a wrong product on the CPU. float emulates the TF32 splits;
// double (device code has no double mma here) multiplies exactly. Ranks past the last whole warp own
// nothing.
#pragma once

#include <string.h>

#include "config.h"
#include "team.h"
#include "team_tiles.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// A warp's unit: a tile of 16 rows and 16 columns, two mma tiles side by side (n-tiles j = 0, 1) that
// share A's fragments: per step of 8, 4 loads and splits of A and 4 of B for 2,048 multiply-adds.
constexpr int kMmaRows = 16;
constexpr int kMmaCols = 16;

// The operands of one step of 8 along the sum, as lane (g = lane / 4, t = lane mod 4) of a warp loads
// them for mma.sync m16n8k8 .row.col: x[0..3] = A(r0, k0), A(r1, k0), A(r0, k0 + 4), A(r1, k0 + 4) and,
// for n-tile j, y[j][0..1] = B(k0, c_j), B(k0 + 4, c_j), with r0 = row g and r1 = row g + 8 of the unit,
// c_j = its column 8 j + g, and k0 = the step's first k plus t. A(r, k) = a[ar + k * ak], B(k, c) =
// B[bc + k * bk]; the offsets of the rows and columns (clamped to the output) are the lane's MmaOffsets.
// `last`: the step ends past Kd (its k >= Kd read as zero).
template <typename T>
struct MmaFragments {
  T x[4];
  T y[2][2];
};

struct MmaOffsets {
  int ar0, ar1, bc0, bc1;
};

template <typename T>
FASTMAML_HD inline MmaFragments<T> mma_load(const T* a, const MmaOffsets& o, const T* B, int ak, int bk, int k, int t,
                                            int Kd, bool last) {
  MmaFragments<T> f;
  // Past the sum only in the last step (a constant `last` where the device inlines it, so the main
  // loop's loads carry no test): read at Kd - 1 (in bounds), then zeroed.
  const bool v0 = !last || k + t < Kd, v1 = !last || k + t + 4 < Kd;
  const int k0 = v0 ? k + t : Kd - 1, k1 = v1 ? k + t + 4 : Kd - 1;
  f.x[0] = v0 ? a[o.ar0 + k0 * ak] : T(0);
  f.x[1] = v0 ? a[o.ar1 + k0 * ak] : T(0);
  f.x[2] = v1 ? a[o.ar0 + k1 * ak] : T(0);
  f.x[3] = v1 ? a[o.ar1 + k1 * ak] : T(0);
  f.y[0][0] = v0 ? B[o.bc0 + k0 * bk] : T(0);
  f.y[0][1] = v1 ? B[o.bc0 + k1 * bk] : T(0);
  f.y[1][0] = v0 ? B[o.bc1 + k0 * bk] : T(0);
  f.y[1][1] = v1 ? B[o.bc1 + k1 * bk] : T(0);
  return f;
}

// The operands of the last step when at most 4 of the sum are left (mma.sync m16n8k4 .row.col): x[0..1] =
// A(r0, k0), A(r1, k0) and, for n-tile j, y[j] = B(k0, c_j), with k0 = k + t (read at Kd - 1 and zeroed
// past the sum), the rows and columns as mma_load's.
template <typename T>
struct MmaFragments4 {
  T x[2];
  T y[2];
};

template <typename T>
FASTMAML_HD inline MmaFragments4<T> mma_load4(const T* a, const MmaOffsets& o, const T* B, int ak, int bk, int k,
                                              int t, int Kd) {
  MmaFragments4<T> f;
  const bool v = k + t < Kd;
  const int k0 = v ? k + t : Kd - 1;
  f.x[0] = v ? a[o.ar0 + k0 * ak] : T(0);
  f.x[1] = v ? a[o.ar1 + k0 * ak] : T(0);
  f.y[0] = v ? B[o.bc0 + k0 * bk] : T(0);
  f.y[1] = v ? B[o.bc1 + k0 * bk] : T(0);
  return f;
}

// Whether the step at k, the first past the whole steps of 8, is a step of 4 (at most 4 of the sum left).
FASTMAML_HD inline bool mma_last_is_4(int k, int Kd) { return Kd - k <= 4; }

#if defined(__CUDA_ARCH__)

// x = hi + lo exactly: hi is x rounded to TF32 (half an ulp of TF32 added, the 13 low bits cleared: two
// integer instructions, where nvcc spells cvt.rna.tf32.f32 out in five for sm_90), lo the rest in
// float32, whose low 13 bits the tensor core does not read (lo loses at most 2^-10 of itself, 2^-21 of
// x). For finite x: an infinity comes out as NaN (so does the product either way).
__device__ __forceinline__ void tf32_split(float x, uint32_t& hi, uint32_t& lo) {
  hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
  lo = __float_as_uint(x - __uint_as_float(hi));
}

// d += A B for one warp: A [16 x 8] in a0..a3, B [8 x 8] in b0, b1 (TF32 bits), d [16 x 8] in float32.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // not reached: team_mma runs the FFMA tiles below sm_80
#endif
}

// d += A B for one warp: A [16 x 4] in a0, a1, B [4 x 8] in b0 (TF32 bits), d [16 x 8] in float32.
__device__ __forceinline__ void mma_tf32_k4(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
#else
  __trap();  // not reached, as mma_tf32
#endif
}

// One step of 8 along the sum for both n-tiles: the two small cross terms into `small`, the main one
// into `acc` (independent chains of mma, added at the end).
__device__ __forceinline__ void mma_step(float (&acc)[2][4], float (&small)[2][4], const MmaFragments<float>& f) {
  uint32_t ah[4], al[4];
FASTMAML_UNROLL
  for (int i = 0; i < 4; ++i) tf32_split(f.x[i], ah[i], al[i]);
FASTMAML_UNROLL
  for (int j = 0; j < 2; ++j) {
    uint32_t bh[2], bl[2];
    tf32_split(f.y[j][0], bh[0], bl[0]);
    tf32_split(f.y[j][1], bh[1], bl[1]);
    mma_tf32(small[j], al, bh[0], bh[1]);
    mma_tf32(acc[j], ah, bh[0], bh[1]);
    mma_tf32(small[j], ah, bl[0], bl[1]);
  }
}

// The last step, of 4, as mma_step.
__device__ __forceinline__ void mma_step4(float (&acc)[2][4], float (&small)[2][4], const MmaFragments4<float>& f) {
  uint32_t ah[2], al[2];
  tf32_split(f.x[0], ah[0], al[0]);
  tf32_split(f.x[1], ah[1], al[1]);
FASTMAML_UNROLL
  for (int j = 0; j < 2; ++j) {
    uint32_t bh, bl;
    tf32_split(f.y[j], bh, bl);
    mma_tf32_k4(small[j], al[0], al[1], bh);
    mma_tf32_k4(acc[j], ah[0], ah[1], bh);
    mma_tf32_k4(small[j], ah[0], ah[1], bl);
  }
}

struct MmaSums {
  float4 v[2];  // n-tile j's four accumulator elements
};

// A lane's results of one unit: the whole sum over k < Kd (mma_load's arguments). One function for every
// product of a kernel, not inlined: inlined at every product's call site, nvcc made the layer passes
// (forward, backward) functions of their own and the reverse sweep spilled 260 / 728 B with 592 B of
// stack (sm_90a), against 208 / 640 B and 144 B with this function out of line. kShared: both operands
// in shared memory, loaded with 32-bit shared addresses (LDS).
template <bool kShared>
__device__ __noinline__ MmaSums mma_unit_sums(const float* a, MmaOffsets o, const float* B, int ak, int bk, int t,
                                              int Kd) {
  if constexpr (kShared) {
    __builtin_assume(__isShared(a));
    __builtin_assume(__isShared(B));
  }
  float acc[2][4] = {}, small[2][4] = {};
  const int full = Kd - Kd % 8;  // steps of 8 wholly inside the sum
  int k = 0;
  // One step at a time: this function's registers add to those of the kernel that calls it.
#pragma unroll 1
  for (; k < full; k += 8) mma_step(acc, small, mma_load(a, o, B, ak, bk, k, t, Kd, false));
  if (k < Kd) {
    if (mma_last_is_4(k, Kd)) {
      mma_step4(acc, small, mma_load4(a, o, B, ak, bk, k, t, Kd));
    } else {
      mma_step(acc, small, mma_load(a, o, B, ak, bk, k, t, Kd, true));
    }
  }
  MmaSums s;
FASTMAML_UNROLL
  for (int j = 0; j < 2; ++j) {
    s.v[j] = make_float4(acc[j][0] + small[j][0], acc[j][1] + small[j][1], acc[j][2] + small[j][2],
                         acc[j][3] + small[j][3]);
  }
  return s;
}

#else

// x rounded to TF32 (ties away from zero), as tf32_split's hi; and x's TF32 part as the tensor core
// reads an operand, its 13 low bits dropped (tf32_split's lo).
inline float tf32_round(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u = (u + 0x1000u) & 0xffffe000u;
  memcpy(&x, &u, sizeof u);
  return x;
}
inline float tf32_read(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u &= 0xffffe000u;
  memcpy(&x, &u, sizeof u);
  return x;
}

// Lane `lane`'s main and small accumulators after d += A B, A [16 x KS] and B [KS x 8] as the warp's
// fragments placed them: for float the device's three TF32 products, for double the exact one. The
// accumulator's register i of lane l is element (l / 4 + 8 (i / 2), 2 (l mod 4) + i mod 2) for both steps.
template <typename T, int KS>
void emulate_mma_products(T (&acc)[4], T (&small)[4], int lane, const T (&A)[16][KS], const T (&B)[KS][8]) {
  for (int i = 0; i < 4; ++i) {
    const int m = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
    T main = 0, cross = 0;
    for (int k = 0; k < KS; ++k) {
      const T a = A[m][k], b = B[k][n];
      if constexpr (sizeof(T) == 4) {
        const float ah = tf32_round(a), al = tf32_read(a - ah), bh = tf32_round(b), bl = tf32_read(b - bh);
        main += ah * bh;
        cross += al * bh + ah * bl;
      } else {
        main += a * b;
      }
    }
    acc[i] += main;
    small[i] += cross;
  }
}

// Lane `lane`'s accumulators of n-tile j after one step of 8, for a warp whose lanes loaded fragments as
// `load(l)` gives them. PTX's m16n8k8 (.tf32, .row.col): A's register i of lane l is element (l / 4 + 8
// (i mod 2), l mod 4 + 4 (i / 2)), B's register i element (k = l mod 4 + 4 i, n = l / 4).
template <typename T, typename Load>
void emulate_mma_step(T (&acc)[4], T (&small)[4], int lane, int j, const Load& load) {
  T A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const MmaFragments<T> f = load(l);
    for (int i = 0; i < 4; ++i) A[l / 4 + 8 * (i % 2)][l % 4 + 4 * (i / 2)] = f.x[i];
    for (int i = 0; i < 2; ++i) B[l % 4 + 4 * i][l / 4] = f.y[j][i];
  }
  emulate_mma_products(acc, small, lane, A, B);
}

// The same for the step of 4. PTX's m16n8k4 (.tf32, .row.col): A's register i of lane l is element
// (l / 4 + 8 i, l mod 4), B's register element (k = l mod 4, n = l / 4).
template <typename T, typename Load>
void emulate_mma_step4(T (&acc)[4], T (&small)[4], int lane, int j, const Load& load) {
  T A[16][4], B[4][8];
  for (int l = 0; l < 32; ++l) {
    const MmaFragments4<T> f = load(l);
    for (int i = 0; i < 2; ++i) A[l / 4 + 8 * i][l % 4] = f.x[i];
    B[l % 4][l / 4] = f.y[j];
  }
  emulate_mma_products(acc, small, lane, A, B);
}

#endif

// team_mma's warps (the file comment).
template <typename T, typename Team, typename Store>
FASTMAML_HD inline void mma_warp_tiles(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t a_row,
                                       int64_t a_k, const T* __restrict__ B, int64_t b_col, int64_t b_k,
                                       const Store& store, const Team& tm) {
  if (Kd <= 0 || R <= 0 || C <= 0) return;
  const int warps = tm.size() / 32, warp = tm.rank() / 32, lane = tm.rank() % 32;
  if (warp >= warps) return;
  const int g = lane / 4, t = lane % 4;
  const int CT = (C + kMmaCols - 1) / kMmaCols, units = ((R + kMmaRows - 1) / kMmaRows) * CT;
  const int ak = static_cast<int>(a_k), bk = static_cast<int>(b_k);
  const T* pa = opaque(a);
  const T* pb = opaque(B);
#if defined(__CUDA_ARCH__)
  const bool shared = tm.shared_loads() && __isShared(pa) && __isShared(pb);
#endif
  // Unit u = rt * CT + ct, stepped by `warps` units without a division a unit (an integer division is about
  // 25 sm_90a instructions, and a one-step task runs some 67 small units).
  const int drt = warps / CT, dct = warps - drt * CT;
  for (int u = warp, rt = warp / CT, ct = warp - rt * CT; u < units;
       u += warps, rt += drt, ct += dct, (ct >= CT ? (ct -= CT, ++rt) : 0)) {
    // Lane l's operand offsets: its rows l / 4 and l / 4 + 8 of the unit and its columns l / 4 and
    // l / 4 + 8, clamped to the output.
    const auto offsets = [&](int l) {
      const int r0 = rt * kMmaRows + l / 4, r1 = r0 + 8, c0 = ct * kMmaCols + l / 4, c1 = c0 + 8;
      return MmaOffsets{static_cast<int>((r0 < R ? r0 : R - 1) * a_row),
                        static_cast<int>((r1 < R ? r1 : R - 1) * a_row),
                        static_cast<int>((c0 < C ? c0 : C - 1) * b_col),
                        static_cast<int>((c1 < C ? c1 : C - 1) * b_col)};
    };
    T acc[2][4] = {};
#if defined(__CUDA_ARCH__)
    const MmaOffsets o = offsets(lane);
    const MmaSums s =
        shared ? mma_unit_sums<true>(pa, o, pb, ak, bk, t, Kd) : mma_unit_sums<false>(pa, o, pb, ak, bk, t, Kd);
FASTMAML_UNROLL
    for (int j = 0; j < 2; ++j) {
      acc[j][0] = s.v[j].x;
      acc[j][1] = s.v[j].y;
      acc[j][2] = s.v[j].z;
      acc[j][3] = s.v[j].w;
    }
#else
    const int full = Kd - Kd % 8;  // steps of 8 wholly inside the sum
    for (int j = 0; j < 2; ++j) {
      T small[4] = {};
      for (int k = 0; k < Kd; k += 8) {
        if (k >= full && mma_last_is_4(k, Kd)) {
          emulate_mma_step4(acc[j], small, lane, j,
                            [&](int l) { return mma_load4(pa, offsets(l), pb, ak, bk, k, l % 4, Kd); });
        } else {
          emulate_mma_step(acc[j], small, lane, j, [&](int l) {
            return mma_load(pa, offsets(l), pb, ak, bk, k, l % 4, Kd, k >= full);
          });
        }
      }
      for (int i = 0; i < 4; ++i) acc[j][i] += small[i];
    }
#endif
    // n-tile j's accumulator element i: row g (i < 2) or g + 8, column 8 j + 2 t + (i mod 2).
FASTMAML_UNROLL
    for (int j = 0; j < 2; ++j) {
FASTMAML_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int r = rt * kMmaRows + g + (i >= 2 ? 8 : 0), col = ct * kMmaCols + 8 * j + 2 * t + (i & 1);
        if (r < R && col < C) store(r, col, alpha * acc[j][i]);
      }
    }
  }
}

// Whether kTileMma runs team_mma for T: float on a device with TF32 mma (sm_80 and later), and on the
// host (the emulation, any T). Elsewhere (double on the device) kTileMma runs the 4 x 4 register tiles,
// and no code of this file is compiled into the kernel (a CUDA block of double never asks for it).
#if defined(__CUDA_ARCH__)
template <typename T>
constexpr bool kMmaCapable = sizeof(T) == 4 && __CUDA_ARCH__ >= 800;
#else
template <typename T>
constexpr bool kMmaCapable = true;
#endif

// store(r, c, alpha * sum_k a[r * a_row + k * a_k] * B[c * b_col + k * b_k]) for this rank's elements
// (the file comment), for T with kMmaCapable<T>.
template <typename T, typename Team, typename Store>
FASTMAML_HD inline void team_mma(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t a_row, int64_t a_k,
                                 const T* __restrict__ B, int64_t b_col, int64_t b_k, const Store& store,
                                 const Team& tm) {
  static_assert(kMmaCapable<T>, "team_mma: no tensor-core products for this type here");
  mma_warp_tiles(R, C, Kd, alpha, a, a_row, a_k, B, b_col, b_k, store, tm);
}

// The team products with the tile `shape` (the team's tile(R, C)): a register tile of team_tiles.h or the
// tensor-core tiles above. No sync.
// store(r, c, alpha * sum_k a[r * ars + k * aks] * B[k * ldb + c]), k in order (kTileMma: steps of 8 in
// order, the last maybe of 4).
template <typename T, typename Team, typename Store>
FASTMAML_HD inline void team_gemm_nn(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t ars,
                                     int64_t aks, const T* __restrict__ B, int64_t ldb, const Store& store,
                                     const Team& tm, int shape) {
  if (R <= 0 || C <= 0) return;
  switch (shape) {
    case kTileMma:
      if constexpr (kMmaCapable<T>) {
        team_mma(R, C, Kd, alpha, a, ars, aks, B, 1, ldb, store, tm);
        break;
      }
      [[fallthrough]];
    case kTile4x4: team_tiles<4, 4>(R, C, Kd, alpha, a, ars, aks, B, 1, ldb, false, store, tm); break;
    case kTile2x2: team_tiles<2, 2>(R, C, Kd, alpha, a, ars, aks, B, 1, ldb, false, store, tm); break;
    default: team_tiles<1, 1>(R, C, Kd, alpha, a, ars, aks, B, 1, ldb, false, store, tm); break;
  }
}

// store(r, c, sum_k a[r * lda + k] * B[c * ldb + k]). The rows of B a warp reads here lie ldb elements
// apart: read at the same k they would fall on few shared-memory banks (ldb = 40 floats: 4 banks, an
// 8-way conflict). The register tiles' sums start at k = (rb * RB + g) mod Kd and wrap around instead,
// so neighbouring ranks read neighbouring addresses (kTileMma sums in steps from k = 0).
template <typename T, typename Team, typename Store>
FASTMAML_HD inline void team_gemm_nt(int R, int C, int Kd, const T* __restrict__ a, int64_t lda,
                                     const T* __restrict__ B, int64_t ldb, const Store& store, const Team& tm,
                                     int shape) {
  if (R <= 0 || C <= 0) return;
  switch (shape) {
    case kTileMma:
      if constexpr (kMmaCapable<T>) {
        team_mma(R, C, Kd, T(1), a, lda, 1, B, ldb, 1, store, tm);
        break;
      }
      [[fallthrough]];
    case kTile4x4: team_tiles<4, 4>(R, C, Kd, T(1), a, lda, 1, B, ldb, 1, true, store, tm); break;
    case kTile2x2: team_tiles<2, 2>(R, C, Kd, T(1), a, lda, 1, B, ldb, 1, true, store, tm); break;
    default: team_tiles<1, 1>(R, C, Kd, T(1), a, lda, 1, B, ldb, 1, true, store, tm); break;
  }
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
