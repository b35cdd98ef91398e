// fastmaml: the CUDA kernels of maml_fwd, maml_bwd and maml_adapt (docs/kernels.md), float32 and
// float64, and their launchers. The per-task math is csrc/maml_task.h, run with a thread block as the
// team (BlockTeam); this file only lays tasks out on blocks, places the workspaces and reduces the
// meta-gradient. No torch headers (see maml_cuda.h).
//
// Included by the .cu files of this folder, each of which instantiates one group of launchers
// (FASTMAML_INSTANTIATE_*): maml_cuda.cu the forward, adapt and weighted-sum launchers of both dtypes
// and plan(); bwd_f32.cu, bwd_f64.cu, fwdbwd_f32.cu and fwdbwd_f64.cu one reverse-sweep kernel family
// each; bwd_f32_min4.cu and bwd_f32_min6.cu the float reverse sweep for 4 and 6 blocks a multiprocessor
// (BwdMin, bwd_min.cuh), bwd_f32_timeline.cu its barrier timeline (BwdTimeline, timeline.h). Why several
// files: nvcc compiles one file on one core, and the reverse sweeps are most of the build (minutes on 2
// cores, about two on the GPU machine when this was one file); ninja compiles the files in parallel.
// Every kernel and device helper here has internal linkage (the anonymous namespace): each file gets its
// own copies of the few it shares with another (column_sum_kernel, block_sum), so no two device modules
// define one symbol. Outside it: the launchers (host templates, each instantiated in one file), BwdMin,
// BwdTimeline and the plain structs they pass between files (Data, BwdArgs).
#pragma once

#include "maml_cuda.h"

#include "../env_switch.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

