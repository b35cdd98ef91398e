"""The tests' own oracle: MAML computed task by task with plain autograd, plus the tests' shared helpers.

Nothing here imports fastmaml: the MLP, the losses, the rate broadcasting and the inner loop are
written again, the way a per-task MAML implementation does it (a Python loop over tasks,
`torch.autograd.grad(create_graph=True)`), so that fastmaml's reference backend (torch.func + vmap)
and every kernel are checked against an independent computation.

Also here: `make_case` (fresh random problems of a given shape and option set, float64, sizes that
are not powers of two) and `assert_close` (a comparison that reports the largest error and where).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

Forward = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The independent per-task computation
# --------------------------------------------------------------------------------------------------


def mlp_apply(params: Sequence[torch.Tensor], x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """One task's MLP: `params = [W1, b1, ..., WL, bL]` (`W_l [out, in]`), `x [N, D_in]` -> `[N, D_out]`.
    The activation follows every layer but the last."""
    act = {"relu": lambda z: z.clamp_min(0), "tanh": torch.tanh}[activation]
    h = x
    n_layers = len(params) // 2
    for layer in range(n_layers):
        h = h @ params[2 * layer].t() + params[2 * layer + 1]
        if layer + 1 < n_layers:
            h = act(h)
    return h


def loss_value(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """mse: mean of squared errors over points and outputs (`out, target [N, D]`).
    cross_entropy: mean over points of `logsumexp(out_n) - out_n[target_n]` (`out [N, C]`, `target [N]`)."""
    if loss == "mse":
        return ((out - target) ** 2).mean()
    if loss == "cross_entropy":
        picked = out.gather(1, target.unsqueeze(1)).squeeze(1)
        return (torch.logsumexp(out, dim=1) - picked).mean()
    raise ValueError(f"unknown loss {loss!r}")


def rate_per_param(inner_lr, params: Sequence[torch.Tensor], K: int) -> list[Callable[[int], object]]:
    """For each param, `k -> the step-k rate` (a number or a tensor broadcastable to the param).

    `inner_lr`: a number; a tensor of shape `[]`, `[1]` or `[K]` (one rate per step, every param); or
    one tensor per param broadcastable to `[K, *param.shape]` (leading dims of size 1 broadcast).
    """
    if isinstance(inner_lr, (int, float)):
        return [lambda k, r=float(inner_lr): r for _ in params]
    if isinstance(inner_lr, torch.Tensor):
        flat = inner_lr.reshape(-1)
        if flat.numel() == 1:
            return [lambda k, r=flat: r[0] for _ in params]
        return [lambda k, r=flat: r[k] for _ in params]
    out = []
    for r, p in zip(inner_lr, params):
        full = r.reshape((1,) * (p.dim() + 1 - r.dim()) + tuple(r.shape))  # [K or 1, ...]
        out.append(lambda k, full=full: full[k] if full.shape[0] > 1 else full[0])
    return out


def inner_loop(
    params: Sequence[torch.Tensor],
    rates: Sequence[Callable[[int], object]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    inner_steps: int,
    first_order: bool,
    loss: str,
    forward: Forward,
) -> list[list[torch.Tensor]]:
    """`[theta_0, ..., theta_K]` for one task: `theta_{k+1} = theta_k - lr_k * grad L_support(theta_k)`.

    Second order: the inner gradients keep their graph (create_graph=True). First order: they are
    detached, so `theta_{k+1}` depends on `params` only through the identity path and on the rates.
    """
    theta = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    thetas = [theta]
    for k in range(inner_steps):
        support = loss_value(forward(theta, x), y, loss)
        # retain_graph: the support loss's graph shares nodes with the outer objective's graph.
        grads = torch.autograd.grad(support, theta, create_graph=not first_order, retain_graph=True)
        if first_order:
            grads = [g.detach() for g in grads]
        theta = [p - rate(k) * g for p, rate, g in zip(theta, rates, grads)]
        thetas.append(theta)
    return thetas


@dataclass
class LoopResult:
    """`loss` scalar; `task_losses [T]`; `query_preds [T, Nq, D_out]`; `adapted[i] [T, *params[i].shape]`."""

    loss: torch.Tensor
    task_losses: torch.Tensor
    query_preds: torch.Tensor
    adapted: list[torch.Tensor] = field(default_factory=list)


def maml_loop(
    params: Sequence[torch.Tensor],
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: Optional[torch.Tensor] = None,
    y_query: Optional[torch.Tensor] = None,
    *,
    inner_steps: int = 1,
    inner_lr=0.01,
    first_order: bool = False,
    activation: str = "relu",
    loss: str = "mse",
    query_loss_weights: Optional[torch.Tensor] = None,
    forward: Optional[Forward] = None,
) -> LoopResult:
    """MAML task by task. Per task t: K SGD steps on `(x_support[t], y_support[t])`, then the task loss
    `L_query(theta_K)`, or `sum_k w_k L_query(theta_k)` with `query_loss_weights [K + 1]`.

    `forward(params, x [N, ...]) -> [N, D_out]` evaluates one task's model (default: `mlp_apply` with
    `activation`). Without query data only `adapted` is filled. Everything stays differentiable.
    """
    if forward is None:
        forward = lambda p, x: mlp_apply(p, x, activation)  # noqa: E731
    params = list(params)
    rates = rate_per_param(inner_lr, params, inner_steps)
    task_losses, preds, adapted = [], [], []
    for t in range(x_support.shape[0]):
        thetas = inner_loop(params, rates, x_support[t], y_support[t], inner_steps=inner_steps,
                            first_order=first_order, loss=loss, forward=forward)
        adapted.append(thetas[-1])
        if x_query is None:
            continue
        out = forward(thetas[-1], x_query[t])
        if query_loss_weights is None:
            task = loss_value(out, y_query[t], loss)
        else:
            task = sum(query_loss_weights[k] * loss_value(forward(thetas[k], x_query[t]), y_query[t], loss)
                       for k in range(inner_steps + 1))
        task_losses.append(task)
        preds.append(out)
    stacked = [torch.stack(parts) for parts in zip(*adapted)]
    if x_query is None:
        empty = torch.zeros(0)
        return LoopResult(empty, empty, empty, stacked)
    task_losses = torch.stack(task_losses)
    return LoopResult(task_losses.mean(), task_losses, torch.stack(preds), stacked)


# --------------------------------------------------------------------------------------------------
# Random problems
# --------------------------------------------------------------------------------------------------

# Depth 1 to 4, no width a power of two (except the 1-wide output of the sinusoid-like net).
DIMS_BY_DEPTH = {1: [5, 3], 2: [3, 7, 2], 3: [3, 7, 5, 2], 4: [5, 6, 3, 9, 3]}
LR_FORMS = ("float", "per_step", "per_layer", "per_parameter")


@dataclass
class Case:
    """One random problem, float64, every tensor a fresh leaf. `inner_lr` as `maml` takes it."""

    params: list[torch.Tensor]
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    inner_lr: Union[float, torch.Tensor, list[torch.Tensor]]
    query_loss_weights: Optional[torch.Tensor]
    options: dict

    def rate_tensors(self) -> list[torch.Tensor]:
        if isinstance(self.inner_lr, torch.Tensor):
            return [self.inner_lr]
        if isinstance(self.inner_lr, list):
            return list(self.inner_lr)
        return []

    def leaves(self) -> dict[str, torch.Tensor]:
        """Every tensor the meta-gradient flows to, by name (those that require grad)."""
        named = {f"params[{i}]": p for i, p in enumerate(self.params)}
        named.update({f"inner_lr[{i}]": r for i, r in enumerate(self.rate_tensors())})
        named["x_support"] = self.x_support
        named["x_query"] = self.x_query
        if self.query_loss_weights is not None:
            named["query_loss_weights"] = self.query_loss_weights
        return {k: v for k, v in named.items() if v.requires_grad}

    def kwargs(self) -> dict:
        """Keyword arguments of `maml` (and of `maml_loop`)."""
        return dict(inner_lr=self.inner_lr, query_loss_weights=self.query_loss_weights, **self.options)

    def to(self, dtype: torch.dtype, device="cpu") -> "Case":
        """The same problem in another dtype (float tensors) and on `device`, as fresh leaves (same
        requires_grad)."""

        def conv(t):
            if t is None:
                return t
            if not t.is_floating_point():
                return t.to(device)
            return t.detach().to(device, dtype).requires_grad_(t.requires_grad)

        lr = self.inner_lr
        if isinstance(lr, torch.Tensor):
            lr = conv(lr)
        elif isinstance(lr, list):
            lr = [conv(r) for r in lr]
        return Case([conv(p) for p in self.params], conv(self.x_support), conv(self.y_support),
                    conv(self.x_query), conv(self.y_query), lr, conv(self.query_loss_weights),
                    dict(self.options))


def random_params(dims: Sequence[int], dtype=torch.float64, generator=None) -> list[torch.Tensor]:
    """nn.Linear-like initialisation (uniform, scale 1/sqrt(fan_in)) with nonzero biases."""
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(d_in)
        params.append((torch.rand(d_out, d_in, dtype=dtype, generator=generator) * 2 - 1) * bound * 1.5)
        params.append((torch.rand(d_out, dtype=dtype, generator=generator) * 2 - 1) * bound)
    return params


def normal_params(dims: Sequence[int], dtype=torch.float64, generator=None) -> list[torch.Tensor]:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.3^2): the raw-op and Triton tests' initialisation."""
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        params.append(torch.randn(d_out, d_in, dtype=dtype, generator=generator) / d_in ** 0.5)
        params.append(torch.randn(d_out, dtype=dtype, generator=generator) * 0.3)
    return params


