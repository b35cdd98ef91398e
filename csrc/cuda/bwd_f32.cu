// fastmaml: the float launchers of maml_bwd's reverse sweep and maml_fwdbwd_sum (bwd_kernel).
// One file per kernel family and dtype, so that ninja compiles them in parallel (kernels.cuh).

#include "kernels.cuh"

namespace fastmaml {
namespace cuda {

FASTMAML_INSTANTIATE_BWD(float)

}  // namespace cuda
}  // namespace fastmaml
