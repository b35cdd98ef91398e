#!/usr/bin/env bash
# The GPU machine's build, without a GPU: the extension built with its CUDA kernels against a CUDA build of
# torch (as the GPU check's first stage builds it), loaded, and every CUDA kernel the bindings register
# found by the dispatcher; with --tests, then the test suite under that torch.
#
# What a CPU torch cannot show: whether the bindings link to the kernels (a launcher declared one way and
# defined another fails only when the library is loaded), and the differences of the GPU machine's torch
# (2.11, Python 3.12) from the one CI runs (2.13). Neither needs a GPU.
#
#   PYTHON=/path/to/venv/bin/python benchmarks/cuda_build_check.sh [--tests] [--carry]
#
# --carry: then packs the library into .gpu_prebuilt/ (benchmarks/prebuilt.py) for a device call to carry, so
# that the GPU check loads it instead of compiling; build it from the sources the device call sends.
#
# PYTHON: a Python whose torch is a CUDA build, with nvcc on PATH or CUDA_HOME set. Such a venv, once (about
# 5 GB from the package index; the GPU machine's versions):
#   python3.12 -m venv ~/venv-cu && ~/venv-cu/bin/pip install torch==2.11.0 triton==3.6.0 "numpy<2.4" \
#       pytest pytest-xdist pytest-benchmark ninja matplotlib tqdm
# TORCH_CUDA_ARCH_LIST (default 9.0a: the H200 machine's environment sets it so, as the name of its build
# folder at a75ae00 shows; the H100/H200 run 9.0 code as well) and TORCH_EXTENSIONS_DIR (default
# /tmp/fastmaml_cuda_build_check) as for any build; the build takes about 6 minutes on 2 cores, and later
# runs of the same sources load it. Exit status 0 when the library loads with every CUDA kernel (and the
# tests pass, with --tests).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
TESTS=0
CARRY=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    --carry) CARRY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) echo "cuda_build_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if ! cuda="$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")"; then
  echo "cuda_build_check.sh: $PYTHON cannot import torch (set PYTHON; see the header)" >&2
  exit 2
fi
if [ -z "$cuda" ]; then
  echo "cuda_build_check.sh: the torch of $PYTHON is a CPU build (set PYTHON; see the header)" >&2
  exit 2
fi
# The toolkit: CUDA_HOME, else the one nvcc on PATH belongs to (its --dryrun names its root: nvcc may be a
# wrapper script, from whose path torch would guess /usr/local, without the headers), else /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  if [ -n "$top" ] && [ -d "$top" ]; then CUDA_HOME="$(cd "$top" && pwd)"; export CUDA_HOME; fi
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "cuda_build_check.sh: no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)" >&2
  exit 2
fi
command -v nvcc >/dev/null 2>&1 || export PATH="$PATH:$CUDA_HOME/bin"
echo "CUDA_HOME=$CUDA_HOME, nvcc $(command -v nvcc)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
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
# Every kernel the bindings register under the CUDA key, read from their TORCH_LIBRARY_IMPL blocks (each
# block up to its matching brace).
ops = []
for binding in sorted(Path("csrc/cuda").glob("*binding.cpp")):
    text = binding.read_text()
    for start in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*fastmaml\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{", text):
        depth, end = 1, start.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        block = text[start.end():end]
        names = re.findall(rf'\b{start.group(1)}\s*\.\s*impl\(\s*"(\w+)"', block)
        if len(names) != len(re.findall(rf"\b{start.group(1)}\s*\.\s*impl\(", block)):
            sys.exit(f"FAILED: an impl call of {binding.name} whose op name this script cannot read")
        ops += names
missing = [op for op in ops if not cuda_kernels_registered(op)]
if not ops or missing:
    why = _ext.cuda_build_unavailable() or _ext.cuda_build_error()
    sys.exit(f"FAILED: CUDA kernels not registered: {missing or 'none found in the bindings'}"
             + (f" (the build had no CUDA kernels: {why})" if why else ""))
print(f"ok: the library has its {len(ops)} CUDA kernels ({', '.join(ops)})")
EOF

if [ "$CARRY" = 1 ]; then
  "$PYTHON" benchmarks/prebuilt.py pack
fi
if [ "$TESTS" = 1 ]; then
  "$PYTHON" -m pytest -q -n auto --maxprocesses 4 -p no:cacheprovider
fi
