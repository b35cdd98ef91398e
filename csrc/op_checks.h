// fastmaml: the argument checks of the flat operations (docs/kernels.md), written once for the CPU
// kernels (cpu/maml_cpu.cpp) and the CUDA binding (cuda/binding.cpp). Host code with torch headers;
// the kernels themselves never see it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "maml_task.h"

namespace fastmaml {
namespace checks {

// A check that every class index of `y` lies in [0, n_classes): the device's own (a pass on the CPU,
// one reduction and sync on a GPU).
using ClassRangeCheck = void (*)(const at::Tensor& y, const char* name, int64_t n_classes);

// `t` has theta's dtype and device.
inline void check_float(const at::Tensor& t, const char* name, const at::Tensor& theta) {
  TORCH_CHECK(t.scalar_type() == theta.scalar_type(), "fastmaml: ", name, " has dtype ", t.scalar_type(),
              ", expected ", theta.scalar_type(), " (the dtype of theta)");
  TORCH_CHECK(t.device() == theta.device(), "fastmaml: ", name, " is on ", t.device(), ", expected ",
              theta.device(), " (the device of theta)");
}

// Targets: floats [T, N, d_out] for mse, int64 class indices [T, N] for cross-entropy (their range
// checked by `class_range` when given).
inline void check_targets(const at::Tensor& y, const char* name, const at::Tensor& theta, int64_t loss, int64_t T,
                          int64_t N, int64_t d_out, ClassRangeCheck class_range) {
  if (loss == task::kMse) {
    check_float(y, name, theta);
    TORCH_CHECK(y.dim() == 3 && y.size(0) == T && y.size(1) == N && y.size(2) == d_out, "fastmaml: ", name,
                " must be [", T, ", ", N, ", ", d_out, "] for mse, got ", y.sizes());
    return;
  }
  TORCH_CHECK(y.scalar_type() == at::kLong, "fastmaml: ", name, " must hold int64 class indices, got ",
              y.scalar_type());
  TORCH_CHECK(y.device() == theta.device(), "fastmaml: ", name, " is on ", y.device(), ", expected ", theta.device());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == T && y.size(1) == N, "fastmaml: ", name, " must be [", T, ", ", N,
              "] for cross-entropy, got ", y.sizes());
  if (class_range != nullptr) class_range(y, name, d_out);
}

// Checks the arguments every operation shares and returns the sizes (`Sizes`: a struct with `net`, `T`,
// `Ns`, `Nq`, `K`). `kernel` names the device's kernel in the message when theta is elsewhere. Query
// tensors may be null (maml_adapt).
template <typename Sizes>
Sizes check_args(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
                 const at::Tensor* xq, const at::Tensor* yq, c10::IntArrayRef dims, int64_t activation,
                 int64_t loss, c10::DeviceType device, const char* kernel, ClassRangeCheck class_range = nullptr) {
  TORCH_CHECK(theta.device().type() == device, "fastmaml: the ", kernel, " kernel got theta on ", theta.device());
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble,
              "fastmaml: theta must be float32 or float64, got ", theta.scalar_type());
  TORCH_CHECK(activation == task::kRelu || activation == task::kTanh,
              "fastmaml: activation must be 0 (relu) or 1 (tanh), got ", activation);
  TORCH_CHECK(loss == task::kMse || loss == task::kCrossEntropy,
              "fastmaml: loss must be 0 (mse) or 1 (cross-entropy), got ", loss);
  const int64_t n_dims = static_cast<int64_t>(dims.size());
  TORCH_CHECK(n_dims >= 2 && n_dims <= task::kMaxLayers + 1, "fastmaml: dims must hold 2 to ",
              task::kMaxLayers + 1, " sizes [D_in, ..., D_out], got ", dims);
  for (int64_t d : dims) {
    TORCH_CHECK(d >= 1 && d <= (int64_t(1) << 24), "fastmaml: every size in dims must be in [1, 2^24], got ", dims);
  }
  Sizes s;
  TORCH_CHECK(task::make_net(s.net, dims.data(), static_cast<int>(n_dims), static_cast<int>(activation),
                             static_cast<int>(loss)),
              "fastmaml: invalid dims ", dims);
  const int64_t P = s.net.P;
  TORCH_CHECK(theta.dim() == 1 && theta.size(0) == P, "fastmaml: theta must be [P] = [", P, "] for dims ", dims,
              ", got ", theta.sizes());
  check_float(lr, "lr", theta);
  TORCH_CHECK(lr.dim() == 2 && lr.size(1) == P, "fastmaml: lr must be [K, P] with P = ", P, ", got ", lr.sizes());
  s.K = lr.size(0);
  check_float(xs, "x_support", theta);
  TORCH_CHECK(xs.dim() == 3 && xs.size(2) == dims[0], "fastmaml: x_support must be [T, Ns, ", dims[0], "], got ",
              xs.sizes());
  s.T = xs.size(0);
  s.Ns = xs.size(1);
  TORCH_CHECK(s.Ns >= 1 && s.Ns <= (int64_t(1) << 30), "fastmaml: x_support needs 1 to 2^30 points per task");
  check_targets(ys, "y_support", theta, loss, s.T, s.Ns, dims.back(), class_range);
  s.Nq = 0;
  if (xq != nullptr) {
    check_float(*xq, "x_query", theta);
    TORCH_CHECK(xq->dim() == 3 && xq->size(0) == s.T && xq->size(2) == dims[0], "fastmaml: x_query must be [",
                s.T, ", Nq, ", dims[0], "], got ", xq->sizes());
    s.Nq = xq->size(1);
    TORCH_CHECK(s.Nq >= 1 && s.Nq <= (int64_t(1) << 30), "fastmaml: x_query needs 1 to 2^30 points per task");
    check_targets(*yq, "y_query", theta, loss, s.T, s.Nq, dims.back(), class_range);
  }
  return s;
}

