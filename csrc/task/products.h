// fastmaml: the primitives of the per-task math: math functions by scalar type, dot and axpy, the two
// matrix products every layer needs (gemm_nn_acc, gemm_nt_acc, and gemm_*_then ending in a pointwise
// step), and fill, copy and add_col_sums. With a team, none of them syncs.
#pragma once

#include "config.h"
#include "host_tiles.h"
#include "team.h"
#include "team_mma.h"  // with team_tiles.h

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// Small helpers. Math functions by scalar type: the float overloads keep float32 kernels in float.

FASTMAML_HD inline float fm_exp(float x) { return expf(x); }
FASTMAML_HD inline double fm_exp(double x) { return exp(x); }
FASTMAML_HD inline float fm_log(float x) { return logf(x); }
FASTMAML_HD inline double fm_log(double x) { return log(x); }
FASTMAML_HD inline float fm_tanh(float x) { return tanhf(x); }
FASTMAML_HD inline double fm_tanh(double x) { return tanh(x); }

// Dot product with four independent accumulators: a fixed summation order (deterministic) that the
// compiler can still map onto vector registers, which a single running sum forbids without -ffast-math.
template <typename T>
FASTMAML_HD inline T dot(const T* __restrict__ a, const T* __restrict__ b, int n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < n; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

// y += a * x
template <typename T>
FASTMAML_HD inline void axpy(T a, const T* __restrict__ x, T* __restrict__ y, int n) {
  for (int j = 0; j < n; ++j) y[j] += a * x[j];
}

// The two small matrix products every layer needs. At MAML's sizes (tens of points, widths of tens)
// loads and stores bound the time, not multiplies, so on the host (gcc or clang) they keep tiles of the
// output in vector registers through the compilers' generic vector types (16 bytes, SSE2/NEON, by
// default: no -march flag needed; 32 in the AVX2 build); gcc does not find that register tiling by
// itself from scalar loops. Elsewhere (CUDA device code, other compilers, -DFASTMAML_NO_HOST_VECTORS)
// they are plain loops. Both sum in a fixed order (deterministic).

// How a team product (team_tiles.h) stores an output element: its owner adds `v` (alpha times the sum).
template <typename T>
struct AddTo {
  T* out;
  int64_t ldo;
  FASTMAML_HD void operator()(int r, int c, T v) const { out[r * ldo + c] += v; }
};

// out[r, c] += alpha * sum_k a[r * ars + k * aks] * B[k * ldb + c]   (r < R, c < C, k < Kd)
// A team of several threads: register tiles of the output per rank (team_tiles.h), k in order.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nn_acc(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t ars,
                                    int64_t aks, const T* __restrict__ B, int64_t ldb, T* __restrict__ out,
                                    int64_t ldo, const Team& tm = Team()) {
  if (tm.size() > 1) {
    team_gemm_nn(R, C, Kd, alpha, a, ars, aks, B, ldb, AddTo<T>{out, ldo}, tm, tm.tile(R, C));
    return;
  }
#ifdef FASTMAML_HOST_VECTORS
  constexpr int L = Vec16<T>::lanes;
  const int nvec = C / L;  // whole vectors in a row
  const int c1 = nvec * L;
  // Column blocks of two vectors, rows in tiles of up to five (10 accumulators, two vectors of B and a
  // broadcast: 13 of the 16 vector registers); an odd last vector in tiles of up to six rows. Tall
  // tiles rather than wide ones (2 rows x 5 vectors): each row tile loads B again, and B is the larger
  // operand when the rows are few (d W: 10 rows of d times a 40 x 40 W).
  int v0 = 0;
  if (nvec % 2 == 1 && nvec >= 3) {
    // An odd count of three or more: the first three vectors in one block (4 x 3 tiles, 16 registers,
    // over long sums; 3 x 3 over short ones), not a lone last vector whose tiles are load-bound.
    if (Kd >= 16) {
      nn_rows<T, 3, 4>(R, Kd, alpha, a, ars, aks, B, ldb, out, ldo);
    } else {
      nn_rows<T, 3, 3>(R, Kd, alpha, a, ars, aks, B, ldb, out, ldo);
    }
    v0 = 3;
  }
  for (; v0 + 2 <= nvec; v0 += 2) nn_rows<T, 2, 5>(R, Kd, alpha, a, ars, aks, B + v0 * L, ldb, out + v0 * L, ldo);
  if (v0 < nvec) nn_rows<T, 1, 6>(R, Kd, alpha, a, ars, aks, B + v0 * L, ldb, out + v0 * L, ldo);
  if (c1 < C) nn_last_columns(R, C, c1, Kd, alpha, a, ars, aks, B, ldb, out, ldo);
#else
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < Kd; ++k) axpy(alpha * a[r * ars + k * aks], B + k * ldb, out + r * ldo, C);
  }
