"""The factored backend's chunks of tasks (`Chunked`): a call too large to keep every chunk's intermediates
(`factored._chunk_tasks`) runs a chunk at a time, each forward and backward at once."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .._validate import Problem
from . import factored as _f
from ._fused import autocast_off


def _problem_tensors(problem: Problem) -> list[Optional[torch.Tensor]]:
    """The call's tensors autograd may flow to: params, the rate tensors, the four data tensors and the
    multi-step weights (None where absent), in the order `_with_tensors` takes them."""
    if problem.inner_lr_form == "list":
        rates = list(problem.inner_lr)
    else:
        rates = [problem.inner_lr_tensor]  # None for a number
    return [*problem.params, *rates, problem.x_support, problem.y_support, problem.x_query, problem.y_query,
            problem.query_loss_weights]


def _with_tensors(problem: Problem, tensors: list[Optional[torch.Tensor]]) -> Problem:
    """`problem` with `_problem_tensors` replaced by `tensors` (the same order)."""
    n = len(problem.params)
    params, rest = list(tensors[:n]), tensors[n:]
    if problem.inner_lr_form == "list":
        rates, rest = list(rest[:n]), rest[n:]
        changes = dict(rates=rates)
    else:  # the per-parameter views are made again from the rate on first use (`Problem.inner_lr`)
        changes = dict(inner_lr_tensor=rest[0], rates=None)
        rest = rest[1:]
    xs, ys, xq, yq, qw = rest
    return dataclasses.replace(problem, params=params, x_support=xs, y_support=ys, x_query=xq, y_query=yq,
                               query_loss_weights=qw, **changes)


class Chunked(torch.autograd.Function):
    """A call too large to keep every chunk's intermediates: `(task_losses, query_preds, loss)`.

    The forward runs each chunk of tasks with autograd and takes at once the gradient of the chunk's
    summed losses, then frees the chunk: `loss` (the mean) has its gradient when the forward is done.
    So a training step (`loss.backward()`) runs every chunk forward and backward once, where activation
    checkpointing ran each forward twice (once to find the outputs, once to rebuild the graph in the
    backward): a quarter less work, and none of the graph-building of the first pass kept. A gradient
    through `task_losses` or `query_preds` (any cotangent), or one to be differentiated again
    (create_graph), recomputes each chunk in the backward, as checkpointing does (with create_graph the
    recomputed chunks' graphs stay, for the second backward: no memory is saved then). The price: a call
    whose outputs are never differentiated (a meta-loss only logged, with autograd on) still pays the
    backward; under torch.no_grad no chunk is needed (`_chunk_tasks`).
    """

    @staticmethod
    def run(problem: Problem, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tensors = _problem_tensors(problem)
        present = [i for i, t in enumerate(tensors) if t is not None]
        return Chunked.apply(problem, chunk, present, *[tensors[i] for i in present])

    @staticmethod
    def _chunk(problem: Problem, start: int, stop: int, autograd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's outputs; with `autograd`, by autograd through the inner loop (a gradient to be
        differentiated again: the written-out sweep would recompute the chunk once more for it)."""
        data = [t[start:stop] for t in (problem.x_support, problem.y_support, problem.x_query, problem.y_query)]
        # The rates per chunk, not once per call: each chunk's autograd.grad frees its graph, and rates
        # derived once would be shared by every chunk's graph (the second chunk's gradient would fail).
        run = _f._autograd_chunk if autograd else _f._maml_chunk
        return run(problem, _f._step_rates(problem), problem.query_loss_weights, *data, *problem.params)

    @staticmethod
    def forward(ctx, problem, chunk, present, *inputs):
        ctx.set_materialize_grads(False)
        ctx.problem, ctx.chunk, ctx.present = problem, chunk, present
        ctx.save_for_backward(*inputs)
        T = problem.num_tasks
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
        local = Chunked._rebuild(problem, present, leaves)
        sums = [None] * len(leaves)  # d(sum of the task losses) / d(input)
        losses, preds = [], []
        with torch.enable_grad():
            for start in range(0, T, chunk):
                out = Chunked._chunk(local, start, min(start + chunk, T))
                if wanted:
                    grads = torch.autograd.grad(out[0].sum(), [leaves[i] for i in wanted], allow_unused=True)
                    for i, g in zip(wanted, grads):
                        if g is not None:
                            sums[i] = g if sums[i] is None else sums[i] + g
                losses.append(out[0].detach())
                preds.append(out[1].detach())
        ctx.sums = sums
        task_losses = torch.cat(losses)
        return task_losses, torch.cat(preds), task_losses.mean()

    @staticmethod
    def _rebuild(problem, present, tensors):
        full = [None] * len(_problem_tensors(problem))
        for i, t in zip(present, tensors):
            full[i] = t
        return _with_tensors(problem, full)

    @staticmethod
    def backward(ctx, g_losses, g_preds, g_loss):
        # The forward ran without autocast (the backend refuses it): the recomputed chunks and their
        # gradients run without it too, whatever context backward is called in.
        with autocast_off(ctx.problem.device.type):
            return Chunked._backward(ctx, g_losses, g_preds, g_loss)

    @staticmethod
    def _backward(ctx, g_losses, g_preds, g_loss):
        inputs = ctx.saved_tensors
        problem, chunk, T = ctx.problem, ctx.chunk, ctx.problem.num_tasks
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True) records this backward
        grads = [None] * len(inputs)
        if g_loss is not None and not create_graph:
            for i, s in enumerate(ctx.sums):
                if s is not None and ctx.needs_input_grad[3 + i]:
                    grads[i] = s * (g_loss / T)
        elif g_loss is not None:  # recomputed below, with the mean's cotangent on every task
            g_losses = g_loss.expand(T) / T if g_losses is None else g_losses + g_loss / T
        if g_losses is None and g_preds is None:
            return (None, None, None, *grads)
        wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[3 + i]]
        with torch.enable_grad():
            # Differentiated again: views of the originals, so that the gradients are functions of them,
            # one node per input (a tensor passed twice, x_query as x_support, would otherwise get its
            # whole gradient at both places, and autograd would add them).
            if create_graph:
                leaves = [t.view_as(t) if t.requires_grad else t for t in inputs]
            else:
                leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            local = Chunked._rebuild(problem, ctx.present, leaves)
            for start in range(0, T, chunk):
                stop = min(start + chunk, T)
                out = Chunked._chunk(local, start, stop, autograd=create_graph)
                pairs = [(o, g[start:stop]) for o, g in zip(out, (g_losses, g_preds)) if g is not None]
                got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted],
                                          grad_outputs=[g for _, g in pairs], allow_unused=True,
                                          create_graph=create_graph)
                for i, g in zip(wanted, got):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        return (None, None, None, *grads)


__all__ = ["Chunked"]
