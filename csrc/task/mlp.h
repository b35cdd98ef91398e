// fastmaml: one task's MLP math: activation buffers (Acts), theta_0's transposed weights, and the
// layer passes: forward, loss_and_grad, backward, the Hessian-vector product (hvp) and sgd_update.
//
// Notation (docs/math.md): layers l = 0 .. L-1 here (W_{l+1} in that page's 1-based names), layer l maps
// `dims[l]` inputs to `dims[l+1]` outputs: z_l = h_{l-1} W_l^T + b_l, h_l = s(z_l) for hidden layers,
// h_{-1} = x, output z_{L-1}. Activations are stored row-major [N, width].
#pragma once

#include "config.h"
#include "layout.h"
#include "products.h"
#include "team.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// Activation buffers of one pass over N <= nmax points: layer l's slice starts at nmax * act_off[l].
//
// `h` and `z` are one buffer: the forward overwrites a hidden layer's z_l with h_l = s(z_l) in place,
// and every later reader takes the activation's derivatives from h (ReLU: s'(z) = [h > 0], since
// h = max(z, 0) is positive exactly where z is; tanh: s' = 1 - h^2, s'' = -2 h s'). The output layer's
// slice keeps z_{L-1}. A reverse sweep keeps one such state per inner step, so each step's state is two
// width-sized segments instead of three (the sinusoid net at K = 5 without learned rates: 103 instead
// of 123 KiB a task, two tasks per Hopper multiprocessor's shared memory instead of one).
template <typename T>
struct Acts {
  T* z;    // pre-activations z_l                     [N, D_{l+1}] per layer
  T* h;    // activations h_l = s(z_l) (hidden layers): the same buffer as z
  T* d;    // dloss/dz_l
  T* rz;   // tangents of z_l along the HVP direction (null for passes without tangents)
  T* rh;   // tangents of h_l
  T* rd;   // tangents of d_l
  T* p;    // softmax of the output (cross-entropy) [N, D_out]
  int64_t nmax;
};

// Elements of one Acts without tangents (forward, loss and backward only) for at most `nmax` points.
FASTMAML_HD inline int64_t acts_size(const Net& net, int64_t nmax) {
  return nmax * (2 * net.width_sum + net.dims[net.L]);
}

template <typename T>
FASTMAML_HD inline Acts<T> make_acts(const Net& net, T* buf, int64_t nmax) {
  const int64_t s = nmax * net.width_sum;
  Acts<T> a;
  a.z = buf;
  a.h = buf;
  a.d = buf + s;
  a.rz = nullptr;
  a.rh = nullptr;
  a.rd = nullptr;
  a.p = buf + 2 * s;
  a.nmax = nmax;
  return a;
}

template <typename T>
FASTMAML_HD inline int64_t slice(const Net& net, const Acts<T>& a, int l) {
  return a.nmax * net.act_off[l];
}

// ---------------------------------------------------------------------------------------------------
// theta_0's weights transposed (CPU loops). Every task starts from the same theta_0, so the CPU ops
// transpose its weights once per call and run the products with W_l^T at theta_0 -- the support
// forward pass and the HVP's Rh W^T at step 0 -- as row-times-matrix tiles (gemm_nn_acc) instead of dot
// products that each end in a horizontal sum (gemm_nt_acc). `theta_t` has theta's layout with W_l
// stored [D_l, D_{l+1}]; biases are not read.

template <typename T>
inline void transpose_weights(const Net& net, const T* __restrict__ theta, T* __restrict__ theta_t) {
  for (int l = 0; l < net.L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    T* Wt = theta_t + net.w_off[l];
    for (int j = 0; j < dout; ++j) {
      for (int k = 0; k < din; ++k) Wt[static_cast<int64_t>(k) * dout + j] = W[static_cast<int64_t>(j) * din + k];
    }
  }
}

