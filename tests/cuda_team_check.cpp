// fastmaml: checks the team-parallel loops of the per-task math (csrc/task/) on the CPU, without a GPU.
//
// The CUDA kernel runs the per-task drivers with a thread block as the team; here the same drivers run
// with a team of std::threads and a std::barrier as sync(), and every output is compared with the team
// of one (SerialTeam, what the CPU kernel runs and tests against the reference). A missing sync or an
// element written by two ranks shows up as a mismatch (run it under -fsanitize=thread to see the race
// itself). The workspace is filled with NaN before every run so a read of an element nobody wrote
// poisons the result. Several tasks run one after another on one team and one workspace, as in a CUDA
// block, adding into shared g_theta / g_lr rows. The tensor-core products (csrc/task/team_mma.h) run
// here as each lane's emulation of mma.sync, from PTX's fragment layout.
//
// Build and run (tests/test_cuda_team.py does this):
//   g++ -std=c++20 -O1 -pthread -I csrc tests/cuda_team_check.cpp -o team_check && ./team_check
// Exit status 0 when every case matches; otherwise it prints the first mismatches.

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "maml_task.h"
#include "thread_team.h"

namespace {

using fastmaml::task::Net;
using fastmaml::task::TaskData;

struct Case {
  std::vector<int64_t> dims;
  int ns, nq, K, activation, loss;
  bool first_order, need_lr, need_x, multi_step;
  bool recompute;  // the teams' reverse sweeps rebuild theta_k (recompute_thetas); the team of one keeps them
  // The teams' reverse sweeps keep the support states apart from the workspace (kept_states, as the CUDA
  // kernels under FASTMAML_CUDA_STATES=global); the team of one keeps them in it.
  bool states_apart = false;
};

template <typename T>
struct Problem {
  Net net;
  int T_tasks;
  Case c;
  std::vector<T> theta, lr, xs, ys, xq, yq, qw, gl, gp;
  std::vector<int64_t> ys_i, yq_i;

  TaskData<T> task(int t) const {
    const int64_t din = net.dims[0], dout = net.dims[net.L];
    const bool ce = c.loss == fastmaml::task::kCrossEntropy;
    TaskData<T> td;
    td.xs = xs.data() + t * c.ns * din;
    td.ys_float = ce ? nullptr : ys.data() + t * c.ns * dout;
    td.ys_index = ce ? ys_i.data() + t * c.ns : nullptr;
    td.ns = c.ns;
    td.xq = xq.data() + t * c.nq * din;
    td.yq_float = ce ? nullptr : yq.data() + t * c.nq * dout;
    td.yq_index = ce ? yq_i.data() + t * c.nq : nullptr;
    td.nq = c.nq;
    return td;
  }
};

template <typename T>
Problem<T> make_problem(const Case& c, int n_tasks, uint64_t seed) {
  Problem<T> p;
  p.c = c;
  p.T_tasks = n_tasks;
  fastmaml::task::make_net(p.net, c.dims.data(), static_cast<int>(c.dims.size()), c.activation, c.loss);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.02, 0.3);
  auto randn = [&](std::vector<T>& v, size_t n, double scale) {
    v.resize(n);
    for (auto& e : v) e = static_cast<T>(scale * normal(rng));
  };
  const int64_t P = p.net.P, din = c.dims.front(), dout = c.dims.back();
  randn(p.theta, P, 0.5);
  p.lr.resize(static_cast<size_t>(c.K) * P);
  for (auto& e : p.lr) e = static_cast<T>(unif(rng));
  randn(p.xs, static_cast<size_t>(n_tasks) * c.ns * din, 1.0);
  randn(p.xq, static_cast<size_t>(n_tasks) * c.nq * din, 1.0);
  randn(p.ys, static_cast<size_t>(n_tasks) * c.ns * dout, 1.0);
  randn(p.yq, static_cast<size_t>(n_tasks) * c.nq * dout, 1.0);
  std::uniform_int_distribution<int64_t> cls(0, dout - 1);
  p.ys_i.resize(static_cast<size_t>(n_tasks) * c.ns);
  p.yq_i.resize(static_cast<size_t>(n_tasks) * c.nq);
  for (auto& e : p.ys_i) e = cls(rng);
  for (auto& e : p.yq_i) e = cls(rng);
  // Multi-step query weights with a zero among them (the kernels skip zero-weight passes).
  p.qw.assign(c.K + 1, T(0));
  p.qw[c.K] = T(1);
  if (c.multi_step) {
    for (int k = 0; k < c.K; ++k) p.qw[k] = k % 2 == 1 ? T(0) : static_cast<T>(unif(rng));
  }
  randn(p.gl, n_tasks, 1.0);
  randn(p.gp, static_cast<size_t>(n_tasks) * c.nq * dout, 0.3);
  return p;
}

