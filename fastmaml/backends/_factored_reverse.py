"""The factored backend's meta-gradient written out (`_Reverse`), instead of autograd through its inner loop.

Autograd differentiates each product of the inner loop on its own: a factor pair (D_j, H_j) of step j is
used by every later product with W_k (k > j: each step's support pass, its inner backward, the query
pass), and autograd makes one gradient of D_j and H_j per use and then adds them (63 adds of
`[T, 10, 128]` tensors a meta-iteration at K = 5 for the 1-128-128-1 net, about a quarter of its bytes).
Here the adjoint of each layer's adapted weights, bar W_k (per task), is kept as factor pairs too,

    bar W_k = sum_u A_u^T B_u      (A_u [T, n, out], B_u [T, n, in]: one pair per use of W_m, m >= k),

since every use of W_m adds an outer product `(cotangent at its output)^T (its input)` and the update
`W_{k+1} = W_k + s_k D_k^T H_k` (s_k minus the rate) passes bar W_{k+1} on to bar W_k unchanged. So the
adjoints of step k's factors are each one low-rank product over every later use at once,

    bar D_k = s_k H_k bar W_{k+1}^T = s_k sum_u (H_k B_u^T) A_u,   bar H_k = s_k D_k bar W_{k+1},

and the rate's gradient is `<bar W_{k+1}, D_k^T H_k> = sum(D_k * (H_k bar W_{k+1}^T))`, from the same
product. bar W_0 summed over the tasks (the parameter's gradient) is one matrix product per pair over
every task. The rest of the sweep is the reverse of the inner loop's own backpropagation (the second-order
terms: the derivative of `delta W` in W and delta, of the activation's derivative in its input, of the
loss's gradient in the output) and of the support and query passes, in the order the kernels' reverse
sweeps use (docs/math.md).

What it keeps (`_Run`, through `save_for_backward`, so freed after the backward and seen by saved-tensor
hooks and checkpointing): each step's layer inputs and loss derivatives (the factors, which the forward
makes anyway), tanh's `D W` products, the query passes' layer inputs and outputs, each pass's task losses
and a dense layer's per-task weights; no `[N, S]` products and no autograd graph. It runs a gradient through
the task losses and the query outputs with any cotangents, for every input (params, rates, data, float
targets, the multi-step weights). A gradient to be differentiated again (create_graph) recomputes the call
through autograd, as `_factored_chunks.Chunked` does; forward-mode AD, torch.func transforms and
torch.compile's tracing take the autograd form. The backend refuses autocast; a backward called under it runs
without it (the function the forward computed). A layer whose weights are dense per task
(`factored._dense_after`: the thin first and last layers of a 1-W-W-1 net from the first step) keeps its bar
W as one `[T, out, in]` tensor.

FASTMAML_FACTORED_REVERSE (read once, at import): "hand" (the default, this sweep) or "autograd" (the
inner loop differentiated by autograd: the GPU check's A/B `frevauto`, and the tests' second oracle).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._mlp import ACTIVATIONS
from .._plans import forward_ad_active, functorch_active
from .._switches import env_choice
from .._validate import Problem
from . import factored as _f
from . import _lowrank_pairs
from ._fused import autocast_off
from .triton_maml import _pad

MODE = env_choice("FASTMAML_FACTORED_REVERSE", ("hand", "autograd"))


def reason(tensors: list[Optional[torch.Tensor]]) -> Optional[str]:
    """Why a chunk keeps autograd through its inner loop (or None): the switch, no gradient wanted,
    torch.compile's tracing, forward-mode AD, a torch.func transform."""
    if MODE == "autograd":
        return "FASTMAML_FACTORED_REVERSE=autograd"
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return "no gradient is wanted (nothing to keep)"
    if torch.compiler.is_compiling():
        return "torch.compile traces the autograd form"
    if forward_ad_active():
        return "forward-mode AD is active (the sweep is reverse mode only; autograd's form has both)"
    if functorch_active():
        return "a torch.func transform is active (the sweep's Function has no setup_context for it)"
    return None


