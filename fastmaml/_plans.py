"""Validated calls remembered by their signature, so that a training loop validates and dispatches once.

A meta-iteration calls `fastmaml.maml` with tensors of the same shapes, dtypes and devices every time.
The checks of `_validate` and the backend choice of `dispatch` depend only on that metadata (for rates
their strides too), on the options and on a little global state (grad mode, inference mode, forward-mode
AD, autocast, torch.func's transforms); their outcome for one signature is kept here as a `Plan`, and a
later call with the same signature skips them.
The checks that read data (`_validate.check_values`) are not metadata: they run on every call where they
run at all.

The key holds no tensor (only shapes, dtypes, devices and flags), and only calls that passed validation
are remembered, so a key can never stand for a call that would have been refused. Not used while
torch.compile traces: there the checks are traced once and turn into guards.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

MAX_PLANS = 64


class Plan(NamedTuple):
    """What validation and dispatch decided for one signature."""

    backend: Any  # the dispatch.Backend that runs the call
    dims: Optional[list[int]]


_PLANS: dict[tuple, Plan] = {}


def clear() -> None:
    """Forget every plan (a backend was registered or replaced)."""
    _PLANS.clear()


def _meta(t: torch.Tensor) -> tuple:
    return (t.shape, t.dtype, t.device, t.requires_grad)


def _rate_meta(t: torch.Tensor) -> tuple:
    # With the strides: a [K, *shape] rate expanded from [K, 1, ...] (stride 0) is one rate per tensor,
    # the same shape materialised is Meta-SGD's, and the factored backend takes only the first.
    return (*_meta(t), t.stride())


_PEEK = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) is running this call. False while
    torch.compile traces, which runs its own interpreters there (the kernels' ops are traced as ops)."""
    return _PEEK is not None and not torch.compiler.is_compiling() and _PEEK() is not None


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (torch.func.jvp, forward_ad.dual_level)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (False for a device type autocast does not know)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):
        return False


def key(op: str, params: Any, tensors: tuple, inner_steps: Any, inner_lr: Any, options: tuple) -> Optional[tuple]:
    """The signature of a call, or None when it is not one a plan can stand for (then the call is
    validated in full). `tensors`: the data tensors (x and y, support and query; None where absent);
    `options`: the hashable remaining arguments (first order, activation, loss, backend, ...), each of a
    type the validation accepts only as exactly that type (a bool is not taken for an int)."""
    if type(inner_steps) is not int or not isinstance(params, (list, tuple)):
        return None
    try:
        param_key = tuple([_meta(p) for p in params])
        data_key = tuple([None if t is None else _meta(t) for t in tensors])
        lr_type = type(inner_lr)
        if lr_type is float or lr_type is int:
            lr_key: Any = lr_type
        elif isinstance(inner_lr, torch.Tensor):
            lr_key = _rate_meta(inner_lr)
        elif lr_type is list or lr_type is tuple:
            lr_key = (lr_type, tuple([_rate_meta(r) for r in inner_lr]))
        else:
            return None
    except AttributeError:  # something that is not a tensor: the full validation says what
        return None
    for value in options:
        if value is not None and type(value) not in (bool, str, int) and not isinstance(value, torch.Tensor):
            return None
    options = tuple(_meta(v) if isinstance(v, torch.Tensor) else (type(v), v) for v in options)
    if not params or not isinstance(params[0], torch.Tensor):
        return None
    device_type = params[0].device.type
    state = (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.autograd.forward_ad._current_level,
        autocast_enabled(device_type),
        functorch_active(),
    )
    return (op, param_key, data_key, inner_steps, lr_key, options, state)


def get(signature: Optional[tuple]) -> Optional[Plan]:
    return None if signature is None else _PLANS.get(signature)


def remember(signature: Optional[tuple], plan: Plan) -> None:
    if signature is None:
        return
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[signature] = plan
