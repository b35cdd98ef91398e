// fastmaml: the CUDA kernels of maml_fwd, maml_bwd and maml_adapt (docs/kernels.md), float32 and
// float64. The per-task math is csrc/maml_task.h, run with a thread block as the team (BlockTeam);
// this file only lays tasks out on blocks, places the workspaces and reduces the meta-gradient.
// No torch headers (see maml_cuda.h).

#include "maml_cuda.h"

#include <algorithm>

namespace fastmaml {
namespace cuda {
namespace {

using task::Net;
using task::TaskData;

// A thread block as the team of csrc/task/team.h. `red` is a shared buffer of blockDim.x doubles for
// sum(): every rank stores its partial, and every rank reads them back in rank order (the same total
// in every rank, a fixed order).
struct BlockTeam {
  double* red;
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  template <typename T>
  __device__ T sum(T x) const {
    red[threadIdx.x] = static_cast<double>(x);
    __syncthreads();
    T total = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) total += static_cast<T>(red[i]);
    __syncthreads();  // nobody overwrites red before every rank has read it
    return total;
  }
};

template <typename T>
struct Data {
  const T* xs;
  const T* ys_float;
  const int64_t* ys_index;
  const T* xq;
  const T* yq_float;
  const int64_t* yq_index;
};

template <typename T>
__device__ TaskData<T> task_data(const Net& net, int64_t Ns, int64_t Nq, const Data<T>& d, int64_t t) {
  const int64_t din = net.dims[0], dout = net.dims[net.L];
  TaskData<T> td;
  td.xs = d.xs + t * Ns * din;
  td.ys_float = d.ys_float == nullptr ? nullptr : d.ys_float + t * Ns * dout;
  td.ys_index = d.ys_index == nullptr ? nullptr : d.ys_index + t * Ns;
  td.ns = static_cast<int>(Ns);
  td.xq = d.xq == nullptr ? nullptr : d.xq + t * Nq * din;
  td.yq_float = d.yq_float == nullptr ? nullptr : d.yq_float + t * Nq * dout;
  td.yq_index = d.yq_index == nullptr ? nullptr : d.yq_index + t * Nq;
  td.nq = static_cast<int>(Nq);
  return td;
}

// The block's workspace: dynamic shared memory, or its slice of the global workspace.
template <typename T>
__device__ T* block_workspace(bool shared, T* global, int64_t work_elems) {
  extern __shared__ __align__(16) unsigned char fastmaml_smem[];
  return shared ? reinterpret_cast<T*>(fastmaml_smem) : global + static_cast<int64_t>(blockIdx.x) * work_elems;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_kernel(Net net, int64_t n_tasks, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr, Data<T> data,
               const T* qw, T* task_losses, T* preds, T* global_work, int64_t work_elems, bool shared) {
  __shared__ double red[kMaxThreads];
  const BlockTeam tm{red};
  T* work = block_workspace(shared, global_work, work_elems);
  const int64_t dout = net.dims[net.L];
  // The loop bounds are the same for every thread of the block, so every sync inside is reached by all.
  for (int64_t t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const TaskData<T> td = task_data(net, Ns, Nq, data, t);
    const T loss = task::task_forward(net, td, theta, lr, K, qw, preds + t * Nq * dout, work, tm);
    if (tm.rank() == 0) task_losses[t] = loss;
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    adapt_kernel(Net net, int64_t n_tasks, int64_t Ns, int K, const T* theta, const T* lr, Data<T> data, T* thetas,
                 T* global_work, int64_t work_elems, bool shared) {
  __shared__ double red[kMaxThreads];
  const BlockTeam tm{red};
  T* work = block_workspace(shared, global_work, work_elems);
  for (int64_t t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const TaskData<T> td = task_data(net, Ns, int64_t(0), data, t);
    task::task_adapt(net, td, theta, lr, K, thetas + t * net.P, work, tm);
  }
}

// Block b runs tasks [b * chunk, (b + 1) * chunk) in order, adding into its partial rows.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    bwd_kernel(Net net, int64_t n_tasks, int64_t chunk, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr,
               Data<T> data, const T* qw, const T* g_task_losses, const T* g_query_preds, bool first_order,
               T* part_theta, T* part_lr, T* g_xs, T* g_xq, T* global_work, int64_t work_elems, bool shared) {
  __shared__ double red[kMaxThreads];
  const BlockTeam tm{red};
  T* work = block_workspace(shared, global_work, work_elems);
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L];
  const int64_t b = blockIdx.x;
  T* pth = part_theta + b * P;
  T* plr = part_lr == nullptr ? nullptr : part_lr + b * K * P;
  const int64_t t_end = min(n_tasks, (b + 1) * chunk);
  for (int64_t t = b * chunk; t < t_end; ++t) {
    const TaskData<T> td = task_data(net, Ns, Nq, data, t);
    task::task_backward(net, td, theta, lr, K, qw, g_task_losses[t], g_query_preds + t * Nq * dout, first_order,
                        pth, plr, g_xs == nullptr ? nullptr : g_xs + t * Ns * din,
                        g_xq == nullptr ? nullptr : g_xq + t * Nq * din, work, tm);
  }
}

// maml_fwdbwd: each task's loss, query output and own gradient rows (task_backward with c = 1).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    fwdbwd_kernel(Net net, int64_t n_tasks, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr,
                  Data<T> data, const T* qw, bool first_order, T* task_losses, T* preds, T* rows_theta,
                  T* rows_lr, T* g_xs, T* g_xq, T* global_work, int64_t work_elems, bool shared) {
  __shared__ double red[kMaxThreads];
  const BlockTeam tm{red};
  T* work = block_workspace(shared, global_work, work_elems);
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L];
  for (int64_t t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const TaskData<T> td = task_data(net, Ns, Nq, data, t);
    const T loss = task::task_backward(
        net, td, theta, lr, K, qw, T(1), static_cast<const T*>(nullptr), first_order, rows_theta + t * P,
        rows_lr == nullptr ? nullptr : rows_lr + t * K * P, g_xs == nullptr ? nullptr : g_xs + t * Ns * din,
        g_xq == nullptr ? nullptr : g_xq + t * Nq * din, work, tm, preds + t * Nq * dout);
    if (tm.rank() == 0) task_losses[t] = loss;
  }
}

// out[i] = sum over t (in order) of w[t] * rows[t, i]: one thread per column.
template <typename T>
__global__ void weighted_task_sum_kernel(const T* rows, const T* w, int64_t n_tasks, int64_t M, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  T acc = 0;
  for (int64_t t = 0; t < n_tasks; ++t) acc += w[t] * rows[t * M + i];
  out[i] = acc;
}

// out[i] = sum over rows r = 0 .. rows-1 (in order) of part[r, i]: one thread per column.
template <typename T>
__global__ void reduce_rows_kernel(const T* part, int64_t rows, int64_t width, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= width) return;
  T acc = 0;
  for (int64_t r = 0; r < rows; ++r) acc += part[r * width + i];
  out[i] = acc;
}

