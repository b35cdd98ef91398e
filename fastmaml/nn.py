"""`fastmaml.MAML`: the drop-in nn.Module around any model.

An `nn.Sequential` of `nn.Linear` layers (with bias) separated by one supported activation module
(`nn.ReLU` or `nn.Tanh`) runs on the fused kernels; any other module runs on the reference path
(`torch.func.functional_call` + `vmap` over tasks, a task loop where vmap cannot).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import dispatch
from ._validate import check_choice, check_inner_steps, make_problem
from .api import MAMLOutput

LEARN_INNER_LR = (None, "scalar", "per_step", "per_layer", "per_parameter")
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh"}


def mlp_structure(model: nn.Module) -> Optional[str]:
    """The activation name if `model` is Linear (-> act -> Linear)* with biases and one activation, else None."""
    if not isinstance(model, nn.Sequential) or len(model) % 2 == 0:
        return None
    activation = None
    for i, layer in enumerate(model):
        if i % 2 == 0:
            if type(layer) is not nn.Linear or layer.bias is None:
                return None
        else:
            name = _ACTIVATION_MODULES.get(type(layer))
            if name is None or (activation is not None and name != activation):
                return None
            if getattr(layer, "inplace", False):
                return None
            activation = name
    return activation or "relu"


class MAML(nn.Module):
    """Wraps `model` so that `forward(x_s, y_s, x_q, y_q)` runs MAML on a batch of tasks.

    Args:
        model: the network adapted per task. Its parameters are the meta-parameters (theta_0).
        inner_lr: initial inner learning rate (float).
        inner_steps: K, SGD steps per task.
        first_order: FOMAML instead of the exact second-order meta-gradient.
        learn_inner_lr: None (fixed rate), "scalar" (one learned rate), "per_step" (`[K]`),
            "per_layer" (one rate per parameter tensor and step, MAML++), "per_parameter"
            (one rate per scalar parameter, shared over steps: Meta-SGD). Learned rates are
            registered as parameters of this module (`inner_lrs`).
        loss: "mse" or "cross_entropy".
        backend: "auto" or a backend name.

    `forward(x_support [T, Ns, ...], y_support, x_query [T, Nq, ...], y_query, query_loss_weights=None)`
    returns `MAMLOutput(loss, task_losses [T], query_preds [T, Nq, D_out], backend)`.
    `adapt(x_support, y_support, inner_steps=None)` returns the adapted parameters per task (dict of
    name -> `[T, *shape]`) and `functional(adapted, x)` evaluates them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_inner_lr: Optional[str] = None,
        loss: str = "mse",
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if learn_inner_lr not in LEARN_INNER_LR:
            raise ValueError(f"learn_inner_lr must be one of {list(LEARN_INNER_LR)}, got {learn_inner_lr!r}")
        self.model = model
        self.inner_steps = check_inner_steps(inner_steps)
        self.first_order = bool(first_order)
        self.loss = check_choice("loss", loss, ("mse", "cross_entropy"))
        self.backend = backend
        self.learn_inner_lr = learn_inner_lr
        self.activation = mlp_structure(model)
        self._names = [n for n, _ in model.named_parameters()]
        # Whether vmap failed on this model, per training mode (batch-norm statistics block vmap in
        # training mode only): the reference path then goes straight to its task loop.
        self._no_vmap = {True: False, False: False}
        self.inner_lr = float(inner_lr)
        K = self.inner_steps
        params = list(model.parameters())
        if learn_inner_lr is None:
            self.inner_lrs = None
        elif learn_inner_lr == "scalar":
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.tensor(self.inner_lr))])
        elif learn_inner_lr == "per_step":
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full((K,), self.inner_lr))])
        elif learn_inner_lr == "per_layer":
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full((K,) + (1,) * p.dim(), self.inner_lr)) for p in params]
            )
        else:
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), self.inner_lr)) for p in params])
        if self.inner_lrs is not None:
            ref = params[0] if params else None
            if ref is not None:
                self.inner_lrs.to(dtype=ref.dtype, device=ref.device)

    @property
    def is_mlp(self) -> bool:
        """True when the fused kernels can run this model."""
        return self.activation is not None

    def _rates(self):
        if self.inner_lrs is None:
            return self.inner_lr
        if self.learn_inner_lr in ("scalar", "per_step"):
            return self.inner_lrs[0]
        return list(self.inner_lrs)

    def _forward_fn(self):
        buffers = dict(self.model.named_buffers())
        names, model = self._names, self.model

        def forward(params, x):
            return torch.func.functional_call(model, {**buffers, **dict(zip(names, params))}, (x,))

        return forward

    def _problem(self, x_s, y_s, x_q, y_q, *, steps, need_query, query_loss_weights=None):
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters to adapt")
        common = dict(inner_steps=steps, inner_lr=self._rates(), first_order=self.first_order,
                      loss=self.loss, query_loss_weights=query_loss_weights, need_query=need_query)
        if self.is_mlp:
            return make_problem(params, x_s, y_s, x_q, y_q, activation=self.activation, **common)
        problem = make_problem(params, x_s, y_s, x_q, y_q, forward=self._forward_fn(), **common)
        if self._no_vmap[self.model.training]:
            problem.extras["no_vmap"] = True
        return problem

    def _remember_vmap(self, problem) -> None:
        if problem.extras.get("no_vmap"):
            self._no_vmap[self.model.training] = True

    def forward(self, x_support, y_support, x_query, y_query, query_loss_weights=None) -> MAMLOutput:
        problem = self._problem(x_support, y_support, x_query, y_query, steps=self.inner_steps,
                                need_query=True, query_loss_weights=query_loss_weights)
        chosen = dispatch.select(problem, self.backend, "maml")
        out = chosen.maml(problem)
        task_losses, query_preds = out[0], out[1]
        loss = out[2] if len(out) > 2 else task_losses.mean()
        self._remember_vmap(problem)
        return MAMLOutput(loss, task_losses, query_preds, chosen.name)

    def adapt(self, x_support, y_support, inner_steps: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The adapted parameters of every task, `{name: [T, *shape]}`. With learned per-step rates,
        `inner_steps` may not exceed the trained K."""
        steps = self.inner_steps if inner_steps is None else check_inner_steps(inner_steps)
        if steps != self.inner_steps and self.learn_inner_lr in ("per_step", "per_layer"):
            raise ValueError(
                f"inner_steps must be {self.inner_steps} with learn_inner_lr={self.learn_inner_lr!r} "
                f"(one learned rate per step), got {steps}"
            )
        problem = self._problem(x_support, y_support, None, None, steps=steps, need_query=False)
        adapted = dispatch.select(problem, self.backend, "adapt").adapt(problem)
        self._remember_vmap(problem)
        return dict(zip(self._names, adapted))

    def functional(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Evaluate per-task parameters (from `adapt`) on `x [T, N, ...]` -> `[T, N, D_out]`."""
        forward = self._forward_fn()
        names = self._names
        return torch.func.vmap(lambda p, xi: forward(p, xi))([adapted[n] for n in names], x)
