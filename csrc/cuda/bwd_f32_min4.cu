// fastmaml: the float reverse sweep compiled for 4 blocks a multiprocessor (FASTMAML_CUDA_MIN_BLOCKS=4,
// plan()'s Launch::min_blocks): its launcher and its residency report. A file of its own so that ninja
// compiles this sweep beside bwd_f32.cu's default one; together in one file they were the build's
// longest compile.

#include "bwd_min.cuh"

namespace fastmaml {
namespace cuda {

template struct BwdMin<4>;

}  // namespace cuda
}  // namespace fastmaml
