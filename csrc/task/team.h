// fastmaml: teams, the threads that work on one task together, and the loops that share work over them.
//
// Every function of the per-task math takes a `Team` (last argument, default `SerialTeam`): the threads
// that work on one task together. A team has `rank()`, `size()`, `sync()` (a barrier that also makes
// the team's earlier writes visible to all of it), `sum(x)` (a collective: every rank's `x` summed in
// rank order, returned to every rank; it syncs) and `tile(R, C)` (the register tile of its [R, C]
// matrix products: team_tiles.h's pick_tile, team_mma.h's tensor-core tiles (kTileMma, for teams of
// whole warps), or a fixed shape to compare; a function of (R, C) alone, since two products of one shape
// into one output rely on the same owner per element); a team that runs on a GPU also has
// `shared_loads()` (the products' shared-memory loops on or off). The loops are
// output-stationary: in each phase every output element has one owner (`for_owned`, `for_each`, the
// tiles), and a rank reads another rank's results only after a sync. The layer functions and drivers
// may be entered when their inputs are visible to the whole team, and sync before they return; the
// primitives (fill, copy, the matrix products, ...) do not sync.
// The CPU runs `SerialTeam` (one thread per task: every sync is a no-op and the loops run as plain
// loops, with the register-tiled products of products.h); the CUDA kernel runs a thread block
// (csrc/cuda/kernels.cuh); tests/cuda_team_check.cpp runs std::threads and compares with SerialTeam.
#pragma once

#include "config.h"

namespace fastmaml {
namespace FASTMAML_TASK_NAMESPACE {
inline namespace FASTMAML_IMPL_NAMESPACE {

// `p` as a value the compiler cannot see into (an empty asm on a GPU; nothing on the host). The team's
// operands are the block's workspace plus 64-bit offsets; seen through, nvcc folded those offsets into
// every load's and store's index and rebuilt each address in 64 bits (sign extension, add, shift-add:
// four integer instructions an access, sm_90 SASS). Opaque, an access costs at most one wide
// multiply-add (IMAD.WIDE) from the pointer. For the hot loops of a team: the products' sums
// (team_tiles.h) and the elementwise passes over a row of P.
template <typename P>
FASTMAML_HD inline P opaque(P p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
#endif
  return p;
}

// One thread per task: the CPU kernel's team. Every sync is a no-op and every loop runs in order.
struct SerialTeam {
  FASTMAML_HD static constexpr int rank() { return 0; }
  FASTMAML_HD static constexpr int size() { return 1; }
  FASTMAML_HD void sync() const {}
  template <typename T>
  FASTMAML_HD T sum(T x) const {
    return x;
  }
  // The register tile of a team product (team_tiles.h); a team of one runs products.h's own loops.
  FASTMAML_HD static constexpr int tile(int, int) { return 0; }
  // Shared-memory loads in the team products (team_tiles.h, device code only; a CUDA block's switch).
  FASTMAML_HD static constexpr bool shared_loads() { return false; }
};

// Calls f(r, c) for this rank's elements of a [rows, cols] array: element (r, c) belongs to rank
// (r * cols + c) mod size(), so consecutive ranks take consecutive elements (coalesced on a GPU). A
// team of one walks the rows in order.
template <typename Team, typename F>
FASTMAML_HD inline void for_owned(const Team& tm, int64_t rows, int64_t cols, F&& f) {
  if (tm.size() == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) f(r, c);
    }
    return;
  }
  const int64_t m = rows * cols;
  if (rows <= 0 || cols <= 0) return;  // nothing to own (and no column count to step by)
  if (m < (int64_t(1) << 30)) {
    // (r, c) stepped by size() elements with a carry: a division a call, not one an element (a 32-bit
    // integer division is about 25 sm_90a instructions; the one-step kernel's factor rows run some 80
    // elements a lane through here).
    const int c32 = static_cast<int>(cols), dr = tm.size() / c32, dc = tm.size() % c32;
    for (int e = tm.rank(), r = e / c32, c = e % c32; e < static_cast<int>(m);
         e += tm.size(), r += dr, c += dc, (c >= c32 ? (c -= c32, ++r) : 0)) {
      f(int64_t(r), int64_t(c));
    }
  } else {
    for (int64_t e = tm.rank(); e < m; e += tm.size()) f(e / cols, e % cols);
  }
}

// Calls f(j) for this rank's elements of a flat array of m elements (j = rank, rank + size(), ...).
template <typename Team, typename F>
FASTMAML_HD inline void for_each(const Team& tm, int64_t m, F&& f) {
  if (tm.size() > 1 && m < (int64_t(1) << 31) - tm.size()) {
    // A 32-bit index where it cannot overflow: a 64-bit one costs a team's loops over a row of P a
    // 64-bit add and compare a step, and a sign extension in every address (sm_90 SASS).
    const int n = static_cast<int>(m);
    for (int j = tm.rank(); j < n; j += tm.size()) f(j);
    return;
  }
  for (int64_t j = tm.rank(); j < m; j += tm.size()) f(j);
}

}  // namespace FASTMAML_IMPL_NAMESPACE
}  // namespace FASTMAML_TASK_NAMESPACE
}  // namespace fastmaml