def random_data(dims: Sequence[int], tasks: int, n_support: int, n_query: int, loss: str, dtype=torch.float64,
                generator=None):
    """`(x_support, y_support, x_query, y_query)`: normal inputs, normal targets (mse) or uniform class
    indices (cross-entropy), drawn in the order x_support, x_query, y_support, y_query."""
    xs = torch.randn(tasks, n_support, dims[0], dtype=dtype, generator=generator)
    xq = torch.randn(tasks, n_query, dims[0], dtype=dtype, generator=generator)
    if loss == "mse":
        ys = torch.randn(tasks, n_support, dims[-1], dtype=dtype, generator=generator)
        yq = torch.randn(tasks, n_query, dims[-1], dtype=dtype, generator=generator)
    else:
        ys = torch.randint(0, dims[-1], (tasks, n_support), generator=generator)
        yq = torch.randint(0, dims[-1], (tasks, n_query), generator=generator)
    return xs, ys, xq, yq


def make_case(
    *,
    dims: Sequence[int] = (3, 7, 5, 2),
    tasks: int = 3,
    n_support: int = 5,
    n_query: int = 6,
    inner_steps: int = 1,
    lr_form: str = "float",
    first_order: bool = False,
    query_loss_weights: bool = False,
    loss: str = "mse",
    activation: str = "relu",
    grad_inputs: bool = True,
    grad_weights: bool = False,
    seed: int = 0,
    round_to: Optional[torch.dtype] = torch.float32,
    lr_scale: float = 1.0,
) -> Case:
    """A fresh random float64 problem; every float tensor is a leaf, params and rates require grad.

    `lr_form`: "float" (a Python number), "per_step" (`[K]` tensor), "per_layer" (one `[K, 1, ...]`
    tensor per param), "per_parameter" (one `[K, *shape]` tensor per param), "scalar_tensor" (`[]`),
    "meta_sgd" (one `[*shape]` tensor per param, shared by the steps). Rates lie in [0.05, 0.3].
    `round_to`: values are rounded through this dtype so a lower-precision run sees the same inputs.
    `lr_scale` scales the rates (wide nets over several steps diverge at the default rates).
    """
    g = torch.Generator().manual_seed(seed)
    K = inner_steps
    f64 = torch.float64

    def rate(*shape):
        return lr_scale * (0.05 + 0.25 * torch.rand(*shape, dtype=f64, generator=g))

    params = random_params(dims, f64, g)
    xs, ys, xq, yq = random_data(dims, tasks, n_support, n_query, loss, f64, g)
    if lr_form == "float":
        lr = float(rate(()).item())
    elif lr_form == "scalar_tensor":
        lr = rate(())
    elif lr_form == "per_step":
        lr = rate(K)
    elif lr_form == "per_layer":
        lr = [rate(K, *([1] * p.dim())) for p in params]
    elif lr_form == "per_parameter":
        lr = [rate(K, *p.shape) for p in params]
    elif lr_form == "meta_sgd":
        lr = [rate(*p.shape) for p in params]
    else:
        raise ValueError(f"unknown lr_form {lr_form!r}")
    weights = (0.2 + torch.rand(K + 1, dtype=f64, generator=g)) if query_loss_weights else None

    def leaf(t, grad):
        if round_to is not None and t.is_floating_point():
            t = t.to(round_to).to(f64)
        return t.requires_grad_(grad) if t.is_floating_point() else t

    params = [leaf(p, True) for p in params]
    if isinstance(lr, torch.Tensor):
        lr = leaf(lr, True)
    elif isinstance(lr, list):
        lr = [leaf(r, True) for r in lr]
    elif round_to is not None:
        lr = float(torch.tensor(lr, dtype=round_to))
    options = dict(inner_steps=K, first_order=first_order, loss=loss, activation=activation)
    return Case(params, leaf(xs, grad_inputs), leaf(ys, False), leaf(xq, grad_inputs), leaf(yq, False),
                lr, None if weights is None else leaf(weights, grad_weights), options)


