// fastmaml: the per-task drivers of docs/kernels.md (task_forward, task_adapt and task_backward, the
// reverse sweep) and the layout of their scratch workspace (forward_workspace, adapt_workspace,
// backward_workspace). The CPU kernel calls them in a loop over tasks, the CUDA kernel with a thread
// block per task.
#pragma once

#include "config.h"
#include "layout.h"
#include "mlp.h"
#include "products.h"
#include "team.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// One task's data: support and query points, targets as floats (mse) or class indices (cross-entropy).
template <typename T>
struct TaskData {
  const T* xs;
  const T* ys_float;
  const int64_t* ys_index;
  int ns;
  const T* xq;
  const T* yq_float;
  const int64_t* yq_index;
  int nq;
};

// The support gradient g [P] at theta (overwritten); leaves the support pass's state in `a`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void support_grad(const Net& net, const TaskData<T>& td, const T* theta, Acts<T>& a, T* g,
                                     const Team& tm = Team(), const T* theta_t = nullptr) {
  forward(net, theta, td.xs, td.ns, a, tm, theta_t);
  const int64_t s = slice(net, a, net.L - 1);
  loss_and_grad(net, a.z + s, td.ys_float, td.ys_index, td.ns, T(1), a.d + s, a.p, tm);
  fill(g, net.P, T(0), tm);
  tm.sync();
  backward(net, theta, td.xs, td.ns, a, g, static_cast<T*>(nullptr), tm);
}

// Workspace segments start on 64-byte boundaries (given an aligned workspace): element counts are
// rounded up to 16. Unaligned, a third of the 32-byte loads of the products split cache lines.
FASTMAML_HD inline int64_t padded(int64_t n) { return (n + 15) & ~int64_t(15); }

// Elements of the saved state of one pass (z with h in it, d and the softmax p; no tangents).
FASTMAML_HD inline int64_t state_size(const Net& net, int64_t nmax) {
  return 2 * padded(nmax * net.width_sum) + padded(nmax * net.dims[net.L]);
}
// Elements of the tangents (rz, rh, rd) of one pass.
FASTMAML_HD inline int64_t tangents_size(const Net& net, int64_t nmax) { return 3 * padded(nmax * net.width_sum); }

// Acts whose forward state (z, h, d, p) lives at `state` and whose tangents (rz, rh, rd) at `tangents`.
template <typename T>
FASTMAML_HD inline Acts<T> make_split_acts(const Net& net, T* state, T* tangents, int64_t nmax) {
  const int64_t s = padded(nmax * net.width_sum);
  Acts<T> a;
  a.z = state;
  a.h = state;  // one buffer (see Acts)
  a.d = state + s;
  a.p = state + 2 * s;
  a.rz = tangents;
  a.rh = tangents + s;
  a.rd = tangents + 2 * s;
  a.nmax = nmax;
  return a;
}

// Workspace elements of `task_forward` / `task_adapt` / `task_backward` (nmax = max(Ns, Nq)).
FASTMAML_HD inline int64_t forward_workspace(const Net& net, int64_t nmax) {
  return acts_size(net, nmax) + 2 * net.P;
}
FASTMAML_HD inline int64_t adapt_workspace(const Net& net, int64_t nmax) {
  return acts_size(net, nmax) + net.P;
}
// Elements of the space the reverse sweep's tangents and its query state take in turn (task_backward: the
// Hessian-vector products use the tangents, the query passes between them the query state, never both
// at once): the larger of the two (the tangents, three width-sized segments against two and the output).
FASTMAML_HD inline int64_t tangents_or_query_size(const Net& net, int64_t nmax) {
  const int64_t t = tangents_size(net, nmax), q = state_size(net, nmax);
  return t > q ? t : q;
}
// The reverse sweep keeps the support state of steps 0..K-1, the tangents or a query state, the vectors u
// and v, and theta_1..theta_K with the support gradients g_0..g_{K-1} when the rates need a gradient
// (otherwise each g_k is computed in theta_{k+1}'s row and updated into it in place). With
// `recompute_thetas` it keeps one theta row instead, and rebuilds each theta_k from theta_{k+1} on the way
// back (task_backward): rows of P are most of the workspace of a narrow net (the 1-40-40-1 net at K = 5:
// 90.3 KiB a task kept, 62.6 recomputed, in float32; at K = 1 36.8).
// With `states_apart` it holds one support state, the current step's (task_backward's kept_states holds the
// others: backward_states more).
FASTMAML_HD inline int64_t backward_workspace(const Net& net, int64_t K, int64_t nmax, bool need_lr_grad,
                                              bool recompute_thetas = false, bool states_apart = false) {
  const int64_t rows = recompute_thetas ? 3 : K + (need_lr_grad ? K : 0) + 2;
  const int64_t in_work = states_apart && K > 1 ? 1 : K;
  return in_work * state_size(net, nmax) + tangents_or_query_size(net, nmax) + rows * padded(net.P);
}
// Elements of the support states the reverse sweep keeps apart from its workspace (kept_states): those of
// steps 0..K-2, the last one staying in the workspace.
FASTMAML_HD inline int64_t backward_states(const Net& net, int64_t K, int64_t nmax) {
  return K > 1 ? (K - 1) * state_size(net, nmax) : 0;
}

// Where rebuild_step puts each element of g_k: theta_k = theta_{k+1} + lr_k g_k in `theta` (when
// `rebuild`), and g_lr's row `gl` written or added to (when given). Also the store of a team product
// (team_mma.h's team_gemm_nn): element (r, c) of the layer whose weights start at w0.
template <typename T>
struct RebuildStore {
  T* theta;
  const T* lrk;
  T* gl;
  const T* v;
  int64_t w0;
  int din;
  bool rebuild, write_rows;
  FASTMAML_HD void update(int64_t i, T gi) const {
    if (rebuild) theta[i] += lrk[i] * gi;  // theta_k = theta_{k+1} + lr_k g_k
    if (gl != nullptr) gl[i] = write_rows ? -(gi * v[i]) : gl[i] - gi * v[i];
  }
  FASTMAML_HD void operator()(int r, int c, T gi) const { update(w0 + static_cast<int64_t>(r) * din + c, gi); }
};

// The reverse sweep's step k with rebuilt thetas (task_backward's recompute_thetas): g_k recomputed from
// the state step k's support pass left in `a` (each layer's h and d): sum_n d[n, r] h[n, c] for W_l[r, c],
// sum_n d[n, r] for b_l[r] (h_{-1} = x), each element put where RebuildStore says as soon as it is summed:
// no gradient row and no fill. A team sums each W_l as backward does, a team product whose owners finish
// their elements as they store them: in point order with the register tiles (the bits of a loop per
// element), in the tensor cores' steps of 8 and 4 under FASTMAML_CUDA_MMA=1 (then g_k's bits are
// backward's); the biases element by element, in point order. (Element by element for the weights too,
// each multiply-add took two loads: about twice the instructions of the 2 x 2 tiles' loop.)
// The elements' owners differ from the loops over rows of P: the caller syncs before another rank reads
// theta or gl, or writes v. Out of line on the host (config.h).
template <typename T, typename Team>
FASTMAML_HD FASTMAML_HOST_NOINLINE void rebuild_step(const Net& net, const TaskData<T>& td, const Acts<T>& a,
                                                     const T* lrk, bool rebuild, T* theta, T* gl, bool write_rows,
                                                     const T* v, const Team& tm) {
  // Opaque pointers (team.h): the elementwise passes over rows of P.
  RebuildStore<T> st{opaque(theta), opaque(lrk), opaque(gl), opaque(v), 0, 0, rebuild, write_rows};
  const int N = td.ns;
  for (int l = 0; l < net.L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    st.w0 = net.w_off[l];
    st.din = din;
    const int64_t b0 = net.b_off[l];
    const T* d = opaque(a.d + slice(net, a, l));
    const T* in = opaque(l == 0 ? td.xs : a.h + slice(net, a, l - 1));
    if (tm.size() > 1) {
      team_gemm_nn(dout, din, N, T(1), d, 1, dout, in, din, st, tm, tm.tile(dout, din));  // d^T h
    } else {
      for (int r = 0; r < dout; ++r) {
        for (int c = 0; c < din; ++c) {
          T acc = 0;
          for (int n = 0; n < N; ++n) acc += d[n * dout + r] * in[n * din + c];
          st(r, c, acc);
        }
      }
    }
    for_each(tm, dout, [&](int64_t j) {  // the biases (a team of one walks them in order)
      T acc = 0;
      for (int n = 0; n < N; ++n) acc += d[n * dout + j];
      st.update(b0 + j, acc);
    });
  }
}

