// fastmaml: the schemas of the flat operations (docs/kernels.md) and their CPU implementations.
//
// The schemas are declared once here; each device registers its kernels under its dispatch key. The
// fake (meta) kernels and the autograd formulas of maml_fwd, maml_bwd and weighted_task_sum are
// registered from Python (fastmaml/_ext.py, fastmaml/backends/_fused.py); maml_fwdbwd's autograd kernel
// is C++ (autograd_fwdbwd.cpp): it sits on every training call, where a Python formula costs more than
// the rest of the call's overhead.

#include <torch/library.h>

#include "autograd_fwdbwd.h"
#include "cpu/maml_cpu.h"
#include "cpu/onestep_cpu.h"

// The hash of the sources this library was built from, given as -DFASTMAML_SOURCE_HASH=h<hex> (a bare
// token: no quotes to survive the build tools' shells). fastmaml/_ext.py uses a prebuilt library only
// when it matches the sources it sits beside.
#define FASTMAML_STR_(x) #x
#define FASTMAML_STR(x) FASTMAML_STR_(x)
#ifdef FASTMAML_SOURCE_HASH
extern "C" const char* fastmaml_source_hash() { return FASTMAML_STR(FASTMAML_SOURCE_HASH) + 1; }
#else
extern "C" const char* fastmaml_source_hash() { return ""; }
#endif

TORCH_LIBRARY(fastmaml, m) {
  m.def(
      "maml_fwd(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, "
      "Tensor qw, int[] dims, int activation, int loss, bool first_order) -> (Tensor, Tensor)");
  m.def(
      "maml_bwd(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, "
      "Tensor qw, Tensor g_task_losses, Tensor g_query_preds, int[] dims, int activation, int loss, "
      "bool first_order, bool need_lr_grad, bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "maml_fwdbwd(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, Tensor qw, int[] dims, int activation, int loss, bool first_order, bool need_lr_grad, "
      "bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "maml_fwdbwd_sum(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, Tensor qw, int[] dims, int activation, int loss, bool first_order, bool need_lr_grad, "
      "bool need_x_grad, bool keep_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("weighted_task_sum(Tensor rows, Tensor weights) -> Tensor");
  m.def(
      "maml_train(Tensor[] params, Tensor lr, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, Tensor qw, int[] dims, int activation, int loss, bool first_order, bool need_lr_grad, "
      "bool need_x_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "maml_adapt(Tensor theta, Tensor lr, Tensor x_support, Tensor y_support, int[] dims, int activation, "
      "int loss) -> Tensor");
  // One-step MAML with theta_1 kept low-rank: losses, query outputs, the meta-gradient's factor rows and
  // each task's rate gradients (csrc/onestep_op.h; fastmaml/backends/_onestep.py).
  m.def(
      "maml_onestep(Tensor theta, Tensor theta_t, Tensor rates, Tensor x_support, Tensor y_support, "
      "Tensor x_query, Tensor y_query, Tensor? cot, Tensor? g_pred, int[] dims, int activation, int loss, "
      "bool first_order, bool factors) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The factored backend's low-rank product, and the sweep's pair of them, on CUDA tensors
  // (csrc/cuda/lowrank_add.cuh; no CPU kernels: fastmaml/backends/_lowrank.py and _lowrank_pairs.py call
  // them where FASTMAML_FACTORED_KERNELS=cuda).
  m.def("lowrank_add_cuda(Tensor? base, Tensor x, Tensor[] hs, Tensor[] ds, Tensor? scales) -> Tensor");
  m.def(
      "lowrank_pairs_cuda(Tensor? base_u, Tensor? base_v, Tensor h, Tensor d, Tensor[] fa, Tensor[] fb, "
      "Tensor? scales) -> (Tensor, Tensor)");
}

// Test-only operations, outside the public fastmaml namespace: parallel_probe(n) runs an
// at::parallel_for over n items and returns how many threads took part (tests/test_cpu_op.py checks that
// the kernels run on torch's intra-op threads).
TORCH_LIBRARY(fastmaml_testing, m) {
  m.def("parallel_probe(int n) -> int", &fastmaml::cpu::parallel_probe);  // no tensors: any device
}

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("maml_fwd", &fastmaml::cpu::maml_fwd);
  m.impl("maml_bwd", &fastmaml::cpu::maml_bwd);
  m.impl("maml_adapt", &fastmaml::cpu::maml_adapt);
  m.impl("maml_fwdbwd", &fastmaml::cpu::maml_fwdbwd);
  m.impl("maml_fwdbwd_sum", &fastmaml::cpu::maml_fwdbwd_sum);
  m.impl("weighted_task_sum", &fastmaml::cpu::weighted_task_sum);
  m.impl("maml_onestep", &fastmaml::cpu::maml_onestep);
}

// Device-independent: saves the per-task rows and weighs them in the backward (any device's kernels).
TORCH_LIBRARY_IMPL(fastmaml, Autograd, m) {
  m.impl("maml_fwdbwd", &fastmaml::maml_fwdbwd_autograd);
  m.impl("maml_train", &fastmaml::maml_train_autograd);
}

// maml_train without autograd (grad mode off, or nothing requires grad): maml_fwd of the flattened
// parameters, on any device.
TORCH_LIBRARY_IMPL(fastmaml, CompositeExplicitAutograd, m) { m.impl("maml_train", &fastmaml::maml_train_forward); }

// The CUDA kernels (csrc/cuda/, which include ../maml_task.h for the per-task math) register under the
// CUDA key with TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) from their own translation unit, so that a build
// without nvcc still provides the schemas and the CPU kernels.