template <typename T>
struct Outputs {
  std::vector<T> losses, preds, g_theta, g_lr, gxs, gxq, thetas;
  // The fused forward and reverse sweep summed into one row (add_rows: the CUDA maml_fwdbwd_sum), and
  // the same gradient from the reverse sweep alone with c = 1 and no query cotangent.
  std::vector<T> f_losses, f_preds, f_theta, f_lr, f_gxs, f_gxq, sum_theta, sum_lr, zeros;
};

// Runs the three drivers for every task, one task after another, as rank `tm.rank()` of `tm`.
// `states`: where the reverse sweeps keep the support states apart (null: in the workspace); `bwork`: their
// workspace (then only the rest of it).
template <typename T, typename Team>
void run_rank(const Problem<T>& p, Outputs<T>& o, std::vector<T>& work, const Team& tm, bool recompute,
              T* states, T* bwork) {
  const Net& net = p.net;
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L];
  const Case& c = p.c;
  for (int t = 0; t < p.T_tasks; ++t) {
    const TaskData<T> td = p.task(t);
    const T loss = fastmaml::task::task_forward(net, td, p.theta.data(), p.lr.data(), c.K, p.qw.data(),
                                                o.preds.data() + t * c.nq * dout, work.data(), tm);
    if (tm.rank() == 0) o.losses[t] = loss;
    fastmaml::task::task_backward(net, td, p.theta.data(), p.lr.data(), c.K, p.qw.data(), p.gl[t],
                                  p.gp.data() + t * c.nq * dout, c.first_order, o.g_theta.data(),
                                  c.need_lr ? o.g_lr.data() : nullptr,
                                  c.need_x ? o.gxs.data() + t * c.ns * din : nullptr,
                                  c.need_x ? o.gxq.data() + t * c.nq * din : nullptr, bwork, tm,
                                  static_cast<T*>(nullptr), static_cast<const T*>(nullptr), false, recompute, states);
    fastmaml::task::task_adapt(net, td, p.theta.data(), p.lr.data(), c.K, o.thetas.data() + t * P, work.data(), tm);
    const T f_loss = fastmaml::task::task_backward(
        net, td, p.theta.data(), p.lr.data(), c.K, p.qw.data(), T(1), static_cast<const T*>(nullptr),
        c.first_order, o.f_theta.data(), c.need_lr ? o.f_lr.data() : nullptr,
        c.need_x ? o.f_gxs.data() + t * c.ns * din : nullptr, c.need_x ? o.f_gxq.data() + t * c.nq * din : nullptr,
        bwork, tm, o.f_preds.data() + t * c.nq * dout, static_cast<const T*>(nullptr), /*add_rows=*/true,
        recompute, states);
    if (tm.rank() == 0) o.f_losses[t] = f_loss;
    fastmaml::task::task_backward(net, td, p.theta.data(), p.lr.data(), c.K, p.qw.data(), T(1), o.zeros.data(),
                                  c.first_order, o.sum_theta.data(), c.need_lr ? o.sum_lr.data() : nullptr,
                                  static_cast<T*>(nullptr), static_cast<T*>(nullptr), bwork, tm,
                                  static_cast<T*>(nullptr), static_cast<const T*>(nullptr), false, recompute, states);
  }
}

int failures = 0;

