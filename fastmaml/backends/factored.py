"""The `factored` backend: every task's adapted weights kept as theta_0 plus low-rank updates.

Every task starts from the same theta_0, and one SGD step changes a weight matrix by a matrix of rank at
most Ns (the support points): the gradient of layer l is `G = D^T H`, with `D [Ns, out]` the loss's
derivative at the layer's outputs and `H [Ns, in]` its inputs. So after k steps, with one rate per tensor
and step (`r_j`),

    W_k = W_0 - sum_{j<k} r_j D_j^T H_j,

and a product with W_k never needs W_k itself:

    X W_k^T = X W_0^T - sum_{j<k} (X H_j^T) (r_j D_j)
    Y W_k   = Y W_0   - sum_{j<k} (Y (r_j D_j)^T) H_j.

`X W_0^T` over all tasks at once is one matrix product `[T*N, in] x [in, out]` (one BLAS call, on the
GPU cuBLAS), and the corrections go through `[N, Ns]` intermediates (`_lowrank.products`: Triton kernels
on CUDA tensors, batched products elsewhere). No `[T, out, in]` tensor is made: torch.func.vmap keeps
every task's W_k (4.3 GB per 128 x 128 layer and step at T = 65,536). The inner loop's gradients are
written out (the backpropagation of the MLP above), so their derivative is the exact second-order
meta-gradient, itself in factored form (its products are the same kinds of products), with every input's
gradient: params, rates, both inputs, float targets, the multi-step loss weights. The backward is written
out too (`_factored_reverse`: the weights' cotangents kept in factors, no per-use gradients to add); a
backward to be differentiated again is autograd's through the inner loop.

Memory: the backward keeps the intermediates of each task's inner loop, about 2 K Ns activations of
every layer (`saved_bytes_per_task`; measured, 128 KB a task for the 1-128-128-1 net, 10 + 10 points,
K = 5, where the reference's peak on an H100 was 535 KB a task). Above MAX_CHUNK_BYTES of them the
tasks run in chunks (`_factored_chunks.Chunked`): each chunk runs forward and backward at once for the
mean loss's gradient and is freed; a gradient through the per-task outputs recomputes the chunks in the
backward.

Where the corrections would cost more than a dense product, a layer turns into one dense `[out, in]`
matrix per task (vmap's form), and later steps update that (DENSE, `_dense_after`).

Takes: MLPs (`fastmaml.maml`'s params, `fastmaml.MAML` on an MLP) in float32 or float64, on any device,
with one rate per tensor and step: a number, one tensor broadcast to `[K]`, or per-tensor rates
broadcast from `[K, 1, ...]`. Refuses per-parameter rates (Meta-SGD): `r ⊙ G` is not low-rank.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .._mlp import ACTIVATIONS
from .._plans import autocast_enabled, forward_ad_active, functorch_active
from .._switches import env_choice, env_int
from .._validate import Problem
from ._lowrank import add_kernel_reason, products


def _chunk_budget() -> int:
    """MAX_CHUNK_BYTES: 1 GiB, or FASTMAML_FACTORED_CHUNK_MB mebibytes (read once, at import)."""
    return env_int("FASTMAML_FACTORED_CHUNK_MB", 1024, lambda n: n >= 1, "a positive whole number of MiB") << 20


# Above this many bytes of saved intermediates (`saved_bytes_per_task` x T), the tasks run in chunks
# (`_factored_chunks.Chunked`). 1 GiB cuts a 65,536-task call of the 1-128-128-1 net at K = 5 (9.5 GiB
# kept unchunked by the estimate, 8.4 GB by the saved-tensor count) into 10 chunks, with peak memory near 1 GiB. Each
# chunk costs the same number of operations (about 800 for that net at K = 5 with its backward), so
# fewer, larger chunks cost less host time for more memory: FASTMAML_FACTORED_CHUNK_MB sets the budget
# for the GPU check's A/B.
MAX_CHUNK_BYTES = _chunk_budget()

Rate = Union[float, torch.Tensor]  # one step's rate of one tensor: a number or a 0-d tensor


def _rates_reason(problem: Problem) -> Optional[str]:
    """Why the rates are not one per tensor and step (or None)."""
    if problem.inner_lr_form != "list":
        return None
    for i, r in enumerate(problem.inner_lr):
        # The views are [K, *shape], expanded from what the user gave: a broadcast dimension has stride 0.
        if any(size > 1 and stride != 0 for size, stride in zip(r.shape[1:], r.stride()[1:])):
            return (f"inner_lr[{i}] gives each element of params[{i}] its own rate (Meta-SGD); the factored "
                    "form needs one rate per tensor and step (shape [K, 1, ...] or a number)")
    return None


class _Rates(NamedTuple):
    """Minus the rate of one parameter tensor at each step (autograd flows to the user's rates)."""
    tensor: torch.Tensor  # [K]: the products take their factors' rates as one `[J]` slice of it
    steps: list[Rate]  # the K rates one by one: numbers for a number (no tensor operation needed)


def _step_rates(problem: Problem) -> list[_Rates]:
    """One `_Rates` per parameter tensor. Negated once here, so that the steps add (`_Layer.step`): a
    subtraction's backward negates its gradient, one more operation per layer and step. A number's
    tensor comes from torch.full, made on the device without a copy from the host (which would
    synchronise)."""
    K, n = problem.inner_steps, len(problem.params)
    if problem.inner_lr_value is not None:
        value = -problem.inner_lr_value
        return [_Rates(torch.full((K,), value, dtype=problem.dtype, device=problem.device), [value] * K)] * n
    if problem.inner_lr_tensor is not None:
        per_step = -problem.inner_lr_tensor.reshape(-1).expand(K)
        return [_Rates(per_step, [per_step[k] for k in range(K)])] * n
    firsts = [-r[(slice(None),) + (0,) * (r.dim() - 1)] for r in problem.inner_lr]  # [K] per tensor
    return [_Rates(f, [f[k] for k in range(K)]) for f in firsts]


def _dense_mode() -> str:
    """FASTMAML_FACTORED_DENSE: "auto" (the default), "never" or "always" (read once, at import)."""
    return env_choice("FASTMAML_FACTORED_DENSE", ("auto", "never", "always"))


# When a layer's weights turn from factors into one dense [T, out, in] tensor per task. A product through
# k factors costs `k Ns (in + out)` multiply-adds per point, the dense product `in * out`: "auto" turns
# dense at the first step where the factors would cost more (width 40, 10 support points: from the
# third step; width 128: from the seventh). "never" and "always" (vmap's form from the first step) are for
# the tests and the GPU check's A/B.
DENSE = _dense_mode()


def _dense_from(n_support: int, d_in: int, d_out: int) -> int:
    """The fewest updates whose factor pairs (`steps * n_support * (d_in + d_out)` multiply-adds per point)
    cost more than the dense `[d_out, d_in]` product (`d_in * d_out`)."""
    return d_in * d_out // (n_support * (d_in + d_out)) + 1


def _dense_after(steps: int, n_support: int, d_in: int, d_out: int) -> bool:
    """Whether a layer whose weights have had `steps` updates is cheaper as dense weights."""
    if DENSE != "auto":
        return DENSE == "always"
    return steps >= _dense_from(n_support, d_in, d_out)


def auto_reason(problem: Problem) -> Optional[str]:
    """Why `auto` passes over this backend for an MLP call it can run (a speed rule), or None: where the
    widest layer turns dense within the inner loop it runs vmap's own form with more operations, and the
    reference measured faster (on an H200; where the layer stays in factors, factored measured faster,
    in a fraction of the memory: benchmarks/RESULTS.md, "Measurements behind code choices")."""
    dims, K, ns = problem.dims, problem.inner_steps, problem.n_support
    d_in, d_out = max(zip(dims[:-1], dims[1:]), key=lambda pair: pair[0] * pair[1])
    first = _dense_from(ns, d_in, d_out)
    if first <= K:
        return (f"its {d_in} x {d_out} layer turns dense after {first} of the {K} inner steps ({ns} support "
                "points), where the reference measured faster; ask for it explicitly to use it")
    return None


class _Layer:
    """Layer l of every task at the current step: W_0 and the factors of its updates so far (or, once
    that is cheaper, its dense weights per task), and its bias.

    The factors stay one pair per step (not one stacked pair): autograd keeps each pair once, where
    stacks re-made at every step would each be kept (two thirds of the saved memory at K = 5). They are
    kept as the support pass made them, the step's rate applied inside the products (`products`'
    scales): a scaled copy of D_j would be one more tensor per step that autograd keeps (a sixth of the
    saved memory of the 1-128-128-1 net at K = 5)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rates: _Rates):
        self.w0 = weight  # [out, in], shared by every task
        self.bias = bias  # [out] while no step has run, then [T, out]
        self.rates = rates  # minus the weight's rate at each step
        self.h: list[torch.Tensor] = []  # [T, Ns, in] per step: the inputs H_j
        self.d: list[torch.Tensor] = []  # [T, Ns, out] per step: D_j
        self.w: Optional[torch.Tensor] = None  # [T, out, in] once dense (then no factors)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """`x W_k^T + b_k`: x [T, N, in] -> [T, N, out]."""
        if self.w is not None:
            return torch.baddbmm(self.bias.unsqueeze(-2), x, self.w.transpose(1, 2))
        if self.bias.dim() == 1:  # no step yet: the plain layer
            return F.linear(x, self.w0, self.bias)
        z = F.linear(x, self.w0) + self.bias.unsqueeze(-2)
        return products(z, x, self.h, self.d, self.scales()) if self.h else z  # z += sum_j -r_j (x h_j^T) D_j

    def apply_t(self, y: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`base + y W_k`: y [T, N, out] -> [T, N, in] (base [T, N, in] or None: the written-out backward's
        sums, added inside the products)."""
        if self.w is not None:
            return torch.bmm(y, self.w) if base is None else torch.baddbmm(base, y, self.w)
        g = _base_mm(base, y, self.w0)
        return products(g, y, self.d, self.h, self.scales()) if self.h else g  # g += sum_j -r_j (y D_j^T) h_j

    def linear(self, x: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`base + x W_k^T`, no bias: x [T, N, in] -> [T, N, out] (for the written-out backward)."""
        if self.w is not None:
            wt = self.w.transpose(1, 2)
            return torch.bmm(x, wt) if base is None else torch.baddbmm(base, x, wt)
        z = _base_mm(base, x, self.w0.t())
        return products(z, x, self.h, self.d, self.scales()) if self.h else z

    def scales(self) -> torch.Tensor:
        """`[J]`: minus the rates of the factors (factor j is step j's: a layer in factors has had no
        dense step)."""
        return self.rates.tensor[:len(self.h)]

    def step(self, k: int, h: torch.Tensor, d: torch.Tensor, neg_rate_b: Rate) -> "_Layer":
        """The layer after step k's `W -= r_w d^T h`, `b -= r_b sum_n d` (h [T, Ns, in], d [T, Ns, out]),
        given minus the bias's rate (`_step_rates`)."""
        out = _Layer(self.w0, self.bias + neg_rate_b * d.sum(1), self.rates)
        out.h = self.h + [h]
        out.d = self.d + [d]
        if self.w is not None:
            # The rate on d (whose [Ns, out] is smaller than the update's [out, in]). Kept negated, so
            # that the update adds with baddbmm's default scale of 1: with alpha=-1 its backward
            # multiplied both gradients by -1.
            out.w = _scaled_update(self.w, d, h, self.rates.steps[k])
            out.h, out.d = [], []
        elif _dense_after(len(out.h), h.shape[1], *reversed(self.w0.shape)):
            out.w = out.dense(h.shape[0])[0]
            out.h, out.d = [], []
        return out

    def dense(self, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(W_k [T, out, in], b_k [T, out])`."""
        if self.w is not None:
            return self.w, self.bias
        w = self.w0.expand(n_tasks, *self.w0.shape)
        for j, (h, d) in enumerate(zip(self.h, self.d)):
            w = _scaled_update(w, d, h, self.rates.steps[j])
        return w, self.bias.expand(n_tasks, self.w0.shape[0])


def _scaled_update(w: torch.Tensor, d: torch.Tensor, h: torch.Tensor, rate: Rate) -> torch.Tensor:
    """`w + rate d^T h` (d [T, Ns, out], h [T, Ns, in]), the rate on the smaller factor: h for the first
    layer of a 1-W-W-1 net (d is W times its size), d for the last."""
    return scaled_bmm(w, d.transpose(1, 2), h, rate)


def scaled_bmm(base: Optional[torch.Tensor], x: torch.Tensor, m: torch.Tensor, scale) -> torch.Tensor:
    """`base + scale x m` per task (x [T, a, n], m [T, n, b]; scale a number, a tensor or None; base None:
    zeros), the scale on the smaller operand (a dense layer of a 1-W-W-1 net is [W, 1] or [1, W] per
    task: one side is W times smaller than the other)."""
    if scale is not None:
        if x.numel() <= m.numel():
            x = x * scale
        else:
            m = m * scale
    return torch.bmm(x, m) if base is None else torch.baddbmm(base, x, m)


def _base_mm(base: Optional[torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`base + x w` (x [T, N, a], w [a, b] shared by the tasks, base [T, N, b] or None) as one matrix
    product over every task, the base added in the product (no pass of its own)."""
    flat = x.reshape(-1, x.shape[-1])
    if base is None:
        return torch.mm(flat, w).view(*x.shape[:-1], w.shape[1])
    return torch.addmm(base.reshape(-1, w.shape[1]), flat, w).view(*x.shape[:-1], w.shape[1])


def _forward(layers: list[_Layer], x: torch.Tensor, act) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`(inputs, outputs)`: each layer's input and pre-activation output; the last output is the net's."""
    inputs, outputs = [], []
    h = x
    for i, layer in enumerate(layers):
        inputs.append(h)
        z = layer.apply(h)
        outputs.append(z)
        h = act(z) if i < len(layers) - 1 else z
    return inputs, outputs


def _losses(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Each task's loss `[T]` (the reference's `task_loss`, batched)."""
    if loss == "mse":
        return (out - y).square().mean((1, 2))
    picked = out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(out, dim=-1) - picked).mean(1)


def _loss_grad(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """d(task loss)/d(out) `[T, N, D_out]`, written out so that autograd can differentiate it again."""
    n = out.shape[1]
    if loss == "mse":
        return (out - y) * (2.0 / (n * out.shape[2]))
    return (torch.softmax(out, dim=-1) - F.one_hot(y, out.shape[-1]).to(out.dtype)) / n


def _through_act(g: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """`g * s'(z)` from the activation's output h = s(z), in one operation (the backward operations
    autograd itself uses, differentiable again): relu `g` where h > 0 (z > 0; 0 at z = 0, as torch's
    relu), tanh `g (1 - h^2)`. Written as `g * (h > 0)` or `g * (1 - h^2)` it took two or three passes
    over the tensor, and kept a mask or `1 - h^2` for the backward. relu's h is detached: its derivative
    in h is zero, which autograd would otherwise make and add as a tensor of zeros."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, h.detach(), 0)
    return torch.ops.aten.tanh_backward(g, h)


def _inner_step(layers: list[_Layer], xs: torch.Tensor, ys: torch.Tensor, k: int, neg_rates: list[_Rates],
                problem: Problem) -> list[_Layer]:
    """Step k of every task on its support set, in factored form."""
    act = ACTIVATIONS[problem.activation]
    inputs, outputs = _forward(layers, xs, act)
    delta = _loss_grad(outputs[-1], ys, problem.loss)
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        grads[i] = (inputs[i], delta)
        if i > 0:  # with the weights of this step, before any layer is updated
            delta = _through_act(layers[i].apply_t(delta), inputs[i], problem.activation)
    new = []
    for i, (layer, (h, d)) in enumerate(zip(layers, grads)):
        if problem.first_order:  # FOMAML: the inner gradient is a constant; the rate keeps its gradient
            h, d = h.detach(), d.detach()
        new.append(layer.step(k, h, d, neg_rates[2 * i + 1].steps[k]))
    return new


def _adapted_layers(problem: Problem, xs: torch.Tensor, ys: torch.Tensor, params: list[torch.Tensor],
                    neg_rates: list[_Rates]) -> list[list[_Layer]]:
    """The layers at theta_0, ..., theta_K of every task of this chunk."""
    layers = [_Layer(params[2 * i], params[2 * i + 1], neg_rates[2 * i]) for i in range(len(params) // 2)]
    history = [layers]
    for k in range(problem.inner_steps):
        layers = _inner_step(layers, xs, ys, k, neg_rates, problem)
        history.append(layers)
    return history


def _maml_chunk(problem: Problem, neg_rates, weights, xs, ys, xq, yq, *params):
    """`(task_losses [T'], query_preds [T', Nq, D_out])` of the chunk's tasks: its gradient by the written-out
    sweep (`_factored_reverse`) where it runs, else by autograd through the inner loop."""
    tensors = [weights, xs, ys, xq, yq, *params, *(r.tensor for r in neg_rates)]
    if _factored_reverse.reason(tensors) is None:
        return _factored_reverse.maml_chunk(problem, neg_rates, weights, xs, ys, xq, yq, *params)
    return _autograd_chunk(problem, neg_rates, weights, xs, ys, xq, yq, *params)


def _autograd_chunk(problem: Problem, neg_rates, weights, xs, ys, xq, yq, *params):
    """`_maml_chunk` by autograd through the inner loop."""
    act = ACTIVATIONS[problem.activation]
    history = _adapted_layers(problem, xs, ys, list(params), neg_rates)
    K = problem.inner_steps
    preds = _forward(history[K], xq, act)[1][-1]
    final = _losses(preds, yq, problem.loss)
    if weights is None:
        return final, preds
    total = weights[K] * final
    for k in range(K):  # every step, as the reference does (a zero weight still passes a nan through)
        total = total + weights[k] * _losses(_forward(history[k], xq, act)[1][-1], yq, problem.loss)
    return total, preds


def saved_bytes_per_task(problem: Problem) -> int:
    """The bytes autograd keeps per task, from above (within 1.4x of what tests/test_factored.py measures
    with saved-tensor hooks): about 1.5 (relu) or 2.0 (tanh) activations per support point, layer and
    step, and 0.6 per query point and query pass; a pass through k factors adds its `[N, Ns]` products
    with them where they are batched products (the kernels keep none: `_lowrank.add_kernel_reason`), a dense
    layer its `[out, in]` weights."""
    dims, K = problem.dims, problem.inner_steps
    ns, nq = problem.n_support, problem.n_query
    query_steps = [K] if problem.query_loss_weights is None else list(range(K + 1))
    # tanh keeps more per point than relu: tanh_backward's derivative in h needs its g too
    per_support = 2.0 if problem.activation == "tanh" else 1.5
    elems = 0.0
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        dense_from = next((k for k in range(1, K + 1) if _dense_after(k, ns, d_in, d_out)), K + 1)
        elems += (per_support * K * ns + 0.6 * len(query_steps) * nq) * (d_in + d_out)
        if dense_from > K:  # no step made scaled copies of its D_j (`dense` and dense steps do)
            elems -= K * ns * d_out
        for k in range(K + 1):  # the passes at theta_k: support (k < K; forward and back) and query
            if k >= dense_from:
                elems += d_in * d_out
                continue
            for x, rows in ((problem.x_support, 2 * ns * (k < K)), (problem.x_query, nq * (k in query_steps))):
                if k and rows and add_kernel_reason(x, k, ns) is not None:
                    elems += k * ns * rows
    return int(elems) * problem.params[0].element_size()


def _chunk_tasks(problem: Problem) -> int:
    """Tasks per chunk: all of them unless autograd would keep more than MAX_CHUNK_BYTES."""
    T = problem.num_tasks
    if not problem.requires_grad:
        return max(T, 1)
    per_task = max(saved_bytes_per_task(problem), 1)
    return max(1, min(T, MAX_CHUNK_BYTES // per_task))


class FactoredBackend:
    """MLPs with per-tensor rates, every task's weights as theta_0 plus low-rank updates (PyTorch, and Triton
    kernels for the low-rank products on CUDA tensors)."""

    name = "factored"

    def unavailable(self) -> Optional[str]:
        return None

    def reject(self, problem: Problem, op: str) -> Optional[str]:
        if not problem.is_mlp:
            return (problem.extras.get("not_fused")
                    or "the model is not an MLP of nn.Linear layers (the factored form is the MLP's)")
        if problem.dtype not in (torch.float32, torch.float64):
            return f"dtype {problem.dtype} (the factored backend runs float32 and float64)"
        if autocast_enabled(problem.device.type):
            # The module under autocast multiplies by W_k cast to the lower precision; the factored form
            # never makes W_k, so its products would round differently (on the CPU the loss moved by 3e-4).
            return (f"autocast is enabled on {problem.device.type} (the model would multiply by its adapted "
                    "weights in a lower precision; the factored form never makes them)")
        if (op == "maml" and (forward_ad_active() or functorch_active())
                and _chunk_tasks(problem) < problem.num_tasks):
            return ("the call runs in chunks (its saved tensors above the chunk budget, "
                    "FASTMAML_FACTORED_CHUNK_MB), whose autograd Function has no forward-mode or torch.func rule")
        return _rates_reason(problem)

    def maml(self, problem: Problem) -> tuple[torch.Tensor, ...]:
        data = (problem.x_support, problem.y_support, problem.x_query, problem.y_query)
        T = problem.num_tasks
        chunk = _chunk_tasks(problem)
        if chunk >= T:
            return _maml_chunk(problem, _step_rates(problem), problem.query_loss_weights, *data, *problem.params)
        if not torch.compiler.is_compiling():
            return _factored_chunks.Chunked.run(problem, chunk)
        # Traced by torch.compile: chunks under activation checkpointing, which dynamo captures (the
        # gradients that `_factored_chunks.Chunked` takes inside its forward are not traceable).
        from torch.utils.checkpoint import checkpoint

        neg_rates = _step_rates(problem)
        losses, preds = [], []
        for start in range(0, T, chunk):
            part = [t[start:start + chunk] for t in data]
            # preserve_rng_state=False: the chunk draws no random numbers, so no generator state is saved
            # and restored around each chunk.
            out = checkpoint(_maml_chunk, problem, neg_rates, problem.query_loss_weights, *part, *problem.params,
                             use_reentrant=False, preserve_rng_state=False)
            losses.append(out[0])
            preds.append(out[1])
        return torch.cat(losses), torch.cat(preds)

    def adapt(self, problem: Problem) -> list[torch.Tensor]:
        history = _adapted_layers(problem, problem.x_support, problem.y_support, list(problem.params),
                                  _step_rates(problem))
        out = []
        for layer in history[-1]:  # contiguous: a layer no step changed is theta_0 expanded over the tasks
            out.extend(t.contiguous() for t in layer.dense(problem.num_tasks))
        return out


# The written-out meta-gradient (`_maml_chunk` takes it where it runs) and the chunks of a large call; both
# build on this module's pieces.
from . import _factored_chunks, _factored_reverse  # noqa: E402

__all__ = ["FactoredBackend", "MAX_CHUNK_BYTES", "saved_bytes_per_task"]