def output_cotangents(task_losses: torch.Tensor, query_preds: torch.Tensor, seed: int = 1):
    """Random weights `(a [T], B [T, Nq, D_out])` for the objective `loss + a . task_losses + B . query_preds`,
    so one backward exercises the cotangents of all three outputs."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(task_losses.shape, dtype=torch.float64, generator=g)
    b = torch.randn(query_preds.shape, dtype=torch.float64, generator=g)
    return a, b


def objective(loss, task_losses, query_preds, cotangents) -> torch.Tensor:
    a, b = cotangents
    return loss + (task_losses * a.to(task_losses.dtype)).sum() + (query_preds * b.to(query_preds.dtype)).sum()


def task_objective(loss, task_losses, cotangents) -> torch.Tensor:
    """The objective of `objective` without the query output: what a training loop differentiates (the
    cpu backend then reduces its per-task gradient rows instead of running the reverse sweep)."""
    a, _ = cotangents
    return loss + (task_losses * a.to(task_losses.dtype)).sum()


def gradients(value: torch.Tensor, leaves: dict[str, torch.Tensor], retain_graph: bool = False) -> dict[str, torch.Tensor]:
    """`d value / d leaf` for every named leaf; an unused leaf gets zeros (fastmaml may return either)."""
    names = list(leaves)
    grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True, retain_graph=retain_graph)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


# --------------------------------------------------------------------------------------------------
# Comparison with a mismatch report
# --------------------------------------------------------------------------------------------------


def mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor",
             scale_floor: float = 1e-12) -> Optional[str]:
    """None if `actual` matches `expected` (in float64) within `rtol`, else a report.

    The tolerance is relative to the tensor's scale: `|a - e| <= rtol * max(|e|_max, scale_floor)` at
    every element, so entries near zero are judged against the size of the whole tensor, not their own
    (and a tensor that is zero in exact arithmetic against `scale_floor`). The report gives the worst
    element (index, both values), the max abs and max relative errors.
    """
    if not isinstance(actual, torch.Tensor):
        return f"{name}: expected a tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return None
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[0].tolist()
        return f"{name}: non-finite value {a[tuple(bad)].item()} at {bad}"
    scale = max(_scale(e), scale_floor, 1e-12)
    diff = (a - e).abs()
    worst = int(diff.argmax())
    max_abs = diff.reshape(-1)[worst].item()
    if actual.dtype == torch.float32 and os.environ.get("FASTMAML_ERROR_LOG"):  # the norms only when asked
        record_float32_error(name, max_abs / scale, (a - e).norm().item() / max(e.norm().item(), 1e-300),
                             a.numel(), actual.device.type)
    if max_abs <= rtol * scale:
        return None
    index = [int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)] if a.dim() else []
    rel = (diff / e.abs().clamp_min(1e-300)).max().item()
    n_bad = int((diff > rtol * scale).sum())
    return (
        f"{name}: {n_bad}/{a.numel()} elements off; max abs error {max_abs:.3e} at {index} "
        f"(actual {a.reshape(-1)[worst].item():.10g}, expected {e.reshape(-1)[worst].item():.10g}); "
        f"max abs error / scale {scale:.3e} = {max_abs / scale:.3e} > rtol {rtol:.1e}; "
        f"max elementwise rel error {rel:.3e}; shape {list(a.shape)}"
    )


def assert_close_per_tensor(actual: dict, expected: dict, rtol: float, worst: float, name: str = "") -> None:
    """Per tensor, `||a - e|| / ||e|| <= rtol`, and every element within `worst` of the tensor's scale.

    For batches of thousands of tasks, where `assert_close`'s worst element measures float32 itself: a
    ReLU unit whose pre-activation is within rounding of zero switches between float32 and float64 and
    moves that task's next step. In the GPU grid's T=20,000, width-128 cross-entropy case the plain
    PyTorch path in float32 has 20 of 1,000,000 query predictions beyond 1e-4 of the scale (worst 5.4e-4),
    at a norm-wise error of 1e-5. One task computed wrong still fails the norm (its 50 predictions alone
    are above 1e-4 of the whole), and `worst` bounds what any element may do.
    """
    assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} != {sorted(expected)}"
    norms = {key: e.detach().double().norm().item() for key, e in expected.items()}
    scale_floor = COLLECTION_FLOOR * max([_scale(e) for e in expected.values()] + [0.0])
    norm_floor = COLLECTION_FLOOR * max(list(norms.values()) + [0.0])
    reports = []
    for key, e in expected.items():
        label = f"{name}[{key}]" if name else key
        report = mismatch(actual[key], e, worst, label, scale_floor)
        if report is None and e.numel():
            diff = (actual[key].detach().to("cpu", torch.float64) - e.detach().to("cpu", torch.float64)).norm().item()
            ref = max(norms[key], norm_floor, 1e-300)
            if diff > rtol * ref:
                report = f"{label}: norm-wise error {diff / ref:.3e} > {rtol:.1e}; shape {list(e.shape)}"
        if report:
            reports.append(report)
    assert not reports, "mismatch against the expected values:\n  " + "\n  ".join(reports)


def assert_close_float32_batch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str,
                               tasks: int) -> None:
    """One float32 output of `tasks` tasks against its float64 value: elementwise within `rtol` of its scale
    for a few tasks (`assert_close`), per tensor (`assert_close_per_tensor`, no element beyond 1e-2 of the
    scale) from 1,000 tasks on, where float32's own rounding at ReLU kinks moves single elements past 1e-4."""
    if tasks >= 1000:
        assert_close_per_tensor({name: actual}, {name: expected}, rtol, worst=1e-2)
    else:
        assert_close(actual, expected, rtol, name)