// theta_K of one task, written to `theta_out [P]`. `lr [K, P]`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void task_adapt(const Net& net, const TaskData<T>& td, const T* theta0, const T* lr, int K,
                                   T* theta_out, T* work, const Team& tm = Team()) {
  Acts<T> a = make_acts(net, work, td.ns);
  T* g = work + acts_size(net, td.ns);
  copy(theta0, theta_out, net.P, tm);
  tm.sync();
  for (int k = 0; k < K; ++k) {
    support_grad(net, td, theta_out, a, g, tm);
    sgd_update(theta_out, lr + k * net.P, g, theta_out, net.P, tm);
  }
}

// The forward of maml_fwd for one task: returns sum_k qw[k] * L_query(theta_k) (to every rank of the
// team) and writes the query output at theta_K to `preds [Nq, D_out]`. Query passes whose weight is 0
// are skipped (k < K).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline T task_forward(const Net& net, const TaskData<T>& td, const T* theta0, const T* lr, int K,
                                  const T* qw, T* preds, T* work, const Team& tm = Team(),
                                  const T* theta0_t = nullptr) {
  const int64_t nmax = td.ns > td.nq ? td.ns : td.nq;
  Acts<T> a = make_acts(net, work, nmax);
  T* theta = work + acts_size(net, nmax);
  T* g = theta + net.P;
  const int64_t s = slice(net, a, net.L - 1);
  copy(theta0, theta, net.P, tm);
  tm.sync();
  T total = 0;
  for (int k = 0; k <= K; ++k) {
    const T* theta_t = k == 0 ? theta0_t : nullptr;
    if (k == K || qw[k] != T(0)) {
      forward(net, theta, td.xq, td.nq, a, tm, theta_t);
      total += qw[k] * loss_and_grad(net, a.z + s, td.yq_float, td.yq_index, td.nq, T(0), a.d + s, a.p, tm);
    }
    if (k == K) break;
    support_grad(net, td, theta, a, g, tm, theta_t);
    sgd_update(theta, lr + k * net.P, g, theta, net.P, tm);
  }
  copy(a.z + s, preds, static_cast<int64_t>(td.nq) * net.dims[net.L], tm);
  tm.sync();
  return total;
}

// theta_k in the reverse sweep's storage: theta_0 is the caller's, theta_1..theta_K are rows of `stride`
// elements in scratch, or with `one_row` (recomputed thetas) the one row that holds the current theta_k.
template <typename T>
FASTMAML_HD inline const T* theta_at(const T* theta0, const T* thetas, int k, int64_t stride, bool one_row) {
  return k == 0 ? theta0 : one_row ? thetas : thetas + (k - 1) * stride;
}

