// fastmaml: the per-task math of the fused MAML kernels, written once.
//
// One task's MLP forward, loss, gradient, Hessian-vector product, SGD update, and the three per-task
// drivers of docs/kernels.md (forward, adapt, reverse sweep). The CPU kernel (csrc/cpu/) calls the
// drivers in a loop over tasks; the CUDA kernel (csrc/cuda/) calls the same drivers with a thread block
// per task. No torch headers, no allocation, no exceptions, no standard library beyond <cstdint>. Every
// buffer is a raw pointer the caller provides (a scratch workspace of `*_workspace()` elements per task).
//
// Teams. Every function takes a `Team` (last argument, default `SerialTeam`): the threads that work on
// one task together. A team has `rank()`, `size()`, `sync()` (a barrier that also makes the team's
// earlier writes visible to all of it) and `sum(x)` (a collective: every rank's `x` summed in rank
// order, returned to every rank; it syncs). The loops are output-stationary: in each phase every output
// element has one owner (`for_owned`, `for_each`), and a rank reads another rank's results only after
// a sync. The layer functions and drivers may be entered when their inputs are visible to the whole
// team, and sync before they return; the primitives (fill, copy, the matrix products, ...) do not sync.
// The CPU runs `SerialTeam` (one thread per task: every sync is a no-op and the loops run as plain
// loops, with the register-tiled products below); the CUDA kernel runs a thread block
// (csrc/cuda/maml_cuda.cu); tests/cuda_team_check.cpp runs std::threads and compares with SerialTeam.
//
// Notation (docs/math.md): layers l = 0 .. L-1 here (W_{l+1} in that page's 1-based names), layer l maps
// `dims[l]` inputs to `dims[l+1]` outputs: z_l = h_{l-1} W_l^T + b_l, h_l = s(z_l) for hidden layers,
// h_{-1} = x, output z_{L-1}. Activations are stored row-major [N, width].
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTMAML_HD __host__ __device__
#else
#define FASTMAML_HD
#endif

// Host builds with gcc or clang use the compilers' generic vector types in the matrix products (see
// gemm_nn_acc); CUDA device code, other compilers and -DFASTMAML_NO_HOST_VECTORS use plain loops.
#if !defined(FASTMAML_NO_HOST_VECTORS) && !defined(__CUDACC__) && !defined(__HIPCC__) && \
    (defined(__GNUC__) || defined(__clang__))
#define FASTMAML_HOST_VECTORS 1
#ifndef FASTMAML_VECTOR_BYTES
#define FASTMAML_VECTOR_BYTES 16
#endif
#if FASTMAML_VECTOR_BYTES == 16
#define FASTMAML_IMPL_NAMESPACE vec16
#elif FASTMAML_VECTOR_BYTES == 32
#define FASTMAML_IMPL_NAMESPACE vec32
#else
#error "FASTMAML_VECTOR_BYTES must be 16 or 32"
#endif
#else
#define FASTMAML_IMPL_NAMESPACE scalar
#endif

// The namespace is a macro so that one library can hold this math compiled for several instruction
// sets (csrc/cpu/task_loops_*.cpp); the inline namespace names the loop variant, so translation units
// that compile the header differently (a .cu file's host pass, an AVX2 file) never give the linker two
// different bodies under one symbol name.
#ifndef FASTMAML_TASK_NAMESPACE
#define FASTMAML_TASK_NAMESPACE task
#endif

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// Depth is bounded so the network description fits in a fixed-size struct passed by value (registers
// or constant memory on a GPU). Widths and point counts are bounded only by the workspace.
constexpr int kMaxLayers = 8;

enum Activation : int { kRelu = 0, kTanh = 1 };
enum Loss : int { kMse = 0, kCrossEntropy = 1 };

// The network and its flat parameter layout: theta = [W_0 (row-major [out, in]), b_0, W_1, b_1, ...].
struct Net {
  int L;                          // number of linear layers
  int dims[kMaxLayers + 1];       // [D_in, D_1, ..., D_out]
  int64_t w_off[kMaxLayers];      // offset of W_l in theta
  int64_t b_off[kMaxLayers];      // offset of b_l in theta
  int64_t act_off[kMaxLayers];    // offset of layer l's outputs in an activation buffer, per point
  int64_t P;                      // number of parameters
  int64_t width_sum;              // sum of the layer output widths (per-point size of one buffer)
  int activation;                 // Activation
  int loss;                       // Loss
};

