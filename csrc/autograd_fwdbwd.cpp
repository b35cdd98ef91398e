// fastmaml: the autograd kernels of maml_fwdbwd and maml_train, registered under the Autograd key in
// fastmaml.cpp.
//
// Every training call of a fused backend runs through here, so the formulas are C++: registered from
// Python (torch.library.register_autograd) the same formula was a tenth of a small meta-iteration's time.
// maml_train takes the parameters as a list, so the flattening into theta and the split of its gradient
// back into one tensor per parameter happen here too, not as seven more autograd nodes from Python. The
// ops this calls go through the dispatcher, so any device's kernels serve, and torch.compile traces them
// (their fake kernels are registered from Python).

#include "autograd_fwdbwd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>

namespace fastmaml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

using FwdBwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    c10::IntArrayRef, int64_t, int64_t, bool, bool, bool);
using BwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&,
                                                          c10::IntArrayRef, int64_t, int64_t, bool, bool, bool);
using TaskSumFn = Tensor(const Tensor&, const Tensor&);
using FwdFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, c10::IntArrayRef, int64_t, int64_t, bool);
using FwdBwdSumFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    c10::IntArrayRef, int64_t, int64_t, bool, bool, bool, bool);

// The saved tensors, in this order (the sums are undefined unless asked for; `also_save` follows).
enum Saved { kTheta, kLr, kXs, kYs, kXq, kYq, kQw, kRowsTheta, kRowsLr, kRowsXs, kRowsXq, kSumTheta, kSumLr, kAlso };

// The parameters flattened into one vector, theta = [W1 (row-major), b1, ..., WL, bL].
Tensor flatten(at::TensorList params);

// A real CPU tensor whose data can be read here: not a fake, functional or meta tensor of a trace (which
// reach this kernel under torch.compile and opcheck), dense, contiguous, without a lazy negation (the
// bit of torch._neg_view, which a raw read would ignore).
bool readable_cpu(const Tensor& t) {
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || t.is_neg() || t.is_conj()) return false;
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  const c10::DispatchKeySet ks = t.key_set();
  return ks.has(c10::DispatchKey::CPU) && !ks.has(c10::DispatchKey::Python) &&
         !ks.has(c10::DispatchKey::Functionalize) && t.has_storage() && t.is_contiguous();
}

// flatten, below autograd: on the CPU a copy into one new vector (six reshapes and a cat cost more than
// the copy for the small models of MAML's paper); elsewhere, or for strided or mixed parameters, flatten.
Tensor flatten_plain(at::TensorList params) {
  bool plain = !params.empty();
  int64_t P = 0;
  for (const Tensor& p : params) {
    plain = plain && readable_cpu(p) && p.scalar_type() == params[0].scalar_type();
    if (plain) P += p.numel();
  }
  if (!plain) return flatten(params);
  Tensor theta = at::empty({P}, params[0].options());
  char* dst = static_cast<char*>(theta.mutable_data_ptr());
  for (const Tensor& p : params) {
    const size_t bytes = static_cast<size_t>(p.nbytes());
    if (bytes > 0) std::memcpy(dst, p.const_data_ptr(), bytes);
    dst += bytes;
  }
  return theta;
}

// The mean of the task losses `[T]`: on the CPU a loop (an at::mean costs several dispatches), elsewhere
// at::mean.
Tensor mean_of(const Tensor& task_losses) {
  if (!readable_cpu(task_losses)) return task_losses.mean();
  Tensor mean = at::empty({}, task_losses.options());
  AT_DISPATCH_FLOATING_TYPES(task_losses.scalar_type(), "fastmaml_mean", [&] {
    const scalar_t* l = task_losses.const_data_ptr<scalar_t>();
    const int64_t T = task_losses.numel();
    scalar_t total = 0;
    for (int64_t t = 0; t < T; ++t) total += l[t];
    *mean.mutable_data_ptr<scalar_t>() = T > 0 ? total / static_cast<scalar_t>(T) : std::nan("");
  });
  return mean;
}

