// fastmaml: lowrank_add for one task by one block of 128 threads, the factored backend's low-rank product
// (fastmaml/backends/_lowrank.py says what it computes and where it runs):
//
//     out[n, o] = base[n, o] + sum_j s_j sum_s c_j[n, s] ds[j][s, o],   c_j = x hs[j]^T   ([N, S] each).
//
// Why not the Triton kernel's form: Triton's FMA products of these shapes stage both operands in shared
// memory, pad 10 points to 16 and give each thread two outputs of the [16, 16] product, so a thread reads
// about one operand from shared memory for every multiply-add (sm_90a SASS of lowrank_add_kernel at five
// pairs of 10 x 128 factors: 2,280 bytes of LDS for 640 FFMA a thread and chunk, about 1.2 MB a task,
// 9 bytes a useful multiply-add), and a multiprocessor's shared memory and L1 serve 128 bytes a clock.
// Here (benchmarks/RESULTS.md has the counts):
//
// - c_j: the [N, S] outputs in blocks of at most 5 x 5, one block a warp; each lane takes a slice of the
//   reduction (kVec consecutive k, then the next 32 * kVec), loads its slice of the block's rows of x and
//   hs[j] from global memory straight into registers (16-byte loads; each element used 5 times; x's slice
//   kept over the pairs where the width is one step of the lanes) and sums its 25 partial products; one
//   reduce-scatter across the warp (31 shuffles a lane) then leaves the block's element e, summed over
//   every k, with lane e. No shared-memory operands, no barrier, no padding of N or S to 16.
// - out: the c_j (times s_j) go to shared memory, column-major with rows padded to kRows, and each thread
//   makes kRows rows of kVec consecutive output columns, reading ds[j]'s rows with 16-byte loads and a
//   column of c_j's kRows rows as one broadcast read.
//
// About 1 byte of L1 or shared-memory traffic a useful multiply-add at five pairs of 10 x 128 factors.
// The sums run in another order than the batched products' and the Triton kernel's: the results agree
// to rounding, not to the bit. Host-compilable for tests/lowrank_cuda_check.cpp, which runs it with
// std::threads as lanes (`Lanes` below is the only thing a block and the check provide differently).
#pragma once

#include <cstdint>

#include "../task/config.h"