// Fills `net`; returns false when the depth is outside [1, kMaxLayers] or a width is < 1.
template <typename Int>
FASTMAML_HD inline bool make_net(Net& net, const Int* dims, int n_dims, int activation, int loss) {
  const int L = n_dims - 1;
  if (L < 1 || L > kMaxLayers) return false;
  net.L = L;
  net.activation = activation;
  net.loss = loss;
  int64_t off = 0, act = 0;
  for (int l = 0; l <= L; ++l) {
    if (dims[l] < 1) return false;
    net.dims[l] = static_cast<int>(dims[l]);
  }
  for (int l = 0; l < L; ++l) {
    net.w_off[l] = off;
    off += static_cast<int64_t>(net.dims[l + 1]) * net.dims[l];
    net.b_off[l] = off;
    off += net.dims[l + 1];
    net.act_off[l] = act;
    act += net.dims[l + 1];
  }
  net.P = off;
  net.width_sum = act;
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Teams: the threads that work on one task together (see the top of this file).

// One thread per task: the CPU kernel's team. Every sync is a no-op and every loop runs in order.
struct SerialTeam {
  FASTMAML_HD static constexpr int rank() { return 0; }
  FASTMAML_HD static constexpr int size() { return 1; }
  FASTMAML_HD void sync() const {}
  template <typename T>
  FASTMAML_HD T sum(T x) const {
    return x;
  }
};

// Calls f(r, c) for this rank's elements of a [rows, cols] array: element (r, c) belongs to rank
// (r * cols + c) mod size(), so consecutive ranks take consecutive elements (coalesced on a GPU). A
// team of one walks the rows in order.
template <typename Team, typename F>
FASTMAML_HD inline void for_owned(const Team& tm, int64_t rows, int64_t cols, F&& f) {
  if (tm.size() == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) f(r, c);
    }
    return;
  }
  const int64_t m = rows * cols;
  if (m < (int64_t(1) << 30)) {  // 32-bit division: several times cheaper than 64-bit on a GPU
    const int c32 = static_cast<int>(cols);
    for (int e = tm.rank(); e < static_cast<int>(m); e += tm.size()) f(int64_t(e / c32), int64_t(e % c32));
  } else {
    for (int64_t e = tm.rank(); e < m; e += tm.size()) f(e / cols, e % cols);
  }
}

// Calls f(j) for this rank's elements of a flat array of m elements (j = rank, rank + size(), ...).
template <typename Team, typename F>
FASTMAML_HD inline void for_each(const Team& tm, int64_t m, F&& f) {
  for (int64_t j = tm.rank(); j < m; j += tm.size()) f(j);
}

// ---------------------------------------------------------------------------------------------------
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
#ifdef FASTMAML_HOST_VECTORS
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
#endif

#ifdef FASTMAML_HOST_VECTORS
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
// at a time. A single running sum per element was bound by the multiply-add latency: 40 x 1 x 10 took
// ~860 cycles in place, 3 times a task (10% of a 1-40-40-1 meta-gradient).
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
#endif

