// fastmaml: the one-step kernel's products (`product`: the FFMA loop `cols_product`, or team_mma.h's
// tensor-core tiles where the team asks for them) and the ends its products finish with (csrc/task/onestep.h's
// per-task math calls them; the CPU runs them with a team of one, a GPU with a warp).
#pragma once

#include "config.h"
#include "mlp.h"
#include "team.h"
#include "team_mma.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {
namespace onestep {

constexpr int kChunk = 8;       // points a rank keeps in registers in one pass over k
constexpr int kSmallChunk = 5;  // the capacity of cols_product's second build (chunks of 5 points or fewer)

// V consecutive elements of T at p into v (16 bytes: 4 floats or 2 doubles). On a GPU one 16-byte load,
// a broadcast when the whole warp reads the same address; p must be 16-byte aligned there.
template <typename T>
FASTMAML_HD inline void load16(const T* p, T* v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const double2 q = *reinterpret_cast<const double2*>(p);
    v[0] = q.x, v[1] = q.y;
  }
#else
  for (int j = 0; j < static_cast<int>(16 / sizeof(T)); ++j) v[j] = p[j];
#endif
}

// Whether a team's products read both operands from shared memory (every one of them: the kernel staged
// theta_0, the scratch and the task's inputs there). A team says so with `static constexpr bool
// kSharedOperands = true` (csrc/cuda/onestep.cu's kernel for that case); by default false.
template <typename Team, typename = void>
struct SharedOperands {
  static constexpr bool value = false;
};
template <typename Team>
struct SharedOperands<Team, decltype(void(Team::kSharedOperands))> {
  static constexpr bool value = Team::kSharedOperands;
};

// Whether a host team runs `unit_sums`' predicated form, the one a GPU runs from generic addresses (a team
// says so with `static constexpr bool kPredicatedLoop = true`: the team check's, so that the CPU tests cover
// both forms); by default a host team runs the unpredicated one.
template <typename Team, typename = void>
struct PredicatedLoop {
  static constexpr bool value = false;
};
template <typename Team>
struct PredicatedLoop<Team, decltype(void(Team::kPredicatedLoop))> {
  static constexpr bool value = Team::kPredicatedLoop;
};

// One unit's sums: acc[i] += sum_k A[(n0 + i) an + k ak] B[k bk] (Bm is B's column) for i < nn <= C, k in
// order. Two forms of one loop, the same sums in the same order:
// - kClamp (shared operands on a GPU, and on the host unless the team asks for the other): points past the
//   chunk read its last point's row, in bounds, into accumulators nobody stores, so the loop runs without
//   predicates. With both operands in shared memory, nvcc loads them with 32-bit shared addresses:
//   65-67 sm_90a instructions a step of 4 k for 8 points' 32 multiply-adds, against 96-112 predicated from
//   generic addresses (8 points' predicates and the loop's outgrew the 7 predicate registers and were
//   recomputed every step, each address rebuilt in 64 bits, and a point left out issued anyway);
// - otherwise (generic addresses: the scratch in global memory), predicated: clamped, that loop kept 8 row
//   pointers and the kernel spilled 52 / 136 B.
// Either way a step issues C points' work whatever nn is: C is the chunk's capacity, compiled in.
template <int C, bool kClamp, typename T>
FASTMAML_HD FASTMAML_FORCE_INLINE void unit_sums(T (&acc)[C], int nn, int Kd, int kv, const T* a0, int an, int ak,
                                                 const T* Bm, int bk) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const T* ar[C];  // each point's row (kClamp; the predicated form addresses from a0)
  FASTMAML_UNROLL
  for (int i = 0; i < C; ++i) ar[i] = a0 + static_cast<int64_t>(kClamp && i >= nn ? nn - 1 : i) * an;
  for (int k = 0; k < kv; k += V) {
    T b[V];
    FASTMAML_UNROLL
    for (int j = 0; j < V; ++j) b[j] = Bm[static_cast<int64_t>(k + j) * bk];
    FASTMAML_UNROLL
    for (int i = 0; i < C; ++i) {
      if (kClamp || i < nn) {
        T a[V];
        load16((kClamp ? ar[i] : a0 + static_cast<int64_t>(i) * an) + k, a);
        FASTMAML_UNROLL
        for (int j = 0; j < V; ++j) acc[i] += a[j] * b[j];
      }
    }
  }
  for (int k = kv; k < Kd; ++k) {
    const T b = Bm[static_cast<int64_t>(k) * bk];
    FASTMAML_UNROLL
    for (int i = 0; i < C; ++i) {
      const T* row = kClamp ? ar[i] : a0 + static_cast<int64_t>(i) * an;
      if (kClamp || i < nn) acc[i] += row[static_cast<int64_t>(k) * ak] * b;
    }
  }
}

