"""Helpers of the jobs' tests."""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def interrupted_at(monkeypatch, learner_class, iteration: int):
    """Within the block, `learner_class.step` raises KeyboardInterrupt at `iteration` (a run killed there);
    the block expects it. The real step is put back afterwards."""
    real_step = learner_class.step

    def dying_step(self, batch, it):
        if it == iteration:
            raise KeyboardInterrupt("stopped")
        return real_step(self, batch, it)

    monkeypatch.setattr(learner_class, "step", dying_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(learner_class, "step", real_step)
