#!/usr/bin/env bash
# The GPU machine's build, without a GPU: the extension built with its CUDA kernels against a CUDA build of
# torch (as the GPU check's first stage builds it), loaded, and every CUDA kernel the bindings register
# found by the dispatcher; with --tests, then the test suite under that torch.
#
# What a CPU torch cannot show: whether the bindings link to the kernels (a launcher declared one way and
# defined another fails only when the library is loaded), and the differences of the GPU machine's torch
# (2.11, Python 3.12) from the one CI runs (2.13). Neither needs a GPU.
#
#   PYTHON=/path/to/venv/bin/python benchmarks/cuda_build_check.sh [--tests]
#
# PYTHON: a Python whose torch is a CUDA build, with nvcc on PATH or CUDA_HOME set. Such a venv, once (about
# 5 GB from the package index; the GPU machine's versions):
#   python3.12 -m venv ~/venv-cu && ~/venv-cu/bin/pip install torch==2.11.0 triton==3.6.0 "numpy<2.4" \
#       pytest pytest-xdist pytest-benchmark ninja matplotlib tqdm
# TORCH_CUDA_ARCH_LIST (default 9.0, the H100/H200) and TORCH_EXTENSIONS_DIR (default
# /tmp/fastmaml_cuda_build_check) as for any build; the build takes about 6 minutes on 2 cores, and later
# runs of the same sources load it. Exit status 0 when the library loads with every CUDA kernel (and the
# tests pass, with --tests).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "cuda_build_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda_build_check.sh: $PYTHON has no CUDA build of torch (set PYTHON; see the header)" >&2
  exit 2
fi
# torch takes CUDA_HOME from nvcc's path when unset; a wrapper on PATH (/usr/local/bin/nvcc) would give it
# /usr/local, without the toolkit's headers.
if [ -z "${CUDA_HOME:-}" ]; then
  for root in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
    if [ -f "$root/include/cuda_runtime.h" ]; then export CUDA_HOME="$root"; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "cuda_build_check.sh: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
fi
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastmaml_cuda_build_check}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

"$PYTHON" - <<'EOF'
import re
import sys
import time
from pathlib import Path

import torch

from fastmaml import _ext
from fastmaml.backends.cuda import cuda_kernels_registered

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")
start = time.time()
try:
    _ext.load()
except _ext.ExtensionUnavailable as err:
    sys.exit(f"FAILED: the extension did not build or load: {err}")
print(f"built or loaded in {time.time() - start:.0f} s")
# Every kernel the bindings register under the CUDA key, read from their TORCH_LIBRARY_IMPL blocks.
ops = []
for binding in sorted(Path("csrc/cuda").glob("*binding.cpp")):
    for block in re.findall(r"TORCH_LIBRARY_IMPL\(fastmaml, CUDA, m\) \{(.*?)\n?\}", binding.read_text(), re.S):
        ops += re.findall(r'm\.impl\("(\w+)"', block)
missing = [op for op in ops if not cuda_kernels_registered(op)]
if not ops or missing:
    sys.exit(f"FAILED: CUDA kernels not registered: {missing or 'none found in the bindings'}")
print(f"ok: the library has its {len(ops)} CUDA kernels ({', '.join(ops)})")
EOF

if [ "$TESTS" = 1 ]; then
  "$PYTHON" -m pytest -q -n auto --maxprocesses 4 -p no:cacheprovider
fi