// out[r, c] += alpha * sum_k a[r * ars + k * aks] * B[k * ldb + c]   (r < R, c < C, k < Kd)
// A team of several threads: one owner per output element, summing over k in order.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nn_acc(int R, int C, int Kd, T alpha, const T* __restrict__ a, int64_t ars,
                                    int64_t aks, const T* __restrict__ B, int64_t ldb, T* __restrict__ out,
                                    int64_t ldo, const Team& tm = Team()) {
  if (tm.size() > 1) {
    for_owned(tm, R, C, [&](int64_t r, int64_t c) {
      T acc = 0;
      for (int k = 0; k < Kd; ++k) acc += a[r * ars + k * aks] * B[k * ldb + c];
      out[r * ldo + c] += alpha * acc;
    });
    return;
  }
#ifdef FASTMAML_HOST_VECTORS
  constexpr int L = Vec16<T>::lanes;
  const int nvec = C / L;  // whole vectors in a row
  const int c1 = nvec * L;
  // Column blocks of two vectors, rows in tiles of up to five (10 accumulators, two vectors of B and a
  // broadcast: 13 of the 16 vector registers); an odd last vector in tiles of up to six rows. Measured
  // on one core (AVX2, float32) against 2-row x 5-vector tiles: d W for 10 x 40 x 40 0.59 -> 0.38 us,
  // d^T h for 40 x 40 x 10 unchanged (0.43 us).
  int v0 = 0;
  if (nvec % 2 == 1 && nvec >= 3) {
    // An odd count of three or more: the first three vectors in one block (4 x 3 tiles, 16 registers,
    // over long sums; 3 x 3 over short ones), not a lone last vector whose tiles are load-bound. 10 x 40
    // x 40: 0.375 -> 0.343 us; 40 x 40 x 10: 0.405 -> 0.37 us.
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
// A team of several threads: one owner per output element.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void gemm_nt_acc(int R, int C, int Kd, const T* __restrict__ a, int64_t lda,
                                    const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo,
                                    const Team& tm = Team()) {
  if (tm.size() > 1) {
    for_owned(tm, R, C, [&](int64_t r, int64_t c) { out[r * ldo + c] += dot(a + r * lda, B + c * ldb, Kd); });
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
    // four dot products are reduced together (sum4). The 2 x 4 tiles below would fall back to one
    // scalar dot product per element here, about ten times slower.
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

// Primitives with a team (fill, copy, broadcast_rows, add_col_sums, the gemm_*_acc above, the pointwise
// loops) do not sync; the functions below sync between dependent phases and before they return.

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void fill(T* p, int64_t n, T value, const Team& tm = Team()) {
  for_each(tm, n, [&](int64_t i) { p[i] = value; });
}

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void copy(const T* __restrict__ src, T* __restrict__ dst, int64_t n, const Team& tm = Team()) {
  for_each(tm, n, [&](int64_t i) { dst[i] = src[i]; });
}

// out[n, c] = row[c] for n < N, c < C (a bias broadcast to every point).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void broadcast_rows(const T* __restrict__ row, T* __restrict__ out, int N, int C,
                                       const Team& tm = Team()) {
  for_owned(tm, N, C, [&](int64_t n, int64_t c) { out[n * C + c] = row[c]; });
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

// ---------------------------------------------------------------------------------------------------
// Activation buffers of one pass over N <= nmax points: layer l's slice starts at nmax * act_off[l].

template <typename T>
struct Acts {
  T* z;    // pre-activations z_l                     [N, D_{l+1}] per layer
  T* h;    // activations h_l = s(z_l) (hidden layers)
  T* d;    // dloss/dz_l
  T* rz;   // tangents of z_l along the HVP direction
  T* rh;   // tangents of h_l
  T* rd;   // tangents of d_l
  T* p;    // softmax of the output (cross-entropy) [N, D_out]
  int64_t nmax;
};

// Elements of one Acts for passes of at most `nmax` points.
FASTMAML_HD inline int64_t acts_size(const Net& net, int64_t nmax) {
  return nmax * (6 * net.width_sum + net.dims[net.L]);
}

template <typename T>
FASTMAML_HD inline Acts<T> make_acts(const Net& net, T* buf, int64_t nmax) {
  const int64_t s = nmax * net.width_sum;
  Acts<T> a;
  a.z = buf;
  a.h = buf + s;
  a.d = buf + 2 * s;
  a.rz = buf + 3 * s;
  a.rh = buf + 4 * s;
  a.rd = buf + 5 * s;
  a.p = buf + 6 * s;
  a.nmax = nmax;
  return a;
}

template <typename T>
FASTMAML_HD inline int64_t slice(const Net& net, const Acts<T>& a, int l) {
  return a.nmax * net.act_off[l];
}

// ---------------------------------------------------------------------------------------------------
// theta_0's weights transposed (CPU loops). Every task starts from the same theta_0, so the CPU ops
// transpose its weights once per call and run the products with W_l^T at theta_0 -- the support
// forward pass and the HVP's Rh W^T at step 0 -- as row-times-matrix tiles (gemm_nn_acc) instead of dot
// products that each end in a horizontal sum (gemm_nt_acc): 10 x 40 x 40 in 0.39 instead of 0.53 us on
// one AVX2 core. `theta_t` has theta's layout with W_l stored [D_l, D_{l+1}]; biases are not read.

template <typename T>
inline void transpose_weights(const Net& net, const T* __restrict__ theta, T* __restrict__ theta_t) {
  for (int l = 0; l < net.L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    T* Wt = theta_t + net.w_off[l];
    for (int j = 0; j < dout; ++j) {
      for (int k = 0; k < din; ++k) Wt[static_cast<int64_t>(k) * dout + j] = W[static_cast<int64_t>(j) * din + k];
    }
  }
}

// Whether a layer with `dout` outputs takes its h W^T product from the transposed weights: a serial team
// on the host and at least one vector of outputs (narrower, the dot products' few-column path is faster).
template <typename T, typename Team>
FASTMAML_HD inline bool use_transposed(const T* theta_t, int dout, const Team& tm) {
#ifdef FASTMAML_HOST_VECTORS
  return theta_t != nullptr && tm.size() == 1 && dout >= Vec16<T>::lanes;
#else
  (void)theta_t;
  (void)dout;
  (void)tm;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------
// Forward: z_l and h_l of every layer for x [N, D_in]. The output is the slice of layer L-1 in a.z.

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void forward(const Net& net, const T* __restrict__ theta, const T* __restrict__ x, int N,
                                Acts<T>& a, const Team& tm = Team(), const T* theta_t = nullptr) {
  for (int l = 0; l < net.L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* b = theta + net.b_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    T* z = a.z + slice(net, a, l);
    broadcast_rows(b, z, N, dout, tm);
    tm.sync();
    if (use_transposed(theta_t, dout, tm)) {
      gemm_nn_acc(N, dout, din, T(1), in, din, 1, theta_t + net.w_off[l], dout, z, dout, tm);
    } else {
      gemm_nt_acc(N, dout, din, in, din, W, din, z, dout, tm);
    }
    tm.sync();
    if (l < net.L - 1) {
      T* h = a.h + slice(net, a, l);
      const int64_t m = static_cast<int64_t>(N) * dout;
      if (net.activation == kRelu) {
        for_each(tm, m, [&](int64_t j) { h[j] = z[j] > T(0) ? z[j] : T(0); });
      } else {
        for_each(tm, m, [&](int64_t j) { h[j] = fm_tanh(z[j]); });
      }
      tm.sync();
    }
  }
}

// The loss of the output `out [N, D]` against `y` (mse: `y_float [N, D]`; cross-entropy: `y_index [N]`,
// classes 0..D-1), unscaled, returned to every rank of the team. Writes `dout = scale * dloss/dout` and,
// for cross-entropy, the softmax `p` (which the Hessian-vector product reads).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline T loss_and_grad(const Net& net, const T* __restrict__ out, const T* __restrict__ y_float,
                                   const int64_t* __restrict__ y_index, int N, T scale, T* __restrict__ dout,
                                   T* __restrict__ p, const Team& tm = Team()) {
  const int D = net.dims[net.L];
  const int64_t m = static_cast<int64_t>(N) * D;
  T total = 0;  // this rank's part of the loss; sum() adds the parts and syncs
  if (net.loss == kMse) {
    const T c = scale * T(2) / static_cast<T>(m);
    for_each(tm, m, [&](int64_t j) {
      const T r = out[j] - y_float[j];
      total += r * r;
      dout[j] = c * r;
    });
    return tm.sum(total) / static_cast<T>(m);
  }
  // Cross-entropy through a stable log-softmax: lse = max + log(sum exp(z - max)). One rank per point.
  const T c = scale / static_cast<T>(N);
  for (int n = tm.rank(); n < N; n += tm.size()) {
    const T* zr = out + static_cast<int64_t>(n) * D;
    T* pr = p + static_cast<int64_t>(n) * D;
    T* dr = dout + static_cast<int64_t>(n) * D;
    T mx = zr[0];
    for (int i = 1; i < D; ++i) mx = zr[i] > mx ? zr[i] : mx;
    T se = 0;
    for (int i = 0; i < D; ++i) {
      pr[i] = fm_exp(zr[i] - mx);
      se += pr[i];
    }
    const int64_t cls = y_index[n];
    total += mx + fm_log(se) - zr[cls];
    const T inv = T(1) / se;
    for (int i = 0; i < D; ++i) {
      pr[i] *= inv;
      dr[i] = c * pr[i];
    }
    dr[cls] -= c;
  }
  return tm.sum(total) / static_cast<T>(N);
}

// d_{l-1} = e * s'(z_{l-1}) in place on e (e = d_l W_l), for hidden layer `l` (pointwise, no sync).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void apply_act_grad(const Net& net, const T* __restrict__ z, const T* __restrict__ h,
                                       T* __restrict__ e, int64_t m, const Team& tm = Team()) {
  if (net.activation == kRelu) {
    for_each(tm, m, [&](int64_t j) { e[j] = z[j] > T(0) ? e[j] : T(0); });
  } else {
    for_each(tm, m, [&](int64_t j) { e[j] *= T(1) - h[j] * h[j]; });
  }
}

// Backward from the output gradient (the slice of layer L-1 in a.d, set by loss_and_grad): fills d_l
// of every layer, adds the parameter gradient to `g [P]`, and, when `gx` is given, adds
// dloss/dx = d_0 W_0 to `gx [N, D_in]`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void backward(const Net& net, const T* __restrict__ theta, const T* __restrict__ x, int N,
                                 Acts<T>& a, T* __restrict__ g, T* __restrict__ gx, const Team& tm = Team()) {
  for (int l = net.L - 1; l >= 0; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* d = a.d + slice(net, a, l);
    T* gW = g + net.w_off[l];
    T* gb = g + net.b_off[l];
    gemm_nn_acc(dout, din, N, T(1), d, 1, dout, in, din, gW, din, tm);  // gW += d^T h
    add_col_sums(T(1), d, N, dout, gb, tm);                            // gb += sum_n d
    if (l == 0 && gx == nullptr) break;
    T* e = l == 0 ? gx : a.d + slice(net, a, l - 1);
    if (l > 0) {
      fill(e, static_cast<int64_t>(N) * din, T(0), tm);
      tm.sync();
    }
    gemm_nn_acc(N, din, dout, T(1), d, dout, 1, W, din, e, din, tm);  // e += d W
    if (l > 0) {
      tm.sync();
      apply_act_grad(net, a.z + slice(net, a, l - 1), a.h + slice(net, a, l - 1), e,
                     static_cast<int64_t>(N) * din, tm);
    }
    tm.sync();  // the next layer reads every d_{l-1}
  }
  tm.sync();
}

// Hessian-vector product of the loss at the state left by forward + loss_and_grad(scale = 1) +
// backward (forward-over-reverse, docs/math.md): adds `alpha * H u` to `out [P]` and, when `gx` is given,
// `alpha * d/dx (g . u) = alpha * (Rd_0 W_0 + d_0 U_0)` to `gx [N, D_in]`. `u [P]` is the direction.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void hvp(const Net& net, const T* __restrict__ theta, const T* __restrict__ u,
                            const T* __restrict__ x, int N, Acts<T>& a, T alpha, T* __restrict__ out,
                            T* __restrict__ gx, const Team& tm = Team(), const T* theta_t = nullptr) {
  const int L = net.L;
  // Tangents forward: Rz_l = Rh_{l-1} W_l^T + h_{l-1} U_l^T + ub_l (Rh_{-1} = 0); Rh_l = s'(z_l) Rz_l.
  for (int l = 0; l < L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* U = u + net.w_off[l];
    const T* ub = u + net.b_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* rin = l == 0 ? nullptr : a.rh + slice(net, a, l - 1);
    T* rz = a.rz + slice(net, a, l);
    broadcast_rows(ub, rz, N, dout, tm);
    tm.sync();
    gemm_nt_acc(N, dout, din, in, din, U, din, rz, dout, tm);
    if (rin != nullptr) {
      tm.sync();
      if (use_transposed(theta_t, dout, tm)) {
        gemm_nn_acc(N, dout, din, T(1), rin, din, 1, theta_t + net.w_off[l], dout, rz, dout, tm);
      } else {
        gemm_nt_acc(N, dout, din, rin, din, W, din, rz, dout, tm);
      }
    }
    tm.sync();
    if (l < L - 1) {
      const T* z = a.z + slice(net, a, l);
      const T* h = a.h + slice(net, a, l);
      T* rh = a.rh + slice(net, a, l);
      const int64_t m = static_cast<int64_t>(N) * dout;
      if (net.activation == kRelu) {
        for_each(tm, m, [&](int64_t j) { rh[j] = z[j] > T(0) ? rz[j] : T(0); });
      } else {
        for_each(tm, m, [&](int64_t j) { rh[j] = (T(1) - h[j] * h[j]) * rz[j]; });
      }
      tm.sync();
    }
  }

  // Tangent of the output gradient: the loss curvature times Rz_out.
  {
    const int D = net.dims[L];
    const int64_t s = slice(net, a, L - 1);
    const T* rz = a.rz + s;
    T* rd = a.rd + s;
    if (net.loss == kMse) {
      const int64_t m = static_cast<int64_t>(N) * D;
      const T c = T(2) / static_cast<T>(m);
      for_each(tm, m, [&](int64_t j) { rd[j] = c * rz[j]; });
    } else {
      // (diag(p) - p p^T) Rz / N per point (one rank per point).
      const T c = T(1) / static_cast<T>(N);
      for (int n = tm.rank(); n < N; n += tm.size()) {
        const T* pr = a.p + static_cast<int64_t>(n) * D;
        const T* rzr = rz + static_cast<int64_t>(n) * D;
        T* rdr = rd + static_cast<int64_t>(n) * D;
        const T pz = dot(pr, rzr, D);
        for (int i = 0; i < D; ++i) rdr[i] = c * pr[i] * (rzr[i] - pz);
      }
    }
    tm.sync();
  }

  // Tangents backward: R gW_l = Rd_l^T h_{l-1} + d_l^T Rh_{l-1}; R gb_l = sum_n Rd_l;
  // Rd_{l-1} = (Rd_l W_l + d_l U_l) * s'(z_{l-1}) + (d_l W_l) * s''(z_{l-1}) * Rz_{l-1}.
  for (int l = L - 1; l >= 0; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* U = u + net.w_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* rin = l == 0 ? nullptr : a.rh + slice(net, a, l - 1);
    const T* d = a.d + slice(net, a, l);
    const T* rd = a.rd + slice(net, a, l);
    T* oW = out + net.w_off[l];
    T* ob = out + net.b_off[l];
    gemm_nn_acc(dout, din, N, alpha, rd, 1, dout, in, din, oW, din, tm);  // Rd^T h
    if (rin != nullptr) {
      tm.sync();
      gemm_nn_acc(dout, din, N, alpha, d, 1, dout, rin, din, oW, din, tm);  // d^T Rh
    }
    add_col_sums(alpha, rd, N, dout, ob, tm);
    if (l == 0 && gx == nullptr) break;
    // re = Rd_l W_l + d_l U_l (scaled by alpha when it is the input term).
    const T scale = l == 0 ? alpha : T(1);
    T* re = l == 0 ? gx : a.rd + slice(net, a, l - 1);
    if (l > 0) {
      fill(re, static_cast<int64_t>(N) * din, T(0), tm);
      tm.sync();
    }
    gemm_nn_acc(N, din, dout, scale, rd, dout, 1, W, din, re, din, tm);
    tm.sync();
    gemm_nn_acc(N, din, dout, scale, d, dout, 1, U, din, re, din, tm);
    if (l > 0) {
      tm.sync();
      const int64_t s = slice(net, a, l - 1);
      const int64_t m = static_cast<int64_t>(N) * din;
      const T* z = a.z + s;
      const T* h = a.h + s;
      const T* dprev = a.d + s;
      const T* rzprev = a.rz + s;
      if (net.activation == kRelu) {
        // s'' = 0: only the mask.
        for_each(tm, m, [&](int64_t j) { re[j] = z[j] > T(0) ? re[j] : T(0); });
      } else {
        // tanh: s' = 1 - h^2, s'' = -2 h s', so (d_l W_l) s'' Rz = -2 h d_{l-1} Rz.
        for_each(tm, m,
                 [&](int64_t j) { re[j] = re[j] * (T(1) - h[j] * h[j]) - T(2) * h[j] * dprev[j] * rzprev[j]; });
      }
    }
    tm.sync();  // the next layer reads every Rd_{l-1}
  }
  tm.sync();
}