template <typename T>
Outputs<T> run(const Problem<T>& p, int team_size, int shape = -1, bool recompute = false, bool states_apart = false) {
  const Net& net = p.net;
  const Case& c = p.c;
  const int64_t P = net.P, din = net.dims[0], dout = net.dims[net.L], nmax = std::max(c.ns, c.nq);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  Outputs<T> o;
  o.losses.assign(p.T_tasks, nan);
  o.preds.assign(static_cast<size_t>(p.T_tasks) * c.nq * dout, nan);
  o.g_theta.assign(P, T(0));
  o.g_lr.assign(static_cast<size_t>(c.K) * P, T(0));
  o.gxs.assign(c.need_x ? static_cast<size_t>(p.T_tasks) * c.ns * din : 0, nan);
  o.gxq.assign(c.need_x ? static_cast<size_t>(p.T_tasks) * c.nq * din : 0, nan);
  o.thetas.assign(static_cast<size_t>(p.T_tasks) * P, nan);
  o.f_losses.assign(p.T_tasks, nan);
  o.f_preds.assign(o.preds.size(), nan);
  o.f_theta.assign(P, T(0));
  o.f_lr.assign(o.g_lr.size(), T(0));
  o.f_gxs.assign(o.gxs.size(), nan);
  o.f_gxq.assign(o.gxq.size(), nan);
  o.sum_theta.assign(P, T(0));
  o.sum_lr.assign(o.g_lr.size(), T(0));
  o.zeros.assign(static_cast<size_t>(c.nq) * dout, T(0));
  int64_t ws = fastmaml::task::backward_workspace(net, c.K, nmax, c.need_lr, recompute);
  ws = std::max(ws, fastmaml::task::forward_workspace(net, nmax));
  ws = std::max(ws, fastmaml::task::adapt_workspace(net, c.ns));
  std::vector<T> work(static_cast<size_t>(ws), nan);
  // States apart (K > 1: steps 0..K-2 apart, the step's at hand in the workspace): the reverse sweeps get
  // their own workspace of exactly backward_workspace(..., true) elements, then a guard of sentinels that
  // must stay untouched (as long as the states, so that a sweep keeping them in its workspace after all is
  // reported, not a corrupted heap), and every element of the states buffer must be written.
  const int64_t bws = fastmaml::task::backward_workspace(net, c.K, nmax, c.need_lr, recompute, true);
  const int64_t n_states = fastmaml::task::backward_states(net, c.K, nmax);
  const T sentinel = T(-12345.5), unwritten = T(-6789.25);
  std::vector<T> kept(states_apart ? static_cast<size_t>(n_states) : 0, unwritten);
  std::vector<T> bwork_apart(states_apart ? static_cast<size_t>(bws + n_states + 16) : 0, nan);
  std::fill(bwork_apart.begin() + (states_apart ? bws : 0), bwork_apart.end(), sentinel);
  T* states = states_apart && n_states > 0 ? kept.data() : nullptr;
  T* bwork = states_apart ? bwork_apart.data() : work.data();
  const auto check_apart = [&] {
    if (!states_apart) return;
    const bool guard_kept = std::all_of(bwork_apart.begin() + bws, bwork_apart.end(), [&](T x) { return x == sentinel; });
    // Each state is copied out whole, padding included: no element may keep its initial sentinel.
    const bool written = std::none_of(kept.begin(), kept.end(), [&](T x) { return x == unwritten; });
    if (!guard_kept || !written) {
      std::printf("STATES APART team=%d: %s\n", team_size,
                  !guard_kept ? "the reverse sweep wrote past its workspace" : "the kept states were never written");
      ++failures;
    }
  };
  if (team_size == 0) {
    run_rank(p, o, work, fastmaml::task::SerialTeam(), recompute, states, bwork);
    check_apart();
    return o;
  }
  std::barrier<> bar(team_size);
  std::vector<double> red(team_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < team_size; ++r) {
    threads.emplace_back(
        [&, r] { run_rank(p, o, work, ThreadTeam{r, team_size, &bar, red.data(), shape}, recompute, states, bwork); });
  }
  for (auto& th : threads) th.join();
  check_apart();
  return o;
}

