// fastmaml: the CUDA implementations of maml_fwd, maml_bwd, maml_fwdbwd, weighted_task_sum and maml_adapt
// (docs/kernels.md), registered under the CUDA dispatch key of the schemas declared in csrc/fastmaml.cpp.
//
// This file checks the arguments, allocates the outputs, the workspace and the partial rows of the
// meta-gradient with the tensors' allocator on their device, and calls the launchers of kernels.cuh
// on the current stream. It is compiled only in builds with a CUDA torch and nvcc (fastmaml/_ext.py,
// setup.py); the kernels themselves have no torch headers. It also adds two aids for the benchmarks to
// the test-only operations: fastmaml_testing::cuda_training_launch (how a training call is laid out, and
// how many of its blocks a multiprocessor holds) and cuda_timeline_arm (the reverse sweep's barrier
// timeline, csrc/cuda/timeline.h).

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <tuple>
#include <vector>

#include "../op_checks.h"
#include "maml_cuda.h"

namespace fastmaml {
namespace cuda {
namespace {

// The dynamic shared memory one block may opt into on the tensor's GPU, less the kernels' static part
// and a margin, asked once per device. FASTMAML_CUDA_SHARED_KB caps it (read once per process): a
// switch for measuring the global-memory workspace against the shared one (44 keeps every workspace
// above 44 KiB in global memory, as before the opt-in; 0 every workspace, so that teams of one or two
// warps are bounded by registers, not by shared memory).
int64_t shared_limit(const at::Tensor& t) {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int64_t>, kDevices> cache{};
  static const int64_t cap = [] {
    const char* kb = std::getenv("FASTMAML_CUDA_SHARED_KB");
    return kb == nullptr ? int64_t(-1) : std::max<int64_t>(0, std::atoll(kb)) * 1024;
  }();
  const int dev = t.get_device();
  if (dev >= 0 && dev < kDevices) {
    const int64_t known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known - 1;  // stored plus one: 0 is a limit (SHARED_KB=0), not "not asked"
  }
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it, and keep the portable limit
    optin = 0;
  }
  int64_t limit = std::max<int64_t>(kSharedWorkspaceBytes, int64_t(optin) - kStaticSharedBytes - 1024);
  if (cap >= 0) limit = std::min(limit, cap);
  if (dev >= 0 && dev < kDevices) cache[dev].store(limit + 1, std::memory_order_relaxed);
  return limit;
}

// The argument checks shared with the CPU kernels (csrc/op_checks.h); query tensors may be null
// (maml_adapt).
Sizes check_args(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
                 const at::Tensor* xq, const at::Tensor* yq, c10::IntArrayRef dims, int64_t activation,
                 int64_t loss) {
  // No class-range check here: it would read the labels, one device synchronisation per call. Python
  // makes it when asked (fastmaml.set_check_inputs); otherwise the kernels turn a task with a class out of
  // range into a nan loss and gradient (csrc/task/mlp.h, loss_and_grad).
  return checks::check_args<Sizes>(theta, lr, xs, ys, xq, yq, dims, activation, loss, c10::DeviceType::CUDA,
                                   "CUDA");
}

void check_launch(cudaError_t err, const char* op, const Launch& l) {
  if (err != cudaSuccess) (void)cudaGetLastError();  // reported here, not again by the next launch check
  TORCH_CHECK(err == cudaSuccess, "fastmaml: the CUDA kernel of ", op, " failed (", l.blocks, " blocks of ",
              l.threads, " threads, workspace ", l.work_elems, " elements per block in ",
              l.shared ? "shared" : "global", " memory, ", l.state_elems, " of states apart): ",
              cudaGetErrorString(err));
}

// Typed pointers of a target tensor: floats for mse, class indices for cross-entropy.
template <typename scalar_t>
const scalar_t* float_targets(const at::Tensor& y, int64_t loss) {
  return loss == task::kMse ? y.const_data_ptr<scalar_t>() : nullptr;
}
const int64_t* index_targets(const at::Tensor& y, int64_t loss) {
  return loss == task::kCrossEntropy ? y.const_data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> maml_fwd(const at::Tensor& theta_in, const at::Tensor& lr_in,
                                            const at::Tensor& xs_in, const at::Tensor& ys_in,
                                            const at::Tensor& xq_in, const at::Tensor& yq_in,
                                            const at::Tensor& qw_in, c10::IntArrayRef dims, int64_t activation,
                                            int64_t loss, bool first_order) {
  (void)first_order;  // read by the autograd formula only
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  checks::check_qw(qw_in, theta_in, s.K);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous();
  const int64_t d_out = s.net.dims[s.net.L];
  at::Tensor task_losses = at::empty({s.T}, theta.options());
  at::Tensor preds = at::empty({s.T, s.Nq, d_out}, theta.options());
  const Launch l = plan(Op::kForward, s, false, static_cast<int>(theta.element_size()), shared_limit(theta));
  at::Tensor work = at::empty({l.global_elems}, theta.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_fwd_cuda", [&] {
    check_launch(launch_fwd<scalar_t>(s, l, theta.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(),
                                      xs.const_data_ptr<scalar_t>(), float_targets<scalar_t>(ys, loss),
                                      index_targets(ys, loss), xq.const_data_ptr<scalar_t>(),
                                      float_targets<scalar_t>(yq, loss), index_targets(yq, loss),
                                      qw.const_data_ptr<scalar_t>(), task_losses.mutable_data_ptr<scalar_t>(),
                                      preds.mutable_data_ptr<scalar_t>(),
                                      l.global_elems > 0 ? work.mutable_data_ptr<scalar_t>() : nullptr, stream),
                 "maml_fwd", l);
  });
  return {task_losses, preds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_bwd(
    const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in, const at::Tensor& ys_in,
    const at::Tensor& xq_in, const at::Tensor& yq_in, const at::Tensor& qw_in, const at::Tensor& gl_in,
    const at::Tensor& gp_in, c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order,
    bool need_lr_grad, bool need_x_grad) {
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  const int64_t P = s.net.P, K = s.K, T = s.T, d_in = s.net.dims[0], d_out = s.net.dims[s.net.L];
  checks::check_qw(qw_in, theta_in, K);
  checks::check_cotangents(gl_in, gp_in, theta_in, T, s.Nq, d_out);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous(), gl = gl_in.contiguous(), gp = gp_in.contiguous();
  const auto opts = theta.options();
  const Launch l = plan(Op::kBackward, s, need_lr_grad, static_cast<int>(theta.element_size()), shared_limit(theta));
  at::Tensor part_theta = at::empty({l.blocks, P}, opts);
  at::Tensor part_lr = need_lr_grad ? at::empty({l.blocks, K * P}, opts) : at::empty({0}, opts);
  at::Tensor g_theta = at::empty({P}, opts);
  at::Tensor g_lr = need_lr_grad ? at::empty({K, P}, opts) : at::empty({0}, opts);
  at::Tensor g_xs = need_x_grad ? at::empty({T, s.Ns, d_in}, opts) : at::empty({0}, opts);
  at::Tensor g_xq = need_x_grad ? at::empty({T, s.Nq, d_in}, opts) : at::empty({0}, opts);
  at::Tensor work = at::empty({l.global_elems}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool lr_rows = need_lr_grad && K > 0;  // with K = 0 there is no rate to differentiate
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_bwd_cuda", [&] {
    check_launch(
        launch_bwd<scalar_t>(
            s, l, theta.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(), xs.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(ys, loss), index_targets(ys, loss), xq.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(yq, loss), index_targets(yq, loss), qw.const_data_ptr<scalar_t>(),
            gl.const_data_ptr<scalar_t>(), gp.const_data_ptr<scalar_t>(), first_order,
            part_theta.mutable_data_ptr<scalar_t>(), lr_rows ? part_lr.mutable_data_ptr<scalar_t>() : nullptr,
            g_theta.mutable_data_ptr<scalar_t>(), lr_rows ? g_lr.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xs.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xq.mutable_data_ptr<scalar_t>() : nullptr,
            l.global_elems > 0 ? work.mutable_data_ptr<scalar_t>() : nullptr, stream),
        "maml_bwd", l);
  });
  return {g_theta, g_lr, g_xs, g_xq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_fwdbwd(
    const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in, const at::Tensor& ys_in,
    const at::Tensor& xq_in, const at::Tensor& yq_in, const at::Tensor& qw_in, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad) {
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  const int64_t P = s.net.P, K = s.K, T = s.T, d_in = s.net.dims[0], d_out = s.net.dims[s.net.L];
  checks::check_qw(qw_in, theta_in, K);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous();
  const auto opts = theta.options();
  // The forward's layout (tasks strided over blocks) with the backward's workspace.
  const Launch l = plan(Op::kForwardBackward, s, need_lr_grad, static_cast<int>(theta.element_size()), shared_limit(theta));
  at::Tensor task_losses = at::empty({T}, opts);
  at::Tensor preds = at::empty({T, s.Nq, d_out}, opts);
  at::Tensor rows_theta = at::empty({T, P}, opts);  // every row written by its task
  at::Tensor rows_lr = need_lr_grad ? at::empty({T, K, P}, opts) : at::empty({0}, opts);
  at::Tensor g_xs = need_x_grad ? at::empty({T, s.Ns, d_in}, opts) : at::empty({0}, opts);
  at::Tensor g_xq = need_x_grad ? at::empty({T, s.Nq, d_in}, opts) : at::empty({0}, opts);
  at::Tensor work = at::empty({l.global_elems}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool lr_rows = need_lr_grad && K > 0;
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_fwdbwd_cuda", [&] {
    check_launch(
        launch_fwdbwd<scalar_t>(
            s, l, theta.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(), xs.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(ys, loss), index_targets(ys, loss), xq.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(yq, loss), index_targets(yq, loss), qw.const_data_ptr<scalar_t>(), first_order,
            task_losses.mutable_data_ptr<scalar_t>(), preds.mutable_data_ptr<scalar_t>(),
            rows_theta.mutable_data_ptr<scalar_t>(), lr_rows ? rows_lr.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xs.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xq.mutable_data_ptr<scalar_t>() : nullptr,
            l.global_elems > 0 ? work.mutable_data_ptr<scalar_t>() : nullptr, stream),
        "maml_fwdbwd", l);
  });
  return {task_losses, preds, rows_theta, rows_lr, g_xs, g_xq};
}

// maml_fwdbwd with the parameter rows summed over tasks. Without keep_rows (what maml_train asks for on a
// GPU) no per-task parameter row is written at all: each block sums its chunk of tasks as it goes
// (launch_fwdbwd_sum), and the rows come back empty ([0]); with keep_rows, maml_fwdbwd and the rows'
// column sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
maml_fwdbwd_sum(const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in, const at::Tensor& ys_in,
                const at::Tensor& xq_in, const at::Tensor& yq_in, const at::Tensor& qw_in, c10::IntArrayRef dims,
                int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad,
                bool keep_rows) {
  const c10::cuda::CUDAGuard guard(theta_in.device());  // the sums below launch on the tensors' device too
  if (keep_rows) {
    auto [task_losses, preds, rows_theta, rows_lr, g_xs, g_xq] = maml_fwdbwd(
        theta_in, lr_in, xs_in, ys_in, xq_in, yq_in, qw_in, dims, activation, loss, first_order, need_lr_grad,
        need_x_grad);
    const at::Tensor sum_theta = at::empty({rows_theta.size(1)}, rows_theta.options());
    const at::Tensor sum_lr = need_lr_grad ? at::empty(lr_in.sizes(), rows_theta.options()) : at::empty({0}, rows_theta.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(rows_theta.scalar_type(), "fastmaml_maml_fwdbwd_sum_rows_cuda", [&] {
      const int64_t T = rows_theta.size(0);
      cudaError_t err = launch_weighted_task_sum<scalar_t>(rows_theta.const_data_ptr<scalar_t>(), nullptr, T,
                                                           sum_theta.numel(), sum_theta.mutable_data_ptr<scalar_t>(), stream);
      if (err == cudaSuccess && need_lr_grad && sum_lr.numel() > 0) {
        err = launch_weighted_task_sum<scalar_t>(rows_lr.const_data_ptr<scalar_t>(), nullptr, T, sum_lr.numel(),
                                                 sum_lr.mutable_data_ptr<scalar_t>(), stream);
      }
      if (err != cudaSuccess) (void)cudaGetLastError();
      TORCH_CHECK(err == cudaSuccess, "fastmaml: the CUDA sums of maml_fwdbwd_sum failed: ", cudaGetErrorString(err));
    });
    return {task_losses, preds, rows_theta, rows_lr, g_xs, g_xq, sum_theta, sum_lr};
  }
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  const int64_t P = s.net.P, K = s.K, T = s.T, d_in = s.net.dims[0], d_out = s.net.dims[s.net.L];
  checks::check_qw(qw_in, theta_in, K);
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous();
  const auto opts = theta.options();
  // The backward's layout: contiguous chunks of tasks per block, each summing into its partial rows.
  const Launch l = plan(Op::kBackward, s, need_lr_grad, static_cast<int>(theta.element_size()), shared_limit(theta));
  at::Tensor task_losses = at::empty({T}, opts);
  at::Tensor preds = at::empty({T, s.Nq, d_out}, opts);
  at::Tensor part_theta = at::empty({l.blocks, P}, opts);
  at::Tensor part_lr = need_lr_grad ? at::empty({l.blocks, K * P}, opts) : at::empty({0}, opts);
  at::Tensor sum_theta = at::empty({P}, opts);
  at::Tensor sum_lr = need_lr_grad ? at::empty({K, P}, opts) : at::empty({0}, opts);
  at::Tensor g_xs = need_x_grad ? at::empty({T, s.Ns, d_in}, opts) : at::empty({0}, opts);
  at::Tensor g_xq = need_x_grad ? at::empty({T, s.Nq, d_in}, opts) : at::empty({0}, opts);
  at::Tensor work = at::empty({l.global_elems}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool lr_sums = need_lr_grad && K > 0;
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_fwdbwd_sum_cuda", [&] {
    check_launch(
        launch_fwdbwd_sum<scalar_t>(
            s, l, theta.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(), xs.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(ys, loss), index_targets(ys, loss), xq.const_data_ptr<scalar_t>(),
            float_targets<scalar_t>(yq, loss), index_targets(yq, loss), qw.const_data_ptr<scalar_t>(), first_order,
            task_losses.mutable_data_ptr<scalar_t>(), preds.mutable_data_ptr<scalar_t>(),
            part_theta.mutable_data_ptr<scalar_t>(), lr_sums ? part_lr.mutable_data_ptr<scalar_t>() : nullptr,
            sum_theta.mutable_data_ptr<scalar_t>(), lr_sums ? sum_lr.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xs.mutable_data_ptr<scalar_t>() : nullptr,
            need_x_grad ? g_xq.mutable_data_ptr<scalar_t>() : nullptr,
            l.global_elems > 0 ? work.mutable_data_ptr<scalar_t>() : nullptr, stream),
        "maml_fwdbwd_sum", l);
  });
  return {task_losses, preds, at::empty({0}, opts), at::empty({0}, opts), g_xs, g_xq, sum_theta, sum_lr};
}

at::Tensor weighted_task_sum(const at::Tensor& rows_in, const at::Tensor& weights_in) {
  const int64_t T = checks::check_task_sum_args(rows_in, weights_in, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous(), weights = weights_in.contiguous();
  const int64_t M = T == 0 ? 0 : rows.numel() / T;
  at::Tensor out = at::empty(rows.sizes().slice(1), rows.options());
  if (T == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fastmaml_weighted_task_sum_cuda", [&] {
    const cudaError_t err = launch_weighted_task_sum<scalar_t>(rows.const_data_ptr<scalar_t>(),
                                                               weights.const_data_ptr<scalar_t>(), T, M,
                                                               out.mutable_data_ptr<scalar_t>(), stream);
    if (err != cudaSuccess) (void)cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "fastmaml: the CUDA kernel of weighted_task_sum failed: ", cudaGetErrorString(err));
  });
  return out;
}

at::Tensor maml_adapt(const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in,
                      const at::Tensor& ys_in, c10::IntArrayRef dims, int64_t activation, int64_t loss) {
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, nullptr, nullptr, dims, activation, loss);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous();
  at::Tensor thetas = at::empty({s.T, s.net.P}, theta.options());
  const Launch l = plan(Op::kAdapt, s, false, static_cast<int>(theta.element_size()), shared_limit(theta));
  at::Tensor work = at::empty({l.global_elems}, theta.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_adapt_cuda", [&] {
    check_launch(launch_adapt<scalar_t>(s, l, theta.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(),
                                        xs.const_data_ptr<scalar_t>(), float_targets<scalar_t>(ys, loss),
                                        index_targets(ys, loss), thetas.mutable_data_ptr<scalar_t>(),
                                        l.global_elems > 0 ? work.mutable_data_ptr<scalar_t>() : nullptr, stream),
                 "maml_adapt", l);
  });
  return thetas;
}

// fastmaml_testing::cuda_training_launch: how the training call (maml_fwdbwd_sum without rows) lays out T
// tasks of the net `dims` with Ns + Nq points and K steps on `theta`'s GPU and dtype, for the benchmarks'
// reports: [threads a block, blocks, tasks a block, workspace in shared memory (0 / 1), workspace bytes a
// block, theta_k rebuilt (0 / 1), tensor cores (0 / 1), registers a thread, local bytes a thread, blocks a
// multiprocessor holds at once, bytes a block of support states kept in global memory apart (0: none)].
std::vector<int64_t> cuda_training_launch(const at::Tensor& theta, c10::IntArrayRef dims, int64_t Ns, int64_t Nq,
                                          int64_t K, int64_t T, bool need_lr) {
  TORCH_CHECK(theta.is_cuda(), "fastmaml: cuda_training_launch takes a CUDA tensor (for its device and dtype)");
  TORCH_CHECK(Ns >= 1 && Nq >= 1 && K >= 0 && T >= 0, "fastmaml: cuda_training_launch: Ns and Nq must be >= 1, ",
              "K and T >= 0, got Ns=", Ns, " Nq=", Nq, " K=", K, " T=", T);
  Sizes s{};
  TORCH_CHECK(task::make_net(s.net, dims.data(), static_cast<int>(dims.size()), 0, 0),
              "fastmaml: cuda_training_launch: bad dims ", dims);
  s.T = T;
  s.Ns = Ns;
  s.Nq = Nq;
  s.K = K;
  const c10::cuda::CUDAGuard guard(theta.device());
  const Launch l = plan(Op::kBackward, s, need_lr, static_cast<int>(theta.element_size()), shared_limit(theta));
  Residency r{};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_cuda_training_launch", [&] {
    const cudaError_t err = reverse_sweep_residency<scalar_t>(l, &r);
    TORCH_CHECK(err == cudaSuccess, "fastmaml: the reverse sweep's residency query failed: ", cudaGetErrorString(err));
  });
  // plan() asks for the tensor-core path for float only; it runs on sm_80 and later (team_mma.h's
  // kMmaCapable: the FFMA tiles below).
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, theta.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();
  }
  const bool mma = l.mma && major >= 8;
  const int64_t itemsize = static_cast<int64_t>(theta.element_size());
  return {l.threads, l.blocks, l.chunk, l.shared, l.work_elems * itemsize, l.recompute_thetas, mma,
          r.registers, r.local_bytes, r.blocks_per_sm, l.state_elems * itemsize};
}

