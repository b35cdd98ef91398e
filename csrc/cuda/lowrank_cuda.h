// fastmaml: the launcher of the factored backend's CUDA lowrank_add (csrc/cuda/lowrank_add.cuh). Raw
// pointers in, a cudaError_t out, no torch headers: lowrank_cuda.cu compiles with a bare `nvcc -c`
// (tests/test_cuda_compile.py), and binding.cpp connects it to fastmaml::lowrank_add_launch.
#pragma once

#include <cuda_runtime_api.h>

#include "lowrank_add.cuh"

namespace fastmaml {
namespace cuda {

// One block of lowrank::kThreads threads a task, a.tasks blocks (at least one task), on `stream`. The
// 16-byte loads are taken where a.i and a.o are multiples of 16 / sizeof(T) and every pointer is 16-byte
// aligned; elementwise loads otherwise. Needs a.pairs in [1, lowrank::kMaxPairs], every size at least 1,
// a.tasks below 2^31, and lowrank::shared_elements(a.pairs, a.n, a.s) * sizeof(T) at most
// lowrank_max_shared_bytes (cudaErrorInvalidValue otherwise).
template <typename T>
cudaError_t launch_lowrank_add(const lowrank::AddArgs<T>& a, cudaStream_t stream);

// u and v, two lowrank_adds of the same tasks, rows and pairs with the widths swapped (v.i == u.o, v.o ==
// u.i: the factored sweep's two products of a weight cotangent), in one launch: blocks 2t and 2t + 1 make
// task t's u and v, so the second reads the task's factors while the first's reads have them in L2. The
// bounds of launch_lowrank_add, and u.tasks below 2^30.
template <typename T>
cudaError_t launch_lowrank_pairs(const lowrank::AddArgs<T>& u, const lowrank::AddArgs<T>& v, cudaStream_t stream);

// The shared memory (the c_j) a launch may take without opting in.
constexpr int64_t lowrank_max_shared_bytes = 48 << 10;

}  // namespace cuda
}  // namespace fastmaml