// theta_next = theta - lr * g (elementwise over P; theta_next may alias theta).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void sgd_update(const T* theta, const T* __restrict__ lr, const T* __restrict__ g, T* theta_next,
                                   int64_t P, const Team& tm = Team()) {
  for_each(tm, P, [&](int64_t i) { theta_next[i] = theta[i] - lr[i] * g[i]; });
  tm.sync();
}

// ---------------------------------------------------------------------------------------------------
// Per-task drivers.

// One task's data: support and query points, targets as floats (mse) or class indices (cross-entropy).
template <typename T>
struct TaskData {
  const T* xs;
  const T* ys_float;
  const int64_t* ys_index;
  int ns;
  const T* xq;
  const T* yq_float;
  const int64_t* yq_index;
  int nq;
};

// The support gradient g [P] at theta (overwritten); leaves the support pass's state in `a`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void support_grad(const Net& net, const TaskData<T>& td, const T* theta, Acts<T>& a, T* g,
                                     const Team& tm = Team(), const T* theta_t = nullptr) {
  forward(net, theta, td.xs, td.ns, a, tm, theta_t);
  const int64_t s = slice(net, a, net.L - 1);
  loss_and_grad(net, a.z + s, td.ys_float, td.ys_index, td.ns, T(1), a.d + s, a.p, tm);
  fill(g, net.P, T(0), tm);
  tm.sync();
  backward(net, theta, td.xs, td.ns, a, g, static_cast<T*>(nullptr), tm);
}

