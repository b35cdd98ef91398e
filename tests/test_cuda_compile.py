"""The CUDA kernels without a GPU: every `.cu` file under csrc/cuda compiles with nvcc for sm_80 and sm_90a,
the torch bindings (csrc/cuda/*binding.cpp) compile against the installed torch headers and call only
launchers that the .cu files define, and the `cuda` backend says clearly why it cannot run on a machine
without a CUDA torch or a GPU.

The kernels' math is checked on the CPU: by the cpu backend's tests (the same csrc/maml_task.h with a
team of one thread) and by tests/test_cuda_team.py (the team loops with several threads). Their
results on a GPU are checked by tests/test_backends.py, which runs every registered backend, cuda
included, against the reference when the machine can run it.

The compile checks skip only when nvcc is not installed (the bindings' part of the sm_90a case, visibly,
when g++ or the CUDA headers are not found). They compile with the device optimisers off
(`-Xcicc -O0 -Xptxas -O0`): errors and warnings come from the front end, and the optimised build takes
minutes on two cores, too long for a test. `FASTMAML_NVCC_OPT=1` compiles with -O3 instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastmaml
from fastmaml import _ext, dispatch
from fastmaml.backends import cuda as cuda_backend
from fastmaml._validate import make_problem

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = {"sm_80": "compute_80", "sm_90a": "compute_90a"}
BINDINGS = ("binding.cpp", "lowrank_binding.cpp", "onestep_binding.cpp")


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC / 'cuda'}"
    for name in BINDINGS:
        assert (CSRC / "cuda" / name).is_file(), name


def binding_compiles(tmp_path: Path, include: Path) -> dict[str, list[str]]:
    """g++ -c of each torch binding against the installed torch headers, without optimisation. A CPU build
    of torch ships the c10/cuda headers but not the one CMake generates for them; a stub stands in for it."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in include_paths()):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++20", "-c", "-O0", "-fPIC", "-Wall", "-Wextra", "-I", str(tmp_path / "stub")]
    for path in include_paths():
        cmd += ["-isystem", path]
    cmd += ["-isystem", str(include)]
    return {b: [*cmd, str(CSRC / "cuda" / b), "-o", str(tmp_path / f"{Path(b).stem}.binding.o")] for b in BINDINGS}


# The Itanium names of what fastmaml's namespaces hold: functions (const, volatile or ref-qualified
# members too), and the vtables and type infos of its classes.
_FASTMAML_SYMBOL = re.compile(r"_Z(?:T[VIS])?N[rVKRO]*8fastmaml")


