// fastmaml: launchers of the CUDA kernels of maml_fwd, maml_bwd and maml_adapt (docs/kernels.md).
//
// Raw pointers, sizes and a stream in; a cudaError_t out. No torch headers: the .cu files compile with
// a bare `nvcc -c` on any machine (tests/test_cuda_compile.py), and binding.cpp connects the launchers
// to the op under the CUDA dispatch key.
//
// Layout: one thread block is the team of one task at a time (csrc/task/team.h), taking tasks blockIdx.x,
// blockIdx.x + gridDim.x, ... (forward, adapt) or one contiguous chunk of tasks
// (backward, so that each block sums its tasks' meta-gradients in task order into its own partial row;
// a second kernel sums the partial rows in block order: deterministic, no atomics). A block's scratch
// workspace is in shared memory when it fits (up to the GPU's opt-in limit), else in global memory that
// the caller allocates (`Launch::global_elems` elements).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../maml_task.h"
#include "timeline.h"

namespace fastmaml {
namespace cuda {

// Threads per block at most, and the block's reduction buffer for BlockTeam::sum (one double a warp).
constexpr int kMaxThreads = 128;
constexpr int kReductionSlots = kMaxThreads / 32;
// A block's workspace goes to dynamic shared memory up to this size on any GPU (below the 48 KiB a
// kernel may use without opting in, leaving room for the static reduction buffer); up to the GPU's
// opt-in limit (227 KiB on Hopper) where the binding says so (`plan`'s max_shared_bytes).
constexpr int64_t kSharedWorkspaceBytes = 44 << 10;
// Static shared memory of the task kernels (the team's reduction buffer), kept out of the opt-in.
constexpr int64_t kStaticSharedBytes = kReductionSlots * sizeof(double);
// Blocks at most per launch, and the memory budgets that can lower it: the global workspace of all
// blocks, and the backward's partial rows (blocks x (K + 1) x P).
constexpr int64_t kMaxBlocks = 8192;
constexpr int64_t kWorkspaceBudgetBytes = int64_t(1) << 30;
constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;

// The reverse sweep rebuilds each theta_k on the way back instead of keeping K rows of P (task_backward's
// recompute_thetas) where the kept rows would make a task's workspace larger than this: 3 blocks of 128
// threads a multiprocessor is what the reverse sweep's 168 registers allow, and 3 workspaces of this size
// (with 1 KiB a block for the system and the reduction buffer) fill a Hopper multiprocessor's 228 KiB of
// shared memory. The 1-40-40-1 net at K = 5 (10 points, float32): 90.3 KiB kept, 2 blocks; 62.6 KiB
// recomputed, 3. A constant rather than the device's limit: the choice moves the results' last bits, and
// plan() never depends on the device. FASTMAML_REVERSE_THETAS=keep or recompute overrides it.
constexpr int64_t kKeepThetasBytes = 74 << 10;

enum class Op : int { kForward = 0, kBackward = 1, kAdapt = 2, kForwardBackward = 3 };

// The sizes of one call (T tasks, Ns support and Nq query points per task, K inner steps).
struct Sizes {
  task::Net net;
  int64_t T, Ns, Nq, K;
};

// How one call is laid out. A function of the sizes, options and dtype only (never of the device), so
// the backward's summation order, hence its result, does not depend on the GPU it runs on.
struct Launch {
  int threads;           // block (team) size
  int64_t blocks;        // grid size
  int64_t chunk;         // backward: tasks per block (block b takes tasks [b * chunk, (b + 1) * chunk))
  int64_t work_elems;    // workspace elements per block
  bool shared;           // workspace in dynamic shared memory (work_elems * itemsize bytes per block)
  int64_t global_elems;  // elements of global workspace the caller provides: blocks * work_elems when not
                         // shared, then blocks * state_elems (0 when neither)
  int64_t state_elems;   // float reverse sweep (Op::kBackward): elements per block of the support states of
                         // steps 0..K-2, kept in global memory apart from the workspace (K > 1,
                         // FASTMAML_CUDA_STATES=global with FASTMAML_CUDA_MIN_BLOCKS=4 or 6: the sweeps that
                         // stage them); 0: all in the workspace
  int min_blocks;        // float reverse sweep (Op::kBackward): the sweep compiled for 4 or 6 blocks a
                         // multiprocessor (FASTMAML_CUDA_MIN_BLOCKS), or 0: the default; the launchers
                         // launch this one, which plan() sized the states for
  bool tiles;            // register tiles in the team products (FASTMAML_CUDA_TILES=0: one output per thread)
  bool recompute_thetas;  // reverse sweep: theta_k rebuilt, not kept (kKeepThetasBytes)
  bool shared_loads;     // products load from shared memory (LDS) where both operands are there
                         // (FASTMAML_CUDA_LDS=0: generic loads everywhere)
  bool mma;              // the float reverse sweeps' products of at least 8 x 8 outputs on tensor cores,
                         // 3xTF32 (csrc/task/team_mma.h; FASTMAML_CUDA_MMA=1, sm_80 and later)
};

// `max_shared_bytes`: the dynamic shared memory one block of this GPU may opt into (a workspace up to it
// goes to shared memory): at least kSharedWorkspaceBytes, unless FASTMAML_CUDA_SHARED_KB asks for less
// (0: every workspace in global memory). The grid does not depend on it.
Launch plan(Op op, const Sizes& s, bool need_lr_grad, int itemsize, int64_t max_shared_bytes = kSharedWorkspaceBytes);

// task_losses [T], query_preds [T, Nq, D_out]. Targets: y_float (mse) or y_index (cross-entropy), the
// other null. `workspace`: launch.global_elems elements (may be null when 0).
template <typename T>
cudaError_t launch_fwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, T* task_losses, T* query_preds, T* workspace,
                       cudaStream_t stream);

// The reverse sweep: g_theta [P] and, when g_lr is not null, g_lr [K, P], summed over tasks through
// `part_theta [blocks, P]` and `part_lr [blocks, K * P]` (the caller allocates them; they are zeroed
// here); g_x_support [T, Ns, D_in] and g_x_query [T, Nq, D_in] when not null.
template <typename T>
cudaError_t launch_bwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, const T* g_task_losses, const T* g_query_preds,
                       bool first_order, T* part_theta, T* part_lr, T* g_theta, T* g_lr, T* g_xs, T* g_xq,
                       T* workspace, cudaStream_t stream);

