// fastmaml: one task of one-step MAML with theta_1 never formed (the `onestep` kernels, docs/kernels.md).
//
// Every task starts from the same theta_0 and takes one SGD step on its support loss, so each adapted
// weight matrix is theta_0's plus a matrix of rank at most Ns:
//     W1_l = W_l - rW_l D_l^T H_l      (D_l = dL_s/dz_l [Ns, out], H_l = layer l's support inputs [Ns, in])
//     b1_l = b_l - rb_l sum_n D_l[n]
// and every product with W1_l is a product with the shared W_l plus a correction through an [Nq, Ns]
// matrix of the task's own (`gram_in` = H'_l H_l^T, `gram_d` = D'_l D_l^T). The meta-gradient
//     g = v - H_s (R v),   v = grad L_q(theta_1),  R = the rates per tensor,  H_s = the support Hessian at theta_0
// is never formed either: per layer it is a sum of outer products, written out as factor rows
//     g_[W_l | b_l] = U_l^T V_l,   U_l = [D'_l ; Ddot_l ; D_l],   V_l = [H'_l | 1 ; -H_l | -1 ; -Hdot_l | 0]
// (R = Nq + 2 Ns rows; first order: the first Nq only), so the caller sums tasks with one matrix
// product per layer ([out, T R] x [T R, in + 1]). Ddot and Hdot are the tangents of the Hessian-vector
// product along R v, whose W part is rW_l D'_l^T H'_l: rank Nq, so its products go through the same
// two Gram matrices.
//
// MSE or cross-entropy loss, ReLU or tanh hidden layers, one rate per tensor (2 L values: rW_l, rb_l). The
// loss of a task is its query loss at theta_1; its cotangent `cot` and the query output's `g_pred` seed
// the query backward (the training call's fused pass takes cot = 1 and none, and the caller scales U's rows
// by each task's cotangent: D' and Ddot are linear in the seed, D is not but pairs with Hdot, which is, so
// every outer product U_r^T V_r is).
//
// The work of a task is shared by a team (team.h): on a GPU one warp, whose syncs are __syncwarp; on the
// CPU a team of one. Every product is `product` (onestep_loops.h): by default `cols_product`, where a rank
// owns units of one output column and one chunk of points, keeps the chunk in registers, and reads the left
// operand's rows as one value for the ranks on that chunk (a broadcast on a GPU) and the right operand's row
// across the team (consecutive columns: coalesced), so theta_0's weights are read both as W (for D W) and
// transposed (for H W^T): `wt` holds the transposes; for a team that asks for them, tensor-core tiles of 16 x
// 16 outputs a warp.
#pragma once