namespace fastmaml {
namespace cuda {

// A task's data (the kernels' Data argument), and bwd_kernel's arguments past its launch configuration in
// its parameter order: outside the anonymous namespace, for the launchers of bwd_f32_min4.cu and
// bwd_f32_min6.cu (BwdMin).
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
struct BwdArgs {
  task::Net net;
  int64_t n_tasks, chunk, Ns, Nq;
  int K;
  const T *theta, *lr;
  Data<T> data;
  const T *qw, *g_task_losses, *g_query_preds;
  bool first_order;
  T *task_losses, *preds, *part_theta, *part_lr, *g_xs, *g_xq, *global_work, *global_states;
  int64_t work_elems, state_elems;
  bool shared, tiles, recompute_thetas, lds, mma;
  Timeline timeline;  // where the timeline variant writes (timeline.h); unused by the others
};

namespace {

using task::Net;
using task::TaskData;

// The total of `v` over the block, in every rank (BlockTeam::sum). Each warp sums its lanes by butterfly
// shuffles (each lane adds in its own order; only lane 0's total is kept) and stores it in `red` (one
// double a warp); every rank then adds the warp totals in warp order: a fixed order, the same total in
// every rank. Blocks are whole warps (plan()) and every rank calls it, so every lane is active.
// Not inlined: the reverse sweep calls it from several places, and inlined copies tipped nvcc out of
// inlining the sweep into its kernels (ptxas -v: up to 884 B of spills).
__device__ __noinline__ double block_sum(double v, double* red) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += red[w];
  __syncthreads();  // nobody overwrites red before every rank has read it
  return total;
}

// A thread block as the team of csrc/task/team.h; `red` is the buffer of block_sum.
struct BlockTeam {
  double* red;
  bool tiles;  // register tiles in the products (Launch::tiles)
  bool lds;    // shared-memory loads in the products where both operands are there (Launch::shared_loads)
  bool mma;    // tensor-core tiles for products of at least 8 x 8 outputs (Launch::mma; float kernels only)
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ int tile(int R, int C) const {
    if (!tiles) return task::kTile1x1;
    return mma && R >= 8 && C >= 8 ? task::kTileMma : task::pick_tile(R, C, size());
  }
  __device__ bool shared_loads() const { return lds; }
  // Summed in double (5 shuffle steps and one read a warp, where every rank read every rank's partial
  // before), rounded once to T.
  template <typename T>
  __device__ T sum(T x) const { return static_cast<T>(block_sum(static_cast<double>(x), red)); }
};

static_assert(kMaxThreads / 32 <= kTimelineWarps, "a timeline record has a word for each warp of a block");

// A BlockTeam that, in a block that records (`rec` not null), writes a record (timeline.h) at each of its
// barriers: the call site (file and line, from default arguments evaluated where sync() or sum() is
// called), each warp's clock as it arrives and the block's as it leaves. Every thread counts the barriers
// it passes (`n`: the same in every thread, since every thread passes every barrier); past `capacity`
// records it only counts. The timeline variant of the reverse sweep only (bwd_f32_timeline.cu).
struct TimelineTeam : BlockTeam {
  int64_t* rec;
  int capacity;
  mutable int n;
  __device__ void arrive(int64_t site) const {
    if (rec != nullptr && n < capacity && (threadIdx.x & 31) == 0) {
      int64_t* r = rec + static_cast<int64_t>(n) * kTimelineWords;
      if (threadIdx.x == 0) r[0] = site;
      r[2 + (threadIdx.x >> 5)] = static_cast<int64_t>(clock64());
    }
  }
  __device__ void depart() const {
    if (rec != nullptr && n < capacity && threadIdx.x == 0) {
      rec[static_cast<int64_t>(n) * kTimelineWords + 1] = static_cast<int64_t>(clock64());
    }
    ++n;
  }
  __device__ void sync(uint32_t tag = file_tag(__builtin_FILE()), int line = __builtin_LINE()) const {
    arrive(timeline_site(tag, line));
    __syncthreads();
    depart();
  }
  template <typename T>
  __device__ T sum(T x, uint32_t tag = file_tag(__builtin_FILE()), int line = __builtin_LINE()) const {
    arrive(timeline_site(tag, line));
    const T total = BlockTeam::sum(x);
    depart();
    return total;
  }
  // A record without a barrier (kTaskStart, kTasksEnd): each warp's clock as it passes, thread 0's twice.
  __device__ void mark(int64_t site) const {
    arrive(site);
    depart();
  }
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

// The block's slice of the support states kept apart from the workspace (Launch::state_elems), or null
// (task_backward then keeps them in the workspace).
template <typename T>
__device__ T* block_states(T* global_states, int64_t state_elems) {
  return global_states == nullptr ? nullptr : global_states + static_cast<int64_t>(blockIdx.x) * state_elems;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_kernel(Net net, int64_t n_tasks, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr, Data<T> data,
               const T* qw, T* task_losses, T* preds, T* global_work, int64_t work_elems, bool shared, bool tiles,
               bool lds) {
  __shared__ double red[kReductionSlots];
  // No tensor-core products here (Launch::mma is the reverse sweeps'): their call raised this kernel
  // from 80 to 122 registers, 6 to 4 blocks a multiprocessor (sm_90a), for a forward's few products.
  const BlockTeam tm{red, tiles, lds, false};
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
                 T* global_work, int64_t work_elems, bool shared, bool tiles, bool lds) {
  __shared__ double red[kReductionSlots];
  const BlockTeam tm{red, tiles, lds, false};  // as fwd_kernel (80 registers, not 96 with 16 / 56 B of spills)
  T* work = block_workspace(shared, global_work, work_elems);
  for (int64_t t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const TaskData<T> td = task_data(net, Ns, int64_t(0), data, t);
    task::task_adapt(net, td, theta, lr, K, thetas + t * net.P, work, tm);
  }
}

// The reverse sweep's team: the block, or with kTimeline a TimelineTeam recording in the blocks that
// `timeline` asks for. One team object written once in the kernel, not its body in a lambda called with
// either: nvcc then called the lambda instead of inlining it (1,000 B of stack, ptxas -v).
template <bool kTimeline>
__device__ __forceinline__ auto kernel_team(const BlockTeam& block, const Timeline& timeline, int64_t b) {
  if constexpr (kTimeline) {
    int64_t* rec = b < timeline.blocks ? timeline.records + b * timeline.capacity * kTimelineWords : nullptr;
    return TimelineTeam{block, rec, timeline.capacity, 0};
  } else {
    (void)timeline;
    (void)b;
    return block;
  }
}

// Block b runs tasks [b * chunk, (b + 1) * chunk) in order, adding into its partial rows. The reverse
// sweep of maml_bwd (cotangents g_task_losses, g_query_preds); or, with `task_losses` given, maml_fwdbwd_sum
// without per-task rows: forward and reverse sweep with c = 1, each task's loss and query output written
// (g_task_losses and g_query_preds unused). Nothing of size T x P is written either way.
// kMinBlocks 0: the registers nvcc wants (168 for float at width 40 to 128: 3 blocks of 128 threads a
// multiprocessor); 4 or 6: at most 128 or 80 registers (FASTMAML_CUDA_MIN_BLOCKS: maml_cuda.cu's
// min_blocks, recorded by plan() in Launch::min_blocks). kTimeline: the
// team is a TimelineTeam writing to `timeline` (timeline.h; the other variants never read it).
// The support states kept apart (FASTMAML_CUDA_STATES=global, plan()) are staged only by the 4- and 6-block
// sweeps and the timeline's, which run in their place: compiled into the default sweep, the copies' code
// raised its spills with the switch off (ptxas, sm_90a: 264 / 716 B with it, 228 / 620 B without), since a
// kernel argument cannot tell the compiler that the pointer is always null there.
template <typename T, int kMinBlocks = 0, bool kTimeline = false>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    bwd_kernel(Net net, int64_t n_tasks, int64_t chunk, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr,
               Data<T> data, const T* qw, const T* g_task_losses, const T* g_query_preds, bool first_order,
               T* task_losses, T* preds, T* part_theta, T* part_lr, T* g_xs, T* g_xq, T* global_work,
               int64_t work_elems, T* global_states, int64_t state_elems, bool shared, bool tiles,
               bool recompute_thetas, bool lds, bool mma, Timeline timeline) {
  __shared__ double red[kReductionSlots];
  const int64_t b = blockIdx.x;
  const auto tm = kernel_team<kTimeline>(BlockTeam{red, tiles, lds, mma && std::is_same_v<T, float>}, timeline, b);
  T* work = block_workspace(shared, global_work, work_elems);
  constexpr bool kStaged = kMinBlocks != 0 || kTimeline;
  T* states = kStaged ? block_states(global_states, state_elems) : nullptr;
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L];
  T* pth = part_theta + b * P;
  T* plr = part_lr == nullptr ? nullptr : part_lr + b * K * P;
  const int64_t t_end = min(n_tasks, (b + 1) * chunk);
  for (int64_t t = b * chunk; t < t_end; ++t) {
    if constexpr (kTimeline) tm.mark(kTaskStart);
    const TaskData<T> td = task_data(net, Ns, Nq, data, t);
    T* gxs = g_xs == nullptr ? nullptr : g_xs + t * Ns * din;
    T* gxq = g_xq == nullptr ? nullptr : g_xq + t * Nq * din;
    // One call site for both uses: two would each be inlined, and the kernel grew past what nvcc
    // inlines (the reverse sweep then ran as a call, with its registers spilled around it).
    const bool fused = task_losses != nullptr;
    const T loss = task::task_backward(
        net, td, theta, lr, K, qw, fused ? T(1) : g_task_losses[t],
        fused ? static_cast<const T*>(nullptr) : g_query_preds + t * Nq * dout, first_order, pth, plr, gxs, gxq, work,
        tm, fused ? preds + t * Nq * dout : static_cast<T*>(nullptr), static_cast<const T*>(nullptr),
        /*add_rows=*/fused, recompute_thetas, states);
    if (fused && tm.rank() == 0) task_losses[t] = loss;
  }
  if constexpr (kTimeline) tm.mark(kTasksEnd);
}

// maml_fwdbwd: each task's loss, query output and own gradient rows (task_backward with c = 1). Its support
// states stay in the workspace under every switch (plan()).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    fwdbwd_kernel(Net net, int64_t n_tasks, int64_t Ns, int64_t Nq, int K, const T* theta, const T* lr,
                  Data<T> data, const T* qw, bool first_order, T* task_losses, T* preds, T* rows_theta,
                  T* rows_lr, T* g_xs, T* g_xq, T* global_work, int64_t work_elems, bool shared, bool tiles,
                  bool recompute_thetas, bool lds, bool mma) {
  __shared__ double red[kReductionSlots];
  const BlockTeam tm{red, tiles, lds, mma && std::is_same_v<T, float>};
  T* work = block_workspace(shared, global_work, work_elems);
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L];
  for (int64_t t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const TaskData<T> td = task_data(net, Ns, Nq, data, t);
    const T loss = task::task_backward(
        net, td, theta, lr, K, qw, T(1), static_cast<const T*>(nullptr), first_order, rows_theta + t * P,
        rows_lr == nullptr ? nullptr : rows_lr + t * K * P, g_xs == nullptr ? nullptr : g_xs + t * Ns * din,
        g_xq == nullptr ? nullptr : g_xq + t * Nq * din, work, tm, preds + t * Nq * dout,
        static_cast<const T*>(nullptr), /*add_rows=*/false, recompute_thetas);
    if (tm.rank() == 0) task_losses[t] = loss;
  }
}

// out[i] = sum over r of (w[r] *) rows[r, i], for the M columns of `n_rows` rows (w null: plain sum).
// A block takes kColTile consecutive columns (one warp's coalesced run of loads) and splits the rows into
// kRowGroups contiguous ranges, one per warp, each summed in row order; the ranges' sums are then added
// in range order. The order is a function of (n_rows, M) only: the same bits on every GPU and run. (One
// thread per column, looping over every row, used ceil(M / 256) blocks: 7 SMs for the sinusoid net's
// 1,761 parameters, each walking all T rows.)
constexpr int kColTile = 32;
constexpr int kRowGroups = 16;

template <typename T>
__global__ void __launch_bounds__(kColTile* kRowGroups)
    column_sum_kernel(const T* rows, const T* w, int64_t n_rows, int64_t M, T* out) {
  __shared__ T partial[kRowGroups][kColTile];
  const int lane = static_cast<int>(threadIdx.x) % kColTile, group = static_cast<int>(threadIdx.x) / kColTile;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kColTile + lane;
  const int64_t per = (n_rows + kRowGroups - 1) / kRowGroups;
  const int64_t r0 = group * per, r1 = min(n_rows, r0 + per);
  T acc = 0;
  if (i < M) {
    if (w == nullptr) {
      for (int64_t r = r0; r < r1; ++r) acc += rows[r * M + i];
    } else {
      for (int64_t r = r0; r < r1; ++r) acc += w[r] * rows[r * M + i];
    }
  }
  partial[group][lane] = acc;
  __syncthreads();
  if (group == 0 && i < M) {
    T total = 0;
    for (int g = 0; g < kRowGroups; ++g) total += partial[g][lane];
    out[i] = total;
  }
}

template <typename T>
cudaError_t column_sum(const T* rows, const T* w, int64_t n_rows, int64_t M, T* out, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int64_t blocks = (M + kColTile - 1) / kColTile;
  column_sum_kernel<T><<<static_cast<unsigned>(blocks), kColTile * kRowGroups, 0, stream>>>(rows, w, n_rows, M, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reduce_rows(const T* part, int64_t rows, int64_t width, T* out, cudaStream_t stream) {
  return column_sum<T>(part, nullptr, rows, width, out, stream);
}

// The dynamic shared memory of a task kernel's launch: its block's workspace where that is in shared memory.
template <typename T>
size_t dynamic_shared(const Launch& launch) {
  return launch.shared ? static_cast<size_t>(launch.work_elems) * sizeof(T) : 0;
}

// Where the support states kept apart begin in the caller's global workspace (after the blocks'
// workspaces where those are global too), or null where they are in the workspace.
template <typename T>
T* states_base(const Launch& launch, T* workspace) {
  if (launch.state_elems == 0) return nullptr;
  return workspace + (launch.shared ? 0 : launch.blocks * launch.work_elems);
}

// Dynamic shared memory past the 48 KiB a kernel may use by default (its static shared memory counted)
// needs the kernel's opt-in, cudaFuncSetAttribute, for the device. The attribute belongs to the function,
// not the launch: it is only ever raised (a high-water mark per kernel and device, under a lock), so two
// host threads launching the same kernel with different sizes cannot lower it under each other, and a
// captured CUDA graph never sees it shrink. It is a host call, not a stream operation (allowed while a
// graph is captured; the warm-up before a capture has made it already). A failure clears the last-error
// flag so that it is not reported again by the next, unrelated launch check.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes + static_cast<size_t>(kStaticSharedBytes) <= (size_t(48) << 10)) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> guard(lock);
  size_t& high = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= high) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  high = bytes;
  return cudaSuccess;
}

// Launches bwd_kernel<T, kMinBlocks, kTimeline> with `a`, its shared-memory opt-in first.
template <typename T, int kMinBlocks, bool kTimeline = false>
cudaError_t launch_bwd_kernel(const BwdArgs<T>& a, unsigned blocks, int threads, size_t smem, cudaStream_t stream) {
  const auto kernel = &bwd_kernel<T, kMinBlocks, kTimeline>;
  if (const cudaError_t e = allow_shared(kernel, smem); e != cudaSuccess) return e;
  kernel<<<blocks, threads, smem, stream>>>(a.net, a.n_tasks, a.chunk, a.Ns, a.Nq, a.K, a.theta, a.lr, a.data, a.qw,
                                            a.g_task_losses, a.g_query_preds, a.first_order, a.task_losses, a.preds,
                                            a.part_theta, a.part_lr, a.g_xs, a.g_xq, a.global_work, a.work_elems,
                                            a.global_states, a.state_elems, a.shared, a.tiles, a.recompute_thetas,
                                            a.lds, a.mma, a.timeline);
  return cudaGetLastError();
}

// bwd_kernel<T, kMinBlocks>'s registers, local bytes and blocks a multiprocessor (Residency).
template <typename T, int kMinBlocks>
cudaError_t bwd_kernel_residency(int threads, size_t smem, Residency* out) {
  const auto kernel = &bwd_kernel<T, kMinBlocks>;
  if (const cudaError_t e = allow_shared(kernel, smem); e != cudaSuccess) return e;  // as a launch would
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  int blocks = 0;
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  *out = Residency{attr.numRegs, static_cast<int>(attr.localSizeBytes), blocks};
  return cudaSuccess;
}

}  // namespace

