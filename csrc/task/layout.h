// fastmaml: the network of the per-task math and its flat parameter layout: the depth limit, the
// activation and loss codes, Net and make_net.
#pragma once

#include "config.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// Depth is bounded so the network description fits in a fixed-size struct passed by value (registers
// or constant memory on a GPU). Widths and point counts are bounded only by the workspace.
constexpr int kMaxLayers = 8;

enum Activation : int { kRelu = 0, kTanh = 1 };
enum Loss : int { kMse = 0, kCrossEntropy = 1 };

// The network and its flat parameter layout: theta = [W_0 (row-major [out, in]), b_0, W_1, b_1, ...].
struct Net {
  int L;                          // number of linear layers
  int dims[kMaxLayers + 1];       // [D_in, D_1, ..., D_out]
  int64_t w_off[kMaxLayers];      // offset of W_l in theta
  int64_t b_off[kMaxLayers];      // offset of b_l in theta
  int64_t act_off[kMaxLayers];    // offset of layer l's outputs in an activation buffer, per point
  int64_t P;                      // number of parameters
  int64_t width_sum;              // sum of the layer output widths (per-point size of one buffer)
  int activation;                 // Activation
  int loss;                       // Loss
};

// Fills `net`; returns false when the depth is outside [1, kMaxLayers] or a width is < 1.
template <typename Int>
FASTMAML_HD inline bool make_net(Net& net, const Int* dims, int n_dims, int activation, int loss) {
  const int L = n_dims - 1;
  if (L < 1 || L > kMaxLayers) return false;
  net.L = L;
  net.activation = activation;
  net.loss = loss;
  int64_t off = 0, act = 0;
  for (int l = 0; l <= L; ++l) {
    if (dims[l] < 1) return false;
    net.dims[l] = static_cast<int>(dims[l]);
  }
  for (int l = 0; l < L; ++l) {
    net.w_off[l] = off;
    off += static_cast<int64_t>(net.dims[l + 1]) * net.dims[l];
    net.b_off[l] = off;
    off += net.dims[l + 1];
    net.act_off[l] = act;
    act += net.dims[l + 1];
  }
  net.P = off;
  net.width_sum = act;
  return true;
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