// `sum [n]` times `w` into a new tensor of `shape` (CPU, contiguous `sum`): the gradient of one parameter
// from the kernel's sums, with no narrow, view or mul dispatched.
Tensor scaled_copy(const Tensor& sum, int64_t offset, c10::IntArrayRef shape, double w) {
  Tensor out = at::empty(shape, sum.options());
  AT_DISPATCH_FLOATING_TYPES(sum.scalar_type(), "fastmaml_scaled_copy", [&] {
    const scalar_t* src = sum.const_data_ptr<scalar_t>() + offset;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t ws = static_cast<scalar_t>(w);
    const int64_t n = out.numel();
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * ws;
  });
  return out;
}

Tensor flatten(at::TensorList params) {
  std::vector<Tensor> flat;
  flat.reserve(params.size());
  for (const Tensor& p : params) flat.push_back(p.reshape({-1}));
  return at::cat(flat);
}

// Runs maml_fwdbwd (with `with_sums`, maml_fwdbwd_sum: CPU) below autograd on the device's kernel and
// saves what the backward needs (then `also_save`). Returns its six outputs (task losses, query output,
// the rows of theta, the rates, x_support, x_query).
variable_list forward_and_save(AutogradContext* ctx, const Tensor& theta, const Tensor& lr,
                                           const Tensor& xs, const Tensor& ys, const Tensor& xq, const Tensor& yq,
                                           const Tensor& qw, c10::IntArrayRef dims, int64_t activation,
                                           int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad,
                                           at::TensorList also_save = {}, bool with_sums = false,
                                           bool keep_rows = true) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmaml::maml_fwdbwd", "").typed<FwdBwdFn>();
  static const auto op_sum =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmaml::maml_fwdbwd_sum", "").typed<FwdBwdSumFn>();
  Tensor task_losses, preds, rows_theta, rows_lr, rows_xs, rows_xq, sum_theta, sum_lr;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the device kernel, not an autograd kernel again
    if (with_sums) {
      std::tie(task_losses, preds, rows_theta, rows_lr, rows_xs, rows_xq, sum_theta, sum_lr) = op_sum.call(
          theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order, need_lr_grad, need_x_grad, keep_rows);
    } else {
      std::tie(task_losses, preds, rows_theta, rows_lr, rows_xs, rows_xq) =
          op.call(theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order, need_lr_grad, need_x_grad);
    }
  }
  variable_list to_save{theta, lr, xs, ys, xq, yq, qw, rows_theta, rows_lr, rows_xs, rows_xq, sum_theta, sum_lr};
  to_save.insert(to_save.end(), also_save.begin(), also_save.end());
  ctx->save_for_backward(to_save);
  ctx->saved_data["dims"] = dims.vec();
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["loss"] = loss;
  ctx->saved_data["first_order"] = first_order;
  ctx->saved_data["need_lr_grad"] = need_lr_grad;
  ctx->saved_data["need_x_grad"] = need_x_grad;
  ctx->set_materialize_grads(false);  // an unused query output gives an undefined gradient, not zeros
  return {task_losses, preds, rows_theta, rows_lr, rows_xs, rows_xq};
}

// The gradients wanted: theta (flat), the rates, x_support, x_query.
struct Wanted {
  bool theta, lr, xs, xq;
};

struct Grads {
  Tensor theta, lr, xs, xq;
};

// The backward: the saved rows weighted by the task losses' cotangents; with a cotangent on the query
// output, or under create_graph=True, maml_bwd's reverse sweep instead.
// `differentiable_theta` (optional) replaces the saved theta in maml_bwd's call under create_graph=True,
// so that its result stays connected to the graph (and a second backward meets maml_bwd's refusal).
Grads backward_from_saved(AutogradContext* ctx, const variable_list& saved, const Tensor& g_task_losses,
                          const Tensor& g_preds, const Wanted& want,
                          const std::function<Tensor()>& differentiable_theta = nullptr) {
  const Tensor &theta = saved[kTheta], &xs = saved[kXs], &xq = saved[kXq];
  const Tensor g_losses =
      g_task_losses.defined() ? g_task_losses.contiguous() : at::zeros({xs.size(0)}, theta.options());
  Grads g;
  // Rows not kept (maml_train on a GPU keeps only their sums): a cotangent other than the mean's needs the
  // reverse sweep again.
  const bool no_rows = saved[kRowsTheta].dim() != 2;
  if (g_preds.defined() || at::GradMode::is_enabled() || no_rows) {
    // The rows do not cover a cotangent of the query output; under create_graph=True the weighted rows
    // would give a silently wrong second derivative, while maml_bwd's own autograd formula raises.
    static const auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastmaml::maml_bwd", "").typed<BwdFn>();
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const Tensor gp = g_preds.defined() ? g_preds.contiguous()
                                        : at::zeros({xq.size(0), xq.size(1), dims.back()}, theta.options());
    const bool create_graph = at::GradMode::is_enabled();
    const Tensor th = create_graph && differentiable_theta ? differentiable_theta() : theta;
    std::tie(g.theta, g.lr, g.xs, g.xq) =
        bwd.call(th, saved[kLr], xs, saved[kYs], xq, saved[kYq], saved[kQw], g_losses, gp, dims,
                 ctx->saved_data["activation"].toInt(), ctx->saved_data["loss"].toInt(),
                 ctx->saved_data["first_order"].toBool(), want.lr, want.xs || want.xq);
  } else {
    static const auto task_sum =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastmaml::weighted_task_sum", "").typed<TaskSumFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // grad mode is off here: nothing to record
    if (want.theta) g.theta = task_sum.call(saved[kRowsTheta], g_losses);
    if (want.lr) g.lr = task_sum.call(saved[kRowsLr], g_losses);
    const Tensor scale = g_losses.view({-1, 1, 1});
    if (want.xs) g.xs = saved[kRowsXs].mul(scale);
    if (want.xq) g.xq = saved[kRowsXq].mul(scale);
  }
  return g;
}

// Which gradients the call asked for (the op's flags) and autograd needs (`lr`, `xs`, `xq`: the edge
// indices of those inputs).
Wanted wanted(AutogradContext* ctx, bool theta, size_t lr, size_t xs, size_t xq) {
  const bool need_lr = ctx->saved_data["need_lr_grad"].toBool();
  const bool need_x = ctx->saved_data["need_x_grad"].toBool();
  return {theta, need_lr && ctx->needs_input_grad(lr), need_x && ctx->needs_input_grad(xs),
          need_x && ctx->needs_input_grad(xq)};
}

// maml_fwdbwd: theta flat; the per-task rows are outputs too (not differentiable).
class MamlFwdBwd : public torch::autograd::Function<MamlFwdBwd> {
 public:
  // Argument positions (the op's schema): 7 tensors, then dims, activation, loss and three flags.
  enum Input { kInTheta, kInLr, kInXs, kInYs, kInXq, kInYq, kInQw, kNumInputs = 13 };

  static variable_list forward(AutogradContext* ctx, const Tensor& theta, const Tensor& lr, const Tensor& xs,
                               const Tensor& ys, const Tensor& xq, const Tensor& yq, const Tensor& qw,
                               c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order,
                               bool need_lr_grad, bool need_x_grad) {
    variable_list out = forward_and_save(ctx, theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order,
                                         need_lr_grad, need_x_grad);
    ctx->mark_non_differentiable({out[2], out[3], out[4], out[5]});  // the rows: the backward's, not results
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Wanted want = wanted(ctx, ctx->needs_input_grad(kInTheta), kInLr, kInXs, kInXq);
    const Grads g = backward_from_saved(ctx, ctx->get_saved_variables(), grads[0], grads[1], want);
    variable_list out(kNumInputs);
    if (want.theta) out[kInTheta] = g.theta;
    if (want.lr) out[kInLr] = g.lr;
    if (want.xs) out[kInXs] = g.xs;
    if (want.xq) out[kInXq] = g.xq;
    return out;
  }
};

// maml_train: the parameters as a list, flattened into theta here; returns the task losses, the query
// output and the mean of the task losses.
class MamlTrain : public torch::autograd::Function<MamlTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const Tensor& lr, const Tensor& xs,
                               const Tensor& ys, const Tensor& xq, const Tensor& yq, const Tensor& qw,
                               c10::IntArrayRef dims, int64_t activation, int64_t loss, bool first_order,
                               bool need_lr_grad, bool need_x_grad) {
    std::vector<int64_t> ranks, shapes;  // each parameter's rank, and all their shapes end to end
    for (const Tensor& p : params) {
      ranks.push_back(p.dim());
      shapes.insert(shapes.end(), p.sizes().begin(), p.sizes().end());
    }
    Tensor theta;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      theta = flatten_plain(params);
    }
    ctx->saved_data["ranks"] = ranks;
    ctx->saved_data["shapes"] = shapes;
    // The kernel also sums the rows over the tasks (maml_fwdbwd_sum): the gradient of the mean loss alone is
    // then those sums scaled, with no pass over T x P rows. On the CPU the rows are made in cache on the
    // way and kept (another cotangent weighs them); on a GPU they are not written at all (HBM traffic and
    // T x P of memory), and another cotangent runs the reverse sweep again (maml_bwd).
    // FASTMAML_KEEP_ROWS=0 drops them on the CPU too (the tests run the GPU's layout that way).
    const char* keep = std::getenv("FASTMAML_KEEP_ROWS");  // read per call (a scan of a few variables)
    const bool keep_rows = theta.is_cpu() && !(keep != nullptr && std::strcmp(keep, "0") == 0);
    const variable_list out = forward_and_save(ctx, theta, lr, xs, ys, xq, yq, qw, dims, activation, loss,
                                               first_order, need_lr_grad, need_x_grad, params, true, keep_rows);
    Tensor mean;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      mean = mean_of(out[0]);
    }
    return {out[0], out[1], mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> ranks = ctx->saved_data["ranks"].toIntVector();
    const std::vector<int64_t> shapes = ctx->saved_data["shapes"].toIntVector();
    const size_t n = ranks.size();
    bool any_param = false;
    for (size_t i = 0; i < n; ++i) any_param = any_param || ctx->needs_input_grad(i);
    // Edges: the n params, then lr, x_support, y_support, x_query, y_query, qw.
    const Wanted want = wanted(ctx, any_param, n, n + 1, n + 3);
    // Outputs: the task losses, the query output, their mean.
    const Tensor &g_task = grads[0], &g_preds = grads[1], &g_mean = grads[2];
    Grads g;
    const variable_list saved = ctx->get_saved_variables();
    const int64_t T = saved[kXs].size(0);
    // One output per argument: the n params (the list is flattened), then the 12 other arguments.
    variable_list out(n + 12);
    const bool mean_only = !g_task.defined() && !g_preds.defined() && g_mean.defined() &&
                           saved[kSumTheta].defined() && !at::GradMode::is_enabled();
    if (mean_only && readable_cpu(g_mean) && readable_cpu(saved[kSumTheta]) &&
        (saved[kSumLr].numel() == 0 || readable_cpu(saved[kSumLr]))) {
      // Only the mean has a cotangent: every task's weight is g_mean / T. The sums are the CPU kernel's
      // (maml_fwdbwd_sum), so g_mean is a CPU scalar and each gradient is one scaled copy of its slice.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const double w = g_mean.item<double>() / static_cast<double>(T);
      int64_t offset = 0;
      size_t dim = 0;
      for (size_t i = 0; i < n; ++i) {
        const c10::IntArrayRef shape(shapes.data() + dim, static_cast<size_t>(ranks[i]));
        dim += static_cast<size_t>(ranks[i]);
        if (ctx->needs_input_grad(i)) out[i] = scaled_copy(saved[kSumTheta], offset, shape, w);
        offset += c10::multiply_integers(shape);
      }
      if (want.lr) out[n] = scaled_copy(saved[kSumLr], 0, saved[kSumLr].sizes(), w);
      if (want.xs) out[n + 1] = saved[kRowsXs].mul(w);
      if (want.xq) out[n + 3] = saved[kRowsXq].mul(w);
      return out;
    }
    if (mean_only) {
      // The same as ops, where the data cannot be read here (torch.compile traces this with fake tensors).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Tensor w = g_mean.div(static_cast<double>(T));
      if (want.theta) g.theta = saved[kSumTheta].mul(w);
      if (want.lr) g.lr = saved[kSumLr].mul(w);
      if (want.xs) g.xs = saved[kRowsXs].mul(w);
      if (want.xq) g.xq = saved[kRowsXq].mul(w);
    } else {
      Tensor c = g_task;
      if (g_mean.defined()) {
        const Tensor w = g_mean.div(static_cast<double>(T)).expand({T});
        c = c.defined() ? c.add(w) : w;
      }
      g = backward_from_saved(ctx, saved, c, g_preds, want, [&] {
        // The params follow the fixed entries; recorded: grad mode is on under create_graph=True.
        return flatten(at::TensorList(saved).slice(kAlso, n));
      });
    }
    if (want.theta) {  // views of the flat gradient, one per parameter
      int64_t offset = 0;
      size_t dim = 0;
      for (size_t i = 0; i < n; ++i) {
        const c10::IntArrayRef shape(shapes.data() + dim, static_cast<size_t>(ranks[i]));
        dim += static_cast<size_t>(ranks[i]);
        const int64_t numel = c10::multiply_integers(shape);
        if (ctx->needs_input_grad(i)) out[i] = g.theta.narrow(0, offset, numel).view(shape);
        offset += numel;
      }
    }
    if (want.lr) out[n] = g.lr;
    if (want.xs) out[n + 1] = g.xs;
    if (want.xq) out[n + 3] = g.xq;
    return out;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> maml_fwdbwd_autograd(
    const Tensor& theta, const Tensor& lr, const Tensor& x_support, const Tensor& y_support, const Tensor& x_query,
    const Tensor& y_query, const Tensor& qw, c10::IntArrayRef dims, int64_t activation, int64_t loss,
    bool first_order, bool need_lr_grad, bool need_x_grad) {
  const variable_list out = MamlFwdBwd::apply(theta, lr, x_support, y_support, x_query, y_query, qw, dims,
                                              activation, loss, first_order, need_lr_grad, need_x_grad);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

std::tuple<Tensor, Tensor, Tensor> maml_train_autograd(at::TensorList params, const Tensor& lr,
                                                       const Tensor& x_support, const Tensor& y_support,
                                                       const Tensor& x_query, const Tensor& y_query, const Tensor& qw,
                                                       c10::IntArrayRef dims, int64_t activation, int64_t loss,
                                                       bool first_order, bool need_lr_grad, bool need_x_grad) {
  bool any_grad = lr.requires_grad() || x_support.requires_grad() || x_query.requires_grad();
  for (const Tensor& p : params) any_grad = any_grad || p.requires_grad();
  if (!at::GradMode::is_enabled() || !any_grad) {  // nothing to differentiate: the forward alone
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return maml_train_forward(params, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss,
                              first_order, need_lr_grad, need_x_grad);
  }
  const variable_list out = MamlTrain::apply(params, lr, x_support, y_support, x_query, y_query, qw, dims,
                                             activation, loss, first_order, need_lr_grad, need_x_grad);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> maml_train_forward(at::TensorList params, const Tensor& lr,
                                                      const Tensor& x_support, const Tensor& y_support,
                                                      const Tensor& x_query, const Tensor& y_query, const Tensor& qw,
                                                      c10::IntArrayRef dims, int64_t activation, int64_t loss,
                                                      bool first_order, bool need_lr_grad, bool need_x_grad) {
  (void)need_lr_grad;
  (void)need_x_grad;
  static const auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastmaml::maml_fwd", "").typed<FwdFn>();
  auto [task_losses, preds] = fwd.call(flatten_plain(params), lr, x_support, y_support, x_query, y_query, qw, dims,
                                       activation, loss, first_order);
  Tensor mean = mean_of(task_losses);
  return {task_losses, preds, mean};
}

}  // namespace fastmaml