def fastmaml_symbols(obj: Path, undefined: bool) -> set[str]:
    """The mangled fastmaml:: symbols an object file defines, or leaves undefined."""
    proc = subprocess.run(["nm", "--undefined-only" if undefined else "--defined-only", str(obj)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"nm {obj.name}: {proc.stderr}"
    names = (line.split()[-1] for line in proc.stdout.splitlines() if line.strip())
    return {n for n in names if _FASTMAML_SYMBOL.match(n)}


def demangle(names: set[str]) -> str:
    proc = subprocess.run(["c++filt"], input="\n".join(sorted(names)), capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else "\n".join(sorted(names))


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cu_files_compile(arch: str, tmp_path: Path):
    """nvcc -c, warnings as errors; the include path resolves ../maml_task.h from csrc/cuda. For sm_90a
    every .cu file on its own, all at once as ninja builds them (one core each), then linked into one
    shared library with no symbol left undefined, as the extension's build links them (a launcher one
    file calls and no file defines fails there, not first on a GPU machine); for sm_80 the same code
    once, as one file that includes them all: each file pays about 15 s of fixed cost at -O0 on this
    machine's cores, and the split into files is what the sm_90a build checks.

    With sm_90a the torch bindings compile beside them (g++ -c), and every fastmaml:: symbol they leave
    undefined must be one the .cu objects define: the extension's link checks that only on a machine with
    a CUDA build of torch. A launcher declared with a parameter of a type from csrc/task/'s inline
    namespace was mangled one way in the bindings and another in nvcc's host pass, and the extension
    failed to load (found building it against a CUDA torch; see csrc/cuda/onestep_cuda.h)."""
    opt = ["-O3"] if os.environ.get("FASTMAML_NVCC_OPT") == "1" else ["-Xcicc", "-O0", "-Xptxas", "-O0"]
    units = list(CU_FILES)
    if arch != "sm_90a":
        units = [tmp_path / "all_cuda.cu"]
        units[0].write_text("".join(f'#include "{cu}"\n' for cu in CU_FILES))
    procs = {cu.name: subprocess.Popen([NVCC, "-c", "-std=c++17", f"-gencode=arch={ARCHS[arch]},code={arch}", *opt,
                                        "-Werror", "all-warnings", "-Xcompiler", "-Wall,-fPIC", "-I", str(CSRC),
                                        str(cu), "-o", str(tmp_path / f"{cu.stem}.o")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cu in units}
    no_link_check = None
    if arch == "sm_90a":
        include = cuda_include_dir()
        no_link_check = ("g++ is not installed" if shutil.which("g++") is None else
                         "the CUDA headers (cuda_runtime_api.h) were not found" if include is None else None)
        if no_link_check is None:
            for binding, cmd in binding_compiles(tmp_path, include).items():
                procs[binding] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failed.append(f"compiling {name} ({arch}) failed:\n$ {' '.join(proc.args)}\n{out}\n{err}")
    assert not failed, "\n".join(failed)
    if arch == "sm_90a":
        run([NVCC, "-shared", f"-gencode=arch={ARCHS[arch]},code={arch}", *(str(tmp_path / f"{cu.stem}.o")
             for cu in units), "-Xlinker", "--no-undefined", "-o", str(tmp_path / "libkernels.so")],
            "linking the CUDA files into one library")
    if arch == "sm_90a" and no_link_check is None:
        defined = set().union(*(fastmaml_symbols(tmp_path / f"{cu.stem}.o", False) for cu in units),
                              *(fastmaml_symbols(tmp_path / f"{Path(b).stem}.binding.o", False) for b in BINDINGS))
        for binding in BINDINGS:
            wanted = fastmaml_symbols(tmp_path / f"{Path(binding).stem}.binding.o", True)
            assert wanted, f"{binding} calls no fastmaml launcher: a check that cannot fail"
            missing = wanted - defined
            assert not missing, f"{binding} calls what no .cu file defines:\n{demangle(missing)}"
    elif no_link_check is not None:
        pytest.skip(f"the .cu files compiled and linked; the bindings' link check did not run: {no_link_check}")


def test_every_launcher_is_instantiated_once():
    """The kernels' launchers (csrc/cuda/kernels.cuh) are instantiated one group a file, so that ninja
    compiles the files in parallel; a group missing or doubled would only show when a GPU machine links
    the library. Each group and dtype once across csrc/cuda/*.cu, the float reverse sweep's 4- and 6-block
    launchers once, and every .cu file is built."""
    groups = re.findall(r"#define FASTMAML_INSTANTIATE_(\w+)\(T\)", (CSRC / "cuda" / "kernels.cuh").read_text())
    assert sorted(groups) == ["BWD", "FWDBWD", "LIGHT"]
    found = {}
    for cu in CU_FILES:
        for group, dtype in re.findall(r"^FASTMAML_INSTANTIATE_(\w+)\((\w+)\)", cu.read_text(), re.M):
            found.setdefault((group, dtype), []).append(cu.name)
    expected = {(g, t) for g in groups for t in ("float", "double")}
    assert set(found) == expected, f"instantiated: {sorted(found)}"
    assert all(len(files) == 1 for files in found.values()), found
    # The float reverse sweep's 4- and 6-block variants and its timeline: launched through BwdMin<4>,
    # BwdMin<6> and BwdTimeline, each defined in one file of its own; BwdMin's members (bwd_min.cuh) are
    # seen by those two files only, so no other file compiles their kernels.
    including = [cu.name for cu in CU_FILES if '#include "bwd_min.cuh"' in cu.read_text()]
    assert including == ["bwd_f32_min4.cu", "bwd_f32_min6.cu"], including
    for launcher, pattern, home in (
            ("BwdMin<4>", r"^template struct BwdMin<4>;", "bwd_f32_min4.cu"),
            ("BwdMin<6>", r"^template struct BwdMin<6>;", "bwd_f32_min6.cu"),
            ("BwdTimeline", r"^cudaError_t BwdTimeline::launch\(", "bwd_f32_timeline.cu")):
        defined = [cu.name for cu in CU_FILES if re.search(pattern, cu.read_text(), re.M)]
        assert defined == [home], (launcher, defined)
    assert sorted(f"cuda/{cu.name}" for cu in CU_FILES) == sorted(s for s in _ext._CUDA_SOURCES if s.endswith(".cu"))


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_runtime_api.h): under CUDA_HOME, /usr/local/cuda or
    nvcc's own root, else where nvcc itself looks (its --dryrun's -I: a wrapper script on PATH, a toolkit
    whose headers are under targets/)."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if NVCC is not None:
        roots.append(str(Path(os.path.realpath(NVCC)).parent.parent))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    if NVCC is not None:
        proc = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
        for folder in re.findall(r'-I"?([^"\s]+)', proc.stdout + proc.stderr):
            if (Path(folder) / "cuda_runtime_api.h").is_file():
                return Path(folder)
    return None


# ---- the backend on a machine that cannot run it ----------------------------------------------------


def small_problem(device: str = "cpu"):
    g = torch.Generator().manual_seed(3)
    dims = [3, 7, 2]
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        params += [torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)]
    xs, ys = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 2, generator=g)
    xq, yq = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 2, generator=g)
    return [t.to(device) for t in (*params,)], xs.to(device), ys.to(device), xq.to(device), yq.to(device)


