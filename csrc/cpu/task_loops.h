// fastmaml: the CPU task loops, compiled once per instruction set (task_loops_<isa>.cpp).
//
// maml_cpu.cpp checks the arguments, allocates the outputs and the per-thread scratch, splits the
// tasks over threads, and calls these loops through the table of the best instruction set the CPU
// has. The loops see raw pointers only (no torch headers), so a translation unit compiled for AVX2
// holds no inline torch or standard-library function that the linker could mix with the baseline ones.
#pragma once

#include <cstdint>

namespace fastmaml {
namespace cpu {

constexpr int kMaxDims = 9;  // task::kMaxLayers + 1 (checked in maml_cpu.cpp)

// One call's data. Targets are floats (mse) or int64 class indices (cross-entropy), per `loss`.
template <typename T>
struct LoopArgs {
  int64_t dims[kMaxDims];
  int n_dims;
  int activation;
  int loss;
  int64_t num_tasks, ns, nq, K;
  const T* theta;        // [P]
  const T* theta_t;      // [P]: theta with its weights transposed (task::transpose_weights), or null
  const T* lr;           // [K, P]
  const T* qw;           // [K + 1]
  const T* xs;           // [T, Ns, D_in]
  const T* xq;           // [T, Nq, D_in] (null for adapt)
  const T* ys_float;     // [T, Ns, D_out] or null
  const int64_t* ys_index;  // [T, Ns] or null
  const T* yq_float;
  const int64_t* yq_index;
  // maml_fwd outputs
  T* task_losses;        // [T]
  T* preds;              // [T, Nq, D_out]
  // maml_bwd
  const T* g_task_losses;  // [T]
  const T* g_preds;        // [T, Nq, D_out]
  bool first_order;
  bool recompute_thetas;   // the reverse sweep rebuilds theta_k instead of keeping K rows (task_backward)
  int64_t chunk;           // tasks per partial sum
  T* part_theta;           // [n_chunks, P]
  T* part_lr;              // [n_chunks, K * P] or null
  T* sums_theta;           // maml_fwdbwd_sum: the rows summed per chunk of tasks, [n_chunks, P]
  T* sums_lr;              // [n_chunks, K * P] or null
  T* gxs;                  // [T, Ns, D_in] or null
  T* gxq;                  // [T, Nq, D_in] or null
  // maml_adapt output
  T* thetas;               // [T, P]
};

// The loops of one instruction set: tasks [begin, end) (chunks [begin, end) for the backward, each
// chunk's tasks summed in order into its partial row), with `work` the scratch of one thread.
template <typename T>
struct LoopTable {
  void (*forward)(const LoopArgs<T>& a, int64_t begin, int64_t end, T* work);
  void (*backward)(const LoopArgs<T>& a, int64_t begin, int64_t end, T* work);
  void (*adapt)(const LoopArgs<T>& a, int64_t begin, int64_t end, T* work);
  void (*forward_backward)(const LoopArgs<T>& a, int64_t begin, int64_t end, T* work);
  // maml_fwdbwd_sum: chunks [begin, end) of `chunk` tasks: forward_backward of their tasks, then their
  // rows summed in task order into the chunk's rows of sums_theta and sums_lr (while still in cache).
  void (*forward_backward_sums)(const LoopArgs<T>& a, int64_t begin, int64_t end, T* work);
  // weighted_task_sum over columns [begin, end): out[i] = sum_t w[t] * rows[t * M + i], t in order.
  void (*task_sum)(const T* rows, const T* w, int64_t num_tasks, int64_t M, int64_t begin, int64_t end, T* out);
};

namespace baseline {
template <typename T>
LoopTable<T> table();
}  // namespace baseline

namespace avx2 {
// Whether this build has the AVX2 loops (x86-64 with gcc or clang).
bool compiled();
template <typename T>
LoopTable<T> table();
}  // namespace avx2

}  // namespace cpu
}  // namespace fastmaml
