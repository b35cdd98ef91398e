// fastmaml: checks the one-step kernel's per-task math (csrc/task/onestep.h) with teams of threads on the
// CPU, without a GPU.
//
// The CUDA kernel runs each task with a warp as the team (__syncwarp as sync()); here a team of std::threads
// with a std::barrier as sync() runs the same function, and every output is compared with the team of one
// that the CPU kernel runs (tested against the reference in tests/test_onestep.py): exactly with the FFMA
// loop, within 1e-11 of each tensor's scale with the tensor-core tiles (their host emulation sums in another
// order). A missing sync or an element written by two ranks shows up as a mismatch (under -fsanitize=thread
// as the race itself). Each case also runs in float, with the FFMA loop and with the tiles (their 3xTF32
// splits emulated), against the double result: within the GPU tests' 1e-4 of each tensor's scale. The
// workspace is filled with NaN before the first task, so a read of an element nobody wrote poisons the
// result; several tasks run one after another on one team and one workspace, as a warp's loop does.
//
// Build and run (tests/test_onestep.py does this):
//   g++ -std=c++20 -O1 -pthread -I csrc tests/onestep_team_check.cpp -o onestep_check && ./onestep_check
// Exit status 0 when every case matches.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "maml_task.h"
#include "task/onestep.h"
#include "thread_team.h"

