"""`fastmaml.MAML`: the drop-in nn.Module around any model.

A plain `nn.Sequential` of `nn.Linear` layers (with bias) separated by one supported activation module
(`nn.ReLU` or `nn.Tanh`), with no hooks, runs on the fused kernels; any other module (a subclass with its
own `forward`, hooks, other layers) runs on the reference path (`torch.func.functional_call` + `vmap`
over tasks, a task loop where vmap cannot), and `MAML.explain` says why.

Frozen parameters (`requires_grad=False`) are neither adapted in the inner loop nor meta-trained, on
every backend: they get an inner rate of 0.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from . import api, dispatch
from ._validate import check_choice, check_inner_steps, check_values, make_problem, values_checked_here
from .api import MAMLOutput
from .training import bounded_rate, rate_logit, rates_for_steps

LEARN_INNER_LR = (None, "scalar", "per_step", "per_layer", "per_parameter")
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh"}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def _hooks_of(module: nn.Module) -> Optional[str]:
    """Which kind of hook, or instance-level `forward`, changes what `module` computes; None if none."""
    for attr in _HOOK_DICTS:
        if getattr(module, attr, None):
            return attr.strip("_").replace("_", " ")
    if "forward" in vars(module) or "_call_impl" in vars(module):
        return "a forward method set on the instance"
    return None


def vmap_gradient_reason(model: nn.Module) -> tuple[Optional[str], bool]:
    """Why torch.func.vmap's derivatives through `model` cannot be trusted (None: they can), and whether
    that holds for the inner gradients themselves (True: every call with inner steps) or only for second
    derivatives (False: second-order calls).

    Measured on torch 2.13 (CPU, float64), vmap over tasks of the inner loop's `torch.func.grad` against
    autograd task by task, one or two inner steps; `torch.func.grad` in a loop agrees exactly, and finite
    differences agree with the loop:
    - an Embedding with a `padding_idx`: vmap's gradient reaches the padding row (autograd's is 0 there),
      so the adapted weights, the losses and first-order meta-gradients differ (5.5e-2 relative);
    - a LayerNorm with a learned scale (8.9e-3 to 1.3e-2), an InstanceNorm with affine parameters (9e-2 to
      0.2) and a batch norm with affine parameters on batch statistics (1.4e-2 to 0.19): the second-order
      meta-gradient differs; the losses and first order agree. TransformerEncoderLayer holds LayerNorms.
    The same norms without learned parameters, GroupNorm, RMSNorm, LocalResponseNorm, convolutions,
    pooling, attention and the usual activations agree to 1e-15. A norm or an embedding called through
    torch.nn.functional in a custom forward is not seen here: the reference path sees those calls when the
    forward first runs under vmap (`backends.reference._untrusted_call`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return f"{name or 'the model'} is an Embedding with a padding_idx", True
    for name, module in model.named_modules():
        what = None
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            what = "a LayerNorm with a learned scale"
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.weight is not None:
            what = "an InstanceNorm with affine parameters"
        elif (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
              and (module.training or module.running_mean is None)):
            what = "a batch norm with affine parameters on batch statistics"
        if what is not None:
            return f"{name or 'the model'} is {what}", False
    return None, False


def mlp_structure_reason(model: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """`(activation, None)` when the fused kernels compute exactly `model`'s function, else `(None, why)`.

    Exactly: a plain `nn.Sequential` (not a subclass, which may override `forward`) of `nn.Linear` layers
    with biases, each layer its own module with its own parameters, separated by one activation module
    (`nn.ReLU`, in place or not, or `nn.Tanh`), with no hooks of any kind on it, its children or every module
    (global hooks), and no `forward` replaced on an instance. Anything else would make the kernels compute
    a function the module does not.
    """
    if type(model) is not nn.Sequential:
        if isinstance(model, nn.Sequential):
            return None, (f"{type(model).__name__} subclasses nn.Sequential (its forward may differ from the "
                          "MLP the fused kernels compute)")
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential of nn.Linear layers"
    import torch.nn.modules.module as module_globals

    for attr in _GLOBAL_HOOK_DICTS:
        if getattr(module_globals, attr, None):
            return None, f"a global module hook is registered ({attr.strip('_').replace('_', ' ')})"
    activation = None
    for i, layer in enumerate([model, *model]):
        hook = _hooks_of(layer)
        if hook is not None:
            where = "the model" if i == 0 else f"layer {i - 1} ({type(layer).__name__})"
            return None, f"{where} has {hook}: the fused kernels would not run it"
    for i, layer in enumerate(model):
        if i % 2 == 0:
            if type(layer) is not nn.Linear:
                return None, f"layer {i} is a {type(layer).__name__}, not an nn.Linear"
            if layer.bias is None:
                return None, f"layer {i} is an nn.Linear without bias (the fused kernels run biased layers)"
            own = list(layer._parameters.items())
            if [name for name, _ in own] != ["weight", "bias"] or not all(
                    isinstance(t, nn.Parameter) and t is getattr(layer, name) for name, t in own):
                return None, (f"layer {i}'s parameters are not its own weight and bias (replaced or re-registered "
                              "tensors: the kernels would read other ones)")
        else:
            name = _ACTIVATION_MODULES.get(type(layer))
            if name is None:
                return None, (f"layer {i} is a {type(layer).__name__} (the fused kernels run nn.ReLU or "
                              "nn.Tanh between the linear layers)")
            if activation is not None and name != activation:
                return None, "the activations differ between layers (the fused kernels run one)"
            if layer._parameters:
                return None, f"layer {i} ({type(layer).__name__}) has parameters of its own"
            activation = name
    if len(model) % 2 == 0:
        return None, "the nn.Sequential ends in an activation or is empty (the fused kernels run Linear, ..., Linear)"
    linears = [layer for i, layer in enumerate(model) if i % 2 == 0]
    if any(layer._modules for layer in model):
        count = len(list(model.parameters()))  # submodules below the layers: count as torch does
    else:  # what model.parameters() yields here, without its walk of the module tree (a third of the check)
        count = len({id(t) for m in (model, *model) for t in m._parameters.values() if t is not None})
    if len({id(layer) for layer in linears}) != len(linears) or count != 2 * len(linears):
        return None, "a linear layer or parameter appears twice (shared weights; the kernels adapt each layer apart)"
    return activation or "relu", None


def _check_range(inner_lr_range, inner_lr: float, learn_inner_lr) -> Optional[tuple[float, float]]:
    """`inner_lr_range` as `(low, high)` floats with `0 <= low < inner_lr < high`, finite, or None."""
    if inner_lr_range is None:
        return None
    if learn_inner_lr is None:
        raise ValueError("inner_lr_range bounds learned rates: give learn_inner_lr too (or leave the range out)")
    try:
        low, high = (float(v) for v in inner_lr_range)
    except (TypeError, ValueError):
        raise TypeError(f"inner_lr_range must be a pair of numbers (low, high), got {inner_lr_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < inner_lr < high):
        raise ValueError(
            f"inner_lr_range must be finite with 0 <= low < inner_lr < high, got ({low}, {high}) "
            f"for inner_lr={inner_lr}"
        )
    return low, high


def mlp_structure(model: nn.Module) -> Optional[str]:
    """The activation name if the fused kernels compute exactly `model` (`mlp_structure_reason`), else None."""
    return mlp_structure_reason(model)[0]


def _accept_state_without_rate_form(module, state_dict, prefix, *args) -> None:
    """A state_dict saved before the rates' form was saved with it loads as before (nothing to check)."""
    state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())


def _named(err: Exception, names: Sequence[str]) -> Exception:
    """`err` of the checks, which name `fastmaml.maml`'s argument (`params[2]`, "the dtype of params") that a
    module's user never passed, with the model's parameter names instead (`err` itself when it names none)."""
    text = re.sub(r"params\[(\d+)\]", lambda m: f"parameter {names[int(m.group(1))]!r}"
                  if int(m.group(1)) < len(names) else m.group(0), str(err))
    text = text.replace("of params)", "of the model's parameters)")
    if text == str(err):
        return err
    try:
        return type(err)(text).with_traceback(err.__traceback__)
    except Exception:  # an error type that takes other arguments: as it was
        return err


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
        inner_lr_range: `(low, high)` with `0 <= low < inner_lr < high`, for learned rates: each rate is
            then `low + (high - low) * sigmoid(raw)` with `raw` the registered parameter, so no
            optimizer step can take a rate out of the range (`inner_lr_values()` gives the rates as
            used). A bound built into the parametrisation, not a clamp after the step: the optimizer's
            state stays consistent with what it optimises, the gradient shrinks as a rate nears a bound,
            and positive rates stay positive (a rate that grows without bound is how a learned-rate run
            diverges). None (default): the parameters are the rates, unbounded.
        loss: "mse" or "cross_entropy".
        backend: "auto" or a backend name.

    A parameter of `model` with `requires_grad=False` is frozen: neither adapted (its inner rate is 0, so
    every task keeps theta_0's value) nor meta-trained (it gets no gradient), on every backend. A learned
    rate of a frozen parameter stays registered but receives no gradient.

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
        inner_lr_range: Optional[tuple[float, float]] = None,
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
        self._names = [n for n, _ in model.named_parameters()]
        # Whether vmap failed on this model, per training mode (batch-norm statistics block vmap in
        # training mode only): the reference path then goes straight to its task loop.
        self._no_vmap = {True: False, False: False}
        # Whether the reference path has said, per mode, that it loops calls vmap gets wrong (once, as above).
        self._said_untrusted = {True: False, False: False}
        # What the reference path saw the forward call in its first batched run, per mode (None: not run
        # yet): `(why vmap's derivatives through those calls are wrong, every_order)` or `(None, False)`.
        self._vmap_calls = {True: None, False: None}
        self.inner_lr = float(inner_lr)
        self.inner_lr_range = _check_range(inner_lr_range, self.inner_lr, learn_inner_lr)
        K = self.inner_steps
        params = list(model.parameters())
        # Rates are made in the parameters' dtype and device: made in float32 and cast, a float64 model's
        # rate of 0.01 would start as 0.009999999776. With a range, the parameters hold the raw values
        # whose image is inner_lr (`_bounded`).
        like = dict(dtype=params[0].dtype, device=params[0].device) if params else {}
        start = self.inner_lr
        if self.inner_lr_range is not None:
            low, high = self.inner_lr_range
            start = rate_logit(self.inner_lr, low, high)
        if learn_inner_lr is None:
            self.inner_lrs = None
        elif learn_inner_lr == "scalar":
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.tensor(start, **like))])
        elif learn_inner_lr == "per_step":
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full((K,), start, **like))])
        elif learn_inner_lr == "per_layer":
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full((K,) + (1,) * p.dim(), start, **like)) for p in params]
            )
        else:
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), start)) for p in params])
        self.register_load_state_dict_pre_hook(_accept_state_without_rate_form)

    # What gives the registered rates their meaning goes with `state_dict()`: loaded into a MAML with
    # another `inner_lr_range` (or none), the same raw values were other rates (a rate of 0.04 became
    # -0.35 without the range) and "All keys matched".
    def get_extra_state(self) -> dict:
        """The form of the learned rates (`learn_inner_lr`, `inner_lr_range`), saved with `state_dict()`."""
        return {"learn_inner_lr": self.learn_inner_lr, "inner_lr_range": self.inner_lr_range}

    def set_extra_state(self, state: dict) -> None:
        """Refuses a state_dict whose learned rates have another form than this module's."""
        saved_range = state.get("inner_lr_range")
        theirs = {"learn_inner_lr": state.get("learn_inner_lr"),
                  "inner_lr_range": None if saved_range is None else tuple(float(v) for v in saved_range)}
        mine = self.get_extra_state()
        if theirs != mine:
            raise ValueError(
                f"this state_dict's learned rates are learn_inner_lr={theirs['learn_inner_lr']!r}, "
                f"inner_lr_range={theirs['inner_lr_range']!r}; this fastmaml.MAML has "
                f"learn_inner_lr={mine['learn_inner_lr']!r}, inner_lr_range={mine['inner_lr_range']!r}: its "
                "stored rate parameters would mean other rates. Make the MAML with the same options.")

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        """A learned rate as used: the parameter itself, or with `inner_lr_range = (low, high)`,
        `low + (high - low) * sigmoid(raw)`, inside the range whatever the optimizer does."""
        if self.inner_lr_range is None:
            return raw
        return bounded_rate(raw, *self.inner_lr_range)

    def inner_lr_values(self) -> Optional[list[torch.Tensor]]:
        """The learned rates as the inner loop uses them (in `inner_lr_range` when one is set), one tensor
        per entry of `inner_lrs`; None when the rate is not learned."""
        if self.inner_lrs is None:
            return None
        return [self._bounded(r) for r in self.inner_lrs]

    @property
    def activation(self) -> Optional[str]:
        """The MLP's activation when the fused kernels compute exactly this model, else None. Asked on
        every call: a hook added after construction sends the model to the reference path."""
        return mlp_structure_reason(self.model)[0]

    @property
    def is_mlp(self) -> bool:
        """True when the fused kernels can run this model (`explain` says why not)."""
        return self.activation is not None

    def _rates(self, params: list[torch.Tensor], steps: int):
        """The `inner_lr` argument of a call of `steps` inner steps. A frozen parameter
        (`requires_grad=False`) gets the rate 0 on every step: it is not adapted (theta_k = theta_0
        exactly), and as it requires no grad it is not meta-trained; the same on every backend, since the
        rate is an input of them all. Learned per-step rates (`per_step`, `per_layer`) for more steps than
        were trained reuse the last step's rate; for fewer, the first `steps`."""
        frozen = [not p.requires_grad for p in params]
        if self.inner_lrs is None:
            if not any(frozen):
                return self.inner_lr
            return [p.new_full((), 0.0 if f else self.inner_lr) for p, f in zip(params, frozen)]
        rates = [self._bounded(r) for r in self.inner_lrs]
        if self.learn_inner_lr in ("per_step", "per_layer"):
            rates = [rates_for_steps(r, steps) for r in rates]
        if self.learn_inner_lr in ("scalar", "per_step"):
            if not any(frozen):
                return rates[0]
            shared = rates[0].reshape(-1)
            return [shared.new_zeros(()) if f else shared.view(-1, *([1] * p.dim())) for p, f in zip(params, frozen)]
        return [r.new_zeros(()) if f else r for r, f in zip(rates, frozen)]

    def _forward_fn(self):
        buffers = dict(self.model.named_buffers())
        names, model = self._names, self.model
        # torch.func.functional_call does not put back the parameters of a submodule that appears twice
        # in the model (a shared layer): it would leave the per-task tensors in the user's model. Every
        # parameter and buffer slot is put back by hand after the call.
        slots = [(table, key) for module in model.modules() for table in (module._parameters, module._buffers)
                 for key in table]

        def forward(params, x):
            saved = [(table, key, table[key]) for table, key in slots]
            try:
                return torch.func.functional_call(model, {**buffers, **dict(zip(names, params))}, (x,))
            finally:
                for table, key, value in saved:
                    if table.get(key) is not value:
                        table[key] = value

        return forward

    def _refresh_names(self, names: Optional[list[str]] = None) -> None:
        """The model's parameter names as they are now (a layer appended after construction counts)."""
        if names is None:
            names = [n for n, _ in self.model.named_parameters()]
        if names != self._names:
            if self.learn_inner_lr in ("per_layer", "per_parameter"):
                raise ValueError("the model's parameters changed since fastmaml.MAML was made, so its learned "
                                 "per-parameter rates no longer match them: make a new fastmaml.MAML")
            self._names = names
            self._vmap_calls = {True: None, False: None}  # a changed model is looked at again

    def _named_params(self) -> list[torch.Tensor]:
        """The model's parameters, with their names refreshed from the same walk of the module tree."""
        named = list(self.model.named_parameters())
        self._refresh_names([n for n, _ in named])
        return [p for _, p in named]

    def _problem(self, x_s, y_s, x_q, y_q, *, steps, need_query, query_loss_weights=None, params=None,
                 structure=None):
        """`params` (`_named_params()`) and `structure` (`mlp_structure_reason(self.model)`): what the
        caller has already computed this call, else computed here."""
        if params is None:
            params = self._named_params()
        if not params:
            raise ValueError("model has no parameters to adapt")
        common = dict(inner_steps=steps, inner_lr=self._rates(params, steps), first_order=self.first_order,
                      loss=self.loss, query_loss_weights=query_loss_weights, need_query=need_query)
        activation, why = mlp_structure_reason(self.model) if structure is None else structure
        try:
            if activation is not None:
                return make_problem(params, x_s, y_s, x_q, y_q, activation=activation, **common)
            problem = make_problem(params, x_s, y_s, x_q, y_q, forward=self._forward_fn(), **common)
        except (TypeError, ValueError) as err:
            renamed = _named(err, self._names)
            if renamed is err:
                raise
            raise renamed from None
        problem.extras["not_fused"] = why
        problem.extras["vmap_untrusted"] = vmap_gradient_reason(self.model)
        problem.extras["said_untrusted"] = self._said_untrusted[self.model.training]
        if self._vmap_calls[self.model.training] is not None:
            problem.extras["vmap_calls"] = self._vmap_calls[self.model.training]
        if self._no_vmap[self.model.training]:
            problem.extras["no_vmap"] = True
        return problem

    def _remember_vmap(self, problem) -> None:
        if problem.extras.get("no_vmap"):
            self._no_vmap[self.model.training] = True
        if problem.extras.get("said_untrusted"):
            self._said_untrusted[self.model.training] = True
        if "vmap_calls" in problem.extras:
            self._vmap_calls[self.model.training] = problem.extras["vmap_calls"]

    def forward(self, x_support, y_support, x_query, y_query, query_loss_weights=None) -> MAMLOutput:
        params = self._named_params()
        structure = mlp_structure_reason(self.model) if params else None
        activation = structure[0] if structure is not None else None
        if activation is not None:
            # An MLP: the functional call, which validates and dispatches once per call signature.
            try:
                return api.maml(params, x_support, y_support, x_query, y_query, inner_steps=self.inner_steps,
                                inner_lr=self._rates(params, self.inner_steps), first_order=self.first_order,
                                activation=activation, loss=self.loss, query_loss_weights=query_loss_weights,
                                backend=self.backend)
            except (TypeError, ValueError) as err:
                renamed = _named(err, self._names)
                if renamed is err:
                    raise
                raise renamed from None
        problem = self._problem(x_support, y_support, x_query, y_query, steps=self.inner_steps,
                                need_query=True, query_loss_weights=query_loss_weights, params=params,
                                structure=structure)
        chosen = dispatch.select(problem, self.backend, "maml")
        if values_checked_here(problem, chosen.name):
            check_values(problem)
        out = chosen.maml(problem)
        task_losses, query_preds = out[0], out[1]
        loss = out[2] if len(out) > 2 else task_losses.mean()
        self._remember_vmap(problem)
        return MAMLOutput(loss, task_losses, query_preds, chosen.name)

    def explain(self, x_support, y_support, x_query=None, y_query=None, query_loss_weights=None,
                inner_steps: Optional[int] = None) -> str:
        """Which backend `forward` (or `adapt`, without query data: with `inner_steps` as `adapt` takes it)
        would run on these tasks, and why each other backend was rejected (for a model the fused kernels
        cannot run exactly: what in it). For a module made with `backend=` a name, the report says
        whether that backend runs the call."""
        need_query = x_query is not None
        if need_query and inner_steps is not None:
            raise ValueError("explain with query data describes forward, which takes the module's inner_steps; "
                             "give inner_steps without x_query/y_query to describe adapt")
        steps = self.inner_steps if inner_steps is None else check_inner_steps(inner_steps)
        problem = self._problem(x_support, y_support, x_query, y_query, steps=steps,
                                need_query=need_query, query_loss_weights=query_loss_weights)
        return dispatch.explain_problem(problem, "maml" if need_query else "adapt", requested=self.backend)

    def adapt(self, x_support, y_support, inner_steps: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The adapted parameters of every task, `{name: [T, *shape]}`, after `inner_steps` steps (default:
        the trained K). Learned per-step rates for more steps than were trained reuse the last step's
        rate (evaluation with more test steps)."""
        steps = self.inner_steps if inner_steps is None else check_inner_steps(inner_steps)
        problem = self._problem(x_support, y_support, None, None, steps=steps, need_query=False)
        chosen = dispatch.select(problem, self.backend, "adapt")
        if values_checked_here(problem, chosen.name):
            check_values(problem)
        adapted = chosen.adapt(problem)
        self._remember_vmap(problem)
        return dict(zip(self._names, adapted))

    def functional(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Evaluate per-task parameters (from `adapt`) on `x [T, N, ...]` -> `[T, N, D_out]`."""
        self._refresh_names()
        forward = self._forward_fn()
        names = self._names
        return torch.func.vmap(lambda p, xi: forward(p, xi), randomness="different")([adapted[n] for n in names], x)
