// fastmaml: the CUDA kernel of maml_onestep: csrc/task/onestep.h's per-task math with one warp a task
// (WarpTeam: no block barriers inside a task), several warps a block sharing theta_0, a grid that loops over
// the tasks. Torch-free (onestep_cuda.h); float32 and float64.

#include "onestep_cuda.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../env_switch.h"
#include "../maml_task.h"
#include "../task/onestep.h"

namespace fastmaml {
namespace cuda {
namespace {

// One warp as the team of csrc/task/team.h: sync() is __syncwarp (which also orders the warp's shared and
// global memory), sum() a butterfly of shuffles (every lane gets a total, the kernel keeps lane 0's; not in
// rank order, so a task's loss may round differently from the CPU's team of one).
struct WarpTeam {
  __device__ int rank() const { return static_cast<int>(threadIdx.x & 31u); }
  __device__ int size() const { return 32; }
  __device__ void sync() const { __syncwarp(); }
  template <typename T>
  __device__ T sum(T x) const {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncwarp();
    return x;
  }
};

// The same warp where every product's operands are in shared memory (theta_0 staged, the scratch and the
// task's inputs there): cols_product then loads with 32-bit shared addresses, its loop unpredicated.
struct SharedWarpTeam : WarpTeam {
  static constexpr bool kSharedOperands = true;
};

// The warp whose products run on tensor cores (onestep_loops.h's `product`), in either form: the tiles test
// each operand's address space themselves (shared_loads: allowed) and load by 32-bit shared addresses where
// both are in shared memory.
struct MmaWarpTeam : WarpTeam {
  static constexpr bool kMmaProducts = true;
  __device__ bool shared_loads() const { return true; }
};

constexpr int kMaxWarps = 16;

constexpr int64_t kMaxGlobalWork = int64_t(1) << 30;  // bytes of a launch's scratch in global memory

// kShared: theta_0 staged and the scratch in shared memory (the launch's plan), the task's inputs copied
// there too, the warp's products told so. That form's bounds ask for at least one block a multiprocessor:
// without it ptxas gave its float build 64 registers and 180 / 224 B of spills. The generic form keeps the
// bounds it had (with the minimum its double build spilled 28 / 44 B, not 8 / 8). kMma: the products on
// tensor cores (float only: the plan never asks for it in double).
template <typename T, bool kShared, bool kMma>
__global__ void __launch_bounds__(kMaxWarps * 32, kShared ? 1 : 0)
    onestep_kernel(OnestepArgs<T> a, bool stage, bool shared_work, int64_t work_elems) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const task::Net& net = a.net;
  const T *theta = a.theta, *wt = a.theta_t, *rates = a.rates;
  int64_t staged = 0;
  // The shared-operand form always stages and always keeps its scratch in shared memory (plan_onestep: shared_form
  // implies stage and shared_work), and says so at compile time, so that every operand of its products is in
  // shared memory by construction. Its products once asserted that with __builtin_assume(__isShared) while
  // `work` below was chosen at run time between shared and global memory; nvcc 13.0 then took the query pass
  // onward for unreachable and the sm_90a kernel exited after the support backward pass, writing no loss,
  // pred, U or V (wrong results on an H200, 2026-12-04; tests/test_onestep_ptx.py).
  if (kShared || stage) {
    const int64_t P = net.P, Pp = (P + 15) & ~int64_t(15);
    T* st = smem;
    T* swt = smem + Pp;
    T* sr = smem + 2 * Pp;
    for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
      st[i] = a.theta[i];
      swt[i] = a.theta_t[i];
    }
    for (int i = threadIdx.x; i < 2 * net.L; i += blockDim.x) sr[i] = a.rates[i];
    __syncthreads();  // the only block barrier: before any warp reads the staged copy
    theta = st, wt = swt, rates = sr;
    staged = 2 * Pp + 16;
  }
  const int warp = static_cast<int>(threadIdx.x >> 5), nw = static_cast<int>(blockDim.x >> 5);
  T* work = kShared || shared_work ? smem + staged + warp * work_elems
                                    : a.global_work + (static_cast<int64_t>(blockIdx.x) * nw + warp) * work_elems;
  using Team = std::conditional_t<kMma, MmaWarpTeam, std::conditional_t<kShared, SharedWarpTeam, WarpTeam>>;
  const Team tm;
  const int64_t din = net.dims[0], dout = net.dims[net.L];
  // The shared-operand form's copies of each task's inputs, past the scratch task() uses (onestep.h's layout).
  const task::onestep::Layout w = task::onestep::layout(net, a.ns, a.nq);
  T* xs_copy = work + w.xs;
  T* xq_copy = work + w.xq;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * nw + warp; t < a.n_tasks;
       t += static_cast<int64_t>(gridDim.x) * nw) {
    task::onestep::Task<T> tk;
    tk.xs = a.xs + t * a.ns * din;
    tk.ys = a.ys != nullptr ? a.ys + t * a.ns * dout : nullptr;
    tk.xq = a.xq + t * a.nq * din;
    if constexpr (kShared) {
      // The previous task's last sync came after its last read of these copies (task() syncs on return).
      for (int64_t i = tm.rank(); i < a.ns * din; i += 32) xs_copy[i] = tk.xs[i];
      for (int64_t i = tm.rank(); i < a.nq * din; i += 32) xq_copy[i] = tk.xq[i];
      tm.sync();
      tk.xs = xs_copy;
      tk.xq = xq_copy;
    }
    tk.yq = a.yq != nullptr ? a.yq + t * a.nq * dout : nullptr;
    tk.ys_index = a.ys_index != nullptr ? a.ys_index + t * a.ns : nullptr;
    tk.yq_index = a.yq_index != nullptr ? a.yq_index + t * a.nq : nullptr;
    tk.cot = a.cot != nullptr ? a.cot[t] : T(1);
    tk.g_pred = a.g_pred != nullptr ? a.g_pred + t * a.nq * dout : nullptr;
    tk.loss = a.losses + t;
    tk.pred = a.preds + t * a.nq * dout;
    tk.U = a.U;
    tk.V = a.V;
    tk.rate_grad = a.rate_grads != nullptr ? a.rate_grads + t * 2 * net.L : nullptr;
    tk.n_tasks = a.n_tasks;
    tk.index = t;
    task::onestep::task(net, theta, wt, rates, a.ns, a.nq, a.first_order, tk, work, tm);
  }
}