#endif
}

// out[r, c] += sum_k a[r * lda + k] * B[c * ldb + k]   (r < R, c < C, k < Kd): dot products of rows.
// A team of several threads: register tiles of the output per rank (team_tiles.h), each tile's sums
// starting at a rotated k so that a warp's reads of B fall on distinct shared-memory banks.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nt_acc(int R, int C, int Kd, const T* __restrict__ a, int64_t lda,
                                    const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo,
                                    const Team& tm = Team()) {
  if (tm.size() > 1) {
    team_gemm_nt(R, C, Kd, a, lda, B, ldb, AddTo<T>{out, ldo}, tm, tm.tile(R, C));
    return;
  }
#ifdef FASTMAML_HOST_VECTORS
  typedef typename Vec16<T>::type V;
  constexpr int L = Vec16<T>::lanes;
  const int kv = Kd - Kd % L;
  int r = 0;
#ifdef FASTMAML_HAS_SHUFFLEVECTOR
  if (C < 4 && kv > 0) {
    // Few columns (a regression output layer): four rows at a time share each column's loads, and the
    // four dot products are reduced together (sum4). The 2 x 4 tiles below need four columns: with
    // fewer they fall back to one scalar dot product per element.
    typedef typename VecBytes<T, 4 * sizeof(T)>::type V4;
    for (; r + 4 <= R; r += 4) {
      const T* a0 = a + r * lda;
      const T* a1 = a0 + lda;
      const T* a2 = a1 + lda;
      const T* a3 = a2 + lda;
      for (int c = 0; c < C; ++c) {
        const T* b = B + c * ldb;
        V s0 = {}, s1 = {}, s2 = {}, s3 = {};
        for (int k = 0; k < kv; k += L) {
          const V w = *reinterpret_cast<const V*>(b + k);
          s0 += *reinterpret_cast<const V*>(a0 + k) * w;
          s1 += *reinterpret_cast<const V*>(a1 + k) * w;
          s2 += *reinterpret_cast<const V*>(a2 + k) * w;
          s3 += *reinterpret_cast<const V*>(a3 + k) * w;
        }
        V4 t = sum4<T, FASTMAML_VECTOR_BYTES>(s0, s1, s2, s3);
        for (int k = kv; k < Kd; ++k) {
          const V4 ak = {a0[k], a1[k], a2[k], a3[k]};
          t += ak * b[k];
        }
        out[r * ldo + c] += t[0];
        out[(r + 1) * ldo + c] += t[1];
        out[(r + 2) * ldo + c] += t[2];
        out[(r + 3) * ldo + c] += t[3];
      }
    }
    for (; r < R; ++r) {  // the last rows (fewer than four): one vector sum each
      const T* a0 = a + r * lda;
      for (int c = 0; c < C; ++c) {
        const T* b = B + c * ldb;
        V s0 = {};
        for (int k = 0; k < kv; k += L) s0 += *reinterpret_cast<const V*>(a0 + k) * *reinterpret_cast<const V*>(b + k);
        T t = lane_sum<T, FASTMAML_VECTOR_BYTES>(s0);
        for (int k = kv; k < Kd; ++k) t += a0[k] * b[k];
        out[r * ldo + c] += t;
      }
    }
    return;
  }
#endif
  for (; r + 2 <= R && kv > 0; r += 2) {  // two rows by four columns: eight dot products share their loads
    const T* a0 = a + r * lda;
    const T* a1 = a0 + lda;
    T* o0 = out + r * ldo;
    T* o1 = o0 + ldo;
    int c = 0;
    for (; c + 4 <= C; c += 4) {
      const T* b0 = B + c * ldb;
      const T* b1 = b0 + ldb;
      const T* b2 = b1 + ldb;
      const T* b3 = b2 + ldb;
      V s00 = {}, s01 = {}, s02 = {}, s03 = {}, s10 = {}, s11 = {}, s12 = {}, s13 = {};
      for (int k = 0; k < kv; k += L) {
        const V x0 = *reinterpret_cast<const V*>(a0 + k), x1 = *reinterpret_cast<const V*>(a1 + k);
        const V w0 = *reinterpret_cast<const V*>(b0 + k), w1 = *reinterpret_cast<const V*>(b1 + k);
        const V w2 = *reinterpret_cast<const V*>(b2 + k), w3 = *reinterpret_cast<const V*>(b3 + k);
        s00 += x0 * w0;
        s01 += x0 * w1;
        s02 += x0 * w2;
        s03 += x0 * w3;
        s10 += x1 * w0;
        s11 += x1 * w1;
        s12 += x1 * w2;
        s13 += x1 * w3;
      }
      constexpr int VB = FASTMAML_VECTOR_BYTES;
#ifdef FASTMAML_HAS_SHUFFLEVECTOR
      typedef typename VecBytes<T, 4 * sizeof(T)>::type V4;
      V4 t0 = sum4<T, VB>(s00, s01, s02, s03), t1 = sum4<T, VB>(s10, s11, s12, s13);
      for (int k = kv; k < Kd; ++k) {
        const V4 bk = {b0[k], b1[k], b2[k], b3[k]};
        t0 += a0[k] * bk;
        t1 += a1[k] * bk;
      }
      *reinterpret_cast<V4*>(o0 + c) += t0;
      *reinterpret_cast<V4*>(o1 + c) += t1;
#else
      T t00 = lane_sum<T, VB>(s00), t01 = lane_sum<T, VB>(s01), t02 = lane_sum<T, VB>(s02), t03 = lane_sum<T, VB>(s03);
      T t10 = lane_sum<T, VB>(s10), t11 = lane_sum<T, VB>(s11), t12 = lane_sum<T, VB>(s12), t13 = lane_sum<T, VB>(s13);
      for (int k = kv; k < Kd; ++k) {
        t00 += a0[k] * b0[k];
        t01 += a0[k] * b1[k];
        t02 += a0[k] * b2[k];
        t03 += a0[k] * b3[k];
        t10 += a1[k] * b0[k];
        t11 += a1[k] * b1[k];
        t12 += a1[k] * b2[k];
        t13 += a1[k] * b3[k];
      }
      o0[c] += t00;
      o0[c + 1] += t01;
      o0[c + 2] += t02;
      o0[c + 3] += t03;
      o1[c] += t10;
      o1[c + 1] += t11;
      o1[c + 2] += t12;
      o1[c + 3] += t13;
#endif
    }
    for (; c < C; ++c) {
      o0[c] += dot(a0, B + c * ldb, Kd);
      o1[c] += dot(a1, B + c * ldb, Kd);
    }
  }
  if (kv == 0 && Kd == 1 && ldb == 1) {
    // One input (the first layer of a 1-D regression): B is a contiguous column, each output row an axpy.
    for (; r < R; ++r) axpy(a[r * lda], B, out + r * ldo, C);
  }
  if (kv == 0) {
    // Rows shorter than a vector: short sums, vectorised over c.
    for (; r < R; ++r) {
      const T* ar = a + r * lda;
      T* o = out + r * ldo;
      for (int k = 0; k < Kd; ++k) {
        const T av = ar[k];
        for (int c = 0; c < C; ++c) o[c] += av * B[c * ldb + k];
      }
    }
  }
  for (; r < R; ++r) {
    for (int c = 0; c < C; ++c) out[r * ldo + c] += dot(a + r * lda, B + c * ldb, Kd);
  }
#else
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) out[r * ldo + c] += dot(a + r * lda, B + c * ldb, Kd);
  }
