// fastmaml: plan() (how a call is laid out on blocks) and the forward, adapt and weighted-sum launchers
// of the CUDA kernels, float32 and float64; the kernels and launchers are in kernels.cuh, the reverse
// sweeps' instantiations in bwd_*.cu and fwdbwd_*.cu (kernels.cuh says why they are separate files).

#include "kernels.cuh"

#include <atomic>

#include "../env_switch.h"

namespace fastmaml {
namespace cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// FASTMAML_CUDA_TILES=0 (read once per process) gives every team product one output per thread, as
// before the register tiles: a switch for measuring them, like FASTMAML_CUDA_SHARED_KB for the workspace.
bool register_tiles() {
  static const bool on = !env_is("FASTMAML_CUDA_TILES", "0");
  return on;
}

// FASTMAML_CUDA_LDS=0 (read once per process) keeps the products' generic loads where both operands are
// in shared memory (csrc/task/team_tiles.h): a switch for the GPU check's A/B.
bool shared_loads() {
  static const bool on = !env_is("FASTMAML_CUDA_LDS", "0");
  return on;
}

// FASTMAML_CUDA_MMA=1 (read once per process) runs the float reverse sweeps' products of at least 8 x 8
// outputs (bwd_kernel, fwdbwd_kernel; not the forward's and adapt's) on tensor cores (csrc/task/team_mma.h:
// mma.sync m16n8k8, 3xTF32), where the register tiles are on (FASTMAML_CUDA_TILES=0 turns both off). Off
// by default until a GPU has measured it against the register tiles (the GPU check's A/B `mma`); the
// results then differ from the tiles' in their last bits.
bool tensor_cores() {
  static const bool on = env_is("FASTMAML_CUDA_MMA", "1");
  return on;
}

// FASTMAML_CUDA_THREADS=32 or 64 (read once per process; the cuda backend refuses other values) caps a
// task's team below kMaxThreads: with the same registers a thread, 4 or 2 times the tasks resident on a
// multiprocessor, and a one-warp team's block barriers cost next to nothing. A switch for the GPU check's
// A/B (with FASTMAML_CUDA_SHARED_KB=44: a 126 KiB shared workspace would allow one such block a
// multiprocessor).
int team_cap() {
  static const int cap = [] {
    const char* v = std::getenv("FASTMAML_CUDA_THREADS");
    const int n = v == nullptr ? kMaxThreads : std::atoi(v);
    return (n == 32 || n == 64) ? n : kMaxThreads;
  }();
  return cap;
}

// FASTMAML_CUDA_MIN_BLOCKS=4 or 6 launches the float reverse sweep compiled for that many blocks of 128
// threads a multiprocessor instead of the 3 its 168 registers allow: ncu on the H200 found it latency-bound
// at 12 warps a multiprocessor (18.75% occupancy, SM throughput 22%), and a task alone on a multiprocessor
// took about as long as one of three. 4: at most 128 registers; 6: at most 80 (more spills, outside the
// products' loops), which also fits 12 teams of 64 threads or 24 of 32 (FASTMAML_CUDA_THREADS). Where
// shared memory holds fewer workspaces (6 x 37.8 KiB at K = 1, W = 40 fit; 62.6 KiB at K = 5 only 3,
// 6 with the states apart: FASTMAML_CUDA_STATES), it bounds the tasks in flight instead. Switches until
// a GPU measures them (the GPU check's A/B). Each kernel is instantiated in a file of its own
// (bwd_f32_min4.cu, bwd_f32_min6.cu: kernels.cuh's BwdMin), apart from bwd_f32.cu's default sweep: each
// reverse sweep is most of its file's build, and ninja compiles the files side by side.
// Read once per process, here only: plan() records it in Launch::min_blocks, which the launchers dispatch
// on, so the sweep launched is the one plan() sized the workspace for (the cuda backend refuses values
// other than 0, the default, 4 and 6).
int min_blocks() {
  static const int n = [] {
    const std::string v = env_word("FASTMAML_CUDA_MIN_BLOCKS");
    return v == "4" ? 4 : v == "6" ? 6 : 0;
  }();
  return n;
}

// FASTMAML_CUDA_STATES=global (read once per process; the cuda backend refuses values other than
// "workspace", the default, and "global") keeps the reverse sweeps' support states of steps 0..K-2 in
// global memory apart from a task's workspace, which holds the step's at hand (task_backward's
// kept_states: each state copied out after its inner step and back in before its reverse step, so every
// product still reads shared memory). At the sinusoid net's K = 5 (W = 40, rebuilt thetas) the shared
// workspace then takes 36.8 KiB a task instead of 62.6, as at K = 1: shared memory holds 6 blocks a
// multiprocessor instead of 3, so the 4- and 6-block sweeps (FASTMAML_CUDA_MIN_BLOCKS) run that many
// tasks at once; the 25.8 KiB of states a task stream through L2. K = 1: no change. Only those two sweeps
// stage the states (bwd_kernel's kStaged: compiled into the default sweep, the copies raised its spills), so
// the switch takes effect with FASTMAML_CUDA_MIN_BLOCKS=4 or 6 on float tensors, in maml_bwd's reverse sweep
// and the training call's (Op::kBackward); the backend refuses it without one of them. A switch until a GPU
// measures it (the GPU check's A/B `blocks6+states`).
bool states_apart(const Launch& l) {
  static const bool on = env_word("FASTMAML_CUDA_STATES") == "global";
  return on && l.min_blocks != 0;
}

// FASTMAML_REVERSE_THETAS (read once per process): "keep" or "recompute" at every size; otherwise (unset,
// "auto") recompute where the kept rows take the workspace past kKeepThetasBytes.
int reverse_thetas() {  // 0 keep, 1 recompute, -1 auto
  static const int mode = [] {
    const std::string m = env_word("FASTMAML_REVERSE_THETAS");  // as the backend's check (cuda.py) reads it
    return m == "keep" ? 0 : m == "recompute" ? 1 : -1;
  }();
  return mode;
}

}  // namespace