// maml_fwdbwd: the outputs of launch_fwd and every task's own gradient rows (cotangent 1 for its loss,
// none for its query output): rows_theta [T, P], rows_lr [T, K, P] (when not null), g_x_support and
// g_x_query (when not null). Each block runs tasks blockIdx.x, blockIdx.x + gridDim.x, ... and writes
// their rows: no partial sums, no atomics.
template <typename T>
cudaError_t launch_fwdbwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                          const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                          const int64_t* yq_index, const T* qw, bool first_order, T* task_losses, T* query_preds,
                          T* rows_theta, T* rows_lr, T* g_xs, T* g_xq, T* workspace, cudaStream_t stream);

// maml_fwdbwd_sum without per-task rows (launch from plan(Op::kBackward, ...)): task_losses [T],
// query_preds [T, Nq, D_out], the gradient of the sum of the task losses summed through `part_theta
// [blocks, P]` (and `part_lr [blocks, K * P]` when sum_lr is not null) into sum_theta [P] and sum_lr
// [K, P]; g_x_support and g_x_query per task when not null.
template <typename T>
cudaError_t launch_fwdbwd_sum(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                              const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                              const int64_t* yq_index, const T* qw, bool first_order, T* task_losses, T* query_preds,
                              T* part_theta, T* part_lr, T* sum_theta, T* sum_lr, T* g_xs, T* g_xq, T* workspace,
                              cudaStream_t stream);

// out [M] = sum over t of weights[t] * rows[t, :] (rows [T, M]; weights null: the plain sum), in a
// fixed order that depends on (T, M) only: deterministic (kernels.cuh, column_sum_kernel).
template <typename T>
cudaError_t launch_weighted_task_sum(const T* rows, const T* weights, int64_t n_tasks, int64_t M, T* out,
                                     cudaStream_t stream);

// What this GPU makes of the reverse sweep's kernel (bwd_kernel, the training call's) launched as `launch`
// says: its registers and local (spill) bytes a thread, and how many of its blocks one multiprocessor holds
// at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor, the workspace's shared memory counted). For the
// benchmarks' reports: tasks in flight are what a latency-bound kernel's speed follows.
struct Residency {
  int registers;
  int local_bytes;
  int blocks_per_sm;
};
template <typename T>
cudaError_t reverse_sweep_residency(const Launch& launch, Residency* out);

// The barrier timeline (timeline.h), for the benchmarks (fastmaml_testing::cuda_timeline_arm):
// arm_timeline(t) makes the next float reverse sweep of the process on GPU t.device (launch_bwd's or
// launch_fwdbwd_sum's) run bwd_kernel's timeline variant, writing into t, once; t.records null disarms.
// The launch's side: timeline_armed (a lock-free look, so that a launch asks for its device only when
// something is armed) and take_timeline (the armed timeline if it is for `device`, disarmed as it is
// taken; false otherwise).
void arm_timeline(const Timeline& t);
bool timeline_armed();
bool take_timeline(int device, Timeline* out);

// thetas [T, P]: theta_K of every task.
template <typename T>
cudaError_t launch_adapt(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                         const T* ys_float, const int64_t* ys_index, T* thetas, T* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmaml
