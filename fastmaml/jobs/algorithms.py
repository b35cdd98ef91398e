"""The MAML family as training rules for an MLP in fastmaml's functional layout (`[W1, b1, ..., WL, bL]`).

`ALGORITHMS` names five; `Learner(algorithm, params, ...)` holds one's meta-trained tensors (the MLP's
parameters and, for Meta-SGD and MAML++, the learned inner rates) and its optimizer, and `Learner.step`
computes one meta-batch's loss and gradients. The jobs' training driver (`fastmaml.jobs.driver`) runs the
loop around it (skipping non-finite steps, ranks, checkpoints, progress).

- maml: Finn et al. 2017. `inner_steps` SGD steps at a fixed rate, exact second-order meta-gradient, Adam.
- fomaml: the same with the inner gradients treated as constants (first order).
- reptile: Nichol et al. 2018. No query loss: `inner_steps` SGD steps on all of a task's points, then the
  parameters move toward the mean adapted parameters, `theta -= step * (theta - mean_t theta_K(t))`,
  with plain SGD whose step is annealed linearly to 0 (their sinusoid demonstration: inner SGD at 0.02,
  outer step 0.1 annealed to 0).
- metasgd: Li et al. 2017. One rate per scalar parameter, learned with the parameters, one inner step.
- mamlpp: Antoniou et al. 2019 (MAML++) without its batch-norm parts, which an MLP lacks: per-step
  per-layer learned rates (LSLR), the multi-step loss (MSL: the query losses after every step, weighted
  uniformly at first and annealed toward the last step over the first tenth of training), derivative-order
  annealing (first order for the first third of training, then second order) and a cosine-annealed
  meta-learning rate.

Learned rates are bounded: rate = `low + (high - low) * sigmoid(raw)` with `raw` the optimised tensor
(`fastmaml.training.bounded_rate`), the parametrisation `fastmaml.MAML(..., inner_lr_range=...)` offers
too. Unbounded, a rate that grows past what some task's SGD can take makes that task's inner loop diverge
and the whole meta-gradient nan; the sigmoid also slows a rate's steps near its bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import api
from ..training import bounded_rate, rate_logit, rates_for_steps


@dataclass(frozen=True)
class Algorithm:
    """One member of the family and the settings its paper uses (defaults of the jobs)."""

    name: str
    title: str
    inner_steps: int
    inner_lr: float
    meta_lr: float
    first_order: bool = False
    learn_inner_lr: Optional[str] = None  # None, "per_parameter" (Meta-SGD) or "per_layer" (MAML++'s LSLR)
    inner_lr_range: Optional[tuple[float, float]] = None  # bounds of learned rates
    reptile: bool = False  # the Reptile update instead of a query loss
    multi_step_loss: bool = False  # MAML++'s MSL
    first_order_fraction: float = 0.0  # MAML++'s derivative-order annealing: first order for this share
    cosine_meta_lr: bool = False  # MAML++: meta-rate annealed along a cosine to 1% of its start
    summary: str = ""

    @property
    def learns_rates(self) -> bool:
        return self.learn_inner_lr is not None


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("maml", "MAML", inner_steps=1, inner_lr=0.01, meta_lr=1e-3,
              summary="Finn et al. 2017: 1 inner SGD step of 0.01, exact second order, Adam 1e-3"),
    Algorithm("fomaml", "FOMAML", inner_steps=1, inner_lr=0.01, meta_lr=1e-3, first_order=True,
              summary="first-order MAML (Finn et al. 2017): MAML's settings, inner gradients as constants"),
    Algorithm("reptile", "Reptile", inner_steps=5, inner_lr=0.02, meta_lr=0.1, reptile=True,
              summary="Nichol et al. 2018: 5 SGD steps of 0.02 on all of a task's points, then an outer SGD "
                      "step of 0.1 (annealed linearly to 0) toward the mean adapted parameters"),
    Algorithm("metasgd", "Meta-SGD", inner_steps=1, inner_lr=0.01, meta_lr=1e-3, learn_inner_lr="per_parameter",
              inner_lr_range=(0.0, 0.1),
              summary="Li et al. 2017: one learned rate per parameter (from 0.01, kept in (0, 0.1)), 1 step, "
                      "Adam 1e-3 on weights and rates"),
    Algorithm("mamlpp", "MAML++", inner_steps=5, inner_lr=0.01, meta_lr=1e-3, learn_inner_lr="per_layer",
              inner_lr_range=(0.0, 0.05), multi_step_loss=True, first_order_fraction=1 / 3, cosine_meta_lr=True,
              summary="Antoniou et al. 2019: 5 steps with learned per-step per-layer rates (from 0.01, kept in "
                      "(0, 0.05)), multi-step loss, first order for the first third, cosine-annealed Adam 1e-3"),
)}


def get(name: str) -> Algorithm:
    """The algorithm called `name`; ValueError naming the choices otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def msl_weights(inner_steps: int, progress: float, anneal: float = 0.1) -> torch.Tensor:
    """MAML++'s multi-step loss weights `[K + 1]` (index 0, before adaptation, always 0) at `progress`
    (0..1) through training: uniform `1/K` over steps 1..K at the start, moving linearly until `anneal` of
    the way through to a floor of `0.03/K` on steps 1..K-1 and the rest on step K. They sum to 1."""
    K = inner_steps
    w = torch.zeros(K + 1, dtype=torch.float64)
    if K == 0:
        return w
    t = min(max(progress / anneal, 0.0), 1.0) if anneal > 0 else 1.0
    floor = 0.03 / K
    others = (1.0 / K) * (1 - t) + floor * t
    w[1:K] = others
    w[K] = 1.0 - others * (K - 1)
    return w


class Learner:
    """An algorithm's meta-trained state for an MLP, and one meta-step.

    `params` (`[W1, b1, ...]`, requiring grad) are trained in place. `inner_steps`, `inner_lr`, `meta_lr`,
    `first_order`, `inner_lr_range`: None takes the algorithm's. `iterations` sizes the schedules
    (Reptile's annealed step, MAML++'s annealing). `extra`: tensors trained with the params by the same
    optimizer that reach the loss another way (a backbone computing the MLP's inputs: ANIL). `tensors`
    lists everything the optimizer trains (params, extra, then raw rates), in the order checkpoints store
    them. With `loss="cross_entropy"` the metrics include the query accuracy.
    """

    def __init__(self, algorithm: Algorithm | str, params: Sequence[torch.Tensor], *, iterations: int,
                 inner_steps: Optional[int] = None, inner_lr: Optional[float] = None,
                 meta_lr: Optional[float] = None, first_order: Optional[bool] = None,
                 inner_lr_range: Optional[tuple[float, float]] = None, extra: Sequence[torch.Tensor] = (),
                 activation: str = "relu", loss: str = "mse", backend: str = "auto"):
        self.algorithm = get(algorithm) if isinstance(algorithm, str) else algorithm
        a = self.algorithm
        self.params = list(params)
        self.iterations = max(int(iterations), 1)
        self.inner_steps = a.inner_steps if inner_steps is None else int(inner_steps)
        self.inner_lr = a.inner_lr if inner_lr is None else float(inner_lr)
        self.meta_lr = a.meta_lr if meta_lr is None else float(meta_lr)
        if a.reptile and first_order:  # it was stored (results.json said first_order: true) and ignored
            raise ValueError("Reptile takes no meta-gradient, of first order or second: first_order does not apply")
        if self.inner_steps < 1 and (a.reptile or a.learns_rates):
            # MAML with K = 0 is pretraining on the query loss; these would train nothing (Reptile's direction
            # theta - theta, MAML++'s zero-weighted loss) or learn rates no step uses, and say nothing.
            raise ValueError(f"{a.title} needs inner_steps >= 1 (it adapts on the support set to train), "
                             f"got {self.inner_steps}")
        self.first_order = a.first_order if first_order is None else bool(first_order)
        self.activation, self.loss_name, self.backend = activation, loss, backend
        self.metric_names = ("meta_loss", "accuracy") if loss == "cross_entropy" else ("meta_loss",)
        self.inner_lr_range = a.inner_lr_range if inner_lr_range is None else tuple(inner_lr_range)
        self.extra = list(extra)
        self.raw_rates: list[torch.Tensor] = []
        if a.learns_rates:
            low, high = self.inner_lr_range
            if not low < self.inner_lr < high:
                raise ValueError(f"{a.title} keeps its learned rates in ({low}, {high}): an initial inner rate "
                                 f"of {self.inner_lr} is outside")
            start = rate_logit(self.inner_lr, low, high)
            K = self.inner_steps
            for p in self.params:
                shape = p.shape if a.learn_inner_lr == "per_parameter" else (K,) + (1,) * p.dim()
                self.raw_rates.append(torch.full(shape, start, dtype=p.dtype, device=p.device, requires_grad=True))
        self.tensors = self.params + self.extra + self.raw_rates
        groups = [{"params": self.params + self.extra, "lr": self.meta_lr}]
        if self.raw_rates:
            groups.append({"params": self.raw_rates, "lr": self.meta_lr})
        if a.reptile:
            self.optimizer = torch.optim.SGD(groups, lr=self.meta_lr)
        else:
            self.optimizer = _adam(groups, self.meta_lr)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------------------------------ rates

    def rates(self) -> Optional[list[torch.Tensor]]:
        """The learned rates as the inner loop uses them (inside the algorithm's range), one tensor per
        parameter (`[*shape]` for Meta-SGD, `[K, 1, ...]` for MAML++); None for a fixed rate."""
        if not self.raw_rates:
            return None
        return [bounded_rate(r, *self.inner_lr_range) for r in self.raw_rates]

    def inner_lr_for(self, steps: int):
        """The `inner_lr` argument of `fastmaml.maml` / `fastmaml.adapt` for `steps` inner steps (training
        or evaluation): the fixed rate, or the learned ones (per-step rates past the trained K reuse the
        last step's)."""
        rates = self.rates()
        if rates is None:
            return self.inner_lr
        if self.algorithm.learn_inner_lr == "per_layer":
            return [rates_for_steps(r, steps) for r in rates]
        return rates

    def eval_rates(self) -> dict:
        """What evaluation needs to adapt like the trained model: `{"inner_lr": float}` or
        `{"rates": [detached tensors], "per_step": bool}`."""
        rates = self.rates()
        if rates is None:
            return {"inner_lr": self.inner_lr}
        return {"rates": [r.detach() for r in rates], "per_step": self.algorithm.learn_inner_lr == "per_layer"}

    # ------------------------------------------------------------------------------------- schedules

    def set_iteration(self, iteration: int) -> None:
        """Set the iteration's meta-learning rates (Reptile's linear, MAML++'s cosine annealing)."""
        a, progress = self.algorithm, iteration / self.iterations
        if a.reptile:
            scale = 1.0 - progress
        elif a.cosine_meta_lr:
            scale = 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            return
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * scale

    def maml_options(self, iteration: int) -> dict:
        """The options of this iteration's `fastmaml.maml` call (Reptile: of its `fastmaml.adapt` call, which
        takes the first three)."""
        a = self.algorithm
        weights = None
        if a.multi_step_loss:
            weights = msl_weights(self.inner_steps, iteration / self.iterations).to(self.params[0])
        return dict(inner_steps=self.inner_steps, inner_lr=self.inner_lr_for(self.inner_steps),
                    activation=self.activation, loss=self.loss_name,
                    first_order=self.first_order or iteration < a.first_order_fraction * self.iterations,
                    query_loss_weights=weights)

    # ------------------------------------------------------------------------------------------ step

    def step(self, batch: tuple[torch.Tensor, ...], iteration: int) -> tuple[dict[str, torch.Tensor], str]:
        """One meta-batch `(x_support, y_support, x_query, y_query)`: set every tensor's `.grad` (the
        optimizer is the caller's to step) and return `({"meta_loss": detached loss}, backend)`.

        Reptile's `.grad` is its meta-direction `theta - mean_t theta_K(t)` (adapted on support and query
        points together) and its loss the adapted parameters' mean loss on those points."""
        self.optimizer.zero_grad(set_to_none=True)
        xs, ys, xq, yq = batch
        if self.algorithm.reptile:
            x, y = torch.cat([xs, xq], dim=1), torch.cat([ys, yq], dim=1)
            with torch.no_grad():
                adapted, backend = api.adapt_on(
                    [p.detach() for p in self.params], x, y, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                    activation=self.activation, loss=self.loss_name, backend=self.backend)
                for p, a in zip(self.params, adapted):
                    p.grad = p.detach() - a.mean(0)
                pred = api.mlp(adapted, x, self.activation)
                values = {"meta_loss": _loss(pred, y, self.loss_name)}
                if self.loss_name == "cross_entropy":
                    values["accuracy"] = (pred.argmax(-1) == y).to(pred.dtype).mean()
            return values, backend
        out = api.maml(self.params, xs, ys, xq, yq, backend=self.backend, **self.maml_options(iteration))
        out.loss.backward()
        values = {"meta_loss": out.loss.detach()}
        if self.loss_name == "cross_entropy":
            values["accuracy"] = (out.query_preds.detach().argmax(-1) == yq).to(out.loss.dtype).mean()
        return values, out.backend


# ---- evaluation: adapting as a trained learner does ----------------------------------------------------


def inner_lr_for(rates: Optional[dict], steps: int, default: float):
    """The `inner_lr` argument that adapts like a trained model for `steps` steps: `rates` as
    `Learner.eval_rates()` returns them (None or `{"inner_lr": x}`: a fixed rate, else the learned ones;
    learned per-step rates past the trained K reuse the last step's)."""
    if not rates or "rates" not in rates:
        return (rates or {}).get("inner_lr", default)
    if rates["per_step"]:
        return [rates_for_steps(r, steps) for r in rates["rates"]]
    return list(rates["rates"])


def adapted_params(
    params: Sequence[torch.Tensor], x_support: torch.Tensor, y_support: torch.Tensor,
    steps: int, inner_lr, backend: str = "auto", loss: str = "mse",
) -> list[torch.Tensor]:
    """Per-task params after `steps` inner SGD steps, each `[T, *shape]` (steps = 0: the meta-learned
    params repeated for every task). `inner_lr`: as `fastmaml.adapt` takes it."""
    if steps == 0:
        T = x_support.shape[0]
        return [p.unsqueeze(0).expand(T, *p.shape) for p in params]
    return api.adapt(params, x_support, y_support, inner_steps=steps, inner_lr=inner_lr, loss=loss, backend=backend)


def _loss(pred: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "mse":
        return ((pred - y) ** 2).mean()
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def _adam(groups, lr: float) -> torch.optim.Optimizer:
    # The fused Adam updates the small tensors in one pass instead of a loop of small ops, which matters
    # when the MAML step itself takes about a millisecond.
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, lr=lr)
