// fastmaml: the CUDA implementations of the factored backend's low-rank products, lowrank_add_cuda and
// lowrank_pairs_cuda (csrc/cuda/lowrank_add.cuh), registered under the CUDA dispatch key of the schemas
// declared in csrc/fastmaml.cpp; the fused MAML kernels' registration is binding.cpp's. The arguments are
// checked and made contiguous here, the outputs allocated, and the torch-free launchers of lowrank_cuda.cu
// called on the current stream. Compiled only in builds with a CUDA torch and nvcc (fastmaml/_ext.py).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "lowrank_cuda.h"

namespace fastmaml {
namespace cuda {
namespace {

// One lowrank_add, `base + sum_j s_j (x hs[j]^T) ds[j]` per task (csrc/cuda/lowrank_add.cuh): its checked,
// contiguous operands (held until the launch is queued) and its output.
struct AddProblem {
  at::Tensor base, x, scales, out;  // base and scales undefined where None
  std::vector<at::Tensor> hs, ds;
  int64_t T, N, S, I, O, J;
  // Sizes the kernel has nothing to do for: the output is made here (base or zeros) and true returned.
  bool done_without_kernel() {
    if (T == 0 || N == 0 || O == 0) return true;
    if (S == 0 || I == 0) {
      if (base.defined()) {
        out.copy_(base);
      } else {
        out.zero_();
      }
      return true;
    }
    return false;
  }
  template <typename T_>
  lowrank::AddArgs<T_> args() const {
    lowrank::AddArgs<T_> a{};
    a.base = base.defined() ? base.const_data_ptr<T_>() : nullptr;
    a.x = x.const_data_ptr<T_>();
    for (int64_t j = 0; j < J; ++j) a.hs[j] = hs[j].const_data_ptr<T_>(), a.ds[j] = ds[j].const_data_ptr<T_>();
    a.scales = scales.defined() ? scales.const_data_ptr<T_>() : nullptr;
    a.out = out.mutable_data_ptr<T_>();
    a.tasks = T, a.n = static_cast<int>(N), a.s = static_cast<int>(S), a.i = static_cast<int>(I),
    a.o = static_cast<int>(O), a.pairs = static_cast<int>(J);
    return a;
  }
};

// The names of a lowrank_add's operands in an op's messages: the input [T, N, I], the factors [T, S, I] and
// [T, S, O], the base [T, N, O].
struct AddNames {
  const char* x;
  const char* hs;
  const char* ds;
  const char* base;
};

// x [T, N, I], hs[j] [T, S, I], ds[j] [T, S, O], base [T, N, O] or None, scales [J] or None: checked (for
// `op`'s messages, the operands as `names` calls them; at most max_tasks tasks) and made contiguous, the
// output allocated.
AddProblem add_problem(const char* op, const AddNames& names, int64_t max_tasks, const std::optional<at::Tensor>& base_in,
                       const at::Tensor& x_in, at::TensorList hs_in, at::TensorList ds_in,
                       const std::optional<at::Tensor>& scales_in) {
  const int64_t J = static_cast<int64_t>(hs_in.size());
  TORCH_CHECK(J >= 1 && J <= lowrank::kMaxPairs && static_cast<int64_t>(ds_in.size()) == J, "fastmaml: ", op,
              " takes 1 to ", lowrank::kMaxPairs, " pairs of factors, got ", J, " and ", ds_in.size());
  TORCH_CHECK(x_in.dim() == 3 && x_in.is_cuda() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble),
              "fastmaml: ", op, ": ", names.x, " must be a float32 or float64 CUDA tensor, got ", x_in.scalar_type(),
              " ", x_in.sizes(), " on ", x_in.device());
  TORCH_CHECK(hs_in[0].dim() == 3 && ds_in[0].dim() == 3, "fastmaml: ", op, ": the factors must be ", names.hs,
              " and ", names.ds, ", got ", hs_in[0].sizes(), " and ", ds_in[0].sizes());
  AddProblem p;
  p.T = x_in.size(0), p.N = x_in.size(1), p.I = x_in.size(2), p.S = hs_in[0].size(1), p.O = ds_in[0].size(2), p.J = J;
  const int64_t T = p.T, N = p.N, I = p.I, S = p.S, O = p.O;
  auto check = [&](const at::Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
    TORCH_CHECK(t.sizes().equals(shape) && t.scalar_type() == x_in.scalar_type() && t.device() == x_in.device(),
                "fastmaml: ", op, ": ", name, " must be ", x_in.scalar_type(), " ", c10::IntArrayRef(shape), " on ",
                x_in.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  for (int64_t j = 0; j < J; ++j) {
    check(hs_in[j], {T, S, I}, names.hs);
    check(ds_in[j], {T, S, O}, names.ds);
  }
  if (base_in.has_value()) check(*base_in, {T, N, O}, names.base);
  if (scales_in.has_value()) check(*scales_in, {J}, "scales");
  // Offsets within a task are 32-bit (a margin for a lane's last step past the width).
  constexpr int64_t kIntBound = INT32_MAX - 4096;
  TORCH_CHECK(T <= max_tasks && N * I <= kIntBound && S * I <= kIntBound && N * O <= kIntBound && S * O <= kIntBound &&
                  (N == 0 || S == 0 || lowrank::shared_elements(static_cast<int>(J), static_cast<int>(N),
                                                                static_cast<int>(S)) * x_in.element_size() <=
                                           lowrank_max_shared_bytes),
              "fastmaml: ", op, ": ", T, " tasks of ", J, " pairs of ", N, " x ", S, " products (widths ", I, " and ",
              O, ") are past the kernel's bounds (at most ", max_tasks, " tasks, 32-bit offsets within a task, the "
              "products in ", lowrank_max_shared_bytes, " bytes of shared memory)");
  p.x = x_in.contiguous();
  for (int64_t j = 0; j < J; ++j) p.hs.push_back(hs_in[j].contiguous()), p.ds.push_back(ds_in[j].contiguous());
  if (base_in.has_value()) p.base = base_in->contiguous();
  if (scales_in.has_value()) p.scales = scales_in->contiguous();
  p.out = at::empty({T, N, O}, p.x.options());
  return p;
}

void check_lowrank_launch(cudaError_t err, const char* op, const AddProblem& p) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastmaml: the CUDA kernel of ", op, " failed (", p.T, " tasks, ", p.J,
              " pairs of ", p.N, " x ", p.S, ", widths ", p.I, " and ", p.O, "): ", cudaGetErrorString(err));
}

// fastmaml::lowrank_add_cuda: one lowrank_add (AddProblem's shapes).
at::Tensor lowrank_add_cuda(const std::optional<at::Tensor>& base, const at::Tensor& x, at::TensorList hs,
                            at::TensorList ds, const std::optional<at::Tensor>& scales) {
  AddProblem p = add_problem("lowrank_add_cuda", {"x [T, N, I]", "each hs[j] [T, S, I]", "each ds[j] [T, S, O]",
                             "base [T, N, O]"}, INT32_MAX, base, x, hs, ds, scales);
  const c10::cuda::CUDAGuard guard(x.device());
  if (p.done_without_kernel()) return p.out;
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "lowrank_add_cuda", [&] {
    check_lowrank_launch(launch_lowrank_add<scalar_t>(p.args<scalar_t>(), c10::cuda::getCurrentCUDAStream()),
                         "lowrank_add_cuda", p);
  });
  return p.out;
}

// fastmaml::lowrank_pairs_cuda: the factored sweep's two products of a weight cotangent in factors
// (fastmaml/backends/_lowrank_pairs.py) in one launch,
//     u = base_u + sum_j s_j (h fb[j]^T) fa[j]   [T, N, O],     v = base_v + sum_j s_j (d fa[j]^T) fb[j]   [T, N, I],
// h [T, N, I], d [T, N, O], fa[j] [T, S, O], fb[j] [T, S, I]: a task's two blocks are neighbours in the grid,
// so the second reads the task's pairs from L2 rather than memory.
std::tuple<at::Tensor, at::Tensor> lowrank_pairs_cuda(const std::optional<at::Tensor>& base_u,
                                                      const std::optional<at::Tensor>& base_v, const at::Tensor& h,
                                                      const at::Tensor& d, at::TensorList fa, at::TensorList fb,
                                                      const std::optional<at::Tensor>& scales) {
  constexpr int64_t kMaxTasks = INT32_MAX / 2;  // two blocks a task
  AddProblem u = add_problem("lowrank_pairs_cuda", {"h [T, N, I]", "each fb[j] [T, S, I]", "each fa[j] [T, S, O]",
                             "base_u [T, N, O]"}, kMaxTasks, base_u, h, fb, fa, scales);
  AddProblem v = add_problem("lowrank_pairs_cuda", {"d [T, N, O]", "each fa[j] [T, S, O]", "each fb[j] [T, S, I]",
                             "base_v [T, N, I]"}, kMaxTasks, base_v, d, fa, fb, scales);
  // v's checks tie d's T and O to the factors; its N is h's too
  TORCH_CHECK(d.size(1) == u.N, "fastmaml: lowrank_pairs_cuda: d must have h's ", u.N, " rows, got ", d.sizes());
  const c10::cuda::CUDAGuard guard(h.device());
  const bool u_done = u.done_without_kernel(), v_done = v.done_without_kernel();
  if (u_done || v_done) {  // an empty size is one of T, N, S, I, O, which the two share (I and O swapped)
    TORCH_INTERNAL_ASSERT(u_done && v_done, "lowrank_pairs_cuda: one product is empty, the other not");
    return {u.out, v.out};
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lowrank_pairs_cuda", [&] {
    check_lowrank_launch(launch_lowrank_pairs<scalar_t>(u.args<scalar_t>(), v.args<scalar_t>(),
                                                        c10::cuda::getCurrentCUDAStream()),
                         "lowrank_pairs_cuda", u);
  });
  return {u.out, v.out};
}

}  // namespace
}  // namespace cuda
}  // namespace fastmaml

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) {
  m.impl("lowrank_add_cuda", &fastmaml::cuda::lowrank_add_cuda);
  m.impl("lowrank_pairs_cuda", &fastmaml::cuda::lowrank_pairs_cuda);
}
