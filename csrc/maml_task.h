// fastmaml: the per-task math of the fused MAML kernels, written once.
//
// One task's MLP forward, loss, gradient, Hessian-vector product, SGD update, and the three per-task
// drivers of docs/kernels.md (forward, adapt, reverse sweep). The CPU kernel (csrc/cpu/) calls the
// drivers in a loop over tasks; the CUDA kernel (csrc/cuda/) calls the same drivers with a thread block
// per task. No torch headers, no allocation, no exceptions, no standard library beyond <cstdint>. Every
// buffer is a raw pointer the caller provides (a scratch workspace of `*_workspace()` elements per task).
//
// The files of csrc/task/, each building on the ones above it:
//   config.h      build settings: FASTMAML_HD, the host vector tiles' switch and width, the namespaces
//   layout.h      the network and its flat parameter layout (Net, make_net, kMaxLayers)
//   team.h        teams (SerialTeam) and the loops that share work over a team (for_owned, for_each)
//   host_tiles.h  the host-only register tiles of the matrix products (gcc and clang vector types)
//   products.h    math helpers, the two matrix products and the other primitives (fill, copy, ...)
//   mlp.h         activation buffers and the layer passes: forward, loss, backward, HVP, SGD update
//   drivers.h     the per-task drivers (forward, adapt, reverse sweep) and their workspace sizes
//
// Includers take this header, which includes the folder in that order.
#pragma once

#include "task/config.h"
#include "task/layout.h"
#include "task/team.h"
#include "task/host_tiles.h"
#include "task/products.h"
#include "task/mlp.h"
#include "task/drivers.h"