// fastmaml_testing::cuda_timeline_arm: the next float reverse sweep of this process (a training call's or
// maml_bwd's) runs with its barrier timeline (timeline.h), writing into `records` [blocks, capacity,
// kTimelineWords] (int64, contiguous; taken by the first such sweep on its GPU; blocks 0 .. blocks - 1
// record, the caller fills it with -1 first). An empty tensor disarms. The tensor is held here until the
// next arm or disarm, so the kernel cannot write into memory its caller has given back.
// benchmarks/phase_timeline.py reads the records.
void cuda_timeline_arm(const at::Tensor& records) {
  static std::mutex lock;
  static at::Tensor held;
  const std::lock_guard<std::mutex> guard(lock);
  if (records.numel() == 0) {
    arm_timeline(Timeline{});
    held = at::Tensor();
    return;
  }
  TORCH_CHECK(records.is_cuda() && records.scalar_type() == at::kLong && records.dim() == 3 &&
                  records.size(2) == kTimelineWords && records.is_contiguous(),
              "fastmaml: cuda_timeline_arm takes a contiguous int64 CUDA tensor [blocks, capacity, ", kTimelineWords,
              "], got ", records.scalar_type(), " ", records.sizes(), " on ", records.device());
  TORCH_CHECK(records.size(0) <= INT32_MAX && records.size(1) <= INT32_MAX,
              "fastmaml: cuda_timeline_arm: too many blocks or records ", records.sizes());
  held = records;
  arm_timeline(Timeline{records.mutable_data_ptr<int64_t>(), static_cast<int>(records.size(1)),
                        static_cast<int>(records.size(0)), static_cast<int>(records.get_device())});
}

}  // namespace
}  // namespace cuda
}  // namespace fastmaml

// Reports for the benchmarks (no tensor math), beside the test-only operations of csrc/fastmaml.cpp.
TORCH_LIBRARY_FRAGMENT(fastmaml_testing, m) {
  m.def("cuda_training_launch(Tensor theta, int[] dims, int Ns, int Nq, int K, int T, bool need_lr) -> int[]",
        &fastmaml::cuda::cuda_training_launch);
  m.def("cuda_timeline_arm(Tensor records) -> ()", &fastmaml::cuda::cuda_timeline_arm);
}

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) {
  m.impl("maml_fwd", &fastmaml::cuda::maml_fwd);
  m.impl("maml_bwd", &fastmaml::cuda::maml_bwd);
  m.impl("maml_adapt", &fastmaml::cuda::maml_adapt);
  m.impl("maml_fwdbwd", &fastmaml::cuda::maml_fwdbwd);
  m.impl("maml_fwdbwd_sum", &fastmaml::cuda::maml_fwdbwd_sum);
  m.impl("weighted_task_sum", &fastmaml::cuda::weighted_task_sum);
}
