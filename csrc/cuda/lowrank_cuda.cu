// fastmaml: the factored backend's lowrank_add as a CUDA kernel (the math and the layout are in
// lowrank_add.cuh), float32 and float64.

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

template <int kVecI, int kVecO, typename T>
void launch(const lowrank::AddArgs<T>& a, int64_t shared, cudaStream_t stream) {
  lowrank_add_kernel<kVecI, kVecO, T><<<dim3(static_cast<unsigned>(a.tasks)), lowrank::kThreads, shared, stream>>>(a);
}

}  // namespace

template <typename T>
cudaError_t launch_lowrank_add(const lowrank::AddArgs<T>& a, cudaStream_t stream) {
  if (a.pairs < 1 || a.pairs > lowrank::kMaxPairs || a.tasks < 1 || a.tasks > int64_t(0x7fffffff) || a.n < 1 ||
      a.s < 1 || a.i < 1 || a.o < 1) {
    return cudaErrorInvalidValue;
  }
  const int64_t shared = lowrank::shared_elements(a.pairs, a.n, a.s) * int64_t(sizeof(T));
  if (shared > lowrank_max_shared_bytes) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  const bool first = first_pass_vectors(a), second = second_pass_vectors(a);
  if (first && second) {
    launch<kVec, kVec>(a, shared, stream);
  } else if (first) {
    launch<kVec, 1>(a, shared, stream);
  } else if (second) {
    launch<1, kVec>(a, shared, stream);
  } else {
    launch<1, 1>(a, shared, stream);
  }
  return cudaGetLastError();
}

template cudaError_t launch_lowrank_add<float>(const lowrank::AddArgs<float>&, cudaStream_t);
template cudaError_t launch_lowrank_add<double>(const lowrank::AddArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastmaml
