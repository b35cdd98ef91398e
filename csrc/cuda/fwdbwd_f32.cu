// fastmaml: the float launchers of maml_fwdbwd, every task's own gradient rows (fwdbwd_kernel).
// One file per kernel family and dtype, so that ninja compiles them in parallel (kernels.cuh).

#include "kernels.cuh"

namespace fastmaml {
namespace cuda {

FASTMAML_INSTANTIATE_FWDBWD(float)

}  // namespace cuda
}  // namespace fastmaml
