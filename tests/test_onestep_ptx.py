"""The one-step kernels at -O3 without a GPU (nvcc -ptx, cicc only, about 20 s on 2 cores): every form of
onestep_kernel keeps the whole task. nvcc 13.0 took the shared-operand FFMA form's query pass onward for
unreachable (__builtin_assume(__isShared) on operands derived from a pointer that could also be global):
its PTX ended in an empty block that `L > 0` branched to, and its sm_90a SASS EXITed there, so the kernel
wrote no loss, pred, U or V. -O0 (test_cuda_compile's default) does not show it."""
import re
import subprocess
from pathlib import Path

from test_cuda_compile import CSRC, NVCC, needs_nvcc  # the same nvcc lookup


@needs_nvcc
def test_onestep_kernels_keep_the_whole_task(tmp_path: Path):
    ptx = tmp_path / "onestep.ptx"
    subprocess.run([NVCC, "-ptx", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=compute_90a", "-I", str(CSRC),
                    str(CSRC / "cuda" / "onestep.cu"), "-o", str(ptx)], check=True, capture_output=True, timeout=900)
    text = ptx.read_text()
    kernels = re.findall(r"\.entry (\S*onestep_kernelI([df])Lb([01])ELb([01])E\S*)\((.*?)\n\}\n", text, re.S)
    assert len(kernels) == 6, [k[0] for k in kernels]
    shuffles = {}
    for name, t, shared, mma, body in kernels:
        # An `unreachable` the compiler derived: a label that ends the function with no instruction after it.
        assert not re.search(r"\n\$L__BB\d+_\d+:\s*$", body), f"{name} ends in an empty (unreachable) block"
        # Three team sums (the loss, each rate's two): every form of one dtype shuffles as often.
        shuffles.setdefault(t, set()).add(body.count("shfl.sync"))
    assert all(len(v) == 1 for v in shuffles.values()), shuffles
