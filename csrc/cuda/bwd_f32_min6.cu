// fastmaml: the float reverse sweep compiled for 6 blocks a multiprocessor (FASTMAML_CUDA_MIN_BLOCKS=6,
// plan()'s Launch::min_blocks): its launcher and its residency report. A file of its own so that ninja
// compiles this sweep beside the default one (bwd_f32.cu) and the 4-block one (bwd_f32_min4.cu).

#include "bwd_min.cuh"

namespace fastmaml {
namespace cuda {

template struct BwdMin<6>;

}  // namespace cuda
}  // namespace fastmaml