template <typename T>
void compare(const std::vector<T>& got, const std::vector<T>& want, const char* what, const char* label, int team,
             double rtol) {
  double scale = 0, worst = 0;
  int64_t at = -1;
  for (size_t i = 0; i < want.size(); ++i) scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(err <= worst) || std::isnan(err)) {  // NaN counts as the worst
      worst = std::isnan(err) ? INFINITY : err;
      at = static_cast<int64_t>(i);
    }
  }
  if (!(worst <= rtol * (scale + 1e-30))) {
    if (failures < 20) {
      std::printf("MISMATCH %s team=%d %s: max |err| %.3g at %lld (got %.17g want %.17g), scale %.3g\n", label, team,
                  what, worst, static_cast<long long>(at), static_cast<double>(got[at]),
                  static_cast<double>(want[at]), scale);
    }
    ++failures;
  }
}

// A team of the given size and tile shape, and a rank run alone: the products never sync, so running the
// ranks one after another shows whether every output element has exactly one owner.
struct RankOf {
  int r, s, shape;
  int rank() const { return r; }
  int size() const { return s; }
  void sync() const {}
  int tile(int, int) const { return shape; }
};

// Epilogues of gemm_*_then for the pair check below: the first product sets the output, the second adds
// to what its owner finds there and scales the sum.
struct SetOut {
  double* out;
  int64_t ldo;
  double init(int, int) const { return 0.0; }
  void finish(int r, int c, double v) const { out[r * ldo + c] = v; }
};
struct AddAndScale {
  double* out;
  int64_t ldo;
  double init(int r, int c) const { return out[r * ldo + c]; }
  void finish(int r, int c, double v) const { out[r * ldo + c] = 3.0 * v; }
};

// Every register tile of the team products (gemm_nn_acc, gemm_nt_acc) against the team of one, on
// sizes around the tiles' edges, with strided operands as the layer passes use them. The output starts
// random, so a missed element or one added twice both show. Then two products of one shape into one
// output with no sync between them, as the layer passes run them (gemm_nt_then setting it, gemm_nn_then
// adding to it), each rank running both before the next rank starts: a rank that owned an element in
// the second product but not in the first would find NaN there.
int check_products() {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  int n = 0;
  for (int R : {1, 3, 10, 17}) {
    for (int C : {1, 5, 40, 41, 130}) {
      for (int Kd : {1, 3, 10, 12, 13, 41}) {
        std::vector<double> a(static_cast<size_t>(R) * Kd), b(static_cast<size_t>(Kd) * C), bt(b.size());
        std::vector<double> out0(static_cast<size_t>(R) * C);
        for (auto& e : a) e = nd(rng);
        for (auto& e : b) e = nd(rng);
        for (auto& e : bt) e = nd(rng);
        for (auto& e : out0) e = nd(rng);
        for (int transposed_a = 0; transposed_a < 2; ++transposed_a) {
          // a as [R, Kd] (ars = Kd, aks = 1) or as the transpose of a [Kd, R] array (ars = 1, aks = R).
          const int64_t ars = transposed_a ? 1 : Kd, aks = transposed_a ? R : 1;
          std::vector<double> want_nn = out0, want_nt = out0;
          fastmaml::task::gemm_nn_acc(R, C, Kd, 0.5, a.data(), ars, aks, b.data(), C, want_nn.data(), C);
          if (!transposed_a) fastmaml::task::gemm_nt_acc(R, C, Kd, a.data(), Kd, bt.data(), Kd, want_nt.data(), C);
          for (int size : {2, 7, 32, 40, 128}) {
            // The tensor-core tiles (kTileMma) need a whole warp; a team of 40 has 8 ranks that own nothing.
            const int last_shape = size >= 32 ? fastmaml::task::kTileMma : fastmaml::task::kTile4x4;
            for (int shape = fastmaml::task::kTile1x1; shape <= last_shape; ++shape) {
              std::vector<double> got_nn = out0, got_nt = out0;
              for (int r = 0; r < size; ++r) {
                const RankOf tm{r, size, shape};
                fastmaml::task::gemm_nn_acc(R, C, Kd, 0.5, a.data(), ars, aks, b.data(), C, got_nn.data(), C, tm);
                if (!transposed_a) {
                  fastmaml::task::gemm_nt_acc(R, C, Kd, a.data(), Kd, bt.data(), Kd, got_nt.data(), C, tm);
                }
              }
              char label[128];
              std::snprintf(label, sizeof label, "products R=%d C=%d Kd=%d a%s tile=%d", R, C, Kd,
                            transposed_a ? "^T" : "", shape);
              compare(got_nn, want_nn, "gemm_nn_acc", label, size, 1e-12);
              if (!transposed_a) compare(got_nt, want_nt, "gemm_nt_acc", label, size, 1e-12);
              if (!transposed_a) {
                std::vector<double> want_pair(out0.size(), NAN), got_pair(out0.size(), NAN);
                fastmaml::task::gemm_nt_then(R, C, Kd, a.data(), Kd, bt.data(), Kd, want_pair.data(), C,
                                             SetOut{want_pair.data(), C});
                fastmaml::task::gemm_nn_then(R, C, Kd, 0.5, a.data(), ars, aks, b.data(), C, want_pair.data(), C,
                                             AddAndScale{want_pair.data(), C});
                for (int r = 0; r < size; ++r) {
                  const RankOf tm{r, size, shape};
                  fastmaml::task::gemm_nt_then(R, C, Kd, a.data(), Kd, bt.data(), Kd, got_pair.data(), C,
                                               SetOut{got_pair.data(), C}, tm);
                  fastmaml::task::gemm_nn_then(R, C, Kd, 0.5, a.data(), ars, aks, b.data(), C, got_pair.data(), C,
                                               AddAndScale{got_pair.data(), C}, tm);
                }
                compare(got_pair, want_pair, "gemm_nt_then + gemm_nn_then", label, size, 1e-12);
              }
              ++n;
            }
          }
        }
      }
    }
  }
  return n;
}

