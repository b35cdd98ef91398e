// fastmaml: a team of std::threads for the host checks of the GPU teams' loops (tests/cuda_team_check.cpp,
// tests/onestep_team_check.cpp): sync() is a barrier (which also orders memory), sum() goes through a shared
// array of per-rank partials read back in rank order, like the CUDA block's.
#pragma once

#include <barrier>

#include "maml_task.h"

struct ThreadTeam {
  int r;
  int s;
  std::barrier<>* bar;
  double* red;
  int shape = -1;  // the products' register tile: -1 = pick_tile's (as the CUDA block), else this one
  int rank() const { return r; }
  int size() const { return s; }
  void sync() const { bar->arrive_and_wait(); }
  int tile(int R, int C) const { return shape < 0 ? fastmaml::task::pick_tile(R, C, s) : shape; }
  template <typename T>
  T sum(T x) const {
    red[r] = static_cast<double>(x);
    sync();
    T total = 0;
    for (int i = 0; i < s; ++i) total += static_cast<T>(red[i]);
    sync();  // nobody overwrites red before every rank has read it
    return total;
  }
};
