"""Builds and runs a C++ check of CUDA kernel code on the CPU (tests/cuda_team_check.cpp,
tests/lowrank_cuda_check.cpp): std::threads as the GPU's threads, no GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def build_and_run(tmp_path: Path, source: Path, flags: list[str]) -> str:
    """Compiles `source` against csrc/ with `flags` (C++20, pthreads) and runs it: its output, after
    asserting that both steps succeeded; skips without a C++ compiler or without C++20's <barrier>."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / source.stem
    cmd = [CXX, "-std=c++20", "-pthread", *flags, "-I", str(ROOT / "csrc"), str(source), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"{CXX} has no <barrier> (C++20): {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, f"building {source.name} failed:\n$ {' '.join(cmd)}\n{proc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"{source.name} failed:\n{out}"
    return out
