// fastmaml: the autograd kernels of maml_fwdbwd and maml_train (autograd_fwdbwd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>

namespace fastmaml {

// maml_fwdbwd under autograd: runs the op (any device), keeps each task's gradient rows, and gives
// the task losses a backward that weighs those rows by their cotangents (weighted_task_sum). With a
// cotangent on the query output, or under create_graph=True, the backward runs maml_bwd instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_fwdbwd_autograd(
    const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, const at::Tensor& qw, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad);

// maml_train (the parameters as a list, flattened here): under autograd, maml_fwdbwd with the same
// backward as above and the gradient of theta split into one view per parameter; returns the task
// losses, the query output and their mean (the meta-loss: with a cotangent on it alone, on CPU, the
// backward scales the rows' sums that the kernel made instead of weighing the rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> maml_train_autograd(
    at::TensorList params, const at::Tensor& lr, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, const at::Tensor& qw, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad);

// maml_train below autograd (no gradient wanted): maml_fwd of the flattened parameters.
std::tuple<at::Tensor, at::Tensor, at::Tensor> maml_train_forward(
    at::TensorList params, const at::Tensor& lr, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, const at::Tensor& qw, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad);

}  // namespace fastmaml
