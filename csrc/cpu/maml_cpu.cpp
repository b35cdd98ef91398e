// fastmaml: the CPU kernels of maml_fwd, maml_bwd, maml_fwdbwd, maml_adapt and weighted_task_sum
// (docs/kernels.md).
//
// Tasks are independent: at::parallel_for runs them on the intra-op threads, each thread with one scratch
// workspace reused for all its tasks (no allocation per task). The products at theta_0 read its
// transposed weights, made once per call (TransposedTheta). The per-task math is csrc/maml_task.h,
// looped over tasks in task_loops.inc, compiled for the baseline instruction set and for AVX2 + FMA;
// the AVX2 loops run when the CPU has them (FASTMAML_CPU_ISA=baseline forces the baseline ones).
// The meta-gradient is reduced over tasks deterministically: tasks are cut into chunks whose size
// depends only on the problem (never on the thread count), each chunk sums its tasks in order into its
// own partial row, and the partial rows are then summed in chunk order.

#include "maml_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../env_switch.h"
#include "../maml_task.h"
#include "../op_checks.h"
#include "task_loops.h"

namespace fastmaml {
namespace cpu {
namespace {

// One thread's scratch, zeroed, starting on a 64-byte boundary: task/drivers.h places its segments on
// 64-byte boundaries from there, so the products' vector loads do not split cache lines.
template <typename T>
class Workspace {
 public:
  explicit Workspace(int64_t n) : buf_(static_cast<size_t>(n) + 64 / sizeof(T)) {}
  T* data() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf_.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
  }

 private:
  std::vector<T> buf_;
};

// theta with its weights transposed (task::transpose_weights), shared read-only by the threads of one
// call: the task loops run the products at theta_0 from it.
template <typename T>
struct TransposedTheta {
  Workspace<T> buf;
  TransposedTheta(const task::Net& net, const T* theta) : buf(net.P) {
    task::transpose_weights(net, theta, buf.data());
  }
};

// out = parts[0] + parts[1] + ... (n rows of m, in row order), columns in parallel: the same bits for
// any thread count.
template <typename T>
void sum_parts(const T* parts, int64_t n, int64_t m, T* out) {
  at::parallel_for(0, m, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = 0;
    for (int64_t c = 0; c < n; ++c) {
      const T* r = parts + c * m;
      for (int64_t i = begin; i < end; ++i) out[i] += r[i];
    }
  });
}

using task::Net;

static_assert(kMaxDims == task::kMaxLayers + 1, "task_loops.h and task/layout.h disagree on the depth limit");

// Partial sums of the backward: at most this many chunks, and at most this many bytes of partial rows
// (but never fewer than kMinChunks chunks, so large models still run in parallel).
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunks = 16;
constexpr int64_t kPartialBytes = int64_t(256) << 20;

struct Sizes {
  Net net;
  int64_t T, Ns, Nq, K;
};

// The argument checks shared with the CUDA binding (csrc/op_checks.h) for the CPU kernels; classes are
// range-checked by each operation after making the targets contiguous (check_class_range).
Sizes check_args(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
                 const at::Tensor* xq, const at::Tensor* yq, c10::IntArrayRef dims, int64_t activation,
                 int64_t loss) {
  return checks::check_args<Sizes>(theta, lr, xs, ys, xq, yq, dims, activation, loss, c10::DeviceType::CPU, "CPU");
}

// The checks that read data run here, inside the operation, where the data is read anyway (Python checks
// only metadata on this path: fastmaml/_validate.py, `check_values`). Each is one pass over a small
// tensor; they raise ValueError, as the Python checks do.

// Out-of-range classes would index out of the logits.
void check_class_range(const at::Tensor& y, const char* name, int64_t n_classes) {
  const int64_t* p = y.const_data_ptr<int64_t>();
  const int64_t n = y.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < n_classes, "fastmaml: ", name, " holds class ", p[i],
                      " but must be in [0, ", n_classes - 1, "] (D_out = ", n_classes, " logits)");
  }
}

// A non-finite rate would turn every adapted parameter it touches into inf or nan. The message names the
// parameter (its index in params) and the step, found from the flat column.
template <typename T>
void check_lr_finite(const Net& net, const at::Tensor& lr) {
  const T* r = lr.const_data_ptr<T>();
  const int64_t K = lr.size(0), P = net.P;
  // x * 0 is 0 for a finite x and nan otherwise: one branch-free (vectorised) pass decides, and only a
  // failure looks for the culprit.
  T lanes[8] = {};  // independent sums: no reassociation needed to vectorise
  const int64_t n = K * P;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += r[i + j] * T(0);
  }
  for (; i < n; ++i) lanes[0] += r[i] * T(0);
  T poison = 0;
  for (int j = 0; j < 8; ++j) poison += lanes[j];
  if (poison == T(0)) return;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < P; ++j) {
      if (std::isfinite(r[k * P + j])) continue;
      int param = 0;
      for (int l = 0; l < net.L; ++l) {
        if (j >= net.w_off[l]) param = 2 * l;
        if (j >= net.b_off[l]) param = 2 * l + 1;
      }
      TORCH_CHECK_VALUE(false, "fastmaml: inner_lr must be finite, got ", r[k * P + j], " in the rates of params[",
                        param, "] at step ", k);
    }
  }
}

template <typename T>
void check_qw_finite(const at::Tensor& qw) {
  const T* w = qw.const_data_ptr<T>();
  for (int64_t k = 0; k < qw.numel(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(w[k]), "fastmaml: query_loss_weights must be finite, got ", w[k], " at step ", k);
  }
}

// The data checks every operation makes on its contiguous inputs (`qw` null for maml_adapt).
void check_values(const Net& net, const at::Tensor& lr, const at::Tensor* qw, int64_t loss, const at::Tensor& ys,
                  const at::Tensor* yq) {
  AT_DISPATCH_FLOATING_TYPES(lr.scalar_type(), "fastmaml_check_values", [&] {
    check_lr_finite<scalar_t>(net, lr);
    if (qw != nullptr) check_qw_finite<scalar_t>(*qw);
  });
  if (loss == task::kCrossEntropy) {
    check_class_range(ys, "y_support", net.dims[net.L]);
    if (yq != nullptr) check_class_range(*yq, "y_query", net.dims[net.L]);
  }
}

bool use_avx2() {
  // Read on every call (a getenv is cheap next to a kernel) so tests can compare the two builds.
  const char* isa = std::getenv("FASTMAML_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && avx2::compiled();
#else
  return false;
#endif
}

// FASTMAML_REVERSE_THETAS=recompute has the reverse sweep rebuild each theta_k instead of keeping K rows of
// P (task_backward's recompute_thetas); "keep" and "auto" keep them on the CPU, where a thread's workspace
// is cache, not a multiprocessor's shared memory. Read on every call, like FASTMAML_CPU_ISA, so tests can
// run both on the CPU (the CUDA kernels' "auto" recomputes for large workspaces).
// Case and spaces are ignored, as the backend's check of the value (cpu.py) ignores them.
bool recompute_thetas() { return env_word("FASTMAML_REVERSE_THETAS") == "recompute"; }

template <typename T>
LoopTable<T> loops() {
  return use_avx2() ? avx2::table<T>() : baseline::table<T>();
}

// The pointers shared by the three operations; query pointers stay null when `xq` is undefined.
template <typename T>
LoopArgs<T> loop_args(const Sizes& s, c10::IntArrayRef dims, int64_t activation, int64_t loss,
                      const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
                      const at::Tensor* xq, const at::Tensor* yq, const at::Tensor* qw) {
  LoopArgs<T> a{};
  for (size_t i = 0; i < dims.size(); ++i) a.dims[i] = dims[i];
  a.n_dims = static_cast<int>(dims.size());
  a.activation = static_cast<int>(activation);
  a.loss = static_cast<int>(loss);
  a.num_tasks = s.T;
  a.ns = s.Ns;
  a.nq = s.Nq;
  a.K = s.K;
  a.recompute_thetas = recompute_thetas();
  a.theta = theta.const_data_ptr<T>();
  a.lr = lr.const_data_ptr<T>();
  a.qw = qw == nullptr ? nullptr : qw->const_data_ptr<T>();
  a.xs = xs.const_data_ptr<T>();
  a.xq = xq == nullptr ? nullptr : xq->const_data_ptr<T>();
  const bool ce = loss == task::kCrossEntropy;
  a.ys_float = ce ? nullptr : ys.const_data_ptr<T>();
  a.ys_index = ce ? ys.const_data_ptr<int64_t>() : nullptr;
  a.yq_float = (yq == nullptr || ce) ? nullptr : yq->const_data_ptr<T>();
  a.yq_index = (yq == nullptr || !ce) ? nullptr : yq->const_data_ptr<int64_t>();
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> maml_fwd(const at::Tensor& theta_in, const at::Tensor& lr_in,
                                            const at::Tensor& xs_in, const at::Tensor& ys_in,
                                            const at::Tensor& xq_in, const at::Tensor& yq_in,
                                            const at::Tensor& qw_in, c10::IntArrayRef dims, int64_t activation,
                                            int64_t loss, bool first_order) {
  (void)first_order;  // read by the autograd formula only
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  checks::check_qw(qw_in, theta_in, s.K);
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous();
  check_values(s.net, lr, &qw, loss, ys, &yq);
  const int64_t d_out = s.net.dims[s.net.L];
  at::Tensor task_losses = at::empty({s.T}, theta.options());
  at::Tensor preds = at::empty({s.T, s.Nq, d_out}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_fwd_cpu", [&] {
    LoopArgs<scalar_t> args = loop_args<scalar_t>(s, dims, activation, loss, theta, lr, xs, ys, &xq, &yq, &qw);
    args.task_losses = task_losses.mutable_data_ptr<scalar_t>();
    args.preds = preds.mutable_data_ptr<scalar_t>();
    const LoopTable<scalar_t> table = loops<scalar_t>();
    TransposedTheta<scalar_t> theta_t(s.net, args.theta);
    args.theta_t = theta_t.buf.data();
    const int64_t ws = task::forward_workspace(s.net, std::max(s.Ns, s.Nq));
    at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> work(ws);
      table.forward(args, begin, end, work.data());
    });
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
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous(), gl = gl_in.contiguous(), gp = gp_in.contiguous();
  check_values(s.net, lr, &qw, loss, ys, &yq);

  // Chunks of tasks for the deterministic reduction: a function of (T, P, K, dtype) only.
  const int64_t row = P * (K + 1) * static_cast<int64_t>(theta.element_size());
  const int64_t by_memory = std::max<int64_t>(kMinChunks, kPartialBytes / std::max<int64_t>(row, 1));
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>({kMaxChunks, by_memory, T}));
  const int64_t chunk = (T + max_chunks - 1) / std::max<int64_t>(max_chunks, 1);
  const int64_t n_chunks = T == 0 ? 0 : (T + chunk - 1) / chunk;

  at::Tensor part_theta = at::zeros({std::max<int64_t>(n_chunks, 1), P}, theta.options());
  at::Tensor part_lr = need_lr_grad ? at::zeros({std::max<int64_t>(n_chunks, 1), K * P}, theta.options())
                                    : at::empty({0}, theta.options());
  at::Tensor g_xs = need_x_grad ? at::empty({T, s.Ns, d_in}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor g_xq = need_x_grad ? at::empty({T, s.Nq, d_in}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor g_theta = at::empty({P}, theta.options());
  at::Tensor g_lr = need_lr_grad ? at::empty({K, P}, theta.options()) : at::empty({0}, theta.options());

  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_bwd_cpu", [&] {
    LoopArgs<scalar_t> args = loop_args<scalar_t>(s, dims, activation, loss, theta, lr, xs, ys, &xq, &yq, &qw);
    args.g_task_losses = gl.const_data_ptr<scalar_t>();
    args.g_preds = gp.const_data_ptr<scalar_t>();
    args.first_order = first_order;
    args.chunk = chunk;
    scalar_t* pth = part_theta.mutable_data_ptr<scalar_t>();
    scalar_t* plr = need_lr_grad ? part_lr.mutable_data_ptr<scalar_t>() : nullptr;
    args.part_theta = pth;
    args.part_lr = plr;
    args.gxs = need_x_grad ? g_xs.mutable_data_ptr<scalar_t>() : nullptr;
    args.gxq = need_x_grad ? g_xq.mutable_data_ptr<scalar_t>() : nullptr;
    const LoopTable<scalar_t> table = loops<scalar_t>();
    TransposedTheta<scalar_t> theta_t(s.net, args.theta);
    args.theta_t = theta_t.buf.data();
    const int64_t ws =
        task::backward_workspace(s.net, K, std::max(s.Ns, s.Nq), need_lr_grad, args.recompute_thetas);
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> work(ws);
      table.backward(args, begin, end, work.data());
    });
    // Sum the partial rows in chunk order; columns in parallel (each column's order is fixed).
    sum_parts(pth, n_chunks, P, g_theta.mutable_data_ptr<scalar_t>());
    if (need_lr_grad) sum_parts(plr, n_chunks, K * P, g_lr.mutable_data_ptr<scalar_t>());
  });
  return {g_theta, g_lr, g_xs, g_xq};
}

namespace {

// Tasks per partial row of maml_fwdbwd_sum's sums: fixed, so the sums do not depend on the thread count.
constexpr int64_t kSumChunk = 8;

// maml_fwdbwd, and with `with_sums` also the rows summed over the tasks (theta's [P], the rates' [K, P]
// or [0]): chunks of kSumChunk tasks each sum their rows in task order while they are in cache, and the
// chunks' partial rows are added in chunk order.
std::vector<at::Tensor> fwdbwd_impl(const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in,
                                    const at::Tensor& ys_in, const at::Tensor& xq_in, const at::Tensor& yq_in,
                                    const at::Tensor& qw_in, c10::IntArrayRef dims, int64_t activation,
                                    int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad,
                                    bool with_sums) {
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, &xq_in, &yq_in, dims, activation, loss);
  const int64_t P = s.net.P, K = s.K, T = s.T, d_in = s.net.dims[0], d_out = s.net.dims[s.net.L];
  checks::check_qw(qw_in, theta_in, K);
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous(),
                   qw = qw_in.contiguous();
  check_values(s.net, lr, &qw, loss, ys, &yq);
  at::Tensor task_losses = at::empty({T}, theta.options());
  at::Tensor preds = at::empty({T, s.Nq, d_out}, theta.options());
  // Every row is written by its task (not added to): no zero fill.
  at::Tensor g_theta = at::empty({T, P}, theta.options());
  at::Tensor g_lr = need_lr_grad ? at::empty({T, K, P}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor g_xs = need_x_grad ? at::empty({T, s.Ns, d_in}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor g_xq = need_x_grad ? at::empty({T, s.Nq, d_in}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor sum_theta = with_sums ? at::empty({P}, theta.options()) : at::Tensor();
  at::Tensor sum_lr = with_sums && need_lr_grad ? at::empty({K, P}, theta.options()) : at::empty({0}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_fwdbwd_cpu", [&] {
    LoopArgs<scalar_t> args = loop_args<scalar_t>(s, dims, activation, loss, theta, lr, xs, ys, &xq, &yq, &qw);
    args.task_losses = task_losses.mutable_data_ptr<scalar_t>();
    args.preds = preds.mutable_data_ptr<scalar_t>();
    args.first_order = first_order;
    args.part_theta = g_theta.mutable_data_ptr<scalar_t>();
    args.part_lr = need_lr_grad ? g_lr.mutable_data_ptr<scalar_t>() : nullptr;
    args.gxs = need_x_grad ? g_xs.mutable_data_ptr<scalar_t>() : nullptr;
    args.gxq = need_x_grad ? g_xq.mutable_data_ptr<scalar_t>() : nullptr;
    const LoopTable<scalar_t> table = loops<scalar_t>();
    TransposedTheta<scalar_t> theta_t(s.net, args.theta);
    args.theta_t = theta_t.buf.data();
    const int64_t ws =
        task::backward_workspace(s.net, K, std::max(s.Ns, s.Nq), need_lr_grad, args.recompute_thetas);
    if (!with_sums) {
      at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
        Workspace<scalar_t> work(ws);
        table.forward_backward(args, begin, end, work.data());
      });
      return;
    }
    args.chunk = kSumChunk;
    const int64_t n_chunks = (T + kSumChunk - 1) / kSumChunk;
    at::Tensor parts_theta = at::empty({n_chunks, P}, theta.options());
    at::Tensor parts_lr = need_lr_grad ? at::empty({n_chunks, K * P}, theta.options()) : at::Tensor();
    args.sums_theta = parts_theta.mutable_data_ptr<scalar_t>();
    args.sums_lr = need_lr_grad ? parts_lr.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> work(ws);
      table.forward_backward_sums(args, begin, end, work.data());
    });
    sum_parts(args.sums_theta, n_chunks, P, sum_theta.mutable_data_ptr<scalar_t>());
    if (need_lr_grad) sum_parts(args.sums_lr, n_chunks, K * P, sum_lr.mutable_data_ptr<scalar_t>());
  });
  if (with_sums) return {task_losses, preds, g_theta, g_lr, g_xs, g_xq, sum_theta, sum_lr};
  return {task_losses, preds, g_theta, g_lr, g_xs, g_xq};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> maml_fwdbwd(
    const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
    const at::Tensor& xq, const at::Tensor& yq, const at::Tensor& qw, c10::IntArrayRef dims,
    int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad) {
  std::vector<at::Tensor> r = fwdbwd_impl(theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order,
                                          need_lr_grad, need_x_grad, false);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
maml_fwdbwd_sum(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& xs, const at::Tensor& ys,
                const at::Tensor& xq, const at::Tensor& yq, const at::Tensor& qw, c10::IntArrayRef dims,
                int64_t activation, int64_t loss, bool first_order, bool need_lr_grad, bool need_x_grad,
                bool keep_rows) {
  std::vector<at::Tensor> r = fwdbwd_impl(theta, lr, xs, ys, xq, yq, qw, dims, activation, loss, first_order,
                                          need_lr_grad, need_x_grad, true);
  if (!keep_rows) {  // the rows are made in cache on the way to the sums; dropped when not asked for
    r[2] = at::empty({0}, theta.options());
    r[3] = at::empty({0}, theta.options());
  }
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}


at::Tensor weighted_task_sum(const at::Tensor& rows_in, const at::Tensor& weights_in) {
  const int64_t T = checks::check_task_sum_args(rows_in, weights_in, c10::DeviceType::CPU, "CPU");
  const at::Tensor rows = rows_in.contiguous(), weights = weights_in.contiguous();
  const int64_t M = T == 0 ? 0 : rows.numel() / T;
  at::Tensor out = at::empty(rows.sizes().slice(1), rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fastmaml_weighted_task_sum_cpu", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const LoopTable<scalar_t> table = loops<scalar_t>();
    // Columns in parallel, each summed over the tasks in order: the same bits for any thread count.
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) { table.task_sum(r, w, T, M, begin, end, o); });
  });
  return out;
}