// Whether the tensor-core form is built for T: float (team_mma.h has no double mma; a double kernel with kMma
// would be the FFMA kernel again, so the plan never asks for one and none is built).
template <typename T>
constexpr bool kMmaKernels = sizeof(T) == 4;

// The kernel's opt-in to more than 48 KiB of dynamic shared memory, only ever raised (a high-water mark per
// device under a lock, as kernels.cuh's allow_shared: a captured graph never sees it shrink).
template <typename T>
cudaError_t allow_shared(size_t bytes) {
  if (bytes <= (size_t(48) << 10)) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return (void)cudaGetLastError(), err;
  static std::mutex lock;
  static std::map<int, size_t> granted;
  const std::lock_guard<std::mutex> guard(lock);
  size_t& high = granted[device];
  if (bytes <= high) return cudaSuccess;
  for (auto kernel : {&onestep_kernel<T, false, false>, &onestep_kernel<T, true, false>,
                      &onestep_kernel<T, false, kMmaKernels<T>>, &onestep_kernel<T, true, kMmaKernels<T>>}) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return (void)cudaGetLastError(), err;
  }
  high = bytes;
  return cudaSuccess;
}

// The kernel a plan runs (its shared_form and mma: see plan_onestep).
template <typename T>
auto kernel_of(const OnestepPlan& p) {
  constexpr bool kMma = kMmaKernels<T>;
  if (p.mma) return p.shared_form ? &onestep_kernel<T, true, kMma> : &onestep_kernel<T, false, kMma>;
  return p.shared_form ? &onestep_kernel<T, true, false> : &onestep_kernel<T, false, false>;
}

// FASTMAML_ONESTEP_WARPS, or 0 when unset (the Python side refuses any value but 2, 4, 8 and 16).
int warps_switch() {
  const std::string w = env_word("FASTMAML_ONESTEP_WARPS");
  return w == "2" ? 2 : w == "4" ? 4 : w == "8" ? 8 : w == "16" ? 16 : 0;
}

}  // namespace