// Whether a layer with `dout` outputs takes its h W^T product from the transposed weights: a serial team
// on the host and at least one vector of outputs (narrower, the dot products' few-column path is faster).
template <typename T, typename Team>
FASTMAML_HD inline bool use_transposed(const T* theta_t, int dout, const Team& tm) {
#ifdef FASTMAML_HOST_VECTORS
  return theta_t != nullptr && tm.size() == 1 && dout >= Vec16<T>::lanes;
#else
  (void)theta_t;
  (void)dout;
  (void)tm;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------
// The pointwise steps the layer products end in (products.h's gemm_*_then): with a team, each owner of an
// output element applies them as it stores the element, instead of a fill before the product and a
// pass after it, each behind a sync. `kNoAct` marks the output layer (no activation).

constexpr int kNoAct = -1;

// s(v) for the activation `act` (kNoAct: v). ReLU as torch's: 0 where v < 0, else v, so that NaN stays
// NaN (a diverged task must not look finite; `v > 0 ? v : 0` made it 0) and -0 stays -0.
template <typename T>
FASTMAML_HD inline T act_value(int act, T v) {
  return act == kRelu ? (v < T(0) ? T(0) : v) : act == kTanh ? fm_tanh(v) : v;
}

// e * s'(z), with s' read from h = s(z): ReLU as torch's threshold_backward, 0 where h <= 0 (z <= 0), else
// e, a choice rather than a product (0 * inf would be NaN) that passes e where h is NaN; tanh 1 - h^2.
template <typename T>
FASTMAML_HD inline T act_grad(int act, T h, T e) {
  return act == kRelu ? (h <= T(0) ? T(0) : e) : e * (T(1) - h * h);
}

// z = s(b + in W^T): a layer's output, from its bias.
template <typename T>
struct BiasAct {
  const T* b;
  T* z;
  int64_t ldo;
  int act;
  FASTMAML_HD T init(int, int c) const { return b[c]; }
  FASTMAML_HD void finish(int r, int c, T v) const { z[r * ldo + c] = act_value(act, v); }
};

// e = (d W) * s'(z) from h: the gradient before a hidden layer (from zero).
template <typename T>
struct ActGrad {
  const T* h;
  T* e;
  int64_t ldo;
  int act;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int r, int c, T v) const { e[r * ldo + c] = act_grad(act, h[r * ldo + c], v); }
};

// v from zero: the first of two products into one output.
template <typename T>
struct FromZero {
  T* out;
  int64_t ldo;
  FASTMAML_HD T init(int, int) const { return T(0); }
  FASTMAML_HD void finish(int r, int c, T v) const { out[r * ldo + c] = v; }
};

// The HVP's tangent Rz (from the bias direction `ub`, or with ub null from what Rz holds), and with `rh`
// given, Rh = s'(z) Rz from h (the last product into a hidden layer's Rz).
template <typename T>
struct Tangent {
  const T* ub;
  T* rz;
  T* rh;
  const T* h;
  int64_t ldo;
  int act;
  FASTMAML_HD T init(int r, int c) const { return ub != nullptr ? ub[c] : rz[r * ldo + c]; }
  FASTMAML_HD void finish(int r, int c, T v) const {
    const int64_t j = r * ldo + c;
    rz[j] = v;
    if (rh != nullptr) rh[j] = act_grad(act, h[j], v);
  }
};