// cols_product's units with chunks of at most C points (the function below).
template <int C, bool kClamp, typename T, typename Team, typename F>
FASTMAML_HD inline void chunk_units(int N, int Kd, int M, const T* A, int an, int ak, const T* B, int bk, int bm,
                                    int nc, int per, int kv, const F& f, const Team& tm) {
  // On a GPU kClamp is the shared-operand form: the kernel's operands are then in shared memory by
  // construction (csrc/cuda/onestep.cu), so nvcc loads them by 32-bit shared addresses without being told.
  // No __builtin_assume(__isShared): where the kernel's scratch pointer could also be global, nvcc 13.0 took
  // the query pass onward for unreachable under those assumptions and the kernel exited after its support
  // pass (the H200 run of 2026-12-04; tests/test_onestep_ptx.py).
  const int dm = tm.size() / nc, dc = tm.size() % nc;  // a step of `size` units: dm columns and dc chunks
  for (int c = tm.rank() % nc, m = tm.rank() / nc; m < M; c += dc, m += dm, (c >= nc ? (c -= nc, ++m) : 0)) {
    const int n0 = c * per;
    if (n0 >= N) continue;
    const int nn = N - n0 < per ? N - n0 : per;
    T acc[C];
    FASTMAML_UNROLL
    for (int i = 0; i < C; ++i) acc[i] = i < nn ? f.init(n0 + i, m) : T(0);
    unit_sums<C, kClamp>(acc, nn, Kd, kv, A + static_cast<int64_t>(n0) * an, an, ak,
                         B + static_cast<int64_t>(m) * bm, bk);
    FASTMAML_UNROLL
    for (int i = 0; i < C; ++i) {
      if (i < nn) f.finish(n0 + i, m, acc[i]);
    }
  }
}

// out[n, m] for n < N, m < M: f.finish(n, m, f.init(n, m) + sum_k A[n an + k ak] B[k bk + m bm]), the sum
// in k order. The work is cut into units of one column and one chunk of points: ceil(N / kChunk) chunks,
// balanced (10 points: 5 + 5, not 8 + 2), each kept in registers for one pass over k. Unit u is chunk
// u % chunks of column u / chunks, and rank r owns the units r, r + size, ... A unit's loop issues the same
// instructions whatever its points (unit_sums), so the fewest chunks take the fewest rounds; spreading the
// units over the ranks is what balances them: at the sinusoid size a 40-column product takes a warp 3 rounds,
// where whole columns of 8 + 2 points gave lanes 0-7 four passes, and a 10-column Gram matrix or the output
// layer's one column one round, not two. A warp's lanes read at most 32 / chunks + 1 neighbouring columns of
// B at once (no two in one bank where B's columns are neighbours in memory, bm = 1) and `chunks` rows of A.
// Each output's sum is one rank's, in k order, so the result does not depend on the team; the owners depend
// on N, M and the team only, so the second of two products of one N and M into one output may read what the
// first stored without a sync.
// The loop is compiled for chunks of at most 5 points and of at most kChunk: chunks of 5 or fewer (10 points,
// 5, 4, 3, ...) run the first, whose step of 4 k issues 5 points' loads and multiply-adds, not 8 (at the
// sinusoid size every product's chunks are 5 points). Which one runs depends on N alone, so the owners do
// not change.
// Where A's rows are contiguous and 16-byte aligned (ak = 1, an and A's address multiples of 16 bytes)
// each point's A values come 16 bytes at a time: per 4 k (float) one load of A a point and 4 of B for 4
// multiply-adds a point (8 points: 12 loads for 32), where one value at a time takes 36 loads (the loads,
// not the multiply-adds, bound a warp's products on a GPU: the lanes on one chunk read the same A value, a
// broadcast).
template <typename T, typename Team, typename F>
FASTMAML_HD inline void cols_product(int N, int Kd, int M, const T* A, int an, int ak, const T* B, int bk, int bm,
                                     const F& f, const Team& tm) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
#if defined(__CUDA_ARCH__)
  constexpr bool kClamp = SharedOperands<Team>::value;
#else
  constexpr bool kClamp = !PredicatedLoop<Team>::value;
#endif
  const bool rows16 = ak == 1 && an % V == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0;
  const int kv = rows16 ? Kd - Kd % V : 0;  // k below kv: 16-byte loads of A
  const int nc = (N + kChunk - 1) / kChunk;  // chunks
  const int per = (N + nc - 1) / nc;  // points a chunk (the last may have fewer)
  if (per <= kSmallChunk) {
    chunk_units<kSmallChunk, kClamp>(N, Kd, M, A, an, ak, B, bk, bm, nc, per, kv, f, tm);
  } else {
    chunk_units<kChunk, kClamp>(N, Kd, M, A, an, ak, B, bk, bm, nc, per, kv, f, tm);
  }
}

// Whether a team's products run on tensor cores (team_mma.h's warp tiles, 3xTF32 for float): a team says
// so with `static constexpr bool kMmaProducts = true` (the CUDA kernel's mma form, and the team check's teams
// that emulate it on the host); by default false.
template <typename Team, typename = void>
struct MmaProducts {
  static constexpr bool value = false;
};
template <typename Team>
struct MmaProducts<Team, decltype(void(Team::kMmaProducts))> {
  static constexpr bool value = Team::kMmaProducts;
};