Launch plan(Op op, const Sizes& s, bool need_lr_grad, int itemsize, int64_t max_shared_bytes) {
  const Net& net = s.net;
  const int64_t nmax = std::max(s.Ns, s.Nq);
  Launch l{};
  switch (op) {
    case Op::kForward:
      l.work_elems = task::forward_workspace(net, nmax);
      break;
    case Op::kAdapt:
      l.work_elems = task::adapt_workspace(net, s.Ns);
      break;
    case Op::kBackward:
    case Op::kForwardBackward: {
      const int64_t kept = task::backward_workspace(net, s.K, nmax, need_lr_grad);
      const int mode = reverse_thetas();
      l.recompute_thetas = mode == 1 || (mode == -1 && kept * itemsize > kKeepThetasBytes);
      l.work_elems = l.recompute_thetas ? task::backward_workspace(net, s.K, nmax, need_lr_grad, true) : kept;
      l.min_blocks = op == Op::kBackward && itemsize == 4 ? min_blocks() : 0;
      if (states_apart(l)) {  // none apart at K <= 1
        l.state_elems = task::backward_states(net, s.K, nmax);
        l.work_elems -= l.state_elems;
      }
      break;
    }
  }
  // Threads: enough for the widest phase (a layer's outputs, or the P parameters), in whole warps.
  int64_t widest = net.P;
  for (int i = 0; i < net.L; ++i) {
    const int64_t din = net.dims[i], dout = net.dims[i + 1];
    widest = std::max({widest, nmax * dout, nmax * din, din * dout});
  }
  l.threads = static_cast<int>(std::min<int64_t>(team_cap(), ceil_div(widest, 32) * 32));
  l.shared = l.work_elems * itemsize <= max_shared_bytes;
  // The grid as if the workspace (with the states) were global, whether or not it fits in this GPU's
  // shared memory and wherever the states are kept: the backward's chunks (its summation order) must not
  // depend on the device or the switches.
  const int64_t work_bytes = (l.work_elems + l.state_elems) * itemsize;
  int64_t max_blocks = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(s.T, 1));
  max_blocks = std::min(max_blocks, std::max<int64_t>(1, kWorkspaceBudgetBytes / std::max<int64_t>(work_bytes, 1)));
  if (op == Op::kBackward) {
    const int64_t row_bytes = net.P * (1 + (need_lr_grad ? s.K : 0)) * itemsize;
    max_blocks = std::min(max_blocks, std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(row_bytes, 1)));
    l.chunk = ceil_div(std::max<int64_t>(s.T, 1), max_blocks);
    l.blocks = ceil_div(std::max<int64_t>(s.T, 1), l.chunk);
  } else {
    l.chunk = 0;
    l.blocks = max_blocks;
  }
  l.global_elems = (l.shared ? 0 : l.blocks * l.work_elems) + l.blocks * l.state_elems;
  l.tiles = register_tiles();
  l.shared_loads = shared_loads();
  l.mma = tensor_cores() && itemsize == 4;  // float only: team_mma.h has no double tiles
  return l;
}

// The armed timeline (maml_cuda.h): one per process, behind a lock, since any host thread may launch;
// `pending` mirrors whether one is armed, for the launches' look without the lock.
namespace {
std::mutex timeline_lock;
Timeline armed_timeline{};
std::atomic<bool> pending{false};
}  // namespace

void arm_timeline(const Timeline& t) {
  const std::lock_guard<std::mutex> guard(timeline_lock);
  armed_timeline = t.records == nullptr ? Timeline{} : t;
  pending.store(t.records != nullptr);
}

bool timeline_armed() { return pending.load(std::memory_order_relaxed); }

bool take_timeline(int device, Timeline* out) {
  const std::lock_guard<std::mutex> guard(timeline_lock);
  if (armed_timeline.records == nullptr || armed_timeline.device != device) return false;
  *out = armed_timeline;
  armed_timeline = Timeline{};
  pending.store(false);
  return true;
}

FASTMAML_INSTANTIATE_LIGHT(float)
FASTMAML_INSTANTIATE_LIGHT(double)

}  // namespace cuda
}  // namespace fastmaml
