// fastmaml: the register tiles of the matrix products (products.h) on the host: gcc's and clang's
// generic vector types, compiled only when config.h sets FASTMAML_HOST_VECTORS (host builds with gcc
// or clang, never CUDA device code). The tiles sum in a fixed order (deterministic), as the products do.
#pragma once

#include "config.h"

#ifdef FASTMAML_HOST_VECTORS

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

template <typename T, int Bytes>
struct VecBytes {
  // may_alias and element alignment: loads and stores through this type are legal at any T address.
  typedef T type __attribute__((vector_size(Bytes), aligned(sizeof(T)), may_alias));
};
template <typename T>
struct Vec16 {
  typedef typename VecBytes<T, FASTMAML_VECTOR_BYTES>::type type;
  static constexpr int lanes = FASTMAML_VECTOR_BYTES / sizeof(T);
};

// The sum of a vector's lanes by halving (lo + hi), which compiles to extracts and vector adds rather
// than one scalar add per lane.
template <typename T, int Bytes>
inline T lane_sum(typename VecBytes<T, Bytes>::type v) {
  if constexpr (Bytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    typedef typename VecBytes<T, Bytes / 2>::type H;
    H lo, hi;
    __builtin_memcpy(&lo, &v, Bytes / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return lane_sum<T, Bytes / 2>(lo + hi);
  }
}

// The lane sums of four vectors as one 4-lane vector (s_i's sum in lane i): halving and pairwise
// shuffles, about half the instructions of four lane_sums. Needs __builtin_shufflevector (clang,
// gcc >= 12); older compilers take lane_sum per vector.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FASTMAML_HAS_SHUFFLEVECTOR 1
template <typename T, int Bytes>
inline typename VecBytes<T, 4 * sizeof(T)>::type sum4(typename VecBytes<T, Bytes>::type s0,
                                                      typename VecBytes<T, Bytes>::type s1,
                                                      typename VecBytes<T, Bytes>::type s2,
                                                      typename VecBytes<T, Bytes>::type s3) {
  typedef typename VecBytes<T, 4 * sizeof(T)>::type V4;
  typedef typename VecBytes<T, 2 * sizeof(T)>::type V2;
  constexpr int L = Bytes / sizeof(T);
  if constexpr (L > 4) {  // halve every vector down to 4 lanes first
    typedef typename VecBytes<T, Bytes / 2>::type H;
    H l0, h0, l1, h1, l2, h2, l3, h3;
    __builtin_memcpy(&l0, &s0, Bytes / 2);
    __builtin_memcpy(&h0, reinterpret_cast<const char*>(&s0) + Bytes / 2, Bytes / 2);
    __builtin_memcpy(&l1, &s1, Bytes / 2);
    __builtin_memcpy(&h1, reinterpret_cast<const char*>(&s1) + Bytes / 2, Bytes / 2);
    __builtin_memcpy(&l2, &s2, Bytes / 2);
    __builtin_memcpy(&h2, reinterpret_cast<const char*>(&s2) + Bytes / 2, Bytes / 2);
    __builtin_memcpy(&l3, &s3, Bytes / 2);
    __builtin_memcpy(&h3, reinterpret_cast<const char*>(&s3) + Bytes / 2, Bytes / 2);
    return sum4<T, Bytes / 2>(l0 + h0, l1 + h1, l2 + h2, l3 + h3);
  } else if constexpr (L == 4) {
    const V4 t0 = __builtin_shufflevector(s0, s1, 0, 4, 2, 6) + __builtin_shufflevector(s0, s1, 1, 5, 3, 7);
    const V4 t1 = __builtin_shufflevector(s2, s3, 0, 4, 2, 6) + __builtin_shufflevector(s2, s3, 1, 5, 3, 7);
    return __builtin_shufflevector(t0, t1, 0, 1, 4, 5) + __builtin_shufflevector(t0, t1, 2, 3, 6, 7);
  } else {
    const V2 t0 = __builtin_shufflevector(s0, s1, 0, 2) + __builtin_shufflevector(s0, s1, 1, 3);
    const V2 t1 = __builtin_shufflevector(s2, s3, 0, 2) + __builtin_shufflevector(s2, s3, 1, 3);
    return __builtin_shufflevector(t0, t1, 0, 1, 2, 3);
  }
}
#endif

// One register tile of gemm_nn_acc: RT rows by NV vectors of columns, summed over k in order, then
// added to `out` (times alpha). Per k: NV vector loads of B and RT broadcasts of a feed RT * NV
// multiply-adds held in registers for the whole sum.
template <typename T, int RT, int NV>
inline void nn_tile(int Kd, T alpha, const T* __restrict__ a, int64_t ars, int64_t aks, const T* __restrict__ B,
                    int64_t ldb, T* __restrict__ out, int64_t ldo) {
  typedef typename Vec16<T>::type V;
  V acc[RT][NV];
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  }
  for (int k = 0; k < Kd; ++k) {
    const V* b = reinterpret_cast<const V*>(B + k * ldb);
    V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = b[j];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      const T x = a[i * ars + k * aks];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += x * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i) {
    V* o = reinterpret_cast<V*>(out + i * ldo);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) o[j] += alpha * acc[i][j];
  }
}

