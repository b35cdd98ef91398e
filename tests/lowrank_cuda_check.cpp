// fastmaml: the CUDA lowrank_add's block (csrc/cuda/lowrank_add.cuh) run on the CPU, without a GPU.
//
// The kernel's code runs here as it is; only its lanes differ: 128 std::threads are a block, a
// std::barrier of all of them is __syncthreads, and a shuffle goes through an array per warp between
// two barriers of the warp's 32 threads. Every output is compared with a long double sum of the same
// products, on fresh random inputs (never zeros), sizes that are not powers of two or multiples of the
// 5 x 5 blocks, 1, 3, 6 and 16 pairs, with and without base and scales, float and double, elementwise and
// 16-byte loads in either pass. Scratch (the c_j) and the output start as NaN, so an element read before
// it is written or never written shows up. Prints "ok: N cases" and exits 0, or names the first case that
// differs.
//
//   g++ -std=c++20 -O1 -pthread -I csrc tests/lowrank_cuda_check.cpp -o lowrank_check && ./lowrank_check

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "cuda/lowrank_add.cuh"

namespace {

using fastmaml::lowrank::AddArgs;
constexpr int kThreads = fastmaml::lowrank::kThreads;

struct Shared {
  std::barrier<> block{kThreads};
  std::vector<std::barrier<>*> warps;
  std::vector<long double> exchange = std::vector<long double>(kThreads);
  Shared() {
    for (int w = 0; w < kThreads / 32; ++w) warps.push_back(new std::barrier<>(32));
  }
  ~Shared() {
    for (auto* b : warps) delete b;
  }
};

struct HostLanes {
  Shared* sh;
  int r;
  int rank() const { return r; }
  int lane() const { return r & 31; }
  int warp() const { return r >> 5; }
  void sync() const { sh->block.arrive_and_wait(); }
  template <typename T>
  T shfl_xor(T v, int mask) const {
    std::barrier<>& w = *sh->warps[warp()];
    sh->exchange[r] = v;
    w.arrive_and_wait();
    const T got = static_cast<T>(sh->exchange[(r & ~31) | (lane() ^ mask)]);
    w.arrive_and_wait();  // nobody overwrites the array before every lane has read it
    return got;
  }
};

template <typename T>
std::vector<T> fresh(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<double> mag(0.25, 1.0);
  std::bernoulli_distribution sign(0.5);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(sign(rng) ? mag(rng) : -mag(rng));
  return v;
}

template <int kVecI, int kVecO, typename T>
bool run_case(std::mt19937& rng, int tasks, int n, int s, int in, int o, int pairs, bool with_base,
              bool with_scales, int id) {
  std::vector<T> x = fresh<T>(rng, size_t(tasks) * n * in), base = fresh<T>(rng, size_t(tasks) * n * o);
  std::vector<std::vector<T>> hs, ds;
  for (int j = 0; j < pairs; ++j) {
    hs.push_back(fresh<T>(rng, size_t(tasks) * s * in));
    ds.push_back(fresh<T>(rng, size_t(tasks) * s * o));
  }
  std::vector<T> scales = fresh<T>(rng, pairs);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> out(size_t(tasks) * n * o, nan), cs(fastmaml::lowrank::shared_elements(pairs, n, s), nan);
  AddArgs<T> a{};
  a.base = with_base ? base.data() : nullptr;
  a.x = x.data();
  for (int j = 0; j < pairs; ++j) a.hs[j] = hs[j].data(), a.ds[j] = ds[j].data();
  a.scales = with_scales ? scales.data() : nullptr;
  a.out = out.data();
  a.tasks = tasks, a.n = n, a.s = s, a.i = in, a.o = o, a.pairs = pairs;

  Shared sh;
  std::vector<std::thread> lanes;
  for (int r = 0; r < kThreads; ++r) {
    lanes.emplace_back([&, r] {
      const HostLanes hl{&sh, r};
      for (int64_t t = 0; t < tasks; ++t) {
        fastmaml::lowrank::add_task<kVecI, kVecO>(hl, a, t, cs.data());
        hl.sync();  // a GPU block takes one task; here the next task reuses the block's scratch
      }
    });
  }
  for (auto& th : lanes) th.join();

  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
  for (int t = 0; t < tasks; ++t) {
    for (int r = 0; r < n; ++r) {
      for (int c = 0; c < o; ++c) {
        long double want = with_base ? base[(size_t(t) * n + r) * o + c] : 0.0L, scale = 0;
        for (int j = 0; j < pairs; ++j) {
          const long double sj = with_scales ? scales[j] : 1.0L;
          for (int si = 0; si < s; ++si) {
            long double cj = 0;
            for (int k = 0; k < in; ++k) {
              cj += static_cast<long double>(x[(size_t(t) * n + r) * in + k]) * hs[j][(size_t(t) * s + si) * in + k];
            }
            const long double term = sj * cj * ds[j][(size_t(t) * s + si) * o + c];
            want += term;
            scale += std::fabs(static_cast<double>(term));
          }
        }
        const T got = out[(size_t(t) * n + r) * o + c];
        if (!(std::fabs(static_cast<double>(got - want)) <= tol * (1.0 + static_cast<double>(scale)))) {
          std::printf("case %d (%s, loads of %d and %d, tasks %d, n %d, s %d, i %d, o %d, pairs %d, base %d, scales %d): "
                      "out[%d, %d, %d] = %.17g, want %.17Lg\n",
                      id, sizeof(T) == 4 ? "float" : "double", kVecI, kVecO, tasks, n, s, in, o, pairs, with_base,
                      with_scales, t, r, c, static_cast<double>(got), want);
          return false;
        }
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(20261202);
  struct Shape {
    int n, s, in, o;
  };
  // Points and support rows: one block, blocks cut evenly (10 -> 5 + 5, 13 -> 5 + 5 + 3, 16 -> 4 x 4),
  // more blocks than warps (23 x 11: 15 blocks). Widths: 1 (a net's first or last layer), below, at and
  // past one lane's step (4 x 32 = 128 floats), not multiples of 4.
  const Shape shapes[] = {{1, 1, 1, 40}, {10, 10, 128, 128}, {10, 10, 40, 1}, {13, 7, 132, 36},
                          {5, 16, 12, 260}, {23, 11, 300, 8}, {10, 10, 129, 7}, {3, 2, 3, 5}};
  int cases = 0, rotate = 0;
  for (const Shape& sh : shapes) {
    for (int pairs : {1, 3}) {
      // base and scales on and off in turn over the shapes (all four combinations for each load width)
      const int variant = rotate++;
      const bool base = variant & 1, scales = variant & 2;
      // every load width each pass can take: elementwise, and 16 bytes where the width allows it
      const int vf_i = sh.in % 4 == 0 ? 4 : 1, vf_o = sh.o % 4 == 0 ? 4 : 1;
      const int vd_i = sh.in % 2 == 0 ? 2 : 1, vd_o = sh.o % 2 == 0 ? 2 : 1;
      bool ok = run_case<1, 1, float>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, base, scales, cases++) &&
                run_case<1, 1, double>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, !base, scales, cases++);
      if (ok && vf_i == 4 && vf_o == 4) ok = run_case<4, 4, float>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, base, !scales, cases++);
      if (ok && vf_i == 4) ok = run_case<4, 1, float>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, !base, !scales, cases++);
      if (ok && vf_o == 4) ok = run_case<1, 4, float>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, !base, scales, cases++);
      if (ok && vd_i == 2 && vd_o == 2) ok = run_case<2, 2, double>(rng, 2, sh.n, sh.s, sh.in, sh.o, pairs, !base, !scales, cases++);
      if (!ok) return 1;
    }
  }
  // The most pairs a launch takes, and a sixth to see that the pair loop has no bound of its own.
  for (int pairs : {6, 16}) {
    if (!run_case<4, 4, float>(rng, 3, 10, 10, 128, 128, pairs, true, true, cases++)) return 1;
  }
  std::printf("ok: %d cases\n", cases);
  return 0;
}