def record_float32_error(name: str, worst: float, norm_wise: float, numel: int, device: str) -> None:
    """Append one float32 comparison's errors to the file named by FASTMAML_ERROR_LOG (one JSON line: the
    test, the tensor, the worst element over the tensor's scale, the norm-wise error), when it is set. The
    GPU check sets it, so that the bounds of the float32 comparisons can be set from what the kernels do
    on the card rather than from the CPU's float32 alone. One write per line (O_APPEND), so the xdist
    workers' lines do not interleave."""
    path = os.environ.get("FASTMAML_ERROR_LOG")
    if not path:
        return
    line = json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0], "tensor": name,
                       "worst_over_scale": worst, "norm_wise": norm_wise, "numel": numel, "device": device})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _scale(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


# A tensor's tolerance scale in a collection is at least this fraction of the largest tensor's: far
# below any real gradient of the tests' problems, above the rounding noise of one that is zero.
COLLECTION_FLOOR = 1e-6


def assert_close(actual, expected, rtol: float, name: str = "tensor") -> None:
    """Assert one tensor, or dicts / sequences of tensors (by key or position), match; report all mismatches.

    Each tensor is judged against its own scale (`mismatch`), so a gradient a millionth the size of the
    largest is still checked to `rtol` of itself. The only floor is for tensors that are zero, or nearly,
    in exact arithmetic (a bias before a batch norm), which hold the rounding noise of the others: in a
    collection each tensor's scale is at least `COLLECTION_FLOOR` times the largest tensor's.
    """
    reports = []
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} != {sorted(expected)}"
        floor = COLLECTION_FLOOR * max([_scale(e) for e in expected.values()] + [0.0])
        for key in expected:
            reports.append(mismatch(actual[key], expected[key], rtol, f"{name}[{key}]" if name else key, floor))
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{name}: {len(actual)} tensors, expected {len(expected)}"
        floor = COLLECTION_FLOOR * max([_scale(e) for e in expected] + [0.0])
        for i, (a, e) in enumerate(zip(actual, expected)):
            reports.append(mismatch(a, e, rtol, f"{name}[{i}]", floor))
    else:
        reports.append(mismatch(actual, expected, rtol, name))
    reports = [r for r in reports if r]
    assert not reports, "mismatch against the expected values:\n  " + "\n  ".join(reports)