// A team's size and its products' tile (-1: pick_tile's, as the CUDA block without tensor cores).
struct TeamSpec {
  int size, shape;
};

template <typename T>
void check_case(const Case& c, uint64_t seed, const std::vector<TeamSpec>& teams, double rtol) {
  const Problem<T> p = make_problem<T>(c, 3, seed);
  char label[256];
  std::snprintf(label, sizeof label, "case#%llu %s dims=%zu-layer ns=%d nq=%d K=%d %s %s%s%s%s%s%s%s",
                static_cast<unsigned long long>(seed), sizeof(T) == 8 ? "f64" : "f32", c.dims.size() - 1, c.ns, c.nq,
                c.K, c.activation == 0 ? "relu" : "tanh", c.loss == 0 ? "mse" : "ce", c.first_order ? " fo" : "",
                c.need_lr ? " lr" : "", c.need_x ? " x" : "", c.multi_step ? " qw" : "", c.recompute ? " rebuilt" : "",
                c.states_apart ? " states-apart" : "");
  // The team of one keeps theta_1..theta_K; teams of a recompute case rebuild them (within a rounding).
  const Outputs<T> want = run(p, 0);
  for (const TeamSpec& spec : teams) {
    const int team = spec.size;
    const Outputs<T> got = run(p, team, spec.shape, c.recompute, c.states_apart);
    compare(got.losses, want.losses, "task_losses", label, team, rtol);
    compare(got.preds, want.preds, "query_preds", label, team, rtol);
    compare(got.g_theta, want.g_theta, "g_theta", label, team, rtol);
    if (c.need_lr) compare(got.g_lr, want.g_lr, "g_lr", label, team, rtol);
    if (c.need_x) compare(got.gxs, want.gxs, "g_x_support", label, team, rtol);
    if (c.need_x) compare(got.gxq, want.gxq, "g_x_query", label, team, rtol);
    compare(got.thetas, want.thetas, "thetas", label, team, rtol);
    compare(got.f_losses, want.losses, "fused task_losses", label, team, rtol);
    compare(got.f_preds, want.preds, "fused query_preds", label, team, rtol);
    compare(got.f_theta, want.sum_theta, "fused summed g_theta", label, team, rtol);
    if (c.need_lr) compare(got.f_lr, want.sum_lr, "fused summed g_lr", label, team, rtol);
    if (c.need_x) compare(got.f_gxs, want.f_gxs, "fused g_x_support", label, team, rtol);
    if (c.need_x) compare(got.f_gxq, want.f_gxq, "fused g_x_query", label, team, rtol);
  }
}

}  // namespace