def maml_chunk(problem: Problem, neg_rates: list, weights, xs, ys, xq, yq, *params):
    """`(task_losses [T], query_preds [T, Nq, D_out])` of `factored._maml_chunk`, its gradient by
    `_Reverse` (the caller has checked `reason`)."""
    rate_tensors, rate_index = [], []
    for r in neg_rates:  # the distinct rate tensors (a number's or one tensor's are shared by every param)
        found = next((i for i, t in enumerate(rate_tensors) if t is r.tensor), None)
        if found is None:
            rate_tensors.append(r.tensor)
            found = len(rate_tensors) - 1
        rate_index.append(found)
    return _Reverse.apply(problem, neg_rates, rate_index, len(params), weights, xs, ys, xq, yq, *params,
                          *rate_tensors)


def _pair_products(h: torch.Tensor, d: torch.Tensor, fa: list[torch.Tensor], fb: list[torch.Tensor],
                   scale: Optional[torch.Tensor], base_u: Optional[torch.Tensor], want_v: bool,
                   base_v: Optional[torch.Tensor] = None):
    """`(u, v)`: `u = base_u + scale sum_j (h fb[j]^T) fa[j]` and `v = base_v + scale sum_j (d fa[j]^T)
    fb[j]` per task (h [T, N, in], d [T, N, out], fa[j] [T, n_j, out], fb[j] [T, n_j, in]; scale a `[1]`
    tensor or None; bases None: zeros; v None unless want_v), by `_lowrank_pairs.pair_products`: the pairs grouped by their rows (the kernels
    take pairs of one size) and in groups the kernels keep in registers (`_lowrank_pairs.max_tiles`), each group
    added onto the last's results, the scale applied to the `[N, n_j]` products inside."""
    u, v = base_u, base_v
    for rows in sorted({t.shape[1] for t in fa}):
        idx = [j for j, t in enumerate(fa) if t.shape[1] == rows]
        per_group = max(1, _lowrank_pairs.max_tiles(h.dtype) // (_pad(h.shape[1]) * _pad(rows)))
        for start in range(0, len(idx), per_group):
            group = idx[start:start + per_group]
            scales = None if scale is None else scale.expand(len(group))
            u, v = _lowrank_pairs.pair_products(u, v, h, d, [fa[j] for j in group], [fb[j] for j in group],
                                                scales, want_v)
    return u, v


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a + b


class _Step:
    """What step k's support pass leaves for the sweep: each layer's input (H, the activations), loss
    derivative at its output (D), for tanh the product `D W` before the activation's derivative, and the
    net's output (for cross-entropy's softmax)."""

    def __init__(self, acts, deltas, es, out):
        self.acts, self.deltas, self.es, self.out = acts, deltas, es, out


class _Run:
    """The forward of one call, kept for the sweep: the layers at theta_0..theta_K (`factored._Layer`),
    the support steps (`_Step`), the query passes' layer inputs and outputs, and each pass's task losses."""

    def __init__(self, problem: Problem, neg_rates, weights, xs, ys, xq, yq, params):
        self.problem, self.neg_rates = problem, neg_rates
        L, K = len(params) // 2, problem.inner_steps
        act = ACTIVATIONS[problem.activation]
        layers = [_f._Layer(params[2 * i], params[2 * i + 1], neg_rates[2 * i]) for i in range(L)]
        self.history, self.steps = [layers], []
        for k in range(K):
            acts, outs = _f._forward(layers, xs, act)
            out = outs[-1]
            delta = _f._loss_grad(out, ys, problem.loss)
            deltas, es = [None] * L, [None] * L
            for i in range(L - 1, -1, -1):
                deltas[i] = delta
                if i > 0:
                    e = layers[i].apply_t(delta)
                    if problem.activation == "tanh":  # tanh's second derivative needs it in the sweep
                        es[i] = e
                    delta = _f._through_act(e, acts[i], problem.activation)
            self.steps.append(_Step(acts, deltas, es, out if problem.loss == "cross_entropy" else None))
            layers = [layer.step(k, acts[i], deltas[i], neg_rates[2 * i + 1].steps[k])
                      for i, layer in enumerate(layers)]
            self.history.append(layers)
        self.query_steps = [K] if weights is None else list(range(K + 1))
        self.query, self.losses = {}, {}
        for m in self.query_steps:
            acts, outs = _f._forward(self.history[m], xq, act)
            self.query[m] = [acts, outs[-1]]
            self.losses[m] = _f._losses(outs[-1], yq, problem.loss)
        for layers in self.history[1:]:  # the sweep's products take no bias: the adapted ones need not stay
            for layer in layers:
                layer.bias = None

    def outputs(self, weights) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.problem.inner_steps
        total = self.losses[K]
        if weights is not None:
            total = weights[K] * total
            for k in range(K):
                total = total + weights[k] * self.losses[k]
        return total, self.query[K][1]

    def _slots(self):
        """`(holder, key)` of every tensor the run holds, in a fixed order: list items and dict values by
        index or key, object attributes by name."""
        for s in self.steps:
            for seq in (s.acts, s.deltas, s.es):
                yield from ((seq, j) for j in range(len(seq)))
            yield s, "out"
        for m in self.query_steps:
            acts = self.query[m][0]
            yield from ((acts, j) for j in range(len(acts)))
            yield self.query[m], 1
            yield self.losses, m
        for layers in self.history:
            for layer in layers:
                for seq in (layer.h, layer.d):
                    yield from ((seq, j) for j in range(len(seq)))
                yield from ((layer, name) for name in ("w0", "bias", "w"))

    def stash(self) -> list[Optional[torch.Tensor]]:
        """Takes every tensor out of the run (left as None) and returns them in `_slots`' order: they go to
        the backward through `save_for_backward`, so that autograd frees them after it (unless the graph
        is retained), saved-tensor hooks and checkpointing see them, and the run holds no output (which
        holds the node that holds the run: a cycle the garbage collector cannot free)."""
        out = []
        for holder, key in self._slots():
            if isinstance(holder, (list, dict)):
                out.append(holder[key])
                holder[key] = None
            else:
                out.append(getattr(holder, key))
                setattr(holder, key, None)
        return out

    def restore(self, tensors) -> None:
        """Puts `stash`'s tensors back."""
        for (holder, key), t in zip(self._slots(), tensors):
            if isinstance(holder, (list, dict)):
                holder[key] = t
            else:
                setattr(holder, key, t)


class _Sweep:
    """The reverse sweep over a `_Run`, given the cotangents of the task losses `c [T]` and the query
    outputs `gp [T, Nq, D_out]` (either may be None), and which inputs want a gradient."""

    def __init__(self, run: _Run, c, gp, want: dict):
        self.run, self.c, self.gp, self.want = run, c, gp, want
        p = run.problem
        self.L, self.K = len(run.history[0]), p.inner_steps
        # bar W of each layer at the current step: (A, B) pairs from the uses of its factored weights, and
        # one [T, out, in] tensor from the uses of its dense weights (`factored._Layer.w`; None until one)
        self.pairs = [[] for _ in range(self.L)]
        self.dense = [None] * self.L
        self.bias = [None] * self.L  # bar b of each layer at the current step, [T, out]
        self.rate_w = [[None] * self.K for _ in range(self.L)]  # d/d(minus the rate): weights, per step
        self.rate_b = [[None] * self.K for _ in range(self.L)]  # and biases
        self.g = dict(xs=None, ys=None, xq=None, yq=None)
        self.g_weights = [None] * (self.K + 1)

    def run_all(self, weights, ys, yq):
        run = self.run
        for k in range(self.K, -1, -1):
            if k in run.query:
                self._query(k, weights, yq)
            if k > 0:
                self._step(k - 1, ys)
        return self

    def _query(self, m: int, weights, yq):
        """The query pass at theta_m: seeds its output and backpropagates it to bar theta_m."""
        run, p = self.run, self.run.problem
        acts, out = run.query[m]
        seed = self.c
        if seed is not None and weights is not None:
            if self.want["weights"]:
                self.g_weights[m] = (seed * run.losses[m]).sum()
            seed = seed * weights[m]
        bar = None if seed is None else seed.view(-1, 1, 1) * _f._loss_grad(out, yq, p.loss)
        if bar is not None and self.want["yq"]:  # mse: the loss depends on (out - y)
            self.g["yq"] = _add(self.g["yq"], -bar)
        if m == self.K:
            bar = _add(bar, self.gp)
        if bar is None:
            return
        self._backprop(run.history[m], acts, bar, "xq", None)

    def _backprop(self, layers, acts, bar_z, x_key: str, bar_acts):
        """Through a forward pass (`acts`: each layer's input) from its output's cotangent `bar_z`: adds each
        layer's pair and bias cotangent, and the input's gradient to `g[x_key]`. `bar_acts[i]`: cotangents
        of the layer inputs from elsewhere (the step's update and tanh's second derivative), or None."""
        act = self.run.problem.activation
        for i in range(self.L - 1, -1, -1):
            self._use(i, layers[i], bar_z, acts[i])
            self.bias[i] = _add(self.bias[i], bar_z.sum(1))
            extra = bar_acts[i] if bar_acts is not None else None
            if i > 0:
                bar_z = _f._through_act(layers[i].apply_t(bar_z, extra), acts[i], act)
            elif self.want[x_key]:
                self.g[x_key] = _add(self.g[x_key], layers[0].apply_t(bar_z, extra))

    def _use(self, i: int, layer: "_f._Layer", a: torch.Tensor, b: torch.Tensor):
        """Adds `a^T b` (a [T, n, out], b [T, n, in]) to layer i's bar W: a pair where the use was of its
        factors, into the dense tensor where it was of dense weights."""
        if layer.w is None:
            self.pairs[i].append((a, b))
        elif self.dense[i] is None:
            self.dense[i] = torch.bmm(a.transpose(1, 2), b)
        else:
            self.dense[i] = torch.baddbmm(self.dense[i], a.transpose(1, 2), b)

    def _step(self, k: int, ys):
        """Step k's update, inner backward and support pass, from bar theta_{k+1} to bar theta_k."""
        run, p = self.run, self.run.problem
        layers, step = run.history[k], run.steps[k]
        L = self.L
        bar_d, bar_a = [None] * L, [None] * L
        # The update `W += s D^T H`, `b += s_b sum_n D`, with bar W_{k+1}'s pairs as they are now (before
        # this step's passes add theirs).
        for i in range(L):
            rates_w, s_b = run.neg_rates[2 * i], run.neg_rates[2 * i + 1].steps[k]
            D, H = step.deltas[i], step.acts[i]
            from_bias = None  # s_b bar b_{k+1}, the same at every point
            if self.bias[i] is not None:
                if self.want["rates"][2 * i + 1]:
                    self.rate_b[i][k] = (self.bias[i] * D.sum(1)).sum()
                if not p.first_order:
                    from_bias = (self.bias[i] * s_b).unsqueeze(1).expand_as(D)
            if self.pairs[i] or self.dense[i] is not None:
                # u = H bar W^T [T, Ns, out] and v = D bar W [T, Ns, in], times s_w
                want_v = not p.first_order and (i > 0 or self.want["xs"])
                if self.want["rates"][2 * i]:  # the rate's gradient takes u unscaled
                    u, v = self._bar_products(i, H, D, None, None, want_v)
                    self.rate_w[i][k] = (u * D).sum()
                    if not p.first_order:
                        bar_d[i] = _add(u * rates_w.steps[k], from_bias)
                        bar_a[i] = None if v is None else v * rates_w.steps[k]
                elif not p.first_order:  # s_w applied to the [N, n] products inside the kernels
                    bar_d[i], bar_a[i] = self._bar_products(i, H, D, rates_w.tensor[k:k + 1], from_bias, want_v)
            else:
                bar_d[i] = from_bias
        if p.first_order:  # the inner gradient is a constant: nothing flows into the support pass
            return
        # The inner backward, from the first layer's delta to the last's: delta_i = s'(z_i) (delta_{i+1}
        # W_{i+1}), with s' taken from the activations a_{i+1} (= layer i+1's input).
        act = p.activation
        for i in range(L - 1):
            if bar_d[i] is None:
                continue
            a = step.acts[i + 1]
            bar_e = _f._through_act(bar_d[i], a, act)
            if act == "tanh":  # d/da of g (1 - a^2) = -2 a g
                bar_a[i + 1] = _add(bar_a[i + 1], bar_d[i] * step.es[i + 1] * (-2.0 * a))
            bar_d[i + 1] = layers[i + 1].linear(bar_e, bar_d[i + 1])
            self._use(i + 1, layers[i + 1], step.deltas[i + 1], bar_e)
        # The loss's gradient at the net's output.
        bar_delta = bar_d[L - 1]
        out_bar = None
        if bar_delta is not None:
            n = bar_delta.shape[1]
            if p.loss == "mse":
                scale = 2.0 / (n * bar_delta.shape[2])
                out_bar = bar_delta * scale
                if self.want["ys"]:
                    self.g["ys"] = _add(self.g["ys"], -out_bar)
            else:
                prob = torch.softmax(step.out, dim=-1)
                pg = prob * bar_delta
                out_bar = (pg - prob * pg.sum(-1, keepdim=True)) / n
        if out_bar is None:
            out_bar = torch.zeros_like(step.deltas[L - 1])
        self._backprop(layers, step.acts, out_bar, "xs", bar_a)

    def _bar_products(self, i: int, h: torch.Tensor, d: torch.Tensor, scale: Optional[torch.Tensor],
                      base_u: Optional[torch.Tensor], want_v: bool):
        """`(base_u + scale h bar W^T, scale d bar W or None)` for layer i's bar W (h [T, N, in], d [T, N,
        out])."""
        pairs, dense = self.pairs[i], self.dense[i]
        u, v = base_u, None
        if dense is not None:
            u = _f.scaled_bmm(u, h, dense.transpose(1, 2), scale)
            v = _f.scaled_bmm(None, d, dense, scale) if want_v else None
        if pairs:
            u, v = _pair_products(h, d, [a for a, _ in pairs], [b for _, b in pairs], scale, u, want_v, v)
        return u, v

    def param_grads(self, params) -> list[Optional[torch.Tensor]]:
        out = []
        for i in range(self.L):
            w0 = params[2 * i]
            gw = None
            if self.want["params"][2 * i] and (self.pairs[i] or self.dense[i] is not None):
                gw = torch.zeros_like(w0) if self.dense[i] is None else self.dense[i].sum(0)
                for a, b in self.pairs[i]:  # bar W_0 summed over the tasks: one product per pair
                    gw.addmm_(a.reshape(-1, a.shape[-1]).t(), b.reshape(-1, b.shape[-1]))
            gb = None
            if self.want["params"][2 * i + 1] and self.bias[i] is not None:
                gb = self.bias[i].sum(0)
            out += [gw, gb]
        return out

    def rate_grads(self, rate_index: list[int], rate_tensors) -> list[Optional[torch.Tensor]]:
        out: list[Optional[torch.Tensor]] = [None] * len(rate_tensors)
        for param, r in enumerate(rate_index):
            t = rate_tensors[r]
            if t is None or not t.requires_grad:
                continue
            per_step = (self.rate_w if param % 2 == 0 else self.rate_b)[param // 2]
            zero = t.new_zeros(())
            g = torch.stack([zero if v is None else v for v in per_step]) if per_step else t.new_zeros(0)
            out[r] = g if out[r] is None else out[r] + g
        return out


class _Reverse(torch.autograd.Function):
    """`(task_losses, query_preds)` of a factored chunk, with the sweep above as its backward."""

    @staticmethod
    def forward(ctx, problem, neg_rates, rate_index, n_params, weights, xs, ys, xq, yq, *tensors):
        ctx.set_materialize_grads(False)
        run = _Run(problem, neg_rates, weights, xs, ys, xq, yq, list(tensors[:n_params]))
        outputs = run.outputs(weights)
        inputs = [weights, xs, ys, xq, yq, *tensors]
        # Each tensor saved once: the run holds the inputs again (w0, the first layer's inputs) and each
        # factor in every later layer's lists (a saved-tensor hook would copy every repeat).
        saved, where = list(inputs), {}
        for i, t in enumerate(inputs):
            if t is not None:
                where.setdefault(id(t), i)
        ctx.kept = []  # per slot of the run: its tensor's index in the saved tensors, or -1 (None)
        for t in run.stash():
            if t is not None and id(t) not in where:
                where[id(t)] = len(saved)
                saved.append(t)
            ctx.kept.append(-1 if t is None else where[id(t)])
        ctx.run, ctx.rate_index, ctx.n_params = run, rate_index, n_params
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, g_losses, g_preds):
        # The forward ran without autocast (the backend refuses it): a backward called under autocast would
        # cast the sweep's products, or the recomputed chunk's, and differentiate another function.
        with autocast_off(ctx.run.problem.device.type):  # not saved_tensors: it unpacks once only
            return _Reverse._backward(ctx, g_losses, g_preds)

    @staticmethod
    def _backward(ctx, g_losses, g_preds):
        saved = ctx.saved_tensors
        weights, xs, ys, xq, yq, *tensors = saved[:ctx.n_inputs]
        n = ctx.n_params
        params, rate_tensors = tensors[:n], tensors[n:]
        need = ctx.needs_input_grad[4:]  # weights, xs, ys, xq, yq, params..., rates...
        if g_losses is None and g_preds is None:
            return (None,) * (4 + len(need))
        if torch.is_grad_enabled():  # create_graph: this backward is to be differentiated
            return (None,) * 4 + _recompute(ctx, g_losses, g_preds)
        want = dict(weights=need[0], xs=need[1], ys=need[2] and ys.is_floating_point(), xq=need[3],
                    yq=need[4] and yq.is_floating_point(), params=need[5:5 + n],
                    rates=[need[5 + n + r] for r in ctx.rate_index])
        ctx.run.restore([None if i < 0 else saved[i] for i in ctx.kept])
        try:
            sweep = _Sweep(ctx.run, g_losses, g_preds, want).run_all(weights, ys, yq)
        finally:
            ctx.run.stash()  # the run holds nothing past the backward
        g = sweep.g
        g_weights = None
        if want["weights"]:
            zero = weights.new_zeros(())
            g_weights = torch.stack([zero if v is None else v for v in sweep.g_weights])
        data = [g_weights, g["xs"], g["ys"] if want["ys"] else None, g["xq"], g["yq"] if want["yq"] else None]
        return (None,) * 4 + (*data, *sweep.param_grads(params), *sweep.rate_grads(ctx.rate_index, rate_tensors))


def _recompute(ctx, g_losses, g_preds) -> tuple:
    """The gradients by autograd through the recomputed chunk, as functions of the inputs (create_graph).
    Views of the inputs, so that a tensor passed twice (x_query as x_support) gets each use's gradient
    once, not the whole gradient at both places."""
    saved = ctx.saved_tensors[:ctx.n_inputs]
    n = ctx.n_params
    leaves = [t.view_as(t) if t is not None and t.requires_grad else t for t in saved]
    weights, xs, ys, xq, yq, *tensors = leaves
    params, rate_tensors = tensors[:n], tensors[n:]
    neg_rates = []
    for r, i in zip(ctx.run.neg_rates, ctx.rate_index):
        t = rate_tensors[i]
        numbers = all(not isinstance(v, torch.Tensor) for v in r.steps)
        steps = r.steps if numbers else [t[k] for k in range(len(r.steps))]
        neg_rates.append(_f._Rates(t, steps))
    out = _f._autograd_chunk(ctx.run.problem, neg_rates, weights, xs, ys, xq, yq, *params)
    pairs = [(o, g) for o, g in zip(out, (g_losses, g_preds)) if g is not None]
    wanted = [i for i, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[4 + i]]
    got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                              allow_unused=True, create_graph=True)
    grads: list[Optional[torch.Tensor]] = [None] * len(leaves)
    for i, g in zip(wanted, got):
        grads[i] = g
    return tuple(grads)


__all__ = ["MODE", "maml_chunk", "reason"]
