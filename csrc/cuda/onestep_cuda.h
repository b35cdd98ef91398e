// fastmaml: the launcher of the CUDA maml_onestep (onestep.cu; the per-task math is csrc/task/onestep.h, the
// operation's contract csrc/onestep_op.h). Raw pointers in, a cudaError_t out, no torch headers: onestep.cu
// compiles with a bare `nvcc -c` (tests/test_cuda_compile.py), and onestep_binding.cpp connects it to torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../task/config.h"
#include "../task/layout.h"

namespace fastmaml {
namespace cuda {

// How a launch lays out its tasks: one warp a task, `warps` warps a block, a grid of `blocks` blocks looping
// over the tasks (at most as many blocks as are resident at once). theta_0, its transposes and the rates are
// staged in each block's shared memory when they fit (`stage`), and each warp's scratch (`work_elems`) is
// there too when every warp's fits beside them (`shared_work`); otherwise the caller provides
// `global_work_elems` elements of global memory for it.
struct OnestepPlan {
  int warps;
  int64_t blocks;
  int64_t shared_bytes;
  bool stage, shared_work;
  // The shared-operand form (implies stage and shared_work; for the FFMA loop only under
  // FASTMAML_ONESTEP_FORM=shared), and the products on tensor cores (float, built for compute 8.0+, unless
  // FASTMAML_ONESTEP_PRODUCTS=ffma).
  bool shared_form;
  bool mma;
  int64_t work_elems, global_work_elems;
};

// What a plan depends on. The net reaches the launchers only inside structs of this namespace, never as a
// parameter of its own: task::Net lives in the inline namespace that names the host loop variant
// (task/config.h), `vec16` in the g++-compiled bindings and `scalar` in nvcc's host pass, so a launcher
// declared with a task::Net parameter is mangled two ways and the extension does not link
// (tests/test_cuda_compile.py checks that every launcher the bindings call is one the .cu files define).
// The structs themselves hold a vec16::Net on one side and a scalar::Net on the other, as maml_cuda.h's Sizes
// does: that holds because Net's layout does not depend on the loop variant (csrc/task/layout.h).
struct OnestepShape {
  task::Net net;
  int ns, nq;
  int64_t n_tasks;
};

template <typename T>
struct OnestepArgs {
  task::Net net;
  int64_t n_tasks;
  int ns, nq;
  bool first_order;
  const T *theta, *theta_t, *rates, *xs, *ys, *xq, *yq, *cot, *g_pred;  // ys, yq (mse), cot and g_pred may be null
  const int64_t *ys_index, *yq_index;                                 // the classes (cross-entropy), else null
  T *losses, *preds, *U, *V, *rate_grads;  // U, V and rate_grads [T, 2 L] null: no factor rows
  T* global_work;                                                     // null where the plan needs none
};

// The plan of a launch on the current device. FASTMAML_ONESTEP_WARPS (2, 4, 8 or 16) sets the warps of a
// block (by default as many as fit with their scratch in shared memory beside theta_0, up to 16, where that
// is 8 or more, else 16, and fewer where the tasks would not reach every multiprocessor),
// FASTMAML_ONESTEP_SHARED=0 keeps the scratch in global memory, FASTMAML_ONESTEP_PRODUCTS=ffma runs the float
// products in the FFMA loop instead of on tensor cores (the A/B switches). Global scratch is kept to 1 GiB a
// launch by running fewer blocks.
template <typename T>
cudaError_t plan_onestep(const OnestepShape& shape, OnestepPlan* plan);

// The kernel on `stream` with a plan from plan_onestep (n_tasks at least 1).
template <typename T>
cudaError_t launch_onestep(const OnestepArgs<T>& a, const OnestepPlan& plan, cudaStream_t stream);

// The kernel's registers and local (spilled) bytes a thread, and how many blocks of `plan` one
// multiprocessor holds, for the benchmarks' launch notes.
template <typename T>
cudaError_t onestep_attributes(int* registers, int* local_bytes, const OnestepPlan& plan, int* blocks_per_sm);

}  // namespace cuda
}  // namespace fastmaml