namespace {

namespace ft = fastmaml::task;

struct Case {
  std::vector<int> dims;
  int ns, nq, activation;
  bool first_order, g_pred;
  int loss = ft::kMse;
};

struct Outputs {
  std::vector<double> losses, preds, U, V, rg;
};

// A team that runs cols_product's predicated loop, the form a GPU runs from generic addresses (the host's
// teams run the unpredicated one by default).
struct PredicatedThreadTeam : ThreadTeam {
  static constexpr bool kPredicatedLoop = true;
};

// A team whose products run team_mma.h's tensor-core tiles, each whole warp of it emulating its lanes'
// fragments (in double: exact products, summed in steps of 8 and so in another order than cols_product).
struct MmaThreadTeam : ThreadTeam {
  static constexpr bool kMmaProducts = true;
};

// How a team runs the products: cols_product's unpredicated loop, its predicated loop, or tensor cores.
enum class Loop { kClamped, kPredicated, kMma };

// Runs every task of the problem with a team of `team` threads (0: SerialTeam), in F (the inputs drawn in
// double, then rounded to F; the outputs returned in double).
template <typename F = double>
Outputs run(const Case& c, int team, int T, unsigned seed, Loop loop = Loop::kClamped) {
  ft::Net net;
  ft::make_net(net, c.dims.data(), static_cast<int>(c.dims.size()), c.activation, c.loss);
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, size_t n, double scale) {
    v.resize(n);
    for (auto& x : v) x = scale * normal(gen);
  };
  const int din = net.dims[0], dout = net.dims[net.L];
  std::vector<double> theta, xs, ys, xq, yq, cot, gp, rates;
  fill(theta, net.P, 0.5);
  fill(xs, size_t(T) * c.ns * din, 1.0);
  fill(ys, size_t(T) * c.ns * dout, 1.0);
  fill(xq, size_t(T) * c.nq * din, 1.0);
  fill(yq, size_t(T) * c.nq * dout, 1.0);
  fill(cot, T, 1.0);
  fill(gp, size_t(T) * c.nq * dout, 1.0);
  fill(rates, 2 * net.L, 0.2);
  std::vector<int64_t> ys_i(size_t(T) * c.ns), yq_i(size_t(T) * c.nq);
  std::uniform_int_distribution<int64_t> cls(0, dout - 1);
  for (auto& y : ys_i) y = cls(gen);
  for (auto& y : yq_i) y = cls(gen);
  const bool ce = c.loss == ft::kCrossEntropy;
  std::vector<double> theta_t(net.P);
  for (int l = 0; l < net.L; ++l) {
    const int a = net.dims[l], b = net.dims[l + 1];
    for (int j = 0; j < b; ++j)
      for (int k = 0; k < a; ++k) theta_t[net.w_off[l] + k * b + j] = theta[net.w_off[l] + j * a + k];
  }
  const int R = ft::onestep::factor_rows(c.ns, c.nq, c.first_order);
  struct {
    std::vector<F> losses, preds, U, V, rg;
  } o;
  o.losses.assign(T, 0);
  o.preds.assign(size_t(T) * c.nq * dout, 0);
  o.U.assign(size_t(T) * R * ft::onestep::u_width(net), 0);
  o.V.assign(size_t(T) * R * ft::onestep::v_width(net), 0);
  o.rg.assign(size_t(T) * 2 * net.L, 0);
  std::vector<F> work(ft::onestep::layout(net, c.ns, c.nq).total, std::numeric_limits<F>::quiet_NaN());
  const auto in = [](const std::vector<double>& v) { return std::vector<F>(v.begin(), v.end()); };
  const std::vector<F> th = in(theta), th_t = in(theta_t), rt = in(rates), xs_f = in(xs), ys_f = in(ys),
                       xq_f = in(xq), yq_f = in(yq), gp_f = in(gp);
  const auto outputs = [&] {
    const auto out = [](const std::vector<F>& v) { return std::vector<double>(v.begin(), v.end()); };
    return Outputs{out(o.losses), out(o.preds), out(o.U), out(o.V), out(o.rg)};
  };
  auto task_of = [&](int t) {
    ft::onestep::Task<F> tk;
    tk.xs = xs_f.data() + size_t(t) * c.ns * din;
    tk.ys = ys_f.data() + size_t(t) * c.ns * dout;
    tk.xq = xq_f.data() + size_t(t) * c.nq * din;
    tk.yq = yq_f.data() + size_t(t) * c.nq * dout;
    tk.ys_index = ce ? ys_i.data() + size_t(t) * c.ns : nullptr;
    tk.yq_index = ce ? yq_i.data() + size_t(t) * c.nq : nullptr;
    tk.cot = static_cast<F>(cot[t]);
    tk.g_pred = c.g_pred ? gp_f.data() + size_t(t) * c.nq * dout : nullptr;
    tk.loss = o.losses.data() + t;
    tk.pred = o.preds.data() + size_t(t) * c.nq * dout;
    tk.U = o.U.data();
    tk.V = o.V.data();
    tk.rate_grad = o.rg.data() + size_t(t) * 2 * net.L;
    tk.n_tasks = T;
    tk.index = t;
    return tk;
  };
  if (team == 0) {
    for (int t = 0; t < T; ++t)
      ft::onestep::task(net, th.data(), th_t.data(), rt.data(), c.ns, c.nq, c.first_order, task_of(t), work.data(),
                        ft::SerialTeam());
    return outputs();
  }
  std::barrier<> bar(team);
  std::vector<double> red(team);
  std::vector<std::thread> threads;
  for (int r = 0; r < team; ++r) {
    threads.emplace_back([&, r] {
      const ThreadTeam tm{r, team, &bar, red.data(), -1};
      auto tasks = [&](const auto& any_team) {
        for (int t = 0; t < T; ++t)
          ft::onestep::task(net, th.data(), th_t.data(), rt.data(), c.ns, c.nq, c.first_order, task_of(t),
                            work.data(), any_team);
      };
      if (loop == Loop::kPredicated) {
        tasks(PredicatedThreadTeam{tm});
      } else if (loop == Loop::kMma) {
        tasks(MmaThreadTeam{tm});
      } else {
        tasks(tm);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return outputs();
}

// Every element equal (cols_product sums each element in one order whatever the team); the losses, which
// the team sums in rank order, within 1e-12 relative. `scaled`: within 1e-11 of the tensor's largest
// magnitude (the tensor-core tiles' other order of the sums).
int compare(const char* what, const std::vector<double>& a, const std::vector<double>& b, bool exact,
            bool scaled = false) {
  double scale = 0;  // the tensor's largest magnitude (0: every element must then be exact)
  for (double v : b) scale = std::fmax(scale, std::fabs(v));
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool same = scaled  ? std::fabs(a[i] - b[i]) <= 1e-11 * scale
                      : exact ? a[i] == b[i]
                              : std::fabs(a[i] - b[i]) <= 1e-12 * (1 + std::fabs(b[i]));
    if (!same && bad++ < 3) std::printf("  %s[%zu]: team %.17g, one %.17g\n", what, i, a[i], b[i]);
  }
  return bad;
}

// The largest |a - b| over the largest |b| (b's scale; 0 if both are all zero).
double worst(const std::vector<double>& a, const std::vector<double>& b) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::fmax(err, std::fabs(a[i] - b[i]));
    scale = std::fmax(scale, std::fabs(b[i]));
  }
  return scale > 0 ? err / scale : err;
}

// The worst of worst() over an output's five tensors.
double worst(const Outputs& a, const Outputs& b) {
  return std::fmax(std::fmax(std::fmax(worst(a.losses, b.losses), worst(a.preds, b.preds)),
                             std::fmax(worst(a.U, b.U), worst(a.V, b.V))),
                   worst(a.rg, b.rg));
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {{1, 40, 40, 1}, 10, 10, ft::kRelu, false, false},  // the sinusoid net
      {{3, 7, 5, 2}, 4, 6, ft::kTanh, false, true},
      {{3, 7, 5, 2}, 4, 6, ft::kRelu, true, true},
      {{2, 33, 3}, 9, 3, ft::kTanh, true, false},
      {{5, 3}, 3, 11, ft::kRelu, false, true},           // one layer
      {{4, 6, 9, 7, 3}, 13, 5, ft::kTanh, false, false},  // four layers, more points than a chunk
      {{3, 7, 5}, 6, 9, ft::kTanh, false, true, ft::kCrossEntropy},
      {{12, 33, 5}, 5, 15, ft::kRelu, true, false, ft::kCrossEntropy},
      // Second order with ReLU and more support points than query points: Ddot fills D''s whole place and
      // h_dot D's (onestep.h's layout).
      {{3, 7, 5, 2}, 9, 4, ft::kRelu, false, true},
      {{3, 7, 5}, 9, 4, ft::kRelu, false, false, ft::kCrossEntropy},
  };
  int failures = 0, runs = 0;
  double worst_ffma = 0, worst_mma = 0;
  unsigned seed = 1;
  for (const Case& c : cases) {
    // The scratch layout's size, which fastmaml/backends/_onestep.py's workspace_bytes mirrors (the test
    // compares them).
    ft::Net net;
    ft::make_net(net, c.dims.data(), static_cast<int>(c.dims.size()), c.activation, c.loss);
    std::printf("layout");
    for (int d : c.dims) std::printf(" %d", d);
    std::printf(" | %d %d %d %lld\n", c.ns, c.nq, c.activation,
                static_cast<long long>(ft::onestep::layout(net, c.ns, c.nq).total));
    const Outputs one = run(c, 0, 3, seed);
    // cols_product's two loops at 4 team sizes; the tensor-core tiles at one warp, a warp and a rank that
    // owns nothing, two warps, and a team too small for a warp (which runs cols_product).
    struct Variant {
      int team;
      Loop loop;
    };
    constexpr Variant kVariants[] = {{2, Loop::kClamped},    {5, Loop::kClamped},    {32, Loop::kClamped},
                                     {33, Loop::kClamped},   {2, Loop::kPredicated}, {5, Loop::kPredicated},
                                     {32, Loop::kPredicated}, {33, Loop::kPredicated}, {32, Loop::kMma},
                                     {33, Loop::kMma},       {64, Loop::kMma},       {5, Loop::kMma}};
    for (const Variant& v : kVariants) {
      const int team = v.team;
      const Outputs o = run(c, team, 3, seed, v.loop);
      const bool mma = v.loop == Loop::kMma && team >= 32;
      const int bad = compare("losses", o.losses, one.losses, false, mma) +
                      compare("preds", o.preds, one.preds, !mma, mma) + compare("U", o.U, one.U, !mma, mma) +
                      compare("V", o.V, one.V, !mma, mma) + compare("rate grads", o.rg, one.rg, false, mma);
      ++runs;
      if (bad != 0) {
        constexpr const char* kLoops[] = {"", " (predicated loop)", " (tensor cores)"};
        std::printf("case %zu (L=%zu) team %d%s: %d mismatches\n", static_cast<size_t>(&c - cases.data()),
                    c.dims.size() - 1, team, kLoops[static_cast<int>(v.loop)], bad);
        ++failures;
      }
      bool finite = true;
      for (double v : o.U) finite = finite && std::isfinite(v);
      if (!finite) {
        std::printf("case %zu team %d: a NaN in U (an unwritten element read)\n",
                    static_cast<size_t>(&c - cases.data()), team);
        ++failures;
      }
    }
    // In float, as a GPU runs it: the FFMA loop (a team of one) and the tensor-core tiles (a warp, their TF32
    // splits emulated) against the double team of one, within the GPU tests' 1e-4 of each tensor's scale.
    const double e_ffma = worst(run<float>(c, 0, 3, seed), one);
    const double e_mma = worst(run<float>(c, 32, 3, seed, Loop::kMma), one);
    worst_ffma = std::fmax(worst_ffma, e_ffma);
    worst_mma = std::fmax(worst_mma, e_mma);
    if (!(e_ffma <= 1e-4) || !(e_mma <= 1e-4)) {
      std::printf("case %zu in float: worst element %.3g (FFMA), %.3g (tensor cores) of its tensor's scale\n",
                  static_cast<size_t>(&c - cases.data()), e_ffma, e_mma);
      ++failures;
    }
    ++seed;
  }
  std::printf("float against double, worst element over the cases: FFMA %.3g, tensor cores %.3g of the scale\n",
              worst_ffma, worst_mma);
  if (failures != 0) return 1;
  std::printf("ok: %d cases x 12 teams and loops (%d runs: cols_product's two loops, tensor cores)\n",
              static_cast<int>(cases.size()), runs);
  return 0;
}
