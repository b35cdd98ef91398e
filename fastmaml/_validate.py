"""Input validation and normalisation for the public API.

Every public function turns its arguments into a `Problem` here, so the backends see one checked,
normalised form: the inner learning rates as one tensor per parameter viewed as `[K, *param.shape]`,
the query-loss weights as `[K + 1]` or `None`, and the sizes `T, Ns, Nq, dims`. Bad input raises
`ValueError` (wrong value or shape) or `TypeError` (wrong type or dtype) naming the argument and what
was expected.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ._mlp import ACTIVATIONS, LOSSES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Problem:
    """A validated call. `params` are the user's tensors (autograd flows through them).

    For an MLP problem `forward is None` and `dims = [D_in, D_1, ..., D_out]`; for a generic module
    (`fastmaml.MAML` on a non-MLP), `forward(params, x)` evaluates one task and `dims` is `None`.
    """

    params: list[torch.Tensor]
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: Optional[torch.Tensor]
    y_query: Optional[torch.Tensor]
    inner_steps: int
    # One rate tensor per param, each viewed as [K, *param.shape] (the `inner_lr` property); None when the
    # rate was a number (inner_lr_value), whose tensors are made on first use: the fused backends fill
    # their rate table from the number itself, so the views would be made for nothing on every call.
    rates: Optional[list[torch.Tensor]]
    first_order: bool
    activation: str
    loss: str
    query_loss_weights: Optional[torch.Tensor]  # [K + 1] or None (= only the last step)
    dims: Optional[list[int]] = None
    forward: Optional[Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]] = None
    inner_lr_value: Optional[float] = None  # the rate when given as a number (the fused rate tables use it)
    # The rate when given as one tensor (broadcast to [K]): the fused backends expand it to their [K, P]
    # table directly, without the per-parameter views.
    inner_lr_tensor: Optional[torch.Tensor] = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def inner_lr_form(self) -> str:
        """How the rate was given: "float", "tensor" (one tensor for every parameter) or "list"."""
        if self.inner_lr_value is not None:
            return "float"
        return "tensor" if self.inner_lr_tensor is not None else "list"

    @property
    def inner_lr(self) -> list[torch.Tensor]:
        """One rate tensor per param, each viewed as `[K, *param.shape]` (expanded: no copy)."""
        if self.rates is None:
            K = self.inner_steps
            if self.inner_lr_tensor is not None:
                rate = self.inner_lr_tensor.reshape(-1).expand(K)
            else:
                rate = torch.full((K,), self.inner_lr_value, dtype=self.dtype, device=self.device)
            self.rates = [rate.view(K, *([1] * p.dim())).expand(K, *p.shape) for p in self.params]
        return self.rates

    @property
    def num_params(self) -> int:
        """P, the number of scalar parameters."""
        if self.dims is not None:
            return sum(self.dims[i + 1] * (self.dims[i] + 1) for i in range(len(self.dims) - 1))
        return sum(p.numel() for p in self.params)

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    @property
    def n_support(self) -> int:
        return self.x_support.shape[1]

    @property
    def n_query(self) -> int:
        return 0 if self.x_query is None else self.x_query.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def is_mlp(self) -> bool:
        return self.forward is None

    @property
    def requires_grad(self) -> bool:
        """Whether autograd will need gradients from this call."""
        if not torch.is_grad_enabled():
            return False
        tensors = list(self.params) + [self.x_support]
        if self.inner_lr_tensor is not None:
            tensors.append(self.inner_lr_tensor)
        elif self.rates is not None:
            tensors += self.rates
        if self.x_query is not None:
            tensors.append(self.x_query)
        if self.query_loss_weights is not None:
            tensors.append(self.query_loss_weights)
        return any(t.requires_grad for t in tensors) or self.targets_require_grad

    @property
    def targets_require_grad(self) -> bool:
        """Whether autograd will need the gradient of a float (mse) target, `y_support` or `y_query`."""
        if not torch.is_grad_enabled():
            return False
        return any(y is not None and y.requires_grad for y in (self.y_support, self.y_query))


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_params(params: Any) -> list[int]:
    """Check `[W1, b1, ..., WL, bL]` (nn.Linear layout) and return `dims = [D_in, D_1, ..., D_out]`."""
    if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
        raise TypeError("params must be a sequence of tensors [W1, b1, ..., WL, bL]")
    params = list(params)
    if len(params) == 0 or len(params) % 2 != 0:
        raise ValueError(
            f"params must hold an even, non-zero number of tensors [W1, b1, ..., WL, bL], got {len(params)}"
        )
    for i, p in enumerate(params):
        _check_tensor(f"params[{i}]", p)
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] must be a floating-point tensor, got dtype {p.dtype}")
    dtype, device = params[0].dtype, params[0].device
    for i, p in enumerate(params):
        if p.dtype != dtype:
            raise TypeError(f"params[{i}] has dtype {p.dtype} but params[0] has {dtype}: all must match")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}: all must match")
    dims = []
    for layer in range(len(params) // 2):
        w, b = params[2 * layer], params[2 * layer + 1]
        if w.dim() != 2:
            raise ValueError(f"params[{2 * layer}] (W{layer + 1}) must be [out, in], got shape {_shape(w)}")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(
                f"params[{2 * layer + 1}] (b{layer + 1}) must be [{w.shape[0]}] to match W{layer + 1} "
                f"{_shape(w)}, got shape {_shape(b)}"
            )
        if layer == 0:
            dims.append(w.shape[1])
        elif w.shape[1] != dims[-1]:
            raise ValueError(
                f"params[{2 * layer}] (W{layer + 1}) must be [out, {dims[-1]}] to chain with the previous "
                f"layer's {dims[-1]} outputs, got shape {_shape(w)}"
            )
        dims.append(w.shape[0])
    if min(dims) < 1:
        raise ValueError(f"params: every layer width must be at least 1, got dims {dims}")
    return dims


def check_inner_steps(inner_steps: Any) -> int:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, numbers.Integral):
        raise TypeError(f"inner_steps must be an int >= 0, got {type(inner_steps).__name__}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    return int(inner_steps)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_like(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of params)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of params)")


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def check_inner_lr(inner_lr: Any, params: Sequence[torch.Tensor], K: int) -> None:
    """Check the form of `inner_lr` from its metadata (`planned_problem` then normalises it). Whether rate
    tensors are finite is `check_values`'s.

    Accepted: a finite number; a tensor broadcastable to `[K]` (scalar, `[1]` or `[K]`); a sequence of
    `len(params)` tensors, tensor `i` broadcastable to `[K, *params[i].shape]`.
    """
    dtype, device = params[0].dtype, params[0].device
    if isinstance(inner_lr, bool):
        raise TypeError("inner_lr must be a float, a tensor or a sequence of tensors, got bool")
    if isinstance(inner_lr, numbers.Real):
        if not math.isfinite(float(inner_lr)):
            raise ValueError(f"inner_lr must be finite, got {inner_lr}")
        return
    if isinstance(inner_lr, torch.Tensor):
        _check_like("inner_lr", inner_lr, dtype, device)
        if inner_lr.dim() > 1 or (inner_lr.dim() == 1 and inner_lr.shape[0] not in (1, K)):
            raise ValueError(
                f"inner_lr as one tensor must broadcast to [K] = [{K}] (a scalar, [1] or [{K}]), "
                f"got shape {_shape(inner_lr)}; give a sequence of tensors for per-parameter rates"
            )
        return
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str):
        rates = list(inner_lr)
        if len(rates) != len(params):
            raise ValueError(
                f"inner_lr as a sequence must hold one tensor per param ({len(params)}), got {len(rates)}"
            )
        for i, (r, p) in enumerate(zip(rates, params)):
            _check_tensor(f"inner_lr[{i}]", r)
            _check_like(f"inner_lr[{i}]", r, dtype, device)
            target = (K, *p.shape)
            try:
                if torch.broadcast_shapes(r.shape, target) != torch.Size(target):
                    raise RuntimeError
            except RuntimeError:
                raise ValueError(
                    f"inner_lr[{i}] must broadcast to [K, *params[{i}].shape] = "
                    f"[{', '.join(map(str, target))}], got shape {_shape(r)}"
                ) from None
        return
    raise TypeError(
        f"inner_lr must be a float, a tensor or a sequence of tensors, got {type(inner_lr).__name__}"
    )


def check_query_loss_weights(w: Any, K: int, dtype: torch.dtype, device: torch.device):
    if w is None:
        return None
    _check_tensor("query_loss_weights", w)
    _check_like("query_loss_weights", w, dtype, device)
    if w.shape != (K + 1,):
        raise ValueError(
            f"query_loss_weights must be [inner_steps + 1] = [{K + 1}], got shape {_shape(w)}"
        )
    return w


def check_data(
    name_x: str,
    x: Any,
    name_y: str,
    y: Any,
    *,
    loss: str,
    dtype: torch.dtype,
    device: torch.device,
    num_tasks: Optional[int],
    d_in: Optional[int],
    d_out: Optional[int],
    x_rank: Optional[int] = 3,
) -> None:
    """Check one (x, y) pair: `x [T, N, D_in]`; `y [T, N, D_out]` float (mse) or `[T, N]` int64 (cross_entropy).

    `x_rank=None` (generic modules) accepts `x [T, N, ...]` of any rank >= 2; `d_in`/`d_out` may then be None.
    """
    _check_tensor(name_x, x)
    _check_tensor(name_y, y)
    want = "[T, N, D_in]" if x_rank == 3 else "[T, N, ...]"
    if (x_rank is not None and x.dim() != x_rank) or x.dim() < 2:
        raise ValueError(f"{name_x} must be {want}, got shape {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name_x} must be floating point ({dtype}), got dtype {x.dtype}")
    _check_like(name_x, x, dtype, device)
    T, N = x.shape[0], x.shape[1]
    if T < 1 or N < 1:
        raise ValueError(f"{name_x} must have at least one task and one point, got shape {_shape(x)}")
    if num_tasks is not None and T != num_tasks:
        raise ValueError(f"{name_x} has {T} tasks (dim 0) but x_support has {num_tasks}")
    if d_in is not None and x_rank == 3 and x.shape[2] != d_in:
        raise ValueError(
            f"{name_x} must be [T, N, D_in] with D_in = {d_in} (params[0] is [D_1, {d_in}]), "
            f"got shape {_shape(x)}"
        )
    if loss == "mse":
        if y.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name_y} must be floating point for loss='mse', got dtype {y.dtype}")
        _check_like(name_y, y, dtype, device)
        if d_out is not None:
            if y.shape != (T, N, d_out):
                raise ValueError(
                    f"{name_y} must be [T, N, D_out] = [{T}, {N}, {d_out}] for loss='mse', got shape {_shape(y)}"
                )
        elif y.dim() < 2 or y.shape[:2] != (T, N):
            raise ValueError(f"{name_y} must be [T, N, ...] = [{T}, {N}, ...], got shape {_shape(y)}")
    else:
        if y.dtype != torch.int64:
            raise TypeError(
                f"{name_y} must hold int64 class indices [T, N] for loss='cross_entropy', got dtype {y.dtype}"
            )
        if y.device != device:
            raise ValueError(f"{name_y} is on {y.device}, expected {device} (the device of params)")
        if y.shape != (T, N):
            raise ValueError(f"{name_y} must be [T, N] = [{T}, {N}] for loss='cross_entropy', got shape {_shape(y)}")


def make_problem(
    params: Any,
    x_support: Any,
    y_support: Any,
    x_query: Any = None,
    y_query: Any = None,
    *,
    inner_steps: Any = 1,
    inner_lr: Any = 0.01,
    first_order: Any = False,
    activation: Any = "relu",
    loss: Any = "mse",
    query_loss_weights: Any = None,
    need_query: bool = True,
    forward: Optional[Callable] = None,
) -> Problem:
    """Validate a call and build its `Problem`. `forward` is set for generic modules (no MLP checks)."""
    loss = check_choice("loss", loss, LOSSES)
    if forward is None:
        activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        dims = check_params(params)
    else:
        dims = None
        params = list(params)
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")
    K = check_inner_steps(inner_steps)
    dtype, device = params[0].dtype, params[0].device
    x_rank = 3 if forward is None else None
    d_in = dims[0] if dims else None
    d_out = dims[-1] if dims else None
    check_data("x_support", x_support, "y_support", y_support, loss=loss, dtype=dtype, device=device,
               num_tasks=None, d_in=d_in, d_out=d_out, x_rank=x_rank)
    if need_query:
        check_data("x_query", x_query, "y_query", y_query, loss=loss, dtype=dtype, device=device,
                   num_tasks=x_support.shape[0], d_in=d_in, d_out=d_out, x_rank=x_rank)
        if forward is not None and x_query.shape[2:] != x_support.shape[2:]:
            raise ValueError(
                f"x_query must be [T, Nq, {', '.join(map(str, x_support.shape[2:]))}] like x_support, "
                f"got shape {_shape(x_query)}"
            )
    check_inner_lr(inner_lr, params, K)
    weights = check_query_loss_weights(query_loss_weights, K, dtype, device)
    problem = planned_problem(params, x_support, y_support, x_query if need_query else None,
                              y_query if need_query else None, K, inner_lr, first_order, activation, loss,
                              weights, dims)
    problem.forward = forward
    return problem


def planned_problem(params, x_support, y_support, x_query, y_query, inner_steps, inner_lr, first_order,
                    activation, loss, query_loss_weights, dims) -> Problem:
    """The `Problem` of a call whose metadata passed the checks: `make_problem`'s last step, and on its
    own for a call whose signature passed before (fastmaml/_plans.py). A float rate is checked here (its
    value is not in the signature); a sequence of rates becomes one tensor per param viewed as
    `[K, *param.shape]` (expand: no copy); a number or one tensor stays as given (`Problem.inner_lr` makes
    the views when asked)."""
    value = tensor = rates = None
    if isinstance(inner_lr, torch.Tensor):
        tensor = inner_lr
    elif isinstance(inner_lr, numbers.Real):
        value = float(inner_lr)
        if not math.isfinite(value):
            raise ValueError(f"inner_lr must be finite, got {inner_lr}")
    else:
        rates = [r.expand(inner_steps, *p.shape) for r, p in zip(inner_lr, params)]
    # What the function does not depend on is detached, so that every backend leaves its gradient None, as
    # autograd through the model does (the fused kernels would return zeros: an optimizer skips a None
    # gradient but decays a zero one and counts it in its moments). The rates when no step is taken; the
    # support set when no step is taken or the inner gradient is a constant (first order).
    if inner_steps == 0:
        tensor = tensor.detach() if tensor is not None else None
        rates = [r.detach() for r in rates] if rates is not None else None
    if inner_steps == 0 or first_order:
        x_support = x_support.detach() if x_support.requires_grad else x_support
        y_support = y_support.detach() if y_support.requires_grad else y_support
    return Problem(
        params=list(params), x_support=x_support, y_support=y_support, x_query=x_query, y_query=y_query,
        inner_steps=inner_steps, rates=rates, first_order=first_order, activation=activation, loss=loss,
        query_loss_weights=query_loss_weights, dims=dims, inner_lr_value=value, inner_lr_tensor=tensor,
    )


# ---- the checks that read data -------------------------------------------------------------------------
#
# Whether the rate tensors and multi-step weights are finite and the class indices in range can only be
# known by reading the tensors. On a GPU that read is a device-to-host synchronisation, which stalls the
# training loop every call, so there they run only when asked (FASTMAML_CHECK_INPUTS=1, or
# `set_check_inputs(True)`; the tests switch it on). On the CPU they always run: the fused CPU kernels make
# them inside the operation, on data they read anyway (csrc/cpu/maml_cpu.cpp); for the other backends
# `check_values` makes them here. Under torch.compile they are left to the operations (a data-dependent
# branch would break the graph): the CPU kernels still make them.

def check_inputs_setting(value: Optional[str]) -> bool:
    """FASTMAML_CHECK_INPUTS read as a yes or no (case and spaces ignored; unset or empty: no). Any other
    value raises: `=off` used to switch the checks on, as every value but "" and "0" did."""
    word = (value or "").strip().lower()
    if word in ("", "0", "false", "off", "no"):
        return False
    if word in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"FASTMAML_CHECK_INPUTS must be 0 or 1 (or false/true, off/on, no/yes), got {value!r}")


_CHECK_INPUTS = [check_inputs_setting(os.environ.get("FASTMAML_CHECK_INPUTS"))]


# Backends whose operations check the data themselves, per device type.
SELF_CHECKING = {"cpu": ("cpu",)}


def set_check_inputs(enabled: bool) -> bool:
    """Switch the data-reading input checks on GPU tensors on or off; returns the previous setting.

    On: non-finite rate tensors or multi-step weights and out-of-range class indices raise `ValueError`
    before the call runs, at the cost of one device synchronisation per call. Off (the default unless the
    environment sets FASTMAML_CHECK_INPUTS=1): the call never synchronises; a class index out of range
    gives a nan loss in the fused GPU kernels, non-finite rates give non-finite results. CPU tensors are
    always checked.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = _CHECK_INPUTS[0]
    _CHECK_INPUTS[0] = enabled
    return previous


