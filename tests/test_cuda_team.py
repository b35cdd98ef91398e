"""The team-parallel loops of csrc/task/ (what the CUDA kernel runs with a thread block per task)
on the CPU, without a GPU.

tests/cuda_team_check.cpp checks the team products' register tiles (every tile shape, teams of 2 to 128,
sizes around the tiles' edges, each output element owned once, the same owner in two products of one
shape into one output) and their tensor-core tiles (csrc/task/team_mma.h, emulated lane by lane from
PTX's fragment layout of mma.sync m16n8k8: teams of 32, 40 and 128), then runs the per-task drivers
(forward, reverse sweep, adapt, and the fused forward and reverse sweep summing tasks into one row as
the CUDA maml_fwdbwd_sum does) with teams of 2, 3, 5, 8 and, case by case in turn, 33 or 64 std::threads
synchronised by a std::barrier, each with its own tile shape (64: every product on the emulated tensor-core
tiles), several tasks one after another per team into shared meta-gradient rows, on fresh random problems (mse
and cross-entropy, relu and tanh, depths 1 to 4, widths up to 41, K = 0, 1, 3, first and second order,
rate and input gradients, multi-step query weights, the reverse sweep's thetas kept and recomputed), and
compares every output with the team of one that the cpu backend runs (tested against the reference
elsewhere). A missing sync or an element written by two threads makes outputs differ (scratch is filled
with NaN, so a read of an unwritten element shows up too).

`FASTMAML_TSAN=1` also runs it under ThreadSanitizer (2.5 minutes on 2 cores), which reports the race itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _host_checks import build_and_run

SOURCE = Path(__file__).resolve().parent / "cuda_team_check.cpp"


def test_team_loops_match_the_team_of_one(tmp_path):
    out = build_and_run(tmp_path, SOURCE, ["-O1"])
    assert "ok: 4320 product cases and 184 cases x 5 team sizes" in out


@pytest.mark.skipif(os.environ.get("FASTMAML_TSAN") == "0", reason="FASTMAML_TSAN=0 skips the ThreadSanitizer run")
def test_team_loops_have_no_data_race(tmp_path):
    """The team loops under ThreadSanitizer (about 90 s of one core here). It used to run only with
    FASTMAML_TSAN=1, which nothing set: CI never ran it. Now it runs unless FASTMAML_TSAN=0."""
    out = build_and_run(tmp_path, SOURCE, ["-O1", "-g", "-fsanitize=thread"])
    assert "ThreadSanitizer" not in out, out
