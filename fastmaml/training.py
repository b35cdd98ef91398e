"""Training that survives a diverging task: an optimizer step taken only when it is finite.

One task whose inner loop diverges (a rate too large for it, an outlier) makes the meta-loss or the
meta-gradient inf or nan; one optimizer step with it writes nan into every parameter and into the
optimizer's moments, and the run is lost. `FiniteStep` checks the meta-loss and every gradient first,
skips such a step (parameters and optimizer state untouched, gradients cleared), and counts it.

Learned inner rates are the other way a run dies: an unbounded rate that grows past what a task's SGD can
take diverges. `bounded_rate` keeps a learned rate inside `(low, high)` by its parametrisation;
`rates_for_steps` extends per-step rates to more test steps than were trained.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FiniteStep", "bounded_rate", "rate_logit", "rates_for_steps"]


def bounded_rate(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The rate `low + (high - low) * sigmoid(raw)`: inside `(low, high)` whatever value `raw` takes.

    A bound built into the parametrisation, not a clamp after the step: the optimizer's state stays
    consistent with what it optimises, the gradient shrinks as a rate nears a bound, and a positive rate
    stays positive."""
    return low + (high - low) * torch.sigmoid(raw)


def rate_logit(rate: float, low: float, high: float) -> float:
    """The raw value whose `bounded_rate` is `rate` (`low < rate < high`)."""
    if not low < rate < high:
        raise ValueError(f"rate {rate} must lie strictly inside ({low}, {high})")
    return math.log((rate - low) / (high - rate))


def rates_for_steps(rate: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step rates `[K, ...]` for `steps` steps: the first `steps`, or all K then the last one repeated
    (a test-time loop longer than the trained one reuses the last trained step's rate)."""
    K = rate.shape[0]
    if steps <= K:
        return rate[:steps]
    if K == 0:
        raise ValueError(f"inner_steps={steps}: the rates were learned for 0 steps, so there is no last step's rate")
    return torch.cat([rate, rate[-1:].expand(steps - K, *rate.shape[1:])])


def _square(t: torch.Tensor) -> torch.Tensor:
    """`t * t` in float32, or in `t`'s dtype if wider: inf where a second moment would overflow."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    return t * t


class FiniteStep:
    """Steps `optimizer` only when the meta-loss and every gradient are finite, and no gradient's square
    overflows (past about 1.8e19 in float32): near there an optimizer's second moment turns inf (Adagrad's
    from 1.8e19, Adam's from about 5.8e20 at beta2 = 0.999), and the parameter's later steps
    `m / (sqrt(v) + eps)` are 0: it would never move again.

    Usage, in place of `optimizer.step()`:

        guard = fastmaml.FiniteStep(optimizer)
        for batch in tasks:
            optimizer.zero_grad()
            out = maml(*batch)
            out.loss.backward()
            guard.step(out.loss)          # False (and counted in guard.skipped) when not finite

    A skipped step leaves the parameters and the optimizer's state (moments, step counts) as they were
    and clears the gradients (`set_to_none`), so the next step starts clean. The check costs one
    reduction per gradient (its largest magnitude) and one host-device synchronisation per step (the
    decision is made on the host).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.steps = 0    # steps taken
        self.skipped = 0  # steps skipped: a non-finite loss or gradient, or a gradient too large to square

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def is_finite(self, loss: torch.Tensor | float | None = None) -> bool:
        """Whether `loss` (if given) is finite and every gradient of the optimizer's parameters is finite
        with a finite square (in float32, or the gradient's dtype if wider)."""
        checks = []
        if loss is not None:
            checks.append(torch.isfinite(torch.as_tensor(loss).detach()).all().reshape(1))
        dense, sparse = [], []
        for g in self._grads():
            (sparse if g.layout != torch.strided else dense).append(g.detach())
        if dense:
            # The largest magnitude (inf-norm): it cannot overflow where an L2 norm of finite values would
            # (float16 gradients past 65504); its square is finite exactly when every value's is.
            norms = torch._foreach_norm(dense, ord=float("inf"))
            checks.extend(torch.isfinite(_square(n)).reshape(1) for n in norms)
        for g in sparse:
            values = g.coalesce().values() if g.layout == torch.sparse_coo else g.values()
            checks.append(torch.isfinite(_square(values)).all().reshape(1))
        if not checks:
            return True
        devices = {c.device for c in checks}
        if len(devices) > 1:
            checks = [c.cpu() for c in checks]
        return bool(torch.cat(checks).all())

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Take the optimizer step if `loss` and the gradients are finite; otherwise clear the gradients
        and count the step as skipped. Returns whether the step was taken."""
        if self.is_finite(loss):
            self.optimizer.step()
            self.steps += 1
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        return False

    def state_dict(self) -> dict:
        return {"steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