def test_cuda_backend_is_registered_for_the_backend_tests():
    """tests/test_backends.py runs every registered backend but reference; cuda must be one of them, so
    that a GPU machine checks it against the reference."""
    assert "cuda" in fastmaml.list_backends()
    assert dispatch.AUTO_ORDER["cuda"][0] == "cuda"


def test_cuda_backend_reports_why_it_cannot_run_here():
    """In order: a CPU-only torch, no visible GPU, no extension, a loaded library without CUDA kernels
    (then why: nvcc is named when this machine's build had none). nvcc alone decides nothing: a library
    with CUDA kernels runs without it (tests/test_prebuilt.py)."""
    backend = dispatch.get_backend("cuda")
    why = backend.unavailable()
    if why is None:
        pytest.skip("this machine can run the cuda backend")
    assert isinstance(why, str) and why
    if torch.version.cuda is None:
        assert "CPU-only build" in why
    elif not torch.cuda.is_available():
        assert "no CUDA device" in why
    elif _ext.unavailable() is None:
        assert "no CUDA kernels" in why
        if cuda_backend.build_unavailable() is not None and not _ext.library_is_prebuilt():
            assert "nvcc" in why or "csrc/cuda" in why


def test_cuda_backend_refuses_cpu_tensors_and_says_so():
    params, xs, ys, xq, yq = small_problem()
    problem = make_problem(params, xs, ys, xq, yq)
    assert "CUDA tensors" in dispatch.get_backend("cuda").reject(problem, "maml")
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
        fastmaml.maml(params, xs, ys, xq, yq, backend="cuda")
    # auto on CPU tensors never picks cuda, and explain names the reason
    assert "cuda" in fastmaml.explain(params, xs, ys, xq, yq)


def test_size_limits_name_the_limit():
    params, xs, ys, xq, yq = small_problem()
    wide = [torch.randn(5000, 3), torch.randn(5000), torch.randn(2, 5000), torch.randn(2)]
    assert "width 5000" in cuda_backend.size_limit_reason(make_problem(wide, xs, ys, xq, yq))
    deep = []
    for _ in range(9):
        deep += [torch.randn(3, 3), torch.randn(3)]
    deep_ys, deep_yq = torch.randn(4, 5, 3), torch.randn(4, 6, 3)
    assert "9 layers" in cuda_backend.size_limit_reason(make_problem(deep, xs, deep_ys, xq, deep_yq))
    many = make_problem(params, xs, ys, xq, yq, inner_steps=200)
    big = [torch.randn(1500, 3), torch.randn(1500), torch.randn(2, 1500), torch.randn(2)]
    assert cuda_backend.size_limit_reason(make_problem(params, xs, ys, xq, yq)) is None
    assert cuda_backend.size_limit_reason(many) is None  # small net: 200 steps still fit
    assert "MiB of scratch" in cuda_backend.size_limit_reason(make_problem(big, xs, ys, xq, yq, inner_steps=400))