// The float reverse sweep compiled for kMinBlocks blocks a multiprocessor (Launch::min_blocks, from
// FASTMAML_CUDA_MIN_BLOCKS in plan()). Only
// declared here: the members are defined in bwd_min.cuh, which only bwd_f32_min4.cu and bwd_f32_min6.cu
// include, each instantiating its own (so no other file can compile those kernels, and one missing
// instantiation fails the link).
template <int kMinBlocks>
struct BwdMin {
  static cudaError_t launch(const BwdArgs<float>& a, unsigned blocks, int threads, size_t smem, cudaStream_t stream);
  static cudaError_t residency(int threads, size_t smem, Residency* out);
};

// The float reverse sweep with its barrier timeline (TimelineTeam; a.timeline), defined in
// bwd_f32_timeline.cu: launched in place of the default sweep once armed (maml_cuda.h, arm_timeline).
struct BwdTimeline {
  static cudaError_t launch(const BwdArgs<float>& a, unsigned blocks, int threads, size_t smem, cudaStream_t stream);
};

template <typename T>
cudaError_t launch_fwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, T* task_losses, T* query_preds, T* workspace,
                       cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  const size_t smem = dynamic_shared<T>(launch);
  if (const cudaError_t e = allow_shared(fwd_kernel<T>, smem); e != cudaSuccess) return e;
  fwd_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, s.Nq, static_cast<int>(s.K), theta, lr, data, qw, task_losses, query_preds, workspace,
      launch.work_elems, launch.shared, launch.tiles, launch.shared_loads);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_adapt(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                         const T* ys_float, const int64_t* ys_index, T* thetas, T* workspace, cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, nullptr, nullptr, nullptr};
  const size_t smem = dynamic_shared<T>(launch);
  if (const cudaError_t e = allow_shared(adapt_kernel<T>, smem); e != cudaSuccess) return e;
  adapt_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, static_cast<int>(s.K), theta, lr, data, thetas, workspace, launch.work_elems, launch.shared,
      launch.tiles, launch.shared_loads);
  return cudaGetLastError();
}