// out[n, m] = f.finish(n, m, f.init(n, m) + sum_k A[n an + k ak] B[k bk + m bm]), as cols_product, by the
// team's engine. With MmaProducts (and a type and device that have TF32 mma: kMmaCapable) a warp takes units
// of 16 x 16 outputs on tensor cores (mma_warp_tiles: 3xTF32, about 2^-21 of each product, summed in steps
// of 8 in the hardware's order, init added after the sum); else cols_product. Both engines give each output
// one owner that depends on N, M and the team only, so the pairs of products into one output that onestep.h
// runs without a sync between them keep that property as long as one team uses one engine throughout, which
// this choice, made from the team's type alone, ensures. On the host a team of fewer than 32 ranks holds no
// whole warp and runs cols_product (a device team is a warp: no FFMA loop is built beside the tiles). Every
// product here sums over at least one k (onestep.h's widths and point counts are positive), which the tiles
// need: they store nothing for an empty sum.
// Counted from sm_90a's disassembly (the tiles: 52-53 instructions a step of 8 of a 16 x 16 unit from shared
// memory, 6 of them mma, and 150-250 around each unit's call; cols_product's 5-point build: about 35 a step of
// 4 k for 20 multiply-adds): a sinusoid task's 67 units take its warp about 18,000 instructions on the tiles
// and about 13,000 in the FFMA loop (the sums are short: 1, 10 or 40); a width-128 task about 82,000 against
// 136,000 (benchmarks/RESULTS.md, 2026-12-03). The GPU's A/B decides; the FFMA loop is the default.
template <typename T, typename Team, typename F>
FASTMAML_HD inline void product(int N, int Kd, int M, const T* A, int an, int ak, const T* B, int bk, int bm,
                                const F& f, const Team& tm) {
  if constexpr (MmaProducts<Team>::value && kMmaCapable<T>) {
#if !defined(__CUDA_ARCH__)
    if (tm.size() < 32) return cols_product(N, Kd, M, A, an, ak, B, bk, bm, f, tm);
#endif
    mma_warp_tiles(N, M, Kd, T(1), A, an, ak, B, bm, bk, Finish<T, F>{f}, tm);  // products.h: init + sum
  } else {
    cols_product(N, Kd, M, A, an, ak, B, bk, bm, f, tm);
  }
}

// The products' ends. Each names its output [N, ld]; `i` is element (n, m)'s index in it.

// out = v (from zero, or from a column's bias when `bias` is given: the first of two products into out).
template <typename T>
struct Store {
  T* out;
  int ld;
  const T* bias;
  FASTMAML_HD T init(int, int m) const { return bias != nullptr ? bias[m] : T(0); }
  FASTMAML_HD void finish(int n, int m, T v) const { out[n * ld + m] = v; }
};

// out = s(b + v): a layer's forward from its bias (act = kNoAct: the output layer, no activation).
template <typename T>
struct BiasAct {
  const T* bias;
  T* out;
  int ld, act;
  FASTMAML_HD T init(int, int m) const { return bias[m]; }
  FASTMAML_HD void finish(int n, int m, T v) const { out[n * ld + m] = act_value(act, v); }
};

// out = s(out + scale v): the second product into a layer's output.
template <typename T>
struct AddAct {
  T* out;
  int ld, act;
  T scale;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int n, int m, T v) const {
    T* o = out + n * ld + m;
    *o = act_value(act, *o + scale * v);
  }
};

// e = s'(z) v: a backward step in one product.
template <typename T>
struct ActGradStore {
  const T* h;
  T* e;
  int ld, act;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int n, int m, T v) const { e[n * ld + m] = act_grad(act, h[n * ld + m], v); }
};

// e = s'(z) (e + scale v) [+ s''(z) z_dot (D W), tanh's -2 h z_dot D_low, where z_dot is given]: a backward
// step's second product, with s' and s'' read from h = s(z) as mlp.h's act_grad does.
template <typename T>
struct GradAct {
  const T* h;
  T* e;
  int ld, act;
  T scale;
  const T* z_dot;  // null: no s'' term (the query backward)
  const T* d_low;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int n, int m, T v) const {
    const int i = n * ld + m;
    const T hi = h[i];
    T r = act_grad(act, hi, e[i] + scale * v);
    if (z_dot != nullptr && act == kTanh) r -= T(2) * hi * z_dot[i] * d_low[i];
    e[i] = r;
  }
};

// z_dot = (bias ? bias : z_dot) + scale v, h_dot = s'(z) z_dot: a tangent layer's second product.
template <typename T>
struct TangentAct {
  T* z_dot;
  T* h_dot;
  const T* h;
  const T* bias;  // the layer's bias tangent where no product came first (layer 0)
  int ld, act;
  T scale;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int n, int m, T v) const {
    const int i = n * ld + m;
    const T z = (bias != nullptr ? bias[m] : z_dot[i]) + scale * v;
    z_dot[i] = z;
    h_dot[i] = act == kNoAct ? z : act_grad(act, h[i], z);
  }
};

}  // namespace onestep
}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
