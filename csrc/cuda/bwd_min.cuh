// fastmaml: the launcher and residency report of the float reverse sweep compiled for kMinBlocks blocks a
// multiprocessor (BwdMin, declared in kernels.cuh). Included only by bwd_f32_min4.cu and bwd_f32_min6.cu,
// each of which instantiates BwdMin for its own count: the sweep is most of a file's build, and no other
// file sees these definitions, so none compiles those kernels.
#pragma once

#include "kernels.cuh"

namespace fastmaml {
namespace cuda {

template <int kMinBlocks>
cudaError_t BwdMin<kMinBlocks>::launch(const BwdArgs<float>& a, unsigned blocks, int threads, size_t smem,
                                       cudaStream_t stream) {
  return launch_bwd_kernel<float, kMinBlocks>(a, blocks, threads, smem, stream);
}

template <int kMinBlocks>
cudaError_t BwdMin<kMinBlocks>::residency(int threads, size_t smem, Residency* out) {
  return bwd_kernel_residency<float, kMinBlocks>(threads, smem, out);
}

}  // namespace cuda
}  // namespace fastmaml
