// fastmaml: the factored backend's lowrank_add as a CUDA kernel, alone and as the sweep's pair (the math and
// the layout are in lowrank_add.cuh), float32 and float64.

#include <cstdint>

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

// 128 threads and at least 6 blocks a multiprocessor in float32 (at most 80 registers a thread, taken
// without spills; at 8 blocks, 64 registers, it spills: ptxas -v, sm_90a, benchmarks/RESULTS.md), 4 in
// float64 (a lane's 32 partial sums alone take 64 registers).
template <int kVecI, int kVecO, typename T>
__global__ void __launch_bounds__(lowrank::kThreads, sizeof(T) == 4 ? 6 : 4)
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

// Two lowrank_adds of the same sizes: block b makes task b / 2 of problem b % 2.
template <int kVecI, int kVecO, typename T>
__global__ void __launch_bounds__(lowrank::kThreads, sizeof(T) == 4 ? 6 : 4)
    lowrank_pairs_kernel(const lowrank::AddArgs<T> u, const lowrank::AddArgs<T> v) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  lowrank::add_task<kVecI, kVecO>(BlockLanes{}, (blockIdx.x & 1u) != 0 ? v : u, static_cast<int64_t>(blockIdx.x >> 1),
                                  reinterpret_cast<T*>(shared_bytes));
}

template <typename T>
bool valid(const lowrank::AddArgs<T>& a) {
  return a.pairs >= 1 && a.pairs <= lowrank::kMaxPairs && a.tasks >= 1 && a.tasks <= int64_t(0x3fffffff) && a.n >= 1 &&
         a.s >= 1 && a.i >= 1 && a.o >= 1 &&
         lowrank::shared_elements(a.pairs, a.n, a.s) * int64_t(sizeof(T)) <= lowrank_max_shared_bytes;
}

// Launches lowrank_add_kernel on a alone (b null) or lowrank_pairs_kernel on a and b, with the widest loads
// every problem allows in each pass.
template <typename T>
cudaError_t launch_any(const lowrank::AddArgs<T>& a, const lowrank::AddArgs<T>* b, cudaStream_t stream) {
  if (!valid(a) || (b != nullptr && !valid(*b))) return cudaErrorInvalidValue;
  const int64_t shared = lowrank::shared_elements(a.pairs, a.n, a.s) * int64_t(sizeof(T));
  const dim3 grid(static_cast<unsigned>(b != nullptr ? 2 * a.tasks : a.tasks));
  constexpr int kVec = 16 / sizeof(T);
  const bool first = first_pass_vectors(a) && (b == nullptr || first_pass_vectors(*b));
  const bool second = second_pass_vectors(a) && (b == nullptr || second_pass_vectors(*b));
  auto go = [&](auto kernel_add, auto kernel_pairs) {
    if (b != nullptr) {
      kernel_pairs<<<grid, lowrank::kThreads, shared, stream>>>(a, *b);
    } else {
      kernel_add<<<grid, lowrank::kThreads, shared, stream>>>(a);
    }
  };
  if (first && second) {
    go(lowrank_add_kernel<kVec, kVec, T>, lowrank_pairs_kernel<kVec, kVec, T>);
  } else if (first) {
    go(lowrank_add_kernel<kVec, 1, T>, lowrank_pairs_kernel<kVec, 1, T>);
  } else if (second) {
    go(lowrank_add_kernel<1, kVec, T>, lowrank_pairs_kernel<1, kVec, T>);
  } else {
    go(lowrank_add_kernel<1, 1, T>, lowrank_pairs_kernel<1, 1, T>);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_lowrank_add(const lowrank::AddArgs<T>& a, cudaStream_t stream) {
  return launch_any<T>(a, nullptr, stream);
}

template <typename T>
cudaError_t launch_lowrank_pairs(const lowrank::AddArgs<T>& u, const lowrank::AddArgs<T>& v, cudaStream_t stream) {
  if (u.tasks != v.tasks || u.n != v.n || u.s != v.s || u.pairs != v.pairs) return cudaErrorInvalidValue;
  return launch_any<T>(u, &v, stream);
}

template cudaError_t launch_lowrank_add<float>(const lowrank::AddArgs<float>&, cudaStream_t);
template cudaError_t launch_lowrank_add<double>(const lowrank::AddArgs<double>&, cudaStream_t);
template cudaError_t launch_lowrank_pairs<float>(const lowrank::AddArgs<float>&, const lowrank::AddArgs<float>&,
                                                 cudaStream_t);
template cudaError_t launch_lowrank_pairs<double>(const lowrank::AddArgs<double>&, const lowrank::AddArgs<double>&,
                                                  cudaStream_t);

}  // namespace cuda
}  // namespace fastmaml
