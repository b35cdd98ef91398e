// fastmaml: the float reverse sweep compiled for 4 blocks a multiprocessor (FASTMAML_CUDA_MIN_BLOCKS=4,
// kernels.cuh's four_blocks): its launcher and its residency report. A file of its own so that ninja
// compiles this sweep beside bwd_f32.cu's default one; together in one file they were the build's
// longest compile.

#include "kernels.cuh"

namespace fastmaml {
namespace cuda {

cudaError_t BwdMin4::launch(const BwdArgs<float>& a, unsigned blocks, int threads, size_t smem, cudaStream_t stream) {
  return launch_bwd_kernel<float, 4>(a, blocks, threads, smem, stream);
}

cudaError_t BwdMin4::residency(int threads, size_t smem, Residency* out) {
  return bwd_kernel_residency<float, 4>(threads, smem, out);
}

}  // namespace cuda
}  // namespace fastmaml
