"""The team-parallel loops of csrc/task/ (what the CUDA kernel runs with a thread block per task)
on the CPU, without a GPU.

tests/cuda_team_check.cpp checks the team products' register tiles (every tile shape, teams of 2 to 128,
sizes around the tiles' edges, each output element owned once, the same owner in two products of one
shape into one output) and their tensor-core tiles (csrc/task/team_mma.h, emulated lane by lane from
PTX's fragment layout of mma.sync m16n8k8: teams of 32, 40 and 128), then runs the per-task drivers
(forward, reverse sweep, adapt, and the fused forward and reverse sweep summing tasks into one row as
the CUDA maml_fwdbwd_sum does) with teams of 2, 3, 5, 8, 33 and 64 std::threads synchronised by a
std::barrier, each with its own tile shape (64: every product on the emulated tensor-core tiles),
several tasks one after another per team into shared meta-gradient rows, on fresh random problems (mse
and cross-entropy, relu and tanh, depths 1 to 4, widths up to 41, K = 0, 1, 3, first and second order,
rate and input gradients, multi-step query weights, the reverse sweep's thetas kept and recomputed), and
compares every output with the team of one that the cpu backend runs (tested against the reference
elsewhere). A missing sync or an element written by two threads makes outputs differ (scratch is filled
with NaN, so a read of an unwritten element shows up too).

`FASTMAML_TSAN=1` also runs it under ThreadSanitizer (2.5 minutes on 2 cores), which reports the race itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).resolve().parent / "cuda_team_check.cpp"
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def build_and_run(tmp_path: Path, flags: list[str]) -> str:
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "team_check"
    cmd = [CXX, "-std=c++20", "-pthread", *flags, "-I", str(ROOT / "csrc"), str(SOURCE), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"{CXX} has no <barrier> (C++20): {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, f"building the team check failed:\n$ {' '.join(cmd)}\n{proc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"the team loops differ from the team of one:\n{out}"
    return out


def test_team_loops_match_the_team_of_one(tmp_path):
    out = build_and_run(tmp_path, ["-O1"])
    assert "ok: 4320 product cases and 184 cases x 6 team sizes" in out


@pytest.mark.skipif(os.environ.get("FASTMAML_TSAN") != "1", reason="set FASTMAML_TSAN=1 to run under ThreadSanitizer")
def test_team_loops_have_no_data_race(tmp_path):
    out = build_and_run(tmp_path, ["-O1", "-g", "-fsanitize=thread"])
    assert "ThreadSanitizer" not in out, out