int64_t parallel_probe(int64_t n) {
  // How many threads at::parallel_for uses here for n single-item chunks: a check that the library was
  // built with the parallel backend torch uses (without -fopenmp it silently runs on one thread).
  std::mutex m;
  std::vector<int64_t> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num();
    std::lock_guard<std::mutex> guard(m);
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  });
  return static_cast<int64_t>(ids.size());
}

at::Tensor maml_adapt(const at::Tensor& theta_in, const at::Tensor& lr_in, const at::Tensor& xs_in,
                      const at::Tensor& ys_in, c10::IntArrayRef dims, int64_t activation, int64_t loss) {
  const Sizes s = check_args(theta_in, lr_in, xs_in, ys_in, nullptr, nullptr, dims, activation, loss);
  const at::Tensor theta = theta_in.contiguous(), lr = lr_in.contiguous(), xs = xs_in.contiguous(),
                   ys = ys_in.contiguous();
  check_values(s.net, lr, nullptr, loss, ys, nullptr);
  const int64_t P = s.net.P;
  at::Tensor thetas = at::empty({s.T, P}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_maml_adapt_cpu", [&] {
    LoopArgs<scalar_t> args = loop_args<scalar_t>(s, dims, activation, loss, theta, lr, xs, ys, nullptr, nullptr,
                                                  nullptr);
    args.thetas = thetas.mutable_data_ptr<scalar_t>();
    const LoopTable<scalar_t> table = loops<scalar_t>();
    const int64_t ws = task::adapt_workspace(s.net, s.Ns);
    at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> work(ws);
      table.adapt(args, begin, end, work.data());
    });
  });
  return thetas;
}

void class_range_check(const at::Tensor& y, const char* name, int64_t n_classes) {
  check_class_range(y, name, n_classes);
}

}  // namespace cpu
}  // namespace fastmaml