#include "config.h"
#include "layout.h"
#include "mlp.h"
#include "onestep_loops.h"
#include "team.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {
namespace onestep {

// One point's cross-entropy at logits z [D] with class `cls` (mlp.h's softmax_into): d = c (softmax(z) -
// onehot(cls)); returns the point's loss. A class outside [0, D) (possible where the data checks are off)
// poisons the task with NaN, as mlp.h's loss_and_grad does, instead of reading past the logits.
template <typename T>
FASTMAML_HD inline T ce_point(const T* z, int D, int64_t cls, T c, T* d) {
  const T lse = softmax_into(z, D, d);
  if (cls < 0 || cls >= D) {
    const T nan = static_cast<T>(::nan(""));
    for (int i = 0; i < D; ++i) d[i] = nan;
    return nan;
  }
  for (int i = 0; i < D; ++i) d[i] *= c;
  d[cls] -= c;
  return lse - z[cls];
}

// The team's layout of one task's scratch (elements; `width_sum` S, support and query points ns, nq).
// Every [N, S] buffer holds each layer's [N, D_{l+1}] slice at N * act_off[l], as Acts does. `total` is the
// scratch task() uses; past it, up to `with_inputs`, the task's inputs xs and xq where the CUDA kernel's
// shared-operand form copies them (csrc/cuda/onestep.cu). Buffers whose lives do not overlap share a place,
// so that more warps' scratch fits in a multiprocessor's shared memory:
// - Ddot (rd) takes D''s place (dq): the tangents' backward makes it after their forward has read D' for the
//   last time, and U's D' rows are written out before the tangents begin.
// - With ReLU, h_dot (rh) takes D's place (ds): once the tangents begin only tanh's s'' reads D, and U's D
//   rows go out with D''s before them. The tangents' z_dot (rz) has a buffer of its own only with tanh,
//   whose s'' reads it after h_dot is made; otherwise z_dot is built where h_dot goes (no other read of
//   z_dot follows, and an output layer's h_dot is its z_dot).
// At the sinusoid size (float, ReLU, with the input copies) that is 15.6 KiB a warp (22.0 before the first
// sharing, 25.2 before z_dot's): 13 warps' scratch beside theta_0 in a multiprocessor's shared memory, not 9.
struct Layout {
  int64_t hs, ds, hq, dq, rz, rh, rd, ga, gb, vb, total, xs, xq, with_inputs;
};

FASTMAML_HD inline Layout layout(const Net& net, int ns, int nq) {
  Layout w;
  const int64_t S = net.width_sum, L = net.L;
  int64_t o = 0;
  auto take = [&](int64_t n) {
    const int64_t at = o;
    o += (n + 15) & ~int64_t(15);  // 64-byte segments in float32
    return at;
  };
  const bool own_rh = net.activation == kTanh;  // tanh's s'' reads D after h_dot is made
  w.hs = take(ns * S);
  w.ds = take(ns * S);
  w.hq = take(nq * S);
  w.dq = take((nq > ns ? nq : ns) * S);  // D', then Ddot [ns, S]
  w.rd = w.dq;
  w.rh = own_rh ? take(ns * S) : w.ds;
  w.rz = own_rh ? take(ns * S) : w.rh;
  w.ga = take(L * nq * ns);
  w.gb = take(L * nq * ns);
  w.vb = take(S);
  w.total = o;
  w.xs = take(ns * net.dims[0]);
  w.xq = take(nq * net.dims[0]);
  w.with_inputs = o;
  return w;
}

// Rows of a task's factors (R) and the elements of one task's U and V over all layers.
FASTMAML_HD inline int factor_rows(int ns, int nq, bool first_order) { return first_order ? nq : nq + 2 * ns; }
// Per row of R: U's elements over all layers (sum D_{l+1}) and V's (sum (D_l + 1)).
FASTMAML_HD inline int64_t u_width(const Net& net) { return net.width_sum; }
FASTMAML_HD inline int64_t v_width(const Net& net) {
  int64_t s = 0;
  for (int l = 0; l < net.L; ++l) s += net.dims[l] + 1;
  return s;
}

// One task's inputs and outputs. U and V hold the rows of every task of the call layer by layer: layer
// l's block is [T, R, D_{l+1}] (U) and [T, R, D_l + 1] (V), starting at T R sum_{j<l} D_{j+1} (U) and
// T R sum_{j<l} (D_j + 1) (V), so that each layer's block is one [T R, width] matrix.
template <typename T>
struct Task {
  const T *xs, *ys, *xq, *yq;  // [ns, D_in], [ns, D_out] (mse), [nq, D_in], [nq, D_out] (mse)
  const int64_t *ys_index, *yq_index;  // [ns], [nq]: the classes (cross-entropy)
  T cot;                       // the cotangent of the task's loss
  const T* g_pred;             // [nq, D_out] or null
  T* loss;                     // the task's query loss at theta_1
  T* pred;                     // [nq, D_out]: the query output at theta_1 (or null)
  T *U, *V;                    // the call's factor rows (null: losses and outputs only)
  T* rate_grad;                // [2 L]: dL/d rW_l, dL/d rb_l of the seeded loss (null: none)
  int64_t n_tasks, index;      // the call's tasks and this one's place among them
};

// One task (`t`). theta [P] is theta_0 (flat: W_l [out, in], b_l [out]), wt the transposes of its weights
// (W_l^T [in, out] at w_off[l]; biases unread), rates [2 L] (rW_l, rb_l). `work` has
// layout(net, ns, nq).total elements. Every rank of the team calls it; it syncs before it returns.
template <typename T, typename Team>
FASTMAML_HD FASTMAML_FORCE_INLINE void task(const Net& net, const T* theta, const T* wt, const T* rates, int ns,
                                            int nq, bool first_order, const Task<T>& t, T* work, const Team& tm) {
  const int L = net.L, act = net.activation, dy = net.dims[L];
  const Layout w = layout(net, ns, nq);
  T *hs = work + w.hs, *ds = work + w.ds, *hq = work + w.hq, *dq = work + w.dq;
  T *rz = work + w.rz, *rh = work + w.rh, *rd = work + w.rd, *ga = work + w.ga, *gb = work + w.gb;
  T* vb = work + w.vb;
  const int gsz = nq * ns;
  auto off = [&](int l) { return static_cast<int>(net.act_off[l]); };
  auto layer_act = [&](int l) { return l == L - 1 ? kNoAct : act; };
  auto weights = [&](int l) { return theta + net.w_off[l]; };
  auto weights_t = [&](int l) { return wt + net.w_off[l]; };

  // The support pass at theta_0: z_l = H_l W_l^T + b_l, h_l = s(z_l) (H_0 = xs, H_l = h_{l-1}).
  for (int l = 0; l < L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* in = l == 0 ? t.xs : hs + ns * off(l - 1);
    BiasAct<T> f{theta + net.b_off[l], hs + ns * off(l), dout, layer_act(l)};
    product(ns, din, dout, in, din, 1, weights_t(l), dout, 1, f, tm);
    tm.sync();
  }
  // D_{L-1} = dL_s/dz (mse: 2 (z - y) / (Ns D_out); cross-entropy: (softmax(z) - onehot(y)) / Ns), then
  // D_{l-1} = (D_l W_l) s'(z_{l-1}).
  {
    const T* z = hs + ns * off(L - 1);
    T* d = ds + ns * off(L - 1);
    if (net.loss == kMse) {
      const int m = ns * dy;
      const T c = T(2) / static_cast<T>(m);
      for_each(tm, m, [&](int64_t j) { d[j] = c * (z[j] - t.ys[j]); });
    } else {
      for (int n = tm.rank(); n < ns; n += tm.size()) {
        ce_point(z + n * dy, dy, t.ys_index[n], T(1) / static_cast<T>(ns), d + n * dy);
      }
    }
    tm.sync();
  }
  for (int l = L - 1; l >= 1; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    ActGradStore<T> f{hs + ns * off(l - 1), ds + ns * off(l - 1), din, act};
    product(ns, dout, din, ds + ns * off(l), dout, 1, weights(l), din, 1, f, tm);
    tm.sync();
  }

  // The query pass at theta_1: z'_l = H'_l W_l^T + b1_l - rW_l gram_in_l D_l, gram_in_l = H'_l H_l^T [nq, ns],
  // b1_l = b_l - rb_l sum_n D_l[n].
  for (int l = 0; l < L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T rw = rates[2 * l], rb = rates[2 * l + 1];
    const T* in_q = l == 0 ? t.xq : hq + nq * off(l - 1);
    const T* in_s = l == 0 ? t.xs : hs + ns * off(l - 1);
    const T* d = ds + ns * off(l);
    const T* b = theta + net.b_off[l];
    T* g = ga + l * gsz;
    T* b1 = vb + off(l);
    Store<T> sg{g, ns, nullptr};
    product(nq, din, ns, in_q, din, 1, in_s, 1, din, sg, tm);
    for_each(tm, dout, [&](int64_t m) {
      T s = 0;
      for (int n = 0; n < ns; ++n) s += d[n * dout + m];
      b1[m] = b[m] - rb * s;
    });
    tm.sync();
    T* z = hq + nq * off(l);
    Store<T> f0{z, dout, b1};
    product(nq, din, dout, in_q, din, 1, weights_t(l), dout, 1, f0, tm);
    AddAct<T> f1{z, dout, layer_act(l), -rw};
    product(nq, ns, dout, g, ns, 1, d, dout, 1, f1, tm);
    tm.sync();
  }
  // The query loss, and its gradient seeding the query backward: D'_{L-1} = cot dL_q/dz' + g_pred.
  {
    const int m = nq * dy;
    const T* z = hq + nq * off(L - 1);
    T* d = dq + nq * off(L - 1);
    T part = 0, count = T(m);
    if (net.loss == kMse) {
      const T c = T(2) / static_cast<T>(m);
      for_each(tm, m, [&](int64_t j) {
        const T r = z[j] - t.yq[j];
        part += r * r;
        d[j] = t.cot * c * r + (t.g_pred != nullptr ? t.g_pred[j] : T(0));
      });
    } else {
      count = T(nq);
      for (int n = tm.rank(); n < nq; n += tm.size()) {
        T* dn = d + n * dy;
        part += ce_point(z + n * dy, dy, t.yq_index[n], t.cot / static_cast<T>(nq), dn);
        if (t.g_pred != nullptr) {
          for (int i = 0; i < dy; ++i) dn[i] += t.g_pred[n * dy + i];
        }
      }
    }
    if (t.pred != nullptr) for_each(tm, m, [&](int64_t j) { t.pred[j] = z[j]; });
    const T total = tm.sum(part);  // syncs
    if (tm.rank() == 0 && t.loss != nullptr) *t.loss = total / count;
  }
  if (t.U == nullptr) {
    tm.sync();
    return;
  }
  // The query backward at theta_1: D'_{l-1} = (D'_l W_l - rW_l gram_d_l H_l) s'(z'_{l-1}), gram_d_l = D'_l D_l^T.
  for (int l = L - 1; l >= 1; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T rw = rates[2 * l];
    T* g = gb + l * gsz;
    Store<T> sg{g, ns, nullptr};
    product(nq, dout, ns, dq + nq * off(l), dout, 1, ds + ns * off(l), 1, dout, sg, tm);
    tm.sync();
    T* e = dq + nq * off(l - 1);
    Store<T> f0{e, din, nullptr};
    product(nq, dout, din, dq + nq * off(l), dout, 1, weights(l), din, 1, f0, tm);
    GradAct<T> f1{hq + nq * off(l - 1), e, din, act, -rw, nullptr, nullptr};
    product(nq, ns, din, g, ns, 1, hs + ns * off(l - 1), din, 1, f1, tm);
    tm.sync();
  }
  if (t.rate_grad != nullptr) {
    // The rates' gradients: theta_1 = theta_0 - r_l g_l, so dL/dr_l = -<v_l, g_l> with v = D'^T H' and
    // g = D^T H: -sum(gram_d_l * gram_in_l) for W_l (both [nq, ns]), -(sum_n D_l[n]) . (sum_q D'_l[q]) for
    // b_l. Order does not enter: r_l moves theta_1 alone. gram_d of layer 0 is made here (the backward
    // above stops at layer 1).
    {
      Store<T> sg{gb, ns, nullptr};
      product(nq, net.dims[1], ns, dq, net.dims[1], 1, ds, 1, net.dims[1], sg, tm);
      tm.sync();
    }
    for (int l = 0; l < L; ++l) {
      const int dout = net.dims[l + 1];
      const T* g = gb + l * gsz;
      const T* a = ga + l * gsz;
      const T* dsl = ds + ns * off(l);
      const T* dql = dq + nq * off(l);
      T pw = 0, pb = 0;
      for_each(tm, gsz, [&](int64_t j) { pw += g[j] * a[j]; });
      for_each(tm, dout, [&](int64_t i) {
        T sd = 0, sq = 0;
        for (int n = 0; n < ns; ++n) sd += dsl[n * dout + i];
        for (int q = 0; q < nq; ++q) sq += dql[q * dout + i];
        pb += sd * sq;
      });
      const T w = tm.sum(pw), b = tm.sum(pb);
      if (tm.rank() == 0) t.rate_grad[2 * l] = -w, t.rate_grad[2 * l + 1] = -b;
    }
  }
  // U = [D' ; Ddot ; D] layer by layer: its D' and D rows go out now, before the tangents make Ddot in D''s
  // place and (ReLU) h_dot in D's (layout()); the tangents' first sync orders these reads before those writes.
  auto u_rows = [&](int l, int row, int rows, const T* src) {
    const int dout = net.dims[l + 1], R = factor_rows(ns, nq, first_order);
    T* U = t.U + t.n_tasks * R * off(l) + (t.index * R + row) * dout;
    for_each(tm, int64_t(rows) * dout, [&](int64_t j) { U[j] = src[j]; });
  };
  for (int l = 0; l < L; ++l) {
    u_rows(l, 0, nq, dq + nq * off(l));
    if (!first_order) u_rows(l, nq + ns, ns, ds + ns * off(l));
  }
  if (!first_order) {
    // The tangents along u = R v at theta_0: z_dot_l = Hdot_l W_l^T + rW_l gram_in_l^T D'_l + rb_l sum_q D'_l[q]
    // (Hdot_0 = 0), h_dot_l = s'(z_l) z_dot_l.
    for (int l = 0; l < L; ++l) {
      const int din = net.dims[l], dout = net.dims[l + 1];
      const T rw = rates[2 * l], rb = rates[2 * l + 1];
      const T* dql = dq + nq * off(l);
      T* bt = vb + off(l);
      for_each(tm, dout, [&](int64_t m) {
        T s = 0;
        for (int q = 0; q < nq; ++q) s += dql[q * dout + m];
        bt[m] = rb * s;
      });
      tm.sync();
      T* zd = rz + ns * off(l);
      if (l > 0) {
        Store<T> f0{zd, dout, bt};
        product(ns, din, dout, rh + ns * off(l - 1), din, 1, weights_t(l), dout, 1, f0, tm);
      }
      TangentAct<T> f1{zd, rh + ns * off(l), hs + ns * off(l), l > 0 ? nullptr : bt, dout, layer_act(l), rw};
      product(ns, nq, dout, ga + l * gsz, 1, ns, dql, dout, 1, f1, tm);
      tm.sync();
    }
    // Ddot_{L-1} = the loss's Hessian in z times z_dot (mse: 2 z_dot / (Ns D_out); cross-entropy, a point
    // at a time: (p z_dot - p (p . z_dot)) / Ns with p = softmax(z)), then
    // Ddot_{l-1} = s'(z) (Ddot_l W_l + rW_l gram_d_l^T H'_l) + s''(z) z_dot (D_l W_l),
    // where tanh's s''(z) (D_l W_l) is -2 h D_{l-1} (ReLU's s'' is 0).
    {
      const T* zd = rz + ns * off(L - 1);
      T* d = rd + ns * off(L - 1);
      if (net.loss == kMse) {
        const int m = ns * dy;
        const T c = T(2) / static_cast<T>(m);
        for_each(tm, m, [&](int64_t j) { d[j] = c * zd[j]; });
      } else {
        const T* z = hs + ns * off(L - 1);
        const T c = T(1) / static_cast<T>(ns);
        for (int n = tm.rank(); n < ns; n += tm.size()) {
          T* dn = d + n * dy;
          const T* zdn = zd + n * dy;
          softmax_into(z + n * dy, dy, dn);
          T s = 0;
          for (int i = 0; i < dy; ++i) s += dn[i] * zdn[i];
          for (int i = 0; i < dy; ++i) dn[i] = c * dn[i] * (zdn[i] - s);
        }
      }
      tm.sync();
    }
    for (int l = L - 1; l >= 1; --l) {
      const int din = net.dims[l], dout = net.dims[l + 1];
      const T rw = rates[2 * l];
      T* e = rd + ns * off(l - 1);
      Store<T> f0{e, din, nullptr};
      product(ns, dout, din, rd + ns * off(l), dout, 1, weights(l), din, 1, f0, tm);
      GradAct<T> f1{hs + ns * off(l - 1), e, din, act, rw, rz + ns * off(l - 1), ds + ns * off(l - 1)};
      product(ns, nq, din, gb + l * gsz, 1, ns, hq + nq * off(l - 1), din, 1, f1, tm);
      tm.sync();
    }
  }
  // The rest of the factor rows, layer by layer: U's Ddot, and V_l = [H' | 1 ; -H | -1 ; -Hdot | 0].
  const int R = factor_rows(ns, nq, first_order);
  int64_t vo = 0;
  for (int l = 0; l < L; ++l) {
    const int din = net.dims[l], vw = din + 1;
    if (!first_order) u_rows(l, nq, ns, rd + ns * off(l));
    T* V = t.V + t.n_tasks * R * vo + t.index * R * vw;
    const T* in_q = l == 0 ? t.xq : hq + nq * off(l - 1);
    const T* in_s = l == 0 ? t.xs : hs + ns * off(l - 1);
    const T* hd = l == 0 ? nullptr : rh + ns * off(l - 1);
    for_owned(tm, R, vw, [&](int64_t r, int64_t c) {
      T v;
      if (r < nq) {
        v = c < din ? in_q[r * din + c] : T(1);
      } else if (r < nq + ns) {
        v = c < din ? -in_s[(r - nq) * din + c] : T(-1);
      } else {
        v = c < din && hd != nullptr ? -hd[(r - nq - ns) * din + c] : T(0);
      }
      V[r * vw + c] = v;
    });
    vo += vw;
  }
  tm.sync();
}

}  // namespace onestep
}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
