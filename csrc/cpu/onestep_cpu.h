// fastmaml: the CPU kernel of maml_onestep (onestep_cpu.cpp; the operation's contract is csrc/onestep_op.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace fastmaml {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_onestep(
    const at::Tensor& theta, const at::Tensor& theta_t, const at::Tensor& rates, const at::Tensor& xs,
    const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq, const std::optional<at::Tensor>& cot,
    const std::optional<at::Tensor>& g_pred, c10::IntArrayRef dims, int64_t activation, int64_t loss,
    bool first_order, bool factors);

}  // namespace cpu
}  // namespace fastmaml