// The reverse sweep of maml_bwd for one task (docs/kernels.md). Recomputes theta_1..theta_K from theta0
// in the workspace (the forward saves nothing), keeping each step's support pass for its Hessian-vector
// product. `c` is the cotangent of the task loss, `gpreds [Nq, D_out]` that of the query output.
// Adds dL/dtheta_0 to `g_theta [P]` and, when given, -(g_k * v) to `g_lr [K, P]`; writes the input
// gradients to `gxs [Ns, D_in]` and `gxq [Nq, D_in]` when given. The workspace holds
// `backward_workspace(net, K, max(Ns, Nq), g_lr != nullptr, recompute_thetas)` elements. A team adds to
// g_theta and g_lr element i from rank i mod size(), so tasks run one after another by one team may share
// those rows.
//
// Fused forward and backward (maml_fwdbwd): with `preds_out [Nq, D_out]` given, also writes the query
// output at theta_K there and returns sum_k qw[k] * L_query(theta_k), as task_forward does (every
// weighted query loss is evaluated on the way when c != 0; the caller passes c = 1), and g_theta and
// g_lr are this task's own rows, written rather than added to (no zero-filled buffers). `gpreds` may
// then be null (no cotangent of the query output). Returns 0 without preds_out.
//
// `theta0_t` (optional, host loops): theta0 with its weights transposed (transpose_weights), used by
// the passes at theta0; task_forward takes it too.
//
// `add_rows` (with preds_out): add to g_theta and g_lr as without preds_out, so that the tasks one team
// runs in turn sum their gradients into one row (the CUDA maml_fwdbwd_sum, which keeps no per-task rows).
//
// `recompute_thetas`: keep one theta row, and on the way back rebuild theta_k = theta_{k+1} + lr_k g_k, with
// g_k recomputed from step k's kept support state (rebuild_step). theta_k comes back within a rounding of
// each element (theta_{k+1} was rounded once), so the sweep's results differ from the kept rows' in the
// last bits; it costs the parameter products of one backward per step (K - 1 of them, K with g_lr) and
// saves K - 1 rows of P (2K - 1 with g_lr).
//
// `kept_states` (optional, with K > 1): `backward_states(net, K, max(Ns, Nq))` elements where the support
// states of steps 0..K-2 are kept, while the workspace (`backward_workspace(..., states_apart = true)`)
// holds one state, the step's at hand: each inner step's state is copied out after its support pass and
// copied back in before its reverse step (the last step's stays). The CUDA kernels keep them in global
// memory, so that a shared workspace of a deep inner loop holds more tasks a multiprocessor while every
// product still reads shared memory. The same arithmetic either way.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD FASTMAML_FORCE_INLINE T task_backward(const Net& net, const TaskData<T>& td, const T* theta0,
                                                  const T* lr, int K, const T* qw, T c, const T* gpreds,
                                                  bool first_order, T* g_theta, T* g_lr, T* gxs, T* gxq, T* work,
                                                  const Team& tm = Team(), T* preds_out = nullptr,
                                                  const T* theta0_t = nullptr, bool add_rows = false,
                                                  bool recompute_thetas = false, T* kept_states = nullptr) {
  const bool write_rows = preds_out != nullptr && !add_rows;  // this task's own rows: written, not added to
  const bool one_row = recompute_thetas;
  const int64_t P = net.P, Pp = padded(P);
  const int64_t nmax = td.ns > td.nq ? td.ns : td.nq;
  const int64_t st = state_size(net, nmax);
  // Support state of steps 0..K-1: K segments of the workspace; or, apart, one segment (the stage: the step
  // at hand's state) with steps 0..K-2 copied to kept_states.
  const bool apart = kept_states != nullptr && K > 1;
  T* states = work;
  T* tangents = work + (apart ? 1 : K) * st;  // rz, rh, rd; between the HVPs, the query state
  T* thetas = tangents + tangents_or_query_size(net, nmax);  // theta_1 .. theta_K, K rows of Pp (one_row: one)
  T* grads = thetas + (one_row ? 1 : K) * Pp;    // g_0 .. g_{K-1} (K rows) with g_lr and kept rows, else none
  T* u = grads + (g_lr != nullptr && !one_row ? K : 0) * Pp;  // one_row: also each g_k of the inner loop
  T* v = u + Pp;
  // The query state in the tangents' space: each query pass (forward, loss, backward) runs between two
  // Hessian-vector products, and every one of these passes syncs before it returns. q has no tangents.
  Acts<T> q = make_split_acts(net, tangents, tangents, nmax);
  q.rz = q.rh = q.rd = nullptr;
  const int64_t s = slice(net, q, net.L - 1);
  const int D = net.dims[net.L];
  const int64_t m_out = static_cast<int64_t>(td.nq) * D;

  for (int k = 0; k < K; ++k) {
    Acts<T> a = make_split_acts(net, apart ? states : states + k * st, tangents, nmax);
    // Kept rows without g_lr: g_k is not kept, it lands in theta_{k+1}'s row and the update overwrites it
    // there. One row: g_k in u's row, theta_{k+1} over theta_k.
    T* g = one_row ? u : g_lr != nullptr ? grads + k * Pp : thetas + k * Pp;
    const T* th = theta_at(theta0, thetas, k, Pp, one_row);
    support_grad(net, td, th, a, g, tm, k == 0 ? theta0_t : nullptr);
    // Apart: the state out (support_grad syncs before it returns; sgd_update syncs before the next step
    // writes the stage again).
    if (apart && k < K - 1) copy(states, kept_states + k * st, st, tm);
    sgd_update(th, lr + k * P, g, one_row ? thetas : thetas + k * Pp, P, tm);
  }
  if (gxs != nullptr) fill(gxs, static_cast<int64_t>(td.ns) * net.dims[0], T(0), tm);
  if (gxq != nullptr) fill(gxq, static_cast<int64_t>(td.nq) * net.dims[0], T(0), tm);

  // v = dL/dtheta_K: the weighted query loss at theta_K plus the cotangent of the query output.
  T total = 0;
  fill(v, P, T(0), tm);
  tm.sync();
  {
    const T* th = theta_at(theta0, thetas, K, Pp, one_row);
    forward(net, th, td.xq, td.nq, q, tm, K == 0 ? theta0_t : nullptr);
    const T loss_K = loss_and_grad(net, q.z + s, td.yq_float, td.yq_index, td.nq, c * qw[K], q.d + s, q.p, tm);
    if (preds_out != nullptr) {
      total = qw[K] * loss_K;
      copy(q.z + s, preds_out, m_out, tm);
    }
    T* qd = q.d + s;
    if (gpreds != nullptr) for_each(tm, m_out, [&](int64_t j) { qd[j] += gpreds[j]; });
    tm.sync();
    backward(net, th, td.xq, td.nq, q, v, gxq, tm);
  }

  u = opaque(u);  // the elementwise passes over rows of P below (team.h)
  v = opaque(v);
  for (int k = K - 1; k >= 0; --k) {
    const T* lrk = opaque(lr + k * P);
    if (apart && k < K - 1) {
      // Step k's state back in (the last step's never left): every pass of step k + 1 that reads the stage
      // (rebuild_step, hvp) is followed by a sync before this point.
      copy(kept_states + k * st, states, st, tm);
      tm.sync();
    }
    Acts<T> a = make_split_acts(net, apart ? states : states + k * st, tangents, nmax);
    T* gl = g_lr != nullptr ? opaque(g_lr + k * P) : nullptr;
    if (one_row && (k > 0 || gl != nullptr)) {
      // g_k recomputed where theta_k is rebuilt from it (k > 0) or g_lr needs it.
      rebuild_step(net, td, a, lrk, k > 0, thetas, gl, write_rows, v, tm);
    } else if (gl != nullptr) {
      // Plain loops, apart: on the CPU they vectorise (one loop for both modes, with u below in it, made the
      // cpu backend's training step 1.4-1.6x slower at K = 5).
      const T* g = opaque(grads + k * Pp);
      if (write_rows) {
        for_each(tm, P, [&](int64_t i) { gl[i] = -(g[i] * v[i]); });
      } else {
        for_each(tm, P, [&](int64_t i) { gl[i] -= g[i] * v[i]; });
      }
    }
    if (!first_order) for_each(tm, P, [&](int64_t i) { u[i] = lrk[i] * v[i]; });
    tm.sync();  // hvp and the query pass below read all of u (and theta_k) and write v with their own owners
    const T* th = theta_at(theta0, thetas, k, Pp, one_row);
    if (!first_order) {
      // v -= H_k u; gxs -= d/dx_s (g_k . u)
      hvp(net, th, u, td.xs, td.ns, a, T(-1), v, gxs, tm, k == 0 ? theta0_t : nullptr);
    }
    const T w = c * qw[k];
    if (w != T(0)) {
      forward(net, th, td.xq, td.nq, q, tm, k == 0 ? theta0_t : nullptr);
      const T loss_k = loss_and_grad(net, q.z + s, td.yq_float, td.yq_index, td.nq, w, q.d + s, q.p, tm);
      if (preds_out != nullptr) total += qw[k] * loss_k;
      backward(net, th, td.xq, td.nq, q, v, gxq, tm);
    }
  }
  g_theta = opaque(g_theta);
  if (write_rows) {
    for_each(tm, P, [&](int64_t i) { g_theta[i] = v[i]; });
  } else {
    for_each(tm, P, [&](int64_t i) { g_theta[i] += v[i]; });
  }
  tm.sync();
  return total;
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
