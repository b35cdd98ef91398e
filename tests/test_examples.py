"""examples/omniglot_side_by_side.py: the learn2learn-style loop and fastmaml.MAML give the same meta-loss
and the same meta-gradient (backbone and head) on the same tasks, in float64, on every backend that
runs the head."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fastmaml
from _reference_loop import assert_close
from fastmaml import omniglot_data as data

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import omniglot_side_by_side as example  # noqa: E402


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_loop_and_fastmaml_give_the_same_meta_gradient(backend, inner_steps):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(9, 20, 28, 28, generator=g, dtype=torch.float64)
    batch = data.sample_tasks(images, 4, 3, 2, 3, g)
    backbone, head = example.make_model(3, seed=1, dtype=torch.float64)
    params = list(backbone.parameters()) + list(head.parameters())

    loop = example.meta_loss_loop(backbone, head, batch, inner_steps=inner_steps, inner_lr=0.4)
    expected = torch.autograd.grad(loop, params)
    maml = fastmaml.MAML(head, inner_lr=0.4, inner_steps=inner_steps, loss="cross_entropy", backend=backend)
    loss = example.meta_loss_fastmaml(backbone, maml, batch)
    actual = torch.autograd.grad(loss, params)
    assert_close(loss.detach(), loop.detach(), 1e-10, "meta-loss")
    # As a collection: the conv biases' gradients are zero up to rounding (the normalisation after each conv
    # removes a constant), so each tensor is judged against the largest gradient's scale.
    assert_close(list(actual), list(expected), 1e-8, "gradients")
    assert all(e.abs().max() > 1e-6 for e in expected[2:-4:2])  # the backbone's norms and convs get gradient