// The HVP's Rd_{l-1} = re * s'(z_{l-1}) + (d_l W_l) * s''(z_{l-1}) * Rz_{l-1}, with re = Rd_l W_l + d_l U_l
// summed into `re` by two products (this the second). ReLU: s'' = 0, only the mask. tanh: s' = 1 - h^2,
// s'' = -2 h s', so (d_l W_l) s'' Rz = -2 h d_{l-1} Rz.
template <typename T>
struct TangentGrad {
  T* re;
  const T* h;
  const T* dprev;
  const T* rzprev;
  int64_t ldo;
  int act;
  FASTMAML_HD T init(int r, int c) const { return re[r * ldo + c]; }
  FASTMAML_HD void finish(int r, int c, T v) const {
    const int64_t j = r * ldo + c;
    const T first = act_grad(act, h[j], v);  // re * s'
    re[j] = act == kRelu ? first : first - T(2) * h[j] * dprev[j] * rzprev[j];
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward: h_l of every hidden layer (in z's buffer, see Acts) and the output z_{L-1} for x [N, D_in]; the
// output is the slice of layer L-1 in a.z.

template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void forward(const Net& net, const T* __restrict__ theta, const T* __restrict__ x, int N,
                                Acts<T>& a, const Team& tm = Team(), const T* theta_t = nullptr) {
  for (int l = 0; l < net.L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* b = theta + net.b_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    T* z = a.z + slice(net, a, l);
    // z_l = b + in W^T, then h_l = s(z_l) in place for a hidden layer (Acts: h and z are one buffer).
    const BiasAct<T> ep{b, z, dout, l < net.L - 1 ? static_cast<int>(net.activation) : kNoAct};
    if (use_transposed(theta_t, dout, tm)) {
      gemm_nn_then(N, dout, din, T(1), in, din, 1, theta_t + net.w_off[l], dout, z, dout, ep, tm);
    } else {
      gemm_nt_then(N, dout, din, in, din, W, din, z, dout, ep, tm);
    }
    tm.sync();  // the next layer reads every h_l
  }
}

// softmax(z) of one point's D logits into p; returns their log-sum-exp (stable: through the largest).
template <typename T>
FASTMAML_HD inline T softmax_into(const T* z, int D, T* p) {
  T mx = z[0];
  for (int i = 1; i < D; ++i) mx = z[i] > mx ? z[i] : mx;
  T se = 0;
  for (int i = 0; i < D; ++i) {
    p[i] = fm_exp(z[i] - mx);
    se += p[i];
  }
  const T inv = T(1) / se;
  for (int i = 0; i < D; ++i) p[i] *= inv;
  return mx + fm_log(se);
}

// The loss of the output `out [N, D]` against `y` (mse: `y_float [N, D]`; cross-entropy: `y_index [N]`,
// classes 0..D-1), unscaled, returned to every rank of the team. Writes `dout = scale * dloss/dout` and,
// for cross-entropy, the softmax `p` (which the Hessian-vector product reads).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline T loss_and_grad(const Net& net, const T* __restrict__ out, const T* __restrict__ y_float,
                                   const int64_t* __restrict__ y_index, int N, T scale, T* __restrict__ dout,
                                   T* __restrict__ p, const Team& tm = Team()) {
  const int D = net.dims[net.L];
  const int64_t m = static_cast<int64_t>(N) * D;
  T total = 0;  // this rank's part of the loss; sum() adds the parts and syncs
  if (net.loss == kMse) {
    const T c = scale * T(2) / static_cast<T>(m);
    for_each(tm, m, [&](int64_t j) {
      const T r = out[j] - y_float[j];
      total += r * r;
      dout[j] = c * r;
    });
    return tm.sum(total) / static_cast<T>(m);
  }
  // Cross-entropy through a stable log-softmax: lse = max + log(sum exp(z - max)). One rank per point.
  const T c = scale / static_cast<T>(N);
  for (int n = tm.rank(); n < N; n += tm.size()) {
    const T* zr = out + static_cast<int64_t>(n) * D;
    T* pr = p + static_cast<int64_t>(n) * D;
    T* dr = dout + static_cast<int64_t>(n) * D;
    const T lse = softmax_into(zr, D, pr);
    const int64_t cls = y_index[n];
    if (cls < 0 || cls >= D) {
      // A class out of range (possible where the data checks are off: GPU tensors by default) poisons
      // the task: its loss and gradient become nan instead of reading outside the logits.
      const T nan = static_cast<T>(::nan(""));
      total += nan;
      for (int i = 0; i < D; ++i) dr[i] = nan;
      continue;
    }
    total += lse - zr[cls];
    for (int i = 0; i < D; ++i) dr[i] = c * pr[i];
    dr[cls] -= c;
  }
  return tm.sum(total) / static_cast<T>(N);
}

// Backward from the output gradient (the slice of layer L-1 in a.d, set by loss_and_grad): fills d_l
// of every layer, adds the parameter gradient to `g [P]`, and, when `gx` is given, adds
// dloss/dx = d_0 W_0 to `gx [N, D_in]`.
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void backward(const Net& net, const T* __restrict__ theta, const T* __restrict__ x, int N,
                                 Acts<T>& a, T* __restrict__ g, T* __restrict__ gx, const Team& tm = Team()) {
  for (int l = net.L - 1; l >= 0; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* d = a.d + slice(net, a, l);
    T* gW = g + net.w_off[l];
    T* gb = g + net.b_off[l];
    gemm_nn_acc(dout, din, N, T(1), d, 1, dout, in, din, gW, din, tm);  // gW += d^T h
    add_col_sums(T(1), d, N, dout, gb, tm);                            // gb += sum_n d
    if (l == 0 && gx == nullptr) break;
    if (l > 0) {  // d_{l-1} = (d_l W_l) * s'(z_{l-1})
      T* e = a.d + slice(net, a, l - 1);
      const ActGrad<T> ep{a.h + slice(net, a, l - 1), e, din, static_cast<int>(net.activation)};
      gemm_nn_then(N, din, dout, T(1), d, dout, 1, W, din, e, din, ep, tm);
    } else {
      gemm_nn_acc(N, din, dout, T(1), d, dout, 1, W, din, gx, din, tm);  // gx += d_0 W_0
    }
    tm.sync();  // the next layer reads every d_{l-1}
  }
  tm.sync();
}

// Hessian-vector product of the loss at the state left by forward + loss_and_grad(scale = 1) +
// backward (forward-over-reverse, docs/math.md): adds `alpha * H u` to `out [P]` and, when `gx` is given,
// `alpha * d/dx (g . u) = alpha * (Rd_0 W_0 + d_0 U_0)` to `gx [N, D_in]`. `u [P]` is the direction.
// Inlined by force on the device: with the tensor-core products' calls in the sweep (team_mma.h), nvcc
// made it a function of its own, and the sweep spilled 308 / 848 B instead of 208 / 640 (sm_90a).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD FASTMAML_FORCE_INLINE void hvp(const Net& net, const T* __restrict__ theta, const T* __restrict__ u,
                            const T* __restrict__ x, int N, Acts<T>& a, T alpha, T* __restrict__ out,
                            T* __restrict__ gx, const Team& tm = Team(), const T* theta_t = nullptr) {
  const int L = net.L;
  // Tangents forward: Rz_l = Rh_{l-1} W_l^T + h_{l-1} U_l^T + ub_l (Rh_{-1} = 0); Rh_l = s'(z_l) Rz_l.
  for (int l = 0; l < L; ++l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* U = u + net.w_off[l];
    const T* ub = u + net.b_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* rin = l == 0 ? nullptr : a.rh + slice(net, a, l - 1);
    T* rz = a.rz + slice(net, a, l);
    T* rh = l < L - 1 ? a.rh + slice(net, a, l) : nullptr;
    const T* h = l < L - 1 ? a.h + slice(net, a, l) : nullptr;
    const int act = static_cast<int>(net.activation);
    // Rz = ub + in U^T (then Rh), or with rin: Rz = ub + in U^T, Rz += rin W^T (then Rh). The two products
    // have one shape, so each element has one owner in both: no sync between them.
    const Tangent<T> first{ub, rz, rin == nullptr ? rh : nullptr, h, dout, act};
    gemm_nt_then(N, dout, din, in, din, U, din, rz, dout, first, tm);
    if (rin != nullptr) {
      const Tangent<T> second{nullptr, rz, rh, h, dout, act};
      if (use_transposed(theta_t, dout, tm)) {
        gemm_nn_then(N, dout, din, T(1), rin, din, 1, theta_t + net.w_off[l], dout, rz, dout, second, tm);
      } else {
        gemm_nt_then(N, dout, din, rin, din, W, din, rz, dout, second, tm);
      }
    }
    tm.sync();  // the next layer reads every Rh_l
  }

  // Tangent of the output gradient: the loss curvature times Rz_out.
  {
    const int D = net.dims[L];
    const int64_t s = slice(net, a, L - 1);
    const T* rz = a.rz + s;
    T* rd = a.rd + s;
    if (net.loss == kMse) {
      const int64_t m = static_cast<int64_t>(N) * D;
      const T c = T(2) / static_cast<T>(m);
      for_each(tm, m, [&](int64_t j) { rd[j] = c * rz[j]; });
    } else {
      // (diag(p) - p p^T) Rz / N per point (one rank per point).
      const T c = T(1) / static_cast<T>(N);
      for (int n = tm.rank(); n < N; n += tm.size()) {
        const T* pr = a.p + static_cast<int64_t>(n) * D;
        const T* rzr = rz + static_cast<int64_t>(n) * D;
        T* rdr = rd + static_cast<int64_t>(n) * D;
        const T pz = dot(pr, rzr, D);
        for (int i = 0; i < D; ++i) rdr[i] = c * pr[i] * (rzr[i] - pz);
      }
    }
    tm.sync();
  }

  // Tangents backward: R gW_l = Rd_l^T h_{l-1} + d_l^T Rh_{l-1}; R gb_l = sum_n Rd_l;
  // Rd_{l-1} = (Rd_l W_l + d_l U_l) * s'(z_{l-1}) + (d_l W_l) * s''(z_{l-1}) * Rz_{l-1}.
  for (int l = L - 1; l >= 0; --l) {
    const int din = net.dims[l], dout = net.dims[l + 1];
    const T* W = theta + net.w_off[l];
    const T* U = u + net.w_off[l];
    const T* in = l == 0 ? x : a.h + slice(net, a, l - 1);
    const T* rin = l == 0 ? nullptr : a.rh + slice(net, a, l - 1);
    const T* d = a.d + slice(net, a, l);
    const T* rd = a.rd + slice(net, a, l);
    T* oW = out + net.w_off[l];
    T* ob = out + net.b_off[l];
    // Both products into oW have one shape (one owner per element): no sync between them.
    gemm_nn_acc(dout, din, N, alpha, rd, 1, dout, in, din, oW, din, tm);  // Rd^T h
    if (rin != nullptr) gemm_nn_acc(dout, din, N, alpha, d, 1, dout, rin, din, oW, din, tm);  // d^T Rh
    add_col_sums(alpha, rd, N, dout, ob, tm);
    if (l == 0 && gx == nullptr) break;
    // re = Rd_l W_l + d_l U_l (scaled by alpha when it is the input term), two products of one shape.
    if (l > 0) {
      const int64_t s = slice(net, a, l - 1);
      T* re = a.rd + s;
      gemm_nn_then(N, din, dout, T(1), rd, dout, 1, W, din, re, din, FromZero<T>{re, din}, tm);
      const TangentGrad<T> ep{re, a.h + s, a.d + s, a.rz + s, din, static_cast<int>(net.activation)};
      gemm_nn_then(N, din, dout, T(1), d, dout, 1, U, din, re, din, ep, tm);
    } else {
      gemm_nn_acc(N, din, dout, alpha, rd, dout, 1, W, din, gx, din, tm);
      gemm_nn_acc(N, din, dout, alpha, d, dout, 1, U, din, gx, din, tm);
    }
    tm.sync();  // the next layer reads every Rd_{l-1}
  }
  tm.sync();
}

// theta_next = theta - lr * g (elementwise over P; theta_next may alias theta or g).
template <typename T, typename Team = SerialTeam>
FASTMAML_HD inline void sgd_update(const T* theta, const T* __restrict__ lr, const T* g, T* theta_next,
                                   int64_t P, const Team& tm = Team()) {
  theta = opaque(theta);  // the same pointers, reassigned (restrict kept): on the host, the same loop
  lr = opaque(lr);
  g = opaque(g);
  theta_next = opaque(theta_next);
  for_each(tm, P, [&](int64_t i) { theta_next[i] = theta[i] - lr[i] * g[i]; });
  tm.sync();
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
