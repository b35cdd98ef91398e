// fastmaml: the CPU implementations of the flat operations of docs/kernels.md (maml_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>
#include <vector>

namespace fastmaml {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> maml_fwd(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support,
                                            const at::Tensor& y_support, const at::Tensor& x_query,
                                            const at::Tensor& y_query, const at::Tensor& qw, c10::IntArrayRef dims,
                                            int64_t activation, int64_t loss, bool first_order);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_bwd(
    const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, const at::Tensor& qw, const at::Tensor& g_task_losses,
    const at::Tensor& g_query_preds, c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order,
    bool need_lr_grad, bool need_x_grad);

// Forward and backward in one pass (cotangent 1 for every task loss, none for the query output): the
// outputs of maml_fwd, then each task's own g_theta [T, P], g_lr [T, K, P] (or [0]), g_xs, g_xq (or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_fwdbwd(
    const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, const at::Tensor& qw, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad);

// maml_fwdbwd's outputs, then its rows summed over the tasks: sum_theta [P], sum_lr [K, P] (or [0]);
// the sums in a fixed order (chunks of tasks), the same bits for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
maml_fwdbwd_sum(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support,
                const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                const at::Tensor& qw, c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order,
                bool need_lr_grad, bool need_x_grad, bool keep_rows);

// sum_t weights[t] * rows[t] for rows [T, ...] (tasks in order for every element: deterministic).
at::Tensor weighted_task_sum(const at::Tensor& rows, const at::Tensor& weights);

// Raises ValueError where a class of the int64 targets `y` lies outside [0, n_classes) (the CPU kernels'
// check, for maml_onestep's CPU kernel too).
void class_range_check(const at::Tensor& y, const char* name, int64_t n_classes);

// The number of distinct threads that run at::parallel_for(0, n, 1) here (a build check for the tests).
int64_t parallel_probe(int64_t n);

at::Tensor maml_adapt(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& x_support,
                      const at::Tensor& y_support, c10::IntArrayRef dims, int64_t activation, int64_t loss);

}  // namespace cpu
}  // namespace fastmaml
