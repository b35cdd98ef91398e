// fastmaml: the CPU kernel of maml_onestep (csrc/onestep_op.h): the per-task math of csrc/task/onestep.h with
// a team of one, tasks spread over torch's intra-op threads, one workspace per thread. The oracle of the CUDA
// kernel's math (tests/test_onestep.py compares both with the reference).

#include "onestep_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../onestep_op.h"
#include "maml_cpu.h"

namespace fastmaml {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_onestep(
    const at::Tensor& theta, const at::Tensor& theta_t, const at::Tensor& rates, const at::Tensor& xs,
    const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq, const std::optional<at::Tensor>& cot,
    const std::optional<at::Tensor>& g_pred, c10::IntArrayRef dims, int64_t activation, int64_t loss,
    bool first_order, bool factors) {
  onestep_op::Call c = onestep_op::setup(theta, theta_t, rates, xs, ys, xq, yq, cot, g_pred, dims, activation,
                                         loss, first_order, factors, &class_range_check);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "maml_onestep", [&] {
    using T = scalar_t;
    const task::Net net = c.net;
    const int ns = static_cast<int>(c.ns), nq = static_cast<int>(c.nq);
    const int64_t din = net.dims[0], dout = net.dims[net.L];
    const int64_t ws = task::onestep::layout(net, ns, nq).total;
    const T* th = theta.const_data_ptr<T>();
    const T* tht = theta_t.const_data_ptr<T>();
    const T* r = rates.const_data_ptr<T>();
    const bool ce = loss == task::kCrossEntropy;
    const T *pxs = xs.const_data_ptr<T>(), *pxq = xq.const_data_ptr<T>();
    const T *pys = ce ? nullptr : ys.const_data_ptr<T>(), *pyq = ce ? nullptr : yq.const_data_ptr<T>();
    const int64_t *pysi = ce ? ys.const_data_ptr<int64_t>() : nullptr;
    const int64_t *pyqi = ce ? yq.const_data_ptr<int64_t>() : nullptr;
    const T* pc = cot.has_value() ? cot->const_data_ptr<T>() : nullptr;
    const T* pg = g_pred.has_value() ? g_pred->const_data_ptr<T>() : nullptr;
    T* pl = c.losses.mutable_data_ptr<T>();
    T* pp = c.preds.mutable_data_ptr<T>();
    T* pu = factors ? c.U.mutable_data_ptr<T>() : nullptr;
    T* pv = factors ? c.V.mutable_data_ptr<T>() : nullptr;
    T* prg = factors ? c.rate_grads.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, c.T, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> work(static_cast<size_t>(ws));
      for (int64_t t = begin; t < end; ++t) {
        task::onestep::Task<T> tk;
        tk.xs = pxs + t * ns * din;
        tk.ys = ce ? nullptr : pys + t * ns * dout;
        tk.xq = pxq + t * nq * din;
        tk.yq = ce ? nullptr : pyq + t * nq * dout;
        tk.ys_index = ce ? pysi + t * ns : nullptr;
        tk.yq_index = ce ? pyqi + t * nq : nullptr;
        tk.cot = pc != nullptr ? pc[t] : T(1);
        tk.g_pred = pg != nullptr ? pg + t * nq * dout : nullptr;
        tk.loss = pl + t;
        tk.pred = pp + t * nq * dout;
        tk.U = pu;
        tk.V = pv;
        tk.rate_grad = prg != nullptr ? prg + t * 2 * net.L : nullptr;
        tk.n_tasks = c.T;
        tk.index = t;
        task::onestep::task(net, th, tht, r, ns, nq, first_order, tk, work.data(), task::SerialTeam());
      }
    });
  });
  return {c.losses, c.preds, c.U, c.V, c.rate_grads};
}

}  // namespace cpu
}  // namespace fastmaml