// nn_tile for a run-time row count `rows` in 1 .. RT (one instantiation per count).
template <typename T, int NV, int RT>
inline void nn_tile_rows(int rows, int Kd, T alpha, const T* __restrict__ a, int64_t ars, int64_t aks,
                         const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo) {
  if constexpr (RT == 1) {
    nn_tile<T, 1, NV>(Kd, alpha, a, ars, aks, B, ldb, out, ldo);
  } else {
    if (rows == RT) {
      nn_tile<T, RT, NV>(Kd, alpha, a, ars, aks, B, ldb, out, ldo);
    } else {
      nn_tile_rows<T, NV, RT - 1>(rows, Kd, alpha, a, ars, aks, B, ldb, out, ldo);
    }
  }
}

// The rows of one column block of NV vectors, in tiles of at most MaxRT rows split as evenly as possible
// (10 rows: two tiles of 5, not 4 + 4 + 2: a short tile wastes the loads of B it repeats).
template <typename T, int NV, int MaxRT>
inline void nn_rows(int R, int Kd, T alpha, const T* __restrict__ a, int64_t ars, int64_t aks,
                    const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo) {
  const int ntiles = (R + MaxRT - 1) / MaxRT;
  int r = 0;
  for (int t = 0; t < ntiles; ++t) {
    const int rows = (R - r) / (ntiles - t);
    nn_tile_rows<T, NV, MaxRT>(rows, Kd, alpha, a + r * ars, ars, aks, B, ldb, out + r * ldo, ldo);
    r += rows;
  }
}

// The columns c1 .. C-1 of gemm_nn_acc (fewer than a vector: a one-input first layer's weight gradient
// d^T x). One sum per element over k in order, as in the tiles. When a's rows are contiguous (ars = 1,
// a transposed operand) a vector of rows is summed at once, four vectors in flight; otherwise four rows
// at a time. Several sums in flight hide the multiply-add latency that bounds a single running sum per
// element, in a product that runs three times a task.
template <typename T>
inline void nn_last_columns(int R, int C, int c1, int Kd, T alpha, const T* __restrict__ a, int64_t ars,
                            int64_t aks, const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo) {
  typedef typename Vec16<T>::type V;
  constexpr int L = Vec16<T>::lanes;
  int r = 0;
  if (ars == 1) {
    for (; r + L <= R;) {
      const int nv = (R - r) / L >= 4 ? 4 : 1;
      for (int c = c1; c < C; ++c) {
        V acc[4] = {V{}, V{}, V{}, V{}};
        for (int k = 0; k < Kd; ++k) {
          const T bk = B[k * ldb + c];
          const T* ak = a + r + k * aks;
          for (int j = 0; j < nv; ++j) acc[j] += *reinterpret_cast<const V*>(ak + j * L) * bk;
        }
        for (int j = 0; j < nv; ++j) {
          for (int i = 0; i < L; ++i) out[(r + j * L + i) * ldo + c] += alpha * acc[j][i];
        }
      }
      r += nv * L;
    }
  }
  for (; r + 4 <= R; r += 4) {
    const T* a0 = a + r * ars;
    for (int c = c1; c < C; ++c) {
      T p0 = 0, p1 = 0, p2 = 0, p3 = 0;
      for (int k = 0; k < Kd; ++k) {
        const T bk = B[k * ldb + c];
        p0 += a0[k * aks] * bk;
        p1 += a0[ars + k * aks] * bk;
        p2 += a0[2 * ars + k * aks] * bk;
        p3 += a0[3 * ars + k * aks] * bk;
      }
      out[r * ldo + c] += alpha * p0;
      out[(r + 1) * ldo + c] += alpha * p1;
      out[(r + 2) * ldo + c] += alpha * p2;
      out[(r + 3) * ldo + c] += alpha * p3;
    }
  }
  for (; r < R; ++r) {
    const T* a0 = a + r * ars;
    for (int c = c1; c < C; ++c) {
      T p0 = 0;
      for (int k = 0; k < Kd; ++k) p0 += a0[k * aks] * B[k * ldb + c];
      out[r * ldo + c] += alpha * p0;
    }
  }
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml

#endif  // FASTMAML_HOST_VECTORS