template <typename T>
cudaError_t reduce_rows(const T* part, int64_t rows, int64_t width, T* out, cudaStream_t stream) {
  if (width == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (width + kThreads - 1) / kThreads;
  reduce_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(part, rows, width, out);
  return cudaGetLastError();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

Launch plan(Op op, const Sizes& s, bool need_lr_grad, int itemsize) {
  const Net& net = s.net;
  const int64_t nmax = std::max(s.Ns, s.Nq);
  Launch l{};
  switch (op) {
    case Op::kForward:
      l.work_elems = task::forward_workspace(net, nmax);
      break;
    case Op::kAdapt:
      l.work_elems = task::adapt_workspace(net, s.Ns);
      break;
    case Op::kBackward:
    case Op::kForwardBackward:
      l.work_elems = task::backward_workspace(net, s.K, nmax, need_lr_grad);
      break;
  }
  // Threads: enough for the widest phase (a layer's outputs, or the P parameters), in whole warps.
  int64_t widest = net.P;
  for (int i = 0; i < net.L; ++i) {
    const int64_t din = net.dims[i], dout = net.dims[i + 1];
    widest = std::max({widest, nmax * dout, nmax * din, din * dout});
  }
  l.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(widest, 32) * 32));
  const int64_t work_bytes = l.work_elems * itemsize;
  l.shared = work_bytes <= kSharedWorkspaceBytes;
  int64_t max_blocks = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(s.T, 1));
  if (!l.shared) max_blocks = std::min(max_blocks, std::max<int64_t>(1, kWorkspaceBudgetBytes / work_bytes));
  if (op == Op::kBackward) {
    const int64_t row_bytes = net.P * (1 + (need_lr_grad ? s.K : 0)) * itemsize;
    max_blocks = std::min(max_blocks, std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(row_bytes, 1)));
    l.chunk = ceil_div(std::max<int64_t>(s.T, 1), max_blocks);
    l.blocks = ceil_div(std::max<int64_t>(s.T, 1), l.chunk);
  } else {
    l.chunk = 0;
    l.blocks = max_blocks;
  }
  l.global_elems = l.shared ? 0 : l.blocks * l.work_elems;
  return l;
}

