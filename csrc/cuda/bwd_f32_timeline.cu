// fastmaml: the float reverse sweep with its barrier timeline (timeline.h; BwdTimeline in kernels.cuh),
// launched in place of the default sweep when a benchmark has armed it (maml_cuda.h, arm_timeline). A
// file of its own: the sweep is most of a file's build, and ninja compiles this one beside the others.

#include "kernels.cuh"

namespace fastmaml {
namespace cuda {

cudaError_t BwdTimeline::launch(const BwdArgs<float>& a, unsigned blocks, int threads, size_t smem,
                                cudaStream_t stream) {
  // Compiled for 3 blocks a multiprocessor (at most 168 registers): the default sweep's residency, so the
  // timeline's tasks share a multiprocessor as the measured kernel's do.
  return launch_bwd_kernel<float, 3, true>(a, blocks, threads, smem, stream);
}

}  // namespace cuda
}  // namespace fastmaml
