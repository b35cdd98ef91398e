// fastmaml: how many block barriers one task of the CUDA kernel's reverse sweep costs, counted on the CPU.
//
// The per-task math (csrc/task/) is run as rank 0 of a 128-thread team whose sync() and sum() only
// count: which barriers a rank reaches depends on the sizes and options, not on the data (the values
// computed here are meaningless). Build and run from the repository root:
//   g++ -std=c++20 -O1 -I csrc benchmarks/team_barriers.cpp -o /tmp/team_barriers && /tmp/team_barriers
// Figures: benchmarks/RESULTS.md ("The CUDA kernel's per-task workspace and barriers").
#include <cstdio>
#include <vector>

#include "task/drivers.h"

namespace ft = fastmaml::task;

static long n_barriers = 0;

struct CountingTeam {
  int rank() const { return 0; }
  int size() const { return 128; }
  void sync() const { ++n_barriers; }
  template <typename T>
  T sum(T x) const {
    ++n_barriers;
    return x;
  }
  int tile(int R, int C) const { return ft::pick_tile(R, C, size()); }
};

int main() {
  const int n = 10;  // support and query points
  for (int K : {1, 5}) {
    for (int W : {40, 128}) {
      long dims[4] = {1, W, W, 1};
      ft::Net net;
      ft::make_net(net, dims, 4, ft::kRelu, ft::kMse);
      std::vector<float> theta(net.P, 0.1f), lr(K * net.P, 0.01f), qw(K + 1, 0.0f), x(n, 0.5f), y(n, 0.2f);
      qw[K] = 1;  // the query loss after the last step (MAML's default)
      std::vector<float> work(ft::backward_workspace(net, K, n, false)), g_theta(net.P), preds(n);
      const ft::TaskData<float> td{x.data(), y.data(), nullptr, n, x.data(), y.data(), nullptr, n};
      n_barriers = 0;
      ft::task_backward(net, td, theta.data(), lr.data(), K, qw.data(), 1.0f, static_cast<const float*>(nullptr),
                        false, g_theta.data(), static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                        static_cast<float*>(nullptr), work.data(), CountingTeam(), preds.data());
      std::printf("1-%d-%d-1, K=%d, second order, fused forward and reverse sweep: %ld barriers a task\n", W, W, K,
                  n_barriers);
    }
  }
  return 0;
}