template <typename T>
cudaError_t plan_onestep(const OnestepShape& shape, OnestepPlan* plan) {
  const task::Net& net = shape.net;
  const int ns = shape.ns, nq = shape.nq;
  const int64_t n_tasks = shape.n_tasks;
  int device = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return (void)cudaGetLastError(), err;
  OnestepPlan p{};
  const task::onestep::Layout w = task::onestep::layout(net, ns, nq);
  // A task's scratch in elements and bytes, with the input copies the shared-operand form makes or without.
  auto elems = [&](bool copies) { return copies ? w.with_inputs : w.total; };
  auto scratch = [&](bool copies) { return elems(copies) * static_cast<int64_t>(sizeof(T)); };
  const int64_t Pp = (net.P + 15) & ~int64_t(15);
  const int64_t stage_bytes = (2 * Pp + 16) * static_cast<int64_t>(sizeof(T));
  // theta_0 in shared memory wherever it fits: the products read it most (a product with W reads all of W
  // for every 8 points, the scratch's left operand once). As many warps a block as fit with their scratch
  // beside it where 8 or more do (the sinusoid net in float32 with ReLU: 14 + 13 x 15.6 KiB, one block a
  // multiprocessor), else 16 warps with the scratch in global memory, more tasks in flight to cover its
  // latency (the A/B measures both).
  p.stage = stage_bytes <= optin;
  const int64_t base = p.stage ? stage_bytes : 0;
  const bool shared_allowed = !env_is("FASTMAML_ONESTEP_SHARED", "0");
  // The products on tensor cores (3xTF32) by default in float, the FFMA loop where FASTMAML_ONESTEP_PRODUCTS=ffma
  // asks and in double: on an H200 the tensor-core form was correct at every shape of the GPU tests and 1.4x
  // the FFMA loop's generic form at width 128 (the only one that was right). It needs a kernel compiled for a
  // virtual architecture of 8.0 or later (team_mma.h's kMmaCapable follows the one it was compiled for: a
  // build for an older one, run through the driver's JIT on a newer card, holds the FFMA loop under the mma
  // kernel's name, so such a kernel runs as the FFMA loop and gets its generic form below).
  p.mma = false;
  if (kMmaKernels<T> && !env_is("FASTMAML_ONESTEP_PRODUCTS", "ffma")) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, &onestep_kernel<T, false, kMmaKernels<T>>);
    if (err != cudaSuccess) return (void)cudaGetLastError(), err;
    p.mma = attr.ptxVersion >= 80;
  }
  // The shared-operand form (the task's inputs copied beside its scratch) wherever every operand can be in
  // shared memory: by default with the tensor-core products only. The FFMA loop's build of that form was
  // miscompiled (see the kernel) and gave wrong results on an H200 (benchmarks/RESULTS.md, 2026-12-04); the
  // mended build has not run on a GPU yet, so it runs only where FASTMAML_ONESTEP_FORM=shared asks (the GPU
  // tests and the A/B), and the FFMA loop otherwise runs the generic form. FASTMAML_ONESTEP_FORM=generic keeps
  // the generic form for the tiles too (the Python side refuses other values).
  const bool form_allowed = p.stage && !env_is("FASTMAML_ONESTEP_FORM", "generic") &&
                            (p.mma || env_is("FASTMAML_ONESTEP_FORM", "shared"));
  p.warps = warps_switch();
  if (p.warps == 0) {
    // As many warps as fit with their scratch beside theta_0 (with the input copies where 8 such fit: the
    // shared-operand form), up to 16, where that is 8 or more; else 16 with the scratch in global memory.
    const int64_t room = optin - base;
    const int64_t fit = shared_allowed ? room / scratch(false) : 0;
    const int64_t fit_copies = shared_allowed && form_allowed ? room / scratch(true) : 0;
    const int64_t w = fit_copies >= 8 ? fit_copies : fit;
    p.warps = w >= 8 ? static_cast<int>(w < kMaxWarps ? w : kMaxWarps) : kMaxWarps;
    // A small meta-batch spread over the multiprocessors (T=25: 25 blocks of one warp, not 4 of 8 on 4 of
    // them): each task's latency is the call's, so one a multiprocessor is fastest.
    if (n_tasks < static_cast<int64_t>(sms) * p.warps) {
      p.warps = static_cast<int>(n_tasks <= sms ? 1 : (n_tasks + sms - 1) / sms);
    }
  }
  // The copies only where the shared-operand form runs, and never at the price of the scratch's place: where
  // they would not fit beside it, the generic form keeps the scratch in shared memory without them.
  p.shared_form = shared_allowed && form_allowed && base + p.warps * scratch(true) <= optin;
  p.shared_work = p.shared_form || (shared_allowed && base + p.warps * scratch(false) <= optin);
  p.work_elems = elems(p.shared_form);
  const int64_t work_bytes = scratch(p.shared_form);
  p.shared_bytes = base + (p.shared_work ? p.warps * work_bytes : 0);
  if ((err = allow_shared<T>(static_cast<size_t>(p.shared_bytes))) != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_of<T>(p), p.warps * 32,
                                                      static_cast<size_t>(p.shared_bytes));
  if (err != cudaSuccess) return (void)cudaGetLastError(), err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t needed = (n_tasks + p.warps - 1) / p.warps;
  int64_t blocks = static_cast<int64_t>(per_sm) * sms;  // resident at once: the grid loops over the rest
  if (!p.shared_work) {
    // Global scratch for every resident warp is at most kMaxGlobalWork bytes (16 MiB a task would be 33 GiB
    // on 132 multiprocessors of 16 warps): fewer blocks, each looping over more tasks.
    const int64_t fit = kMaxGlobalWork / (static_cast<int64_t>(p.warps) * work_bytes);
    blocks = fit < blocks ? fit : blocks;
  }
  p.blocks = needed < blocks ? needed : blocks;
  if (p.blocks < 1) p.blocks = 1;
  p.global_work_elems = p.shared_work ? 0 : p.blocks * p.warps * p.work_elems;
  *plan = p;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_onestep(const OnestepArgs<T>& a, const OnestepPlan& plan, cudaStream_t stream) {
  // The shared-operand form's kernels take their scratch in shared memory whatever shared_work says.
  if (plan.blocks < 1 || plan.blocks > 0x7fffffff || (!plan.shared_work && a.global_work == nullptr) ||
      (plan.shared_form && !(plan.stage && plan.shared_work))) {
    return cudaErrorInvalidValue;
  }
  if (const cudaError_t e = allow_shared<T>(static_cast<size_t>(plan.shared_bytes)); e != cudaSuccess) return e;
  kernel_of<T>(plan)<<<static_cast<unsigned>(plan.blocks), plan.warps * 32, static_cast<size_t>(plan.shared_bytes),
                       stream>>>(a, plan.stage, plan.shared_work, plan.work_elems);
  return cudaGetLastError();
}

template <typename T>
cudaError_t onestep_attributes(int* registers, int* local_bytes, const OnestepPlan& plan, int* blocks_per_sm) {
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel_of<T>(plan));
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel_of<T>(plan), plan.warps * 32,
                                                        static_cast<size_t>(plan.shared_bytes));
  }
  if (err != cudaSuccess) return (void)cudaGetLastError(), err;
  *registers = attr.numRegs;
  *local_bytes = static_cast<int>(attr.localSizeBytes);
  return cudaSuccess;
}

template cudaError_t plan_onestep<float>(const OnestepShape&, OnestepPlan*);
template cudaError_t plan_onestep<double>(const OnestepShape&, OnestepPlan*);
template cudaError_t launch_onestep<float>(const OnestepArgs<float>&, const OnestepPlan&, cudaStream_t);
template cudaError_t launch_onestep<double>(const OnestepArgs<double>&, const OnestepPlan&, cudaStream_t);
template cudaError_t onestep_attributes<float>(int*, int*, const OnestepPlan&, int*);
template cudaError_t onestep_attributes<double>(int*, int*, const OnestepPlan&, int*);

}  // namespace cuda
}  // namespace fastmaml