// The kernels that sum tasks into per-block partial rows (bwd, fwdbwd_sum): the rows zeroed (all-zero
// bits are 0.0 in float and double), `run` launching the kernel, then the rows summed in block order into
// out_theta [P] and, with need_lr, out_lr [K, P].
template <typename T, typename Run>
cudaError_t over_partial_rows(const Launch& launch, int64_t P, int64_t K, bool need_lr, T* part_theta, T* part_lr,
                              T* out_theta, T* out_lr, cudaStream_t stream, Run run) {
  cudaError_t err = cudaMemsetAsync(part_theta, 0, static_cast<size_t>(launch.blocks * P) * sizeof(T), stream);
  if (err == cudaSuccess && need_lr) {
    err = cudaMemsetAsync(part_lr, 0, static_cast<size_t>(launch.blocks * K * P) * sizeof(T), stream);
  }
  if (err == cudaSuccess) err = run();
  if (err == cudaSuccess) err = reduce_rows(part_theta, launch.blocks, P, out_theta, stream);
  if (err == cudaSuccess && need_lr) err = reduce_rows(part_lr, launch.blocks, K * P, out_lr, stream);
  return err;
}

// The reverse sweep into per-block partial rows, summed into out_theta [P] and out_lr [K, P]. launch_bwd
// seeds it with the task losses' and query predictions' cotangents (g_*); launch_fwdbwd_sum passes none
// (the plain sum's cotangent) and has the kernel write the losses and predictions its forward computes.
template <typename T>
cudaError_t reverse_sweep(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const Data<T>& data,
                          const T* qw, const T* g_task_losses, const T* g_query_preds, bool first_order,
                          T* task_losses, T* query_preds, T* part_theta, T* part_lr, T* out_theta, T* out_lr,
                          T* g_xs, T* g_xq, T* workspace, cudaStream_t stream) {
  const int64_t P = s.net.P, K = s.K;
  const bool need_lr = out_lr != nullptr && K > 0;
  return over_partial_rows(launch, P, K, need_lr, part_theta, part_lr, out_theta, out_lr, stream, [&]() {
    if (s.T == 0) return cudaSuccess;
    const size_t smem = dynamic_shared<T>(launch);
    const BwdArgs<T> a{s.net, s.T, launch.chunk, s.Ns, s.Nq, static_cast<int>(K), theta, lr, data, qw,
                       g_task_losses, g_query_preds, first_order, task_losses, query_preds, part_theta,
                       need_lr ? part_lr : nullptr, g_xs, g_xq, workspace, states_base(launch, workspace),
                       launch.work_elems, launch.state_elems, launch.shared, launch.tiles, launch.recompute_thetas,
                       launch.shared_loads, launch.mma, Timeline{}};
    const auto blocks = static_cast<unsigned>(launch.blocks);
    if constexpr (std::is_same_v<T, float>) {
      int device = -1;
      if (Timeline t{}; timeline_armed() && cudaGetDevice(&device) == cudaSuccess && take_timeline(device, &t)) {
        BwdArgs<float> timed = a;
        timed.timeline = t;
        return BwdTimeline::launch(timed, blocks, launch.threads, smem, stream);
      }
      if (launch.min_blocks == 4) return BwdMin<4>::launch(a, blocks, launch.threads, smem, stream);
      if (launch.min_blocks == 6) return BwdMin<6>::launch(a, blocks, launch.threads, smem, stream);
    }
    // The default sweep keeps every state in the workspace (bwd_kernel's kStaged): a plan that put some
    // apart gave it a workspace too small for them.
    if (launch.state_elems != 0) return cudaErrorInvalidValue;
    return launch_bwd_kernel<T, 0>(a, blocks, launch.threads, smem, stream);
  });
}