def relu_kink_margins(case, chunk: int = 2500) -> torch.Tensor:
    """`[T]`: for each task of a ReLU `case`, the smallest |pre-activation| of a point in a hidden layer over
    the largest of that layer and pass, over every pass the task's loss reads: the support passes of its inner
    loop (every step but the last) and the query passes (the last step's, and every step's with query-loss
    weights). The float64 run, on the case's device."""
    from fastmaml._mlp import mlp_forward
    from fastmaml._validate import make_problem
    from fastmaml.backends.reference import _inner_loop_func

    c = case.to(torch.float64, case.x_support.device)
    problem = make_problem(c.params, c.x_support, c.y_support, c.x_query, c.y_query, **c.kwargs())
    run = _inner_loop_func(lambda theta, x: mlp_forward(theta, x, "relu"), problem.loss, problem.inner_steps,
                           problem.first_order)
    params = [p.detach() for p in problem.params]
    rates = [r.detach() for r in problem.inner_lr]

    every_query = problem.query_loss_weights is not None

    def margin(xs, ys, xq):
        thetas = run(params, rates, xs, ys)
        passes = [(theta, xs) for theta in thetas[:-1]]
        passes += [(theta, xq) for theta in (thetas if every_query else thetas[-1:])]
        ratios = []
        for theta, x in passes:
            h = x
            for i in range(0, len(theta) - 2, 2):
                z = h @ theta[i].T + theta[i + 1]
                ratios.append(z.abs().min() / z.abs().max())
                h = torch.relu(z)
        return torch.stack(ratios).min() if ratios else xs.new_ones(())

    xs, ys, xq = problem.x_support.detach(), problem.y_support, problem.x_query.detach()
    with torch.no_grad():
        return torch.cat([torch.func.vmap(margin)(xs[i:i + chunk], ys[i:i + chunk], xq[i:i + chunk])
                          for i in range(0, xs.shape[0], chunk)])


def near_relu_kinks(case, rel: float = 3e-7) -> torch.Tensor:
    """`[T]` bool: the tasks whose `relu_kink_margins` are below `rel`. There float32 cannot be sure of the
    ReLU's side: one such task whose float32 run took the other side moved the summed meta-gradient of a
    20,000-task case by 5.7e-4 norm-wise in plain float32 PyTorch (a support pre-activation 6e-10 of its
    layer's scale, task 9991 of the H200 run of 2026-12-04), past the 1e-4 that every float32-accurate
    backend meets elsewhere, by luck of rounding alone. The 9 tasks of that case whose inner loop changed a
    ReLU's side in float32 on the CPU had margins of 6e-10 to 3.5e-8."""
    return relu_kink_margins(case) < rel