template <typename T>
cudaError_t launch_fwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, T* task_losses, T* query_preds, T* workspace,
                       cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  const size_t smem = launch.shared ? static_cast<size_t>(launch.work_elems) * sizeof(T) : 0;
  fwd_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, s.Nq, static_cast<int>(s.K), theta, lr, data, qw, task_losses, query_preds, workspace,
      launch.work_elems, launch.shared);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_adapt(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                         const T* ys_float, const int64_t* ys_index, T* thetas, T* workspace, cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, nullptr, nullptr, nullptr};
  const size_t smem = launch.shared ? static_cast<size_t>(launch.work_elems) * sizeof(T) : 0;
  adapt_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, static_cast<int>(s.K), theta, lr, data, thetas, workspace, launch.work_elems, launch.shared);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, const T* g_task_losses, const T* g_query_preds,
                       bool first_order, T* part_theta, T* part_lr, T* g_theta, T* g_lr, T* g_xs, T* g_xq,
                       T* workspace, cudaStream_t stream) {
  const int64_t P = s.net.P, K = s.K;
  const bool need_lr = g_lr != nullptr && K > 0;
  // The partial rows start at zero (all-zero bits are 0.0 in float and double).
  cudaError_t err = cudaMemsetAsync(part_theta, 0, static_cast<size_t>(launch.blocks * P) * sizeof(T), stream);
  if (err != cudaSuccess) return err;
  if (need_lr) {
    err = cudaMemsetAsync(part_lr, 0, static_cast<size_t>(launch.blocks * K * P) * sizeof(T), stream);
    if (err != cudaSuccess) return err;
  }
  if (s.T > 0) {
    const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
    const size_t smem = launch.shared ? static_cast<size_t>(launch.work_elems) * sizeof(T) : 0;
    bwd_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
        s.net, s.T, launch.chunk, s.Ns, s.Nq, static_cast<int>(K), theta, lr, data, qw, g_task_losses,
        g_query_preds, first_order, part_theta, need_lr ? part_lr : nullptr, g_xs, g_xq, workspace,
        launch.work_elems, launch.shared);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  err = reduce_rows(part_theta, launch.blocks, P, g_theta, stream);
  if (err != cudaSuccess) return err;
  if (need_lr) err = reduce_rows(part_lr, launch.blocks, K * P, g_lr, stream);
  return err;
}

template <typename T>
cudaError_t launch_fwdbwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                          const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                          const int64_t* yq_index, const T* qw, bool first_order, T* task_losses, T* query_preds,
                          T* rows_theta, T* rows_lr, T* g_xs, T* g_xq, T* workspace, cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  const size_t smem = launch.shared ? static_cast<size_t>(launch.work_elems) * sizeof(T) : 0;
  fwdbwd_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, s.Nq, static_cast<int>(s.K), theta, lr, data, qw, first_order, task_losses, query_preds,
      rows_theta, rows_lr, g_xs, g_xq, workspace, launch.work_elems, launch.shared);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_weighted_task_sum(const T* rows, const T* weights, int64_t n_tasks, int64_t M, T* out,
                                     cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (M + kThreads - 1) / kThreads;
  weighted_task_sum_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(rows, weights, n_tasks, M, out);
  return cudaGetLastError();
}

// The two dtypes of the op.
#define FASTMAML_INSTANTIATE(T)                                                                                  \
  template cudaError_t launch_fwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,       \
                                     const int64_t*, const T*, const T*, const int64_t*, const T*, T*, T*, T*,  \
                                     cudaStream_t);                                                             \
  template cudaError_t launch_bwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,       \
                                     const int64_t*, const T*, const T*, const int64_t*, const T*, const T*,    \
                                     const T*, bool, T*, T*, T*, T*, T*, T*, T*, cudaStream_t);                 \
  template cudaError_t launch_adapt<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,     \
                                       const int64_t*, T*, T*, cudaStream_t);                                   \
  template cudaError_t launch_fwdbwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,    \
                                        const int64_t*, const T*, const T*, const int64_t*, const T*, bool, T*, \
                                        T*, T*, T*, T*, T*, T*, cudaStream_t);                                  \
  template cudaError_t launch_weighted_task_sum<T>(const T*, const T*, int64_t, int64_t, T*, cudaStream_t);
FASTMAML_INSTANTIATE(float)
FASTMAML_INSTANTIATE(double)
#undef FASTMAML_INSTANTIATE

}  // namespace cuda
}  // namespace fastmaml