// Workspace segments start on 64-byte boundaries (given an aligned workspace): element counts are
// rounded up to 16. Unaligned, a third of the 32-byte loads of the products split cache lines.
FASTMAML_HD inline int64_t padded(int64_t n) { return (n + 15) & ~int64_t(15); }

// Elements of the saved state of one pass (z, h, d and the softmax p; no tangents).
FASTMAML_HD inline int64_t state_size(const Net& net, int64_t nmax) {
  return 3 * padded(nmax * net.width_sum) + padded(nmax * net.dims[net.L]);
}
// Elements of the tangents (rz, rh, rd) of one pass.
FASTMAML_HD inline int64_t tangents_size(const Net& net, int64_t nmax) { return 3 * padded(nmax * net.width_sum); }

// Acts whose forward state (z, h, d, p) lives at `state` and whose tangents (rz, rh, rd) at `tangents`.
template <typename T>
FASTMAML_HD inline Acts<T> make_split_acts(const Net& net, T* state, T* tangents, int64_t nmax) {
  const int64_t s = padded(nmax * net.width_sum);
  Acts<T> a;
  a.z = state;
  a.h = state + s;
  a.d = state + 2 * s;
  a.p = state + 3 * s;
  a.rz = tangents;
  a.rh = tangents + s;
  a.rd = tangents + 2 * s;
  a.nmax = nmax;
  return a;
}