namespace fastmaml {
namespace lowrank {

constexpr int kThreads = 128;   // a block: four warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPairs = 16;   // factor pairs a launch (pointers passed by value)
constexpr int kBlock = 5;       // c_j's blocks: at most kBlock x kBlock elements, one block a warp
constexpr int kRows = 4;        // output rows a thread in the second pass (one 16-byte read of c_j in float32)

template <typename T>
struct AddArgs {
  const T* base;              // [tasks, n, o], or nullptr (zeros)
  const T* x;                 // [tasks, n, i]
  const T* hs[kMaxPairs];     // pairs x [tasks, s, i]
  const T* ds[kMaxPairs];     // pairs x [tasks, s, o]
  const T* scales;            // [pairs], or nullptr (ones)
  T* out;                     // [tasks, n, o]
  int64_t tasks;
  int n, s, i, o, pairs;
};

// The rows of c_j's columns in shared memory: n rounded up to kRows, so that the second pass reads
// kRows consecutive rows of one column at once (16 bytes in float32).
FASTMAML_HD constexpr int padded_rows(int n) { return (n + kRows - 1) / kRows * kRows; }

// The elements in shared memory a launch needs: every c_j, column-major with padded_rows(n) rows.
FASTMAML_HD constexpr int64_t shared_elements(int pairs, int n, int s) { return int64_t(pairs) * s * padded_rows(n); }

// kVec consecutive elements at p: 16 bytes at a time where kVec * sizeof(T) is a multiple of 16 (the
// launcher checks the alignment), else one by one.
template <int kVec, typename T>
FASTMAML_HD FASTMAML_FORCE_INLINE void load_vec(const T* p, T (&v)[kVec]) {
#if defined(__CUDA_ARCH__)
  if constexpr (kVec * sizeof(T) % 16 == 0 && sizeof(T) == 4) {
    FASTMAML_UNROLL
    for (int q = 0; q < kVec; q += 4) {
      const float4 w = *reinterpret_cast<const float4*>(p + q);
      v[q] = w.x, v[q + 1] = w.y, v[q + 2] = w.z, v[q + 3] = w.w;
    }
  } else if constexpr (kVec * sizeof(T) % 16 == 0 && sizeof(T) == 8) {
    FASTMAML_UNROLL
    for (int q = 0; q < kVec; q += 2) {
      const double2 w = *reinterpret_cast<const double2*>(p + q);
      v[q] = w.x, v[q + 1] = w.y;
    }
  } else
#endif
  {
    FASTMAML_UNROLL
    for (int q = 0; q < kVec; ++q) v[q] = p[q];
  }
}

template <int kVec, typename T>
FASTMAML_HD FASTMAML_FORCE_INLINE void store_vec(T* p, const T (&v)[kVec]) {
#if defined(__CUDA_ARCH__)
  if constexpr (kVec * sizeof(T) == 16 && sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (kVec * sizeof(T) == 16 && sizeof(T) == 8) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  } else
#endif
  {
    FASTMAML_UNROLL
    for (int q = 0; q < kVec; ++q) p[q] = v[q];
  }
}

// One round of reduce_scatter: each lane keeps the half of v whose index has its bit kWidth, adds the
// partner's copy of that half and sends the other. A round a template: a loop over the widths left nvcc
// indexing v at run time (predicated moves, a branch on the lane: about 2,150 instructions a sum, sm_90a
// SASS) where the rounds unrolled take 31 shuffles and about 140 instructions.
template <int kWidth, typename T, typename Lanes>
FASTMAML_HD FASTMAML_FORCE_INLINE void reduce_round(const Lanes& lanes, bool upper, T (&v)[32]) {
  FASTMAML_UNROLL
  for (int e = 0; e < kWidth; ++e) {
    const T send = upper ? v[e] : v[e + kWidth];
    const T keep = upper ? v[e + kWidth] : v[e];
    v[e] = keep + lanes.shfl_xor(send, kWidth);
  }
}

// Lane l's return value: the sum over the warp's 32 lanes of their v[l] (16 + 8 + 4 + 2 + 1 shuffles).
// v is spent.
template <typename T, typename Lanes>
FASTMAML_HD FASTMAML_FORCE_INLINE T reduce_scatter(const Lanes& lanes, T (&v)[32]) {
  const int lane = lanes.lane();
  reduce_round<16>(lanes, (lane & 16) != 0, v);
  reduce_round<8>(lanes, (lane & 8) != 0, v);
  reduce_round<4>(lanes, (lane & 4) != 0, v);
  reduce_round<2>(lanes, (lane & 2) != 0, v);
  reduce_round<1>(lanes, (lane & 1) != 0, v);
  return v[0];
}

// kVec columns from column k of the first `rows` rows (of width `in`) at p into r; zeros past `rows`.
template <int kVec, typename T>
FASTMAML_HD FASTMAML_FORCE_INLINE void load_rows(const T* p, int in, int rows, int k, T (&r)[kBlock][kVec]) {
  FASTMAML_UNROLL
  for (int i = 0; i < kBlock; ++i) {
    if (i < rows) {
      load_vec<kVec>(p + i * in + k, r[i]);
    } else {
      FASTMAML_UNROLL
      for (int q = 0; q < kVec; ++q) r[i][q] = T(0);
    }
  }
}

// v[r * kBlock + c] += sum_q xv[r][q] hv[c][q]: a lane's share of a block's products.
template <int kVec, typename T>
FASTMAML_HD FASTMAML_FORCE_INLINE void add_outer(const T (&xv)[kBlock][kVec], const T (&hv)[kBlock][kVec],
                                                  T (&v)[32]) {
  FASTMAML_UNROLL
  for (int r = 0; r < kBlock; ++r) {
    FASTMAML_UNROLL
    for (int c = 0; c < kBlock; ++c) {
      FASTMAML_UNROLL
      for (int q = 0; q < kVec; ++q) v[r * kBlock + c] += xv[r][q] * hv[c][q];
    }
  }
}

// c_j for every pair j into cs (shared, column-major [pairs, s, padded_rows(n)], each times its scale):
// the first pass. A warp takes a block and every pair in turn; where a lane's slice of the width is one
// step (in <= 32 kVec: widths up to 128 in float32), its slice of the block's rows of x stays in registers
// over the pairs.
template <int kVec, typename T, typename Lanes>
FASTMAML_HD void products_x_h(const Lanes& lanes, const AddArgs<T>& a, int64_t t, T* cs) {
  const int n = a.n, s = a.s, in = a.i, lane = lanes.lane(), np = padded_rows(n);
  // Blocks of rn x rs elements (at most kBlock each, as even as N and S allow: 10 -> 5 + 5, 13 -> 5 + 5 + 3).
  const int bn = (n + kBlock - 1) / kBlock, bs = (s + kBlock - 1) / kBlock;
  const int rn = (n + bn - 1) / bn, rs = (s + bs - 1) / bs;
  const T* x = a.x + t * n * in;
  // Lane e of a block's reduce-scatter holds its element (e / kBlock, e % kBlock).
  const int my_r = lane / kBlock, my_c = lane % kBlock, k1 = lane * kVec;
  const bool one_step = in <= 32 * kVec;
  for (int blk = lanes.warp(); blk < bn * bs; blk += kWarps) {  // warp-uniform: every lane shuffles
    const int n0 = (blk / bs) * rn, s0 = (blk % bs) * rs;
    const int nr = n - n0 < rn ? n - n0 : rn, sr = s - s0 < rs ? s - s0 : rs;
    T xv[kBlock][kVec], hv[kBlock][kVec];
    if (one_step) load_rows<kVec>(x + n0 * in, in, k1 < in ? nr : 0, k1, xv);
    for (int j = 0; j < a.pairs; ++j) {
      const T* h = a.hs[j] + t * s * in + s0 * in;
      T v[32];
      FASTMAML_UNROLL
      for (int e = 0; e < 32; ++e) v[e] = T(0);
      if (one_step) {
        if (k1 < in) {
          load_rows<kVec>(h, in, sr, k1, hv);
          add_outer<kVec>(xv, hv, v);
        }
      } else {
        for (int k = k1; k < in; k += 32 * kVec) {
          load_rows<kVec>(x + n0 * in, in, nr, k, xv);
          load_rows<kVec>(h, in, sr, k, hv);
          add_outer<kVec>(xv, hv, v);
        }
      }
      const T sum = reduce_scatter(lanes, v);
      if (lane < kBlock * kBlock && my_r < nr && my_c < sr) {
        cs[(int64_t(j) * s + s0 + my_c) * np + n0 + my_r] = sum * (a.scales != nullptr ? a.scales[j] : T(1));
      }
    }
  }
}

// out = base + sum_j c_j ds[j]: the second pass, after cs is visible to the block. Each thread makes
// kRows rows of kVec consecutive columns; a column of c_j's kRows rows is one read (cs is column-major
// with padded rows: rows past n are read, and their sums dropped).
template <int kVec, typename T, typename Lanes>
FASTMAML_HD void products_c_d(const Lanes& lanes, const AddArgs<T>& a, int64_t t, const T* cs) {
  const int n = a.n, s = a.s, o = a.o, np = padded_rows(n);
  const int groups = o / kVec, chunks = np / kRows;  // the launcher checks o % kVec == 0
  const T* base = a.base != nullptr ? a.base + t * n * o : nullptr;
  T* out = a.out + t * n * o;
  for (int item = lanes.rank(); item < chunks * groups; item += kThreads) {
    // Consecutive threads take consecutive column groups of one row chunk: coalesced loads and stores.
    const int n0 = (item / groups) * kRows, o0 = (item % groups) * kVec;
    const int nr = n - n0 < kRows ? n - n0 : kRows;
    T acc[kRows][kVec];
    FASTMAML_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (base != nullptr && r < nr) {
        load_vec<kVec>(base + (n0 + r) * o + o0, acc[r]);
      } else {
        FASTMAML_UNROLL
        for (int q = 0; q < kVec; ++q) acc[r][q] = T(0);
      }
    }
    for (int j = 0; j < a.pairs; ++j) {
      const T* d = a.ds[j] + t * s * o + o0;
      const T* c = cs + int64_t(j) * s * np + n0;
      for (int si = 0; si < s; ++si) {
        T dv[kVec], cv[kRows];
        load_vec<kVec>(d + si * o, dv);
        load_vec<kRows>(c + si * np, cv);
        FASTMAML_UNROLL
        for (int r = 0; r < kRows; ++r) {
          FASTMAML_UNROLL
          for (int q = 0; q < kVec; ++q) acc[r][q] += cv[r] * dv[q];
        }
      }
    }
    FASTMAML_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) store_vec<kVec>(out + (n0 + r) * o + o0, acc[r]);
    }
  }
}

// Task t by the whole block; cs is the block's shared [pairs, n, s]. kVecI and kVecO: elements a load in
// the first pass (x, hs) and the second (base, ds, out), 16 bytes where the launcher finds those widths and
// pointers aligned: a net's first and last layers have an input or output width of 1.
template <int kVecI, int kVecO, typename T, typename Lanes>
FASTMAML_HD void add_task(const Lanes& lanes, const AddArgs<T>& a, int64_t t, T* cs) {
  products_x_h<kVecI>(lanes, a, t, cs);
  lanes.sync();
  products_c_d<kVecO>(lanes, a, t, cs);
}

}  // namespace lowrank
}  // namespace fastmaml
