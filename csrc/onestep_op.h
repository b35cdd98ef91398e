// fastmaml: the argument checks and outputs of maml_onestep (csrc/task/onestep.h), written once for the CPU
// kernel (cpu/onestep_cpu.cpp) and the CUDA binding (cuda/onestep_binding.cpp). Host code with torch headers.
//
// maml_onestep(theta [P], theta_t [P], rates [2 L], xs [T, Ns, D_in], ys, xq [T, Nq, D_in], yq, cot [T]?,
//              g_pred [T, Nq, D_out]?, dims, activation, loss, first_order, factors)
//   -> (losses [T], preds [T, Nq, D_out], U [T R sum_l D_{l+1}], V [T R sum_l (D_l + 1)], rate_grads [T, 2 L])
// theta_t holds theta's weights transposed (W_l^T [D_l, D_{l+1}] at W_l's offset; the biases' places are
// not read). U and V are the factor rows of onestep.h and rate_grads each task's gradient in its 2 L rates
// (all three empty when `factors` is false); cot defaults to 1
// for every task and g_pred to none. Targets as the other operations take them: floats [T, N, D_out] for mse,
// int64 classes [T, N] for cross-entropy. One step.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "maml_task.h"
#include "op_checks.h"
#include "task/onestep.h"

namespace fastmaml {
namespace onestep_op {

struct Call {
  task::Net net;
  int64_t T, ns, nq, R;
  at::Tensor losses, preds, U, V, rate_grads;
};

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& theta) {
  TORCH_CHECK(t.scalar_type() == theta.scalar_type(), "fastmaml: maml_onestep: ", name, " has dtype ",
              t.scalar_type(), ", expected ", theta.scalar_type(), " (theta's)");
  TORCH_CHECK(t.device() == theta.device(), "fastmaml: maml_onestep: ", name, " is on ", t.device(), ", expected ",
              theta.device(), " (theta's device)");
  TORCH_CHECK(t.is_contiguous(), "fastmaml: maml_onestep: ", name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.sizes().equals(shape), "fastmaml: maml_onestep: ", name, " must be ", c10::IntArrayRef(shape),
              ", got ", t.sizes());
}

// `class_range` checks the classes of cross-entropy targets (the CPU's; null on a GPU, where an
// out-of-range class makes its task NaN instead).
inline Call setup(const at::Tensor& theta, const at::Tensor& theta_t, const at::Tensor& rates, const at::Tensor& xs,
                  const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                  const std::optional<at::Tensor>& cot, const std::optional<at::Tensor>& g_pred,
                  c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order, bool factors,
                  checks::ClassRangeCheck class_range) {
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble,
              "fastmaml: maml_onestep takes float32 or float64, got ", theta.scalar_type());
  TORCH_CHECK(activation == task::kRelu || activation == task::kTanh, "fastmaml: maml_onestep: activation ",
              activation, " is neither relu (0) nor tanh (1)");
  TORCH_CHECK(loss == task::kMse || loss == task::kCrossEntropy, "fastmaml: maml_onestep: loss ", loss,
              " is neither mse (0) nor cross-entropy (1)");
  Call c;
  TORCH_CHECK(task::make_net(c.net, dims.data(), static_cast<int>(dims.size()), static_cast<int>(activation),
                             static_cast<int>(loss)),
              "fastmaml: maml_onestep: dims ", dims, " must have 2 to ", task::kMaxLayers + 1,
              " positive widths");
  const int L = c.net.L;
  const int64_t din = dims[0], dout = dims[L];
  TORCH_CHECK(xs.dim() == 3 && xq.dim() == 3, "fastmaml: maml_onestep: xs and xq must be [T, N, D_in], got ",
              xs.sizes(), " and ", xq.sizes());
  c.T = xs.size(0), c.ns = xs.size(1), c.nq = xq.size(1);
  TORCH_CHECK(c.ns >= 1 && c.nq >= 1, "fastmaml: maml_onestep needs support and query points, got ", c.ns,
              " and ", c.nq);
  TORCH_CHECK(c.ns * c.net.width_sum < (int64_t(1) << 31) && c.nq * c.net.width_sum < (int64_t(1) << 31),
              "fastmaml: maml_onestep: a task's activations must have fewer than 2^31 elements");
  TORCH_CHECK(L * c.ns * c.nq < (int64_t(1) << 31),
              "fastmaml: maml_onestep: a task's [Nq, Ns] products must have fewer than 2^31 elements");
  check_same(theta, "theta", theta);
  check_shape(theta, "theta", {c.net.P});
  check_same(theta_t, "theta_t", theta);
  check_shape(theta_t, "theta_t", {c.net.P});
  check_same(rates, "rates", theta);
  check_shape(rates, "rates", {2 * L});
  check_same(xs, "xs", theta);
  check_shape(xs, "xs", {c.T, c.ns, din});
  check_same(xq, "xq", theta);
  check_shape(xq, "xq", {c.T, c.nq, din});
  TORCH_CHECK(ys.is_contiguous() && yq.is_contiguous(), "fastmaml: maml_onestep: ys and yq must be contiguous");
  checks::check_targets(ys, "ys", theta, loss, c.T, c.ns, dout, class_range);
  checks::check_targets(yq, "yq", theta, loss, c.T, c.nq, dout, class_range);
  if (cot.has_value()) {
    check_same(*cot, "cot", theta);
    check_shape(*cot, "cot", {c.T});
  }
  if (g_pred.has_value()) {
    check_same(*g_pred, "g_pred", theta);
    check_shape(*g_pred, "g_pred", {c.T, c.nq, dout});
  }
  c.R = task::onestep::factor_rows(static_cast<int>(c.ns), static_cast<int>(c.nq), first_order);
  const auto opts = theta.options();
  c.losses = at::empty({c.T}, opts);
  c.preds = at::empty({c.T, c.nq, dout}, opts);
  const int64_t rows = factors ? c.T * c.R : 0;
  c.U = at::empty({rows * task::onestep::u_width(c.net)}, opts);
  c.V = at::empty({rows * task::onestep::v_width(c.net)}, opts);
  c.rate_grads = at::empty({factors ? c.T : 0, 2 * L}, opts);
  return c;
}

}  // namespace onestep_op
}  // namespace fastmaml