// Workspace elements of `task_forward` / `task_adapt` / `task_backward` (nmax = max(Ns, Nq)).
FASTMAML_HD inline int64_t forward_workspace(const Net& net, int64_t nmax) {
  return acts_size(net, nmax) + 2 * net.P;
}
FASTMAML_HD inline int64_t adapt_workspace(const Net& net, int64_t nmax) {
  return acts_size(net, nmax) + net.P;
}
// The reverse sweep keeps theta_1..theta_K, the support state of steps 0..K-1, the support gradients
// g_0..g_{K-1} when the rates need a gradient (one gradient buffer otherwise), a query state, the
// tangents, and the vectors u and v.
FASTMAML_HD inline int64_t backward_workspace(const Net& net, int64_t K, int64_t nmax, bool need_lr_grad) {
  const int64_t grads = need_lr_grad && K > 1 ? K : 1;  // K = 0: g_lr is empty (a null pointer), one buffer
  return (K + 1) * state_size(net, nmax) + tangents_size(net, nmax) + (K + grads + 2) * padded(net.P);
}

// theta_K of one task, written to `theta_out [P]`. `lr [K, P]`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void task_adapt(const Net& net, const TaskData<T>& td, const T* theta0, const T* lr, int K,
                                   T* theta_out, T* work, const Team& tm = Team()) {
  Acts<T> a = make_acts(net, work, td.ns);
  T* g = work + acts_size(net, td.ns);
  copy(theta0, theta_out, net.P, tm);
  tm.sync();
  for (int k = 0; k < K; ++k) {
    support_grad(net, td, theta_out, a, g, tm);
    sgd_update(theta_out, lr + k * net.P, g, theta_out, net.P, tm);
  }
}