template <typename T>
cudaError_t reverse_sweep_residency(const Launch& launch, Residency* out) {
  const size_t smem = dynamic_shared<T>(launch);
  if constexpr (std::is_same_v<T, float>) {
    if (launch.min_blocks == 4) return BwdMin<4>::residency(launch.threads, smem, out);
    if (launch.min_blocks == 6) return BwdMin<6>::residency(launch.threads, smem, out);
  }
  return bwd_kernel_residency<T, 0>(launch.threads, smem, out);
}

template <typename T>
cudaError_t launch_bwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                       const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                       const int64_t* yq_index, const T* qw, const T* g_task_losses, const T* g_query_preds,
                       bool first_order, T* part_theta, T* part_lr, T* g_theta, T* g_lr, T* g_xs, T* g_xq,
                       T* workspace, cudaStream_t stream) {
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  return reverse_sweep(s, launch, theta, lr, data, qw, g_task_losses, g_query_preds, first_order,
                       static_cast<T*>(nullptr), static_cast<T*>(nullptr), part_theta, part_lr, g_theta, g_lr, g_xs,
                       g_xq, workspace, stream);
}

template <typename T>
cudaError_t launch_fwdbwd(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                          const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                          const int64_t* yq_index, const T* qw, bool first_order, T* task_losses, T* query_preds,
                          T* rows_theta, T* rows_lr, T* g_xs, T* g_xq, T* workspace, cudaStream_t stream) {
  if (s.T == 0) return cudaSuccess;
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  const size_t smem = dynamic_shared<T>(launch);
  if (const cudaError_t e = allow_shared(fwdbwd_kernel<T>, smem); e != cudaSuccess) return e;
  fwdbwd_kernel<T><<<static_cast<unsigned>(launch.blocks), launch.threads, smem, stream>>>(
      s.net, s.T, s.Ns, s.Nq, static_cast<int>(s.K), theta, lr, data, qw, first_order, task_losses, query_preds,
      rows_theta, rows_lr, g_xs, g_xq, workspace, launch.work_elems, launch.shared, launch.tiles,
      launch.recompute_thetas, launch.shared_loads, launch.mma);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwdbwd_sum(const Sizes& s, const Launch& launch, const T* theta, const T* lr, const T* xs,
                              const T* ys_float, const int64_t* ys_index, const T* xq, const T* yq_float,
                              const int64_t* yq_index, const T* qw, bool first_order, T* task_losses, T* query_preds,
                              T* part_theta, T* part_lr, T* sum_theta, T* sum_lr, T* g_xs, T* g_xq, T* workspace,
                              cudaStream_t stream) {
  const Data<T> data{xs, ys_float, ys_index, xq, yq_float, yq_index};
  return reverse_sweep(s, launch, theta, lr, data, qw, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                       first_order, task_losses, query_preds, part_theta, part_lr, sum_theta, sum_lr, g_xs, g_xq,
                       workspace, stream);
}

template <typename T>
cudaError_t launch_weighted_task_sum(const T* rows, const T* weights, int64_t n_tasks, int64_t M, T* out,
                                     cudaStream_t stream) {
  return column_sum<T>(rows, weights, n_tasks, M, out, stream);
}

// Explicit instantiations of the launchers, one group to a translation unit (see the file comment).
#define FASTMAML_INSTANTIATE_LIGHT(T)                                                                             \
  template cudaError_t launch_fwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,       \
                                     const int64_t*, const T*, const T*, const int64_t*, const T*, T*, T*, T*,  \
                                     cudaStream_t);                                                             \
  template cudaError_t launch_adapt<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,     \
                                       const int64_t*, T*, T*, cudaStream_t);                                   \
  template cudaError_t launch_weighted_task_sum<T>(const T*, const T*, int64_t, int64_t, T*, cudaStream_t);
#define FASTMAML_INSTANTIATE_BWD(T)                                                                               \
  template cudaError_t launch_bwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,       \
                                     const int64_t*, const T*, const T*, const int64_t*, const T*, const T*,    \
                                     const T*, bool, T*, T*, T*, T*, T*, T*, T*, cudaStream_t);                 \
  template cudaError_t launch_fwdbwd_sum<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*, \
                                            const int64_t*, const T*, const T*, const int64_t*, const T*, bool, \
                                            T*, T*, T*, T*, T*, T*, T*, T*, T*, cudaStream_t);                  \
  template cudaError_t reverse_sweep_residency<T>(const Launch&, Residency*);
#define FASTMAML_INSTANTIATE_FWDBWD(T)                                                                            \
  template cudaError_t launch_fwdbwd<T>(const Sizes&, const Launch&, const T*, const T*, const T*, const T*,    \
                                        const int64_t*, const T*, const T*, const int64_t*, const T*, bool, T*, \
                                        T*, T*, T*, T*, T*, T*, cudaStream_t);

}  // namespace cuda
}  // namespace fastmaml