int main() {
  // Widths not powers of two, some wider and some narrower than the teams; teams of 2 to 64 threads
  // (33: more threads than most layers have outputs, so some ranks own nothing in a phase; the 41-wide
  // net gives the register tiles several units per rank and partial tiles at the edges).
  const std::vector<std::vector<int64_t>> nets = {{3, 7, 2}, {1, 9, 6, 1}, {5, 3}, {4, 11, 5, 6, 3}, {2, 41, 17, 3}};
  // Each team size with a tile shape of its own (pick_tile's for the first and the 33), so every shape
  // runs through every driver; the team of 64 (two warps) runs every product on the tensor-core tiles.
  // The two large teams take turns, case by case: on 2 cores their 33 and 64 threads meet at each
  // barrier through the scheduler (21 of the check's 25 s when every case ran both), and the order of the
  // cases (option set fastest, then K, activation, loss, net) gives each of them every option set, every K,
  // both losses and activations, and every net.
  const std::vector<TeamSpec> small = {{2, -1}, {3, 1}, {8, 2}, {5, 0}};
  const std::vector<TeamSpec> large = {{33, -1}, {64, fastmaml::task::kTileMma}};
  auto teams_for = [&](uint64_t seed) {
    std::vector<TeamSpec> teams = small;
    teams.push_back(large[seed % 2]);
    return teams;
  };
  const int n_products = check_products();
  int n_cases = 0;
  uint64_t seed = 1;
  for (size_t ni = 0; ni < nets.size(); ++ni) {
    for (int loss = 0; loss < 2; ++loss) {
      for (int act = 0; act < 2; ++act) {
        for (int K : {0, 1, 3}) {
          for (int variant = 0; variant < 3; ++variant) {
            Case c;
            c.dims = nets[ni];
            c.ns = 5 + static_cast<int>(ni);
            c.nq = 7 - static_cast<int>(ni) % 3;
            c.K = K;
            c.activation = act;
            c.loss = loss;
            // Three option sets per net: second order with every gradient, first order with none extra,
            // and second order with every gradient with the thetas recomputed.
            c.first_order = variant == 1;
            c.need_lr = variant != 1;
            c.need_x = variant != 1;
            c.multi_step = variant != 1 && K > 0;
            c.recompute = variant == 2;
            // The states apart from the workspace: second order with kept thetas on half the nets, with
            // rebuilt ones on the other half, first order (kept thetas, no g_lr) on that half too.
            c.states_apart = ni % 2 == 0 ? variant == 0 : variant != 0;
            check_case<double>(c, seed, teams_for(seed), 1e-12);
            ++seed;
            ++n_cases;
          }
        }
      }
    }
  }
  // float32 on one net: the same code path, instantiated for float.
  for (int loss = 0; loss < 2; ++loss) {
    for (bool recompute : {false, true}) {
      Case c{{3, 10, 4}, 6, 5, 2, 1, loss, false, true, true, true, recompute, /*states_apart=*/recompute};
      check_case<float>(c, seed, teams_for(seed), 1e-5);
      ++seed;
      ++n_cases;
    }
  }
  if (failures != 0) {
    std::printf("FAILED: %d mismatching outputs\n", failures);
    return 1;
  }
  std::printf("ok: %d product cases and %d cases x %zu team sizes match the team of one\n", n_products, n_cases,
              small.size() + 1);
  return 0;
}