// The forward of maml_fwd for one task: returns sum_k qw[k] * L_query(theta_k) (to every rank of the
// team) and writes the query output at theta_K to `preds [Nq, D_out]`. Query passes whose weight is 0
// are skipped (k < K).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline T task_forward(const Net& net, const TaskData<T>& td, const T* theta0, const T* lr, int K,
                                  const T* qw, T* preds, T* work, const Team& tm = Team(),
                                  const T* theta0_t = nullptr) {
  const int64_t nmax = td.ns > td.nq ? td.ns : td.nq;
  Acts<T> a = make_acts(net, work, nmax);
  T* theta = work + acts_size(net, nmax);
  T* g = theta + net.P;
  const int64_t s = slice(net, a, net.L - 1);
  copy(theta0, theta, net.P, tm);
  tm.sync();
  T total = 0;
  for (int k = 0; k <= K; ++k) {
    const T* theta_t = k == 0 ? theta0_t : nullptr;
    if (k == K || qw[k] != T(0)) {
      forward(net, theta, td.xq, td.nq, a, tm, theta_t);
      total += qw[k] * loss_and_grad(net, a.z + s, td.yq_float, td.yq_index, td.nq, T(0), a.d + s, a.p, tm);
    }
    if (k == K) break;
    support_grad(net, td, theta, a, g, tm, theta_t);
    sgd_update(theta, lr + k * net.P, g, theta, net.P, tm);
  }
  copy(a.z + s, preds, static_cast<int64_t>(td.nq) * net.dims[net.L], tm);
  tm.sync();
  return total;
}

// theta_k in the reverse sweep's storage: theta_0 is the caller's, theta_1..theta_K are rows of `stride`
// elements in scratch.
template <typename T>
FASTMAML_HD inline const T* theta_at(const T* theta0, const T* thetas, int k, int64_t stride) {
  return k == 0 ? theta0 : thetas + (k - 1) * stride;
}