def check_inputs_enabled() -> bool:
    """Whether the data-reading checks run on GPU tensors (`set_check_inputs`)."""
    return _CHECK_INPUTS[0]


def values_checked_here(problem: Problem, backend: str) -> bool:
    """Whether `check_values` must run in Python for this call on `backend` (see the comment above)."""
    if torch.compiler.is_compiling():
        return False
    device = problem.device.type
    if backend in SELF_CHECKING.get(device, ()):
        return False
    return device == "cpu" or _CHECK_INPUTS[0]


def check_values(problem: Problem) -> None:
    """The checks that read tensor data: finite rate tensors and multi-step weights, class indices in
    `[0, D_out)`. Raises ValueError naming the argument."""
    form = problem.inner_lr_form
    if form == "tensor" and not _all_finite(problem.inner_lr_tensor):
        raise ValueError("inner_lr must be finite, got a tensor with inf or nan")
    if form == "list":
        for i, r in enumerate(problem.rates):
            if not _all_finite(r):
                raise ValueError(f"inner_lr[{i}] must be finite, got inf or nan in the rates of params[{i}]")
    w = problem.query_loss_weights
    if w is not None and not _all_finite(w):
        raise ValueError("query_loss_weights must be finite, got a tensor with inf or nan")
    if problem.loss == "cross_entropy" and problem.dims is not None:
        d_out = problem.dims[-1]
        for name, y in (("y_support", problem.y_support), ("y_query", problem.y_query)):
            if y is None or y.numel() == 0:
                continue
            lo, hi = torch.aminmax(y)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= d_out:
                bad = lo if lo < 0 else hi
                raise class_out_of_range(name, bad, d_out)


def class_out_of_range(name: str, bad: int, d_out: int) -> ValueError:
    """The error for a class index `bad` in the targets `name` that `d_out` logits do not cover (the C++
    operations' check says it in the same words, csrc/cpu/maml_cpu.cpp)."""
    return ValueError(f"{name} holds class {bad} but must be in [0, {d_out - 1}] (D_out = {d_out} logits)")