#endif
}

// A product with the value it starts from and a pointwise step after it (an epilogue `ep`):
//   v = ep.init(r, c) + alpha * sum_k ...;  ep.finish(r, c, v)       for every output element (r, c)
// `init` and `finish` are the element's own (a bias, what the output held, an activation's derivative
// at that element). A team runs it in one pass: each owner finishes its own tiles as it stores them, so
// the product needs no sync before it (no fill of the output by other owners) or after it before the
// pointwise step. A serial team runs three passes over `out [R, C]` (the scratch the sum lands in, ldo
// apart): init, gemm_*_acc, finish, the same operations as before these products existed (its
// gemm_*_acc add to `out` as they always did: some of its loops fold init into the running sum). A
// team computes fl(init + fl(alpha * sum)) per element, as its gemm_*_acc did after a fill. Kd >= 1
// (a layer's width): the team's tiles store nothing for an empty sum.
template <typename T, typename Ep>
struct Finish {
  const Ep& ep;
  FASTMAML_HD void operator()(int r, int c, T v) const { ep.finish(r, c, ep.init(r, c) + v); }
};

template <typename T, typename Ep, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nn_then(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t ars,
                                     int64_t aks, const T* __restrict__ B, int64_t ldb, T* out, int64_t ldo,
                                     const Ep& ep, const Team& tm = Team()) {
  if (tm.size() > 1) {
    team_gemm_nn(R, C, Kd, alpha, a, ars, aks, B, ldb, Finish<T, Ep>{ep}, tm, tm.tile(R, C));
    return;
  }
  for_owned(tm, R, C, [&](int64_t r, int64_t c) {
    out[r * ldo + c] = ep.init(static_cast<int>(r), static_cast<int>(c));
  });
  gemm_nn_acc(R, C, Kd, alpha, a, ars, aks, B, ldb, out, ldo, tm);
  for_owned(tm, R, C, [&](int64_t r, int64_t c) {
    ep.finish(static_cast<int>(r), static_cast<int>(c), out[r * ldo + c]);
  });
}