// The query-loss weights: [K + 1], theta's dtype and device.
inline void check_qw(const at::Tensor& qw, const at::Tensor& theta, int64_t K) {
  check_float(qw, "qw", theta);
  TORCH_CHECK(qw.dim() == 1 && qw.size(0) == K + 1, "fastmaml: qw must be [K + 1] = [", K + 1, "], got ",
              qw.sizes());
}

// The cotangents maml_bwd takes: g_task_losses [T] and g_query_preds [T, Nq, d_out], theta's dtype and
// device.
inline void check_cotangents(const at::Tensor& gl, const at::Tensor& gp, const at::Tensor& theta, int64_t T,
                             int64_t Nq, int64_t d_out) {
  check_float(gl, "g_task_losses", theta);
  TORCH_CHECK(gl.dim() == 1 && gl.size(0) == T, "fastmaml: g_task_losses must be [", T, "], got ", gl.sizes());
  check_float(gp, "g_query_preds", theta);
  TORCH_CHECK(gp.dim() == 3 && gp.size(0) == T && gp.size(1) == Nq && gp.size(2) == d_out,
              "fastmaml: g_query_preds must be [", T, ", ", Nq, ", ", d_out, "], got ", gp.sizes());
}

// weighted_task_sum's arguments: rows [T, ...] in float32 or float64 on the kernel's device, weights [T]
// of the same dtype and device. Returns T.
inline int64_t check_task_sum_args(const at::Tensor& rows, const at::Tensor& weights, c10::DeviceType device,
                                   const char* kernel) {
  TORCH_CHECK(rows.device().type() == device, "fastmaml: the ", kernel, " kernel got rows on ", rows.device());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "fastmaml: rows must be float32 or float64, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() >= 1, "fastmaml: rows must be [T, ...], got ", rows.sizes());
  check_float(weights, "weights", rows);
  const int64_t T = rows.size(0);
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == T, "fastmaml: weights must be [", T, "], got ",
              weights.sizes());
  return T;
}

}  // namespace checks
}  // namespace fastmaml
