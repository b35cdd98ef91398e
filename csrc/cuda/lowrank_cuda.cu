// fastmaml: the factored backend's lowrank_add as a CUDA kernel, alone and as the sweep's pair (the math and
// the layout are in lowrank_add.cuh), float32 and float64.

#include <cstdint>
#include <type_traits>

#include "lowrank_cuda.h"

namespace fastmaml {
namespace cuda {
namespace {

// A block's lanes: the warp intrinsics that tests/lowrank_cuda_check.cpp emulates with std::threads.
struct BlockLanes {
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int lane() const { return static_cast<int>(threadIdx.x) & 31; }
  __device__ int warp() const { return static_cast<int>(threadIdx.x) >> 5; }
  __device__ void sync() const { __syncthreads(); }
  template <typename T>
  __device__ T shfl_xor(T v, int mask) const {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
};

// Both kernels: 128 threads and at least 6 blocks a multiprocessor in float32 (at most 80 registers a
// thread, taken without spills; at 8 blocks, 64 registers, it spills: ptxas -v, sm_90a,
// benchmarks/RESULTS.md), 4 in float64 (a lane's 32 partial sums alone take 64 registers).
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 4 ? 6 : 4;

template <int kVecI, int kVecO, typename T>
__global__ void __launch_bounds__(lowrank::kThreads, kMinBlocks<T>)
    lowrank_add_kernel(const lowrank::AddArgs<T> a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  lowrank::add_task<kVecI, kVecO>(BlockLanes{}, a, static_cast<int64_t>(blockIdx.x),
                                  reinterpret_cast<T*>(shared_bytes));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether a pass may load 16 bytes at a time: its width a multiple of the elements in 16 bytes (so every
// row of every task starts aligned) and every pointer it reads or writes aligned.
template <typename T>
bool first_pass_vectors(const lowrank::AddArgs<T>& a) {
  if (a.i % (16 / sizeof(T)) != 0 || !aligned16(a.x)) return false;
  for (int j = 0; j < a.pairs; ++j) {
    if (!aligned16(a.hs[j])) return false;
  }
  return true;
}

template <typename T>
bool second_pass_vectors(const lowrank::AddArgs<T>& a) {
  if (a.o % (16 / sizeof(T)) != 0 || !aligned16(a.out) || (a.base != nullptr && !aligned16(a.base))) return false;
  for (int j = 0; j < a.pairs; ++j) {
    if (!aligned16(a.ds[j])) return false;
  }
  return true;
}

// The sweep's two lowrank_adds, u over widths (I, O) and v over (O, I): block b makes task b / 2 of u
// (b even) or v. kVecI and kVecO are the loads over width I and width O, so u's passes take <kVecI, kVecO>
// and v's <kVecO, kVecI>: a net's first or last layer (a width of 1) keeps 16-byte loads over its other
// width in both.
template <int kVecI, int kVecO, typename T>
__global__ void __launch_bounds__(lowrank::kThreads, kMinBlocks<T>)
    lowrank_pairs_kernel(const lowrank::AddArgs<T> u, const lowrank::AddArgs<T> v) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* cs = reinterpret_cast<T*>(shared_bytes);
  const int64_t t = static_cast<int64_t>(blockIdx.x >> 1);
  if ((blockIdx.x & 1u) == 0) {
    lowrank::add_task<kVecI, kVecO>(BlockLanes{}, u, t, cs);
  } else {
    lowrank::add_task<kVecO, kVecI>(BlockLanes{}, v, t, cs);
  }
}

template <typename T>
bool valid(const lowrank::AddArgs<T>& a, int64_t max_tasks) {
  return a.pairs >= 1 && a.pairs <= lowrank::kMaxPairs && a.tasks >= 1 && a.tasks <= max_tasks && a.n >= 1 &&
         a.s >= 1 && a.i >= 1 && a.o >= 1 &&
         lowrank::shared_elements(a.pairs, a.n, a.s) * int64_t(sizeof(T)) <= lowrank_max_shared_bytes;
}

template <typename T>
int64_t shared_bytes_of(const lowrank::AddArgs<T>& a) {
  return lowrank::shared_elements(a.pairs, a.n, a.s) * int64_t(sizeof(T));
}

// Calls f(std::integral_constant<int, A>, std::integral_constant<int, B>): A 16-byte loads (16 / sizeof(T)
// elements) where `a` holds, else 1; B likewise for `b`.
template <typename T, typename F>
void with_loads(bool a, bool b, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  using Wide = std::integral_constant<int, kVec>;
  using One = std::integral_constant<int, 1>;
  if (a && b) {
    f(Wide{}, Wide{});
  } else if (a) {
    f(Wide{}, One{});
  } else if (b) {
    f(One{}, Wide{});
  } else {
    f(One{}, One{});
  }
}

}  // namespace

template <typename T>
cudaError_t launch_lowrank_add(const lowrank::AddArgs<T>& a, cudaStream_t stream) {
  if (!valid(a, int64_t(0x7fffffff))) return cudaErrorInvalidValue;
  with_loads<T>(first_pass_vectors(a), second_pass_vectors(a), [&](auto in, auto out) {
    lowrank_add_kernel<decltype(in)::value, decltype(out)::value, T>
        <<<dim3(static_cast<unsigned>(a.tasks)), lowrank::kThreads, shared_bytes_of(a), stream>>>(a);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lowrank_pairs(const lowrank::AddArgs<T>& u, const lowrank::AddArgs<T>& v, cudaStream_t stream) {
  // v is u with the widths swapped: the same tasks, rows and pairs, v.i == u.o, v.o == u.i.
  if (!valid(u, int64_t(0x3fffffff)) || !valid(v, int64_t(0x3fffffff)) || u.tasks != v.tasks || u.n != v.n ||
      u.s != v.s || u.pairs != v.pairs || u.i != v.o || u.o != v.i) {
    return cudaErrorInvalidValue;
  }
  // Width I: u's first pass, v's second; width O: u's second pass, v's first.
  const bool wide_i = first_pass_vectors(u) && second_pass_vectors(v);
  const bool wide_o = second_pass_vectors(u) && first_pass_vectors(v);
  with_loads<T>(wide_i, wide_o, [&](auto in, auto out) {
    lowrank_pairs_kernel<decltype(in)::value, decltype(out)::value, T>
        <<<dim3(static_cast<unsigned>(2 * u.tasks)), lowrank::kThreads, shared_bytes_of(u), stream>>>(u, v);
  });
  return cudaGetLastError();
}

template cudaError_t launch_lowrank_add<float>(const lowrank::AddArgs<float>&, cudaStream_t);
template cudaError_t launch_lowrank_add<double>(const lowrank::AddArgs<double>&, cudaStream_t);
template cudaError_t launch_lowrank_pairs<float>(const lowrank::AddArgs<float>&, const lowrank::AddArgs<float>&,
                                                 cudaStream_t);
template cudaError_t launch_lowrank_pairs<double>(const lowrank::AddArgs<double>&, const lowrank::AddArgs<double>&,
                                                  cudaStream_t);

}  // namespace cuda
}  // namespace fastmaml