template <typename T, typename Ep, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nt_then(int R, int C, int Kd, const T* __restrict__ a, int64_t lda,
                                     const T* __restrict__ B, int64_t ldb, T* out, int64_t ldo, const Ep& ep,
                                     const Team& tm = Team()) {
  if (tm.size() > 1) {
    team_gemm_nt(R, C, Kd, a, lda, B, ldb, Finish<T, Ep>{ep}, tm, tm.tile(R, C));
    return;
  }
  for_owned(tm, R, C, [&](int64_t r, int64_t c) {
    out[r * ldo + c] = ep.init(static_cast<int>(r), static_cast<int>(c));
  });
  gemm_nt_acc(R, C, Kd, a, lda, B, ldb, out, ldo, tm);
  for_owned(tm, R, C, [&](int64_t r, int64_t c) {
    ep.finish(static_cast<int>(r), static_cast<int>(c), out[r * ldo + c]);
  });
}

// Primitives with a team (fill, copy, add_col_sums, the gemm_*_acc and gemm_*_then above, the pointwise
// loops) do not sync; the layer passes (mlp.h) and the drivers (drivers.h) sync between dependent
// phases and before they return.

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void fill(T* p, int64_t n, T value, const Team& tm = Team()) {
  p = opaque(p);
  for_each(tm, n, [&](int64_t i) { p[i] = value; });
}

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void copy(const T* __restrict__ src, T* __restrict__ dst, int64_t n, const Team& tm = Team()) {
  src = opaque(src);
  dst = opaque(dst);
  for_each(tm, n, [&](int64_t i) { dst[i] = src[i]; });
}

// out[c] += alpha * a[n, c] for n = 0 .. N-1 in order (a bias gradient), a [N, C].
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void add_col_sums(T alpha, const T* __restrict__ a, int N, int C, T* __restrict__ out,
                                     const Team& tm = Team()) {
  if (tm.size() == 1) {
    for (int n = 0; n < N; ++n) axpy(alpha, a + static_cast<int64_t>(n) * C, out, C);
    return;
  }
  for_each(tm, C, [&](int64_t c) {
    T acc = out[c];
    for (int n = 0; n < N; ++n) acc += alpha * a[static_cast<int64_t>(n) * C + c];
    out[c] = acc;
  });
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
