// fastmaml: the CUDA implementation of maml_onestep (csrc/onestep_op.h), registered under the CUDA dispatch
// key: the checks and outputs of onestep_op.h, the scratch the plan asks for, and onestep.cu's torch-free
// launcher on the current stream. Also the test-only fastmaml_testing::cuda_onestep_launch (a launch's layout,
// registers and spilled bytes, for the benchmarks' notes). Compiled only in builds with a CUDA torch and nvcc.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../onestep_op.h"
#include "onestep_cuda.h"

namespace fastmaml {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_onestep_cuda(
    const at::Tensor& theta, const at::Tensor& theta_t, const at::Tensor& rates, const at::Tensor& xs,
    const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq, const std::optional<at::Tensor>& cot,
    const std::optional<at::Tensor>& g_pred, c10::IntArrayRef dims, int64_t activation, int64_t loss,
    bool first_order, bool factors) {
  onestep_op::Call c = onestep_op::setup(theta, theta_t, rates, xs, ys, xq, yq, cot, g_pred, dims, activation,
                                         loss, first_order, factors, nullptr);
  if (c.T == 0) return {c.losses, c.preds, c.U, c.V, c.rate_grads};
  const c10::cuda::CUDAGuard guard(theta.device());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "maml_onestep_cuda", [&] {
    using T = scalar_t;
    OnestepPlan plan{};
    cudaError_t err = plan_onestep<T>({c.net, static_cast<int>(c.ns), static_cast<int>(c.nq), c.T}, &plan);
    TORCH_CHECK(err == cudaSuccess, "fastmaml: maml_onestep: no launch plan for dims ", dims, " with ", c.ns,
                " + ", c.nq, " points: ", cudaGetErrorString(err));
    at::Tensor work = at::empty({plan.global_work_elems}, theta.options());
    OnestepArgs<T> a{};
    a.net = c.net;
    a.n_tasks = c.T;
    a.ns = static_cast<int>(c.ns);
    a.nq = static_cast<int>(c.nq);
    a.first_order = first_order;
    a.theta = theta.const_data_ptr<T>();
    a.theta_t = theta_t.const_data_ptr<T>();
    a.rates = rates.const_data_ptr<T>();
    a.xs = xs.const_data_ptr<T>();
    const bool ce = loss == task::kCrossEntropy;
    a.ys = ce ? nullptr : ys.const_data_ptr<T>();
    a.xq = xq.const_data_ptr<T>();
    a.yq = ce ? nullptr : yq.const_data_ptr<T>();
    a.ys_index = ce ? ys.const_data_ptr<int64_t>() : nullptr;
    a.yq_index = ce ? yq.const_data_ptr<int64_t>() : nullptr;
    a.cot = cot.has_value() ? cot->const_data_ptr<T>() : nullptr;
    a.g_pred = g_pred.has_value() ? g_pred->const_data_ptr<T>() : nullptr;
    a.losses = c.losses.mutable_data_ptr<T>();
    a.preds = c.preds.mutable_data_ptr<T>();
    a.U = factors ? c.U.mutable_data_ptr<T>() : nullptr;
    a.V = factors ? c.V.mutable_data_ptr<T>() : nullptr;
    a.rate_grads = factors ? c.rate_grads.mutable_data_ptr<T>() : nullptr;
    a.global_work = plan.global_work_elems > 0 ? work.mutable_data_ptr<T>() : nullptr;
    err = launch_onestep<T>(a, plan, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastmaml: the CUDA kernel of maml_onestep failed (", c.T, " tasks, dims ", dims,
                "): ", cudaGetErrorString(err));
  });
  return {c.losses, c.preds, c.U, c.V, c.rate_grads};
}

// How a launch of `like`'s dtype on its device would be laid out for T tasks of the MLP `dims` with the
// activation and loss of maml_onestep's codes (relu or tanh: a task's scratch differs; mse or cross-entropy):
// [warps a block, blocks, shared bytes a block, theta_0 staged (0/1), scratch in shared memory (0/1),
// scratch bytes a task, registers and local bytes a thread, blocks a multiprocessor, the shared-operand form
// (0/1), the products on tensor cores (0/1)]. For the benchmarks' notes under the cuda rows when
// FASTMAML_CUDA_ONESTEP=1 and the GPU tests' check of the form that ran (the plan reads the switches in force).
std::vector<int64_t> cuda_onestep_launch(const at::Tensor& like, c10::IntArrayRef dims, int64_t ns, int64_t nq,
                                         int64_t T, int64_t activation, int64_t loss) {
  TORCH_CHECK(activation == task::kRelu || activation == task::kTanh,
              "fastmaml: cuda_onestep_launch: activation must be 0 (relu) or 1 (tanh), got ", activation);
  TORCH_CHECK(loss == task::kMse || loss == task::kCrossEntropy,
              "fastmaml: cuda_onestep_launch: loss must be 0 (mse) or 1 (cross-entropy), got ", loss);
  task::Net net;
  TORCH_CHECK(task::make_net(net, dims.data(), static_cast<int>(dims.size()), static_cast<int>(activation),
                             static_cast<int>(loss)),
              "fastmaml: cuda_onestep_launch: bad dims ", dims);
  TORCH_CHECK(like.is_cuda(), "fastmaml: cuda_onestep_launch needs a CUDA tensor");
  const c10::cuda::CUDAGuard guard(like.device());
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "cuda_onestep_launch", [&] {
    OnestepPlan p{};
    cudaError_t err = plan_onestep<scalar_t>({net, static_cast<int>(ns), static_cast<int>(nq), T}, &p);
    int regs = 0, local = 0, per_sm = 0;
    if (err == cudaSuccess) err = onestep_attributes<scalar_t>(&regs, &local, p, &per_sm);
    TORCH_CHECK(err == cudaSuccess, "fastmaml: cuda_onestep_launch: ", cudaGetErrorString(err));
    out = {p.warps, p.blocks, p.shared_bytes, p.stage, p.shared_work,
           p.work_elems * static_cast<int64_t>(sizeof(scalar_t)), regs, local, per_sm, p.shared_form, p.mma};
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmaml

TORCH_LIBRARY_FRAGMENT(fastmaml_testing, m) {
  m.def("cuda_onestep_launch(Tensor like, int[] dims, int Ns, int Nq, int T, int activation=0, int loss=0) "
        "-> int[]",
        &fastmaml::cuda::cuda_onestep_launch);
}

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) { m.impl("maml_onestep", &fastmaml::cuda::maml_onestep_cuda); }