// The reverse sweep of maml_bwd for one task (docs/kernels.md). Recomputes theta_1..theta_K from theta0
// in the workspace (the forward saves nothing), keeping each step's support pass for its Hessian-vector
// product. `c` is the cotangent of the task loss, `gpreds [Nq, D_out]` that of the query output.
// Adds dL/dtheta_0 to `g_theta [P]` and, when given, -(g_k * v) to `g_lr [K, P]`; writes the input
// gradients to `gxs [Ns, D_in]` and `gxq [Nq, D_in]` when given. The workspace holds
// `backward_workspace(net, K, max(Ns, Nq), g_lr != nullptr)` elements. A team adds to g_theta and g_lr
// element i from rank i mod size(), so tasks run one after another by one team may share those rows.
//
// Fused forward and backward (maml_fwdbwd): with `preds_out [Nq, D_out]` given, also writes the query
// output at theta_K there and returns sum_k qw[k] * L_query(theta_k), as task_forward does (every
// weighted query loss is evaluated on the way when c != 0; the caller passes c = 1), and g_theta and
// g_lr are this task's own rows, written rather than added to (no zero-filled buffers). `gpreds` may
// then be null (no cotangent of the query output). Returns 0 without preds_out.
//
// `theta0_t` (optional, host loops): theta0 with its weights transposed (transpose_weights), used by
// the passes at theta0; task_forward takes it too.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline T task_backward(const Net& net, const TaskData<T>& td, const T* theta0, const T* lr, int K,
                                   const T* qw, T c, const T* gpreds, bool first_order, T* g_theta, T* g_lr,
                                   T* gxs, T* gxq, T* work, const Team& tm = Team(), T* preds_out = nullptr,
                                   const T* theta0_t = nullptr) {
  const int64_t P = net.P, Pp = padded(P);
  const int64_t nmax = td.ns > td.nq ? td.ns : td.nq;
  const int64_t st = state_size(net, nmax);
  T* states = work;                              // support state of steps 0..K-1, then the query state
  T* tangents = states + (K + 1) * st;           // rz, rh, rd
  T* thetas = tangents + tangents_size(net, nmax);  // theta_1 .. theta_K, K rows of Pp
  T* grads = thetas + K * Pp;                    // g_0 .. g_{K-1} (K rows) with g_lr, else one
  T* u = grads + (g_lr != nullptr ? K : 1) * Pp;
  T* v = u + Pp;
  Acts<T> q = make_split_acts(net, states + K * st, tangents, nmax);
  const int64_t s = slice(net, q, net.L - 1);
  const int D = net.dims[net.L];
  const int64_t m_out = static_cast<int64_t>(td.nq) * D;

  for (int k = 0; k < K; ++k) {
    Acts<T> a = make_split_acts(net, states + k * st, tangents, nmax);
    T* g = g_lr != nullptr ? grads + k * Pp : grads;
    support_grad(net, td, theta_at(theta0, thetas, k, Pp), a, g, tm, k == 0 ? theta0_t : nullptr);
    sgd_update(theta_at(theta0, thetas, k, Pp), lr + k * P, g, thetas + k * Pp, P, tm);
  }
  if (gxs != nullptr) fill(gxs, static_cast<int64_t>(td.ns) * net.dims[0], T(0), tm);
  if (gxq != nullptr) fill(gxq, static_cast<int64_t>(td.nq) * net.dims[0], T(0), tm);

  // v = dL/dtheta_K: the weighted query loss at theta_K plus the cotangent of the query output.
  T total = 0;
  fill(v, P, T(0), tm);
  tm.sync();
  {
    const T* th = theta_at(theta0, thetas, K, Pp);
    forward(net, th, td.xq, td.nq, q, tm, K == 0 ? theta0_t : nullptr);
    const T loss_K = loss_and_grad(net, q.z + s, td.yq_float, td.yq_index, td.nq, c * qw[K], q.d + s, q.p, tm);
    if (preds_out != nullptr) {
      total = qw[K] * loss_K;
      copy(q.z + s, preds_out, m_out, tm);
    }
    T* qd = q.d + s;
    if (gpreds != nullptr) for_each(tm, m_out, [&](int64_t j) { qd[j] += gpreds[j]; });
    tm.sync();
    backward(net, th, td.xq, td.nq, q, v, gxq, tm);
  }

  for (int k = K - 1; k >= 0; --k) {
    const T* th = theta_at(theta0, thetas, k, Pp);
    const T* lrk = lr + k * P;
    if (g_lr != nullptr) {
      const T* g = grads + k * Pp;
      T* gl = g_lr + k * P;
      if (preds_out != nullptr) {
        for_each(tm, P, [&](int64_t i) { gl[i] = -(g[i] * v[i]); });
      } else {
        for_each(tm, P, [&](int64_t i) { gl[i] -= g[i] * v[i]; });
      }
    }
    if (!first_order) for_each(tm, P, [&](int64_t i) { u[i] = lrk[i] * v[i]; });
    tm.sync();  // hvp and the query pass below read all of u and write v with their own owners
    if (!first_order) {
      Acts<T> a = make_split_acts(net, states + k * st, tangents, nmax);
      // v -= H_k u; gxs -= d/dx_s (g_k . u)
      hvp(net, th, u, td.xs, td.ns, a, T(-1), v, gxs, tm, k == 0 ? theta0_t : nullptr);
    }
    const T w = c * qw[k];
    if (w != T(0)) {
      forward(net, th, td.xq, td.nq, q, tm, k == 0 ? theta0_t : nullptr);
      const T loss_k = loss_and_grad(net, q.z + s, td.yq_float, td.yq_index, td.nq, w, q.d + s, q.p, tm);
      if (preds_out != nullptr) total += qw[k] * loss_k;
      backward(net, th, td.xq, td.nq, q, v, gxq, tm);
    }
  }
  if (preds_out != nullptr) {
    for_each(tm, P, [&](int64_t i) { g_theta[i] = v[i]; });
  } else {
    for_each(tm, P, [&](int64_t i) { g_theta[i] += v[i]; });
  }
  tm.sync();
  return total;
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
