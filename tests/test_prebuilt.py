"""A prebuilt extension is used as shipped (issue R1): a wheel built with `FASTMAML_BUILD_EXT=1` runs on a
machine with no compiler, no nvcc and no ninja, with or without the C++ sources beside it, and nothing is
compiled there.

The wheel is built once per module (setup.py compiles the C++ extension into `fastmaml/_C*.so`: about a
minute on two idle cores, two when they are busy) from a copy of the checkout's packaging files, so the
checkout gets no `build/` folder, and installed with `pip install --target` into a temporary folder.
Each check then runs in a subprocess whose PATH holds only a link to the Python executable, with CXX,
CC and CUDA_HOME unset, an empty TORCH_EXTENSIONS_DIR, a temporary working directory and PYTHONPATH
pointing at the installed copy (it comes before the editable install of the checkout: setuptools'
editable finder is consulted after sys.path; the subprocess asserts which copy it imported).

The other tests here are fast unit tests of `_ext.source_hash` / `_ext.build_directory`, of the build
without CUDA kernels where they cannot be built or their build fails (compiles faked), and of the cuda
backend's availability, which comes from the loaded library's registered CUDA kernels, not from nvcc.

The wheel tests skip only when the build's own prerequisites are missing (a C++ compiler, ninja, pip,
setuptools) or on Windows (the isolation uses symlinks and `_C*.so`). Where torch is a CUDA build and
nvcc is found, the wheel also gets the CUDA kernels; TORCH_CUDA_ARCH_LIST is then set to one
architecture (the visible GPU's, else 8.0) unless it is set already, to keep the build short.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmaml import _ext
from fastmaml.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# What a wheel is built from (the files an sdist holds: see MANIFEST.in and pyproject.toml).
PACKAGING_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in")
PACKAGING_DIRS = ("fastmaml", "csrc")
# Tools whose absence the isolated subprocess checks: it must run without any of them.
BUILD_TOOLS = ("c++", "g++", "gcc", "cc", "clang++", "nvcc", "ninja")


# ---- unit tests: the source hash and the build folder ---------------------------------------------------


def _hide_nvcc(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "find_nvcc", lambda: None)


def _fake_cards(monkeypatch, capabilities: list[tuple[int, int]]) -> None:
    """As if these cards were visible, CUDA not initialised and NVML answering (no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(_ext, "_nvml_capabilities", lambda count: list(capabilities[:count]))

    def started_cuda(i=0):
        raise AssertionError("the capabilities were asked of torch, which starts CUDA, although NVML answered")

    monkeypatch.setattr(torch.cuda, "get_device_capability", started_cuda)


def _fake_cuda_toolchain(monkeypatch, capabilities=((9, 0),)) -> None:
    """As on a machine with a CUDA build of torch, nvcc and the visible cards `capabilities` (nothing is
    compiled by these tests)."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(_ext, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(_ext, "find_cuda_header", lambda: "/opt/cuda/include/cuda_runtime.h")
    _fake_cards(monkeypatch, list(capabilities))


def test_source_hash_does_not_depend_on_the_compilers(monkeypatch):
    """The identity a prebuilt library is accepted by: the same with or without nvcc, on a CPU or CUDA
    build of torch, whatever TORCH_CUDA_ARCH_LIST says."""
    expected = _ext.source_hash(CSRC)
    _hide_nvcc(monkeypatch)
    assert _ext.cuda_build_unavailable(CSRC) is not None
    assert _ext.source_hash(CSRC) == expected
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _ext.source_hash(CSRC) == expected
    _fake_cuda_toolchain(monkeypatch)
    assert _ext.cuda_build_unavailable(CSRC) is None
    assert _ext.source_hash(CSRC) == expected
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert _ext.source_hash(CSRC) == expected


def test_source_hash_covers_every_source_file(monkeypatch, tmp_path):
    """CPU and CUDA sources alike, even where nvcc is absent; whichever are shipped."""
    _hide_nvcc(monkeypatch)
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
    expected = _ext.source_hash(CSRC)
    assert _ext.source_hash(csrc) == expected  # the hash does not depend on where the sources are
    for rel in ("cuda/maml_cuda.cu", "cuda/kernels.cuh", "cuda/bwd_f64.cu", "cuda/binding.cpp", "maml_task.h",
                "cpu/maml_cpu.cpp"):
        original = (csrc / rel).read_bytes()
        (csrc / rel).write_bytes(original + b"\n// changed\n")
        assert _ext.source_hash(csrc) != expected, rel
        (csrc / rel).write_bytes(original)
    assert _ext.source_hash(csrc) == expected
    shutil.rmtree(csrc / "cuda")  # an installation shipped without the CUDA sources is another identity
    assert _ext.source_hash(csrc) != expected


def test_build_directory_separates_builds_with_and_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    digest = _ext.source_hash(CSRC)
    cpu = _ext.build_directory(CSRC, with_cuda=False)
    assert cpu == tmp_path / f"fastmaml_{digest}_cpu"
    _hide_nvcc(monkeypatch)
    assert _ext.build_directory(CSRC) == cpu  # no nvcc: the build has no CUDA kernels
    _fake_cuda_toolchain(monkeypatch)
    cuda = _ext.build_directory(CSRC)
    assert cuda == _ext.build_directory(CSRC, with_cuda=True)
    assert cuda != cpu and cuda.parent == tmp_path and cuda.name.startswith(f"fastmaml_{digest}_cu124_")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # other architectures: another CUDA build
    assert _ext.build_directory(CSRC) not in (cuda, cpu)
    assert _ext.build_directory(CSRC, with_cuda=False) == cpu


def test_build_directory_follows_the_visible_cards_without_an_architecture_list(monkeypatch, tmp_path):
    """Without TORCH_CUDA_ARCH_LIST torch compiles for the visible cards: a cache shared by an A100 and an
    H100 machine must keep a build for each (an sm_90 library has no kernel image for an A100)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    folders = {}
    for cards in ([(8, 0)], [(9, 0)], [(9, 0), (8, 0)], [(8, 0), (9, 0), (9, 0)]):
        _fake_cuda_toolchain(monkeypatch, cards)
        assert _ext.cuda_build_unavailable(CSRC) is None
        folders[tuple(cards)] = _ext.build_directory(CSRC)
    assert len({folders[((8, 0),)], folders[((9, 0),)], folders[((9, 0), (8, 0))]}) == 3
    assert folders[((9, 0), (8, 0))] == folders[((8, 0), (9, 0), (9, 0))]  # the set of cards, not their order
    _fake_cuda_toolchain(monkeypatch, [(9, 0)])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # torch reads it as unset
    assert _ext.build_directory(CSRC) == folders[((9, 0),)]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # a list names the folder whatever the cards
    listed = _ext.build_directory(CSRC)
    assert listed not in folders.values()
    _fake_cards(monkeypatch, [(8, 0)])
    assert _ext.build_directory(CSRC) == listed
    _fake_cards(monkeypatch, [])
    assert _ext.cuda_build_unavailable(CSRC) is None and _ext.build_directory(CSRC) == listed


def test_the_cards_are_read_without_starting_cuda_where_it_is_not_started(monkeypatch):
    """Loading the library looks at the cards (the build folder's name) and must not start CUDA: a process
    that then forks workers using CUDA would fail. NVML answers while CUDA is not started; torch where NVML
    does not answer or CUDA is started already; an error of both is a reason, not an exception."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    _fake_cuda_toolchain(monkeypatch, [(9, 0), (8, 0)])
    assert _ext.visible_capabilities() == ([(9, 0), (8, 0)], None)  # get_device_capability would raise
    assert _ext.cuda_architectures() == "visible:8.0;9.0"

    asked = []

    def from_torch(i=0):
        asked.append(i)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", from_torch)
    monkeypatch.setattr(_ext, "_nvml_capabilities", lambda count: None)  # NVML did not answer
    assert _ext.visible_capabilities() == ([(9, 0), (9, 0)], None) and asked == [0, 1]
    monkeypatch.setattr(_ext, "_nvml_capabilities", lambda count: [(8, 0), (8, 0)])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # started already: torch is asked
    assert _ext.visible_capabilities() == ([(9, 0), (9, 0)], None) and asked == [0, 1, 0, 1]

    def no_driver(i=0):
        raise RuntimeError("The NVIDIA driver on your system is too old")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_driver)
    cards, error = _ext.visible_capabilities()
    assert cards == [] and "driver on your system is too old" in error
    why = _ext.cuda_build_unavailable(CSRC)
    assert why.startswith(_ext.NO_ARCHITECTURE) and "could not be read" in why and "too old" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # a list needs no card
    assert _ext.cuda_build_unavailable(CSRC) is None


def test_nvml_is_asked_for_the_cards_torch_counts(monkeypatch):
    """`_nvml_capabilities` against a fake NVML library: CUDA's device i is NVML's device torch maps it to
    (CUDA_VISIBLE_DEVICES), and a call NVML fails makes the answer None (then torch is asked)."""
    import ctypes

    capability = {3: (9, 0), 1: (8, 6)}
    failing = set()

    class FakeNvml:
        def __init__(self, name):
            assert name == "libnvidia-ml.so.1"

        def nvmlInit_v2(self):
            return 1 if "init" in failing else 0

        def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
            handle._obj.value = 1000 + index
            return 0

        def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):
            if "capability" in failing:
                return 999
            major._obj.value, minor._obj.value = capability[handle.value - 1000]
            return 0

    monkeypatch.setattr(ctypes, "CDLL", FakeNvml)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: [3, 1][i])
    assert _ext._nvml_capabilities(2) == [(9, 0), (8, 6)]
    assert _ext._nvml_capabilities(1) == [(9, 0)]
    for step in ("init", "capability"):
        failing.add(step)
        assert _ext._nvml_capabilities(2) is None
        failing.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NVML and torch compared)")
def test_nvml_and_torch_agree_on_the_cards():
    count = torch.cuda.device_count()
    found = _ext._nvml_capabilities(count)
    if found is None:
        pytest.skip("NVML does not answer on this machine (torch is asked instead)")
    assert found == [tuple(torch.cuda.get_device_capability(i)) for i in range(count)]


@pytest.mark.parametrize("setting", [None, "", "native"], ids=["unset", "empty", "native"])
def test_no_architecture_to_compile_for_builds_without_cuda_kernels(monkeypatch, tmp_path, setting):
    """A CUDA build of torch and nvcc on a machine without a GPU (a login node) and no TORCH_CUDA_ARCH_LIST:
    torch's build would stop on an IndexError (it compiles for the visible cards) and take the CPU kernels
    with it. The extension is built without the CUDA kernels, and the reason says what to set."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    if setting is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setting)
    _fake_cuda_toolchain(monkeypatch, [])
    why = _ext.cuda_build_unavailable(CSRC)
    assert why is not None and why.startswith(_ext.NO_ARCHITECTURE) and "TORCH_CUDA_ARCH_LIST" in why
    assert "no GPU is visible" in why
    assert _ext.build_directory(CSRC) == _ext.build_directory(CSRC, with_cuda=False)
    assert cuda_backend.build_unavailable() == _ext.cuda_build_unavailable()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert _ext.cuda_build_unavailable(CSRC) is None


def _fake_builds(monkeypatch, tmp_path, cuda_error: str) -> list[bool]:
    """`_run_build` as a build whose CUDA half fails with `cuda_error`; returns the list of the builds asked
    for (True: with CUDA kernels). A build without them leaves a library and its stamp, as a real one."""
    calls: list[bool] = []

    def run_build(csrc, build_dir, stamp, with_cuda):
        calls.append(with_cuda)
        if with_cuda:
            raise _ext.ExtensionUnavailable(f"{_ext.BUILD_FAILED}{cuda_error}")
        lib = build_dir / f"{_ext.LIB_NAME}.so"
        lib.write_bytes(b"")
        stamp.write_text("built\n")
        return lib

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    _fake_cuda_toolchain(monkeypatch)
    monkeypatch.setattr(_ext.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.setattr(_ext, "_run_build", run_build)
    monkeypatch.setitem(_ext._state, "cuda_error", None)
    return calls


def test_a_failed_cuda_build_leaves_the_cpu_kernels(monkeypatch, tmp_path):
    """nvcc failing (a toolkit too old for the kernels, a compiler killed for memory) used to make the whole
    extension unavailable, the CPU kernels with it. The library is built without the CUDA kernels, the
    failure is given as a warning and as the cuda backend's reason, and later processes do not spend the CUDA
    build's minutes on it again until its marker is removed."""
    calls = _fake_builds(monkeypatch, tmp_path, "nvcc fatal : Unsupported gpu architecture 'compute_90a'")
    cpu_lib = _ext.build_directory(CSRC, with_cuda=False) / f"{_ext.LIB_NAME}.so"
    marker = _ext.build_directory(CSRC, with_cuda=True) / _ext.CUDA_FAILED_FILE
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to build"):
        assert _ext._jit_build(CSRC) == cpu_lib
    assert calls == [True, False]
    assert "Unsupported gpu architecture" in marker.read_text()
    why = _ext.cuda_build_error()
    assert "Unsupported gpu architecture" in why and str(marker) in why and "building the C++" not in why

    monkeypatch.setitem(_ext._state, "cuda_error", None)  # the next process: the marker is read, nothing built
    with pytest.warns(RuntimeWarning, match="Unsupported gpu architecture"):
        assert _ext._jit_build(CSRC) == cpu_lib
    assert calls == [True, False]
    assert "Unsupported gpu architecture" in _ext.cuda_build_error()

    marker.unlink()  # as the message says: the CUDA build is tried again
    monkeypatch.setitem(_ext._state, "cuda_error", None)
    with pytest.warns(RuntimeWarning):
        assert _ext._jit_build(CSRC) == cpu_lib
    assert calls == [True, False, True] and marker.is_file()


@pytest.mark.parametrize("output", [
    "c++: fatal error: Killed signal terminated program cc1plus",
    "nvcc error   : 'cicc' died due to signal 9 (Kill signal)",
    "fatal error: error writing to /tmp/ccAbc.s: No space left on device",
])
def test_a_cuda_build_killed_for_memory_or_disk_is_tried_again(monkeypatch, tmp_path, output):
    """A compiler killed for memory or a full disk says nothing about the sources or the toolkit: marking it
    failed would keep the CUDA kernels away until someone removed the marker. The CPU kernels are still
    built this time, and the next process tries the CUDA build again."""
    calls = _fake_builds(monkeypatch, tmp_path, "not used")
    marker = _ext.build_directory(CSRC, with_cuda=True) / _ext.CUDA_FAILED_FILE
    cpu_lib = _ext.build_directory(CSRC, with_cuda=False) / f"{_ext.LIB_NAME}.so"

    def run_build(csrc, build_dir, stamp, with_cuda):
        calls.append(with_cuda)
        if with_cuda:  # as `_run_build` raises it: the gist, with torch's whole error as the cause
            whole = RuntimeError(f"Error building extension 'fastmaml_cpu': [1/14] nvcc -c a.cu\nFAILED: a.cuda.o\n"
                                 f"{output}\nninja: build stopped: subcommand failed.")
            raise _ext.ExtensionUnavailable(f"{_ext.BUILD_FAILED}{_ext._short(whole)}") from whole
        return cpu_lib if cpu_lib.is_file() else (cpu_lib.write_bytes(b""), stamp.write_text("ok"), cpu_lib)[2]

    monkeypatch.setattr(_ext, "_run_build", run_build)
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to build"):
        assert _ext._jit_build(CSRC) == cpu_lib
    assert not marker.exists()
    assert _ext.cuda_build_error().endswith("not marked as failed (memory, disk or a folder not writable): the "
                                            "next process tries their build again")
    monkeypatch.setitem(_ext._state, "cuda_error", None)  # the next process builds it again
    with pytest.warns(RuntimeWarning):
        _ext._jit_build(CSRC)
    assert calls == [True, False, True] and not marker.exists()


def test_a_cuda_build_that_failed_while_waiting_is_not_tried_again(monkeypatch, tmp_path):
    """The ranks of a torchrun job wait on the first one's build: when it fails, each would try it again, one
    after another, minutes each. The marker is read again once the lock is held."""
    calls = _fake_builds(monkeypatch, tmp_path, "not reached")
    marker = _ext.build_directory(CSRC, with_cuda=True) / _ext.CUDA_FAILED_FILE
    real_lock = _ext._build_lock

    @contextlib.contextmanager
    def lock_after_the_others_failure(build_dir):
        if build_dir == marker.parent:
            marker.write_text(f"{_ext.BUILD_FAILED}nvcc was killed (the other rank's build)\n")
        with real_lock(build_dir):
            yield

    monkeypatch.setattr(_ext, "_build_lock", lock_after_the_others_failure)
    with pytest.warns(RuntimeWarning, match="the other rank's build"):
        _ext._jit_build(CSRC)
    assert calls == [False]
    assert _ext.cuda_build_error().startswith("nvcc was killed (the other rank's build); remove ")


def test_the_build_errors_gist_keeps_nvccs_fatal_line():
    """nvcc gives an architecture it does not know as "nvcc fatal", without the word error: the reason must
    still carry it, not only torch's "Error building extension" (as seen with nvcc 13 and 5.0)."""
    err = RuntimeError("Error building extension 'fastmaml_cpu': [1/14] /usr/local/cuda/bin/nvcc --generate-"
                       "dependencies-with-compile -c a.cu -o a.cuda.o\nFAILED: a.cuda.o\n/usr/local/cuda/bin/nvcc "
                       "-gencode=arch=compute_50,code=sm_50 -c a.cu\nnvcc fatal   : Unsupported gpu architecture "
                       "'compute_50'\nninja: build stopped: subcommand failed.")
    assert _ext._short(err) == ("Error building extension 'fastmaml_cpu' | nvcc fatal   : Unsupported gpu "
                                "architecture 'compute_50'")


def test_a_cpu_only_torch_never_tries_the_cuda_build(monkeypatch, tmp_path):
    calls = _fake_builds(monkeypatch, tmp_path, "not reached")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _ext._jit_build(CSRC) == _ext.build_directory(CSRC, with_cuda=False) / f"{_ext.LIB_NAME}.so"
    assert calls == [False] and _ext.cuda_build_error() is None


def test_nvcc_without_the_cuda_headers_builds_without_cuda_kernels(monkeypatch, tmp_path):
    """nvcc on PATH as a wrapper script (/usr/local/bin/nvcc) and CUDA_HOME unset: torch guesses
    CUDA_HOME=/usr/local, where nvcc is but cuda_runtime.h is not. A CUDA build would fail on the header
    and take the CPU kernels down with it; the extension is built without its CUDA kernels instead, and
    the reason names CUDA_HOME."""
    from torch.utils import cpp_extension

    wrapper_home = tmp_path / "usr_local"
    (wrapper_home / "bin").mkdir(parents=True)
    (wrapper_home / "bin" / "nvcc").write_text("#!/bin/sh\nexec /opt/cuda/bin/nvcc \"$@\"\n")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper_home))
    _fake_cards(monkeypatch, [(9, 0)])
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_ext, "_SYSTEM_INCLUDE_DIRS", ())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert _ext.find_nvcc() == str(wrapper_home / "bin" / "nvcc")
    assert _ext.find_cuda_header() is None
    why = _ext.cuda_build_unavailable(CSRC)
    assert why is not None and "cuda_runtime.h" in why and f"CUDA_HOME={wrapper_home}" in why
    assert "torch's guess" in why
    assert _ext.build_directory(CSRC) == _ext.build_directory(CSRC, with_cuda=False)  # what the JIT builds
    monkeypatch.setenv("CUDA_HOME", str(wrapper_home))
    assert "as set in the environment" in _ext.cuda_build_unavailable(CSRC)

    # The header where the compiler is told to look, by CPATH or in CUDA_HOME: built with CUDA kernels.
    headers = tmp_path / "cuda_include"
    headers.mkdir()
    (headers / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CPATH", f"/nonexistent{os.pathsep}{headers}")
    assert _ext.find_cuda_header() == str(headers / "cuda_runtime.h")
    assert _ext.cuda_build_unavailable(CSRC) is None
    monkeypatch.delenv("CPATH")
    (wrapper_home / "include").mkdir()
    (wrapper_home / "include" / "cuda_runtime.h").write_text("")
    assert _ext.cuda_build_unavailable(CSRC) is None
    assert _ext.build_directory(CSRC) == _ext.build_directory(CSRC, with_cuda=True)


def test_the_announced_build_time_follows_the_compile_jobs(monkeypatch):
    """A build with CUDA kernels took 366-404 s on 2 cores: the line printed before it must not promise the
    many-core figure there."""
    assert _ext.build_seconds_estimate(False) == _ext.BUILD_SECONDS
    monkeypatch.setenv("MAX_JOBS", "2")
    assert 300 <= _ext.build_seconds_estimate(True) <= 500
    monkeypatch.setenv("MAX_JOBS", "16")
    assert _ext.build_seconds_estimate(True) == _ext.BUILD_SECONDS + _ext.CUDA_BUILD_SECONDS
    monkeypatch.setenv("MAX_JOBS", "not a number")  # torch would refuse it; the estimate counts cores
    assert _ext.build_seconds_estimate(True) >= _ext.BUILD_SECONDS + _ext.CUDA_BUILD_SECONDS


# ---- unit tests: the cuda backend's availability ---------------------------------------------------------


def _as_on_a_gpu_machine(monkeypatch, kernels: bool, library: str, prebuilt: bool) -> None:
    """torch a CUDA build with a visible GPU, the extension loaded from `library`, nvcc absent."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _hide_nvcc(monkeypatch)
    monkeypatch.setattr(_ext, "unavailable", lambda: None)
    monkeypatch.setitem(_ext._state, "cuda_error", None)  # whatever this process's own build did
    monkeypatch.setattr(_ext, "library_path", lambda: library)
    monkeypatch.setattr(_ext, "library_is_prebuilt", lambda: prebuilt)
    monkeypatch.setattr(cuda_backend, "cuda_kernels_registered", lambda op="maml_fwd": kernels)


def test_cuda_backend_runs_a_library_with_cuda_kernels_without_nvcc(monkeypatch):
    _as_on_a_gpu_machine(monkeypatch, kernels=True, library="/site/fastmaml/_C.so", prebuilt=True)
    assert cuda_backend.build_unavailable() is not None  # this machine could not build them ...
    assert cuda_backend.CudaBackend().unavailable() is None  # ... but the loaded library has them


@pytest.mark.parametrize("prebuilt", [True, False], ids=["prebuilt", "jit"])
def test_cuda_backend_says_why_the_library_has_no_cuda_kernels(monkeypatch, prebuilt):
    library = "/site/fastmaml/_C.so" if prebuilt else "/cache/fastmaml_0123456789abcdef_cpu/fastmaml_cpu.so"
    _as_on_a_gpu_machine(monkeypatch, kernels=False, library=library, prebuilt=prebuilt)
    why = cuda_backend.CudaBackend().unavailable()
    assert isinstance(why, str) and "no CUDA kernels" in why and library in why
    assert "nvcc" in why  # the build's missing nvcc is the likely cause, and named
    if prebuilt:
        assert "FASTMAML_BUILD_EXT=1" in why


def test_cuda_backend_gives_the_failed_cuda_build_as_its_reason(monkeypatch):
    library = "/cache/fastmaml_0123456789abcdef_cpu/fastmaml_cpu.so"
    _as_on_a_gpu_machine(monkeypatch, kernels=False, library=library, prebuilt=False)
    failure = ("Error building extension 'fastmaml_cpu' | nvcc fatal : Unsupported gpu architecture 'compute_90a'; "
               "remove /cache/x/fastmaml.cuda_failed to try their build again")
    monkeypatch.setattr(_ext, "cuda_build_error", lambda: failure)
    why = cuda_backend.CudaBackend().unavailable()
    assert "their build failed" in why and failure in why


def test_cuda_backend_checks_torch_then_the_gpu_first(monkeypatch):
    _as_on_a_gpu_machine(monkeypatch, kernels=True, library="/site/fastmaml/_C.so", prebuilt=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in cuda_backend.CudaBackend().unavailable()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_backend.CudaBackend().unavailable()


# ---- the prebuilt wheel on a machine without compilers -------------------------------------------------


def _build_prerequisite_missing() -> str | None:
    if os.name == "nt":
        return "the isolated run links the Python executable and looks for fastmaml/_C*.so (POSIX only)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH): the wheel's extension cannot be built"
    if shutil.which("ninja", path=_build_path()) is None:
        return "ninja is not installed (setup.py builds the extension with ninja)"
    for dist in ("pip", "setuptools"):
        # Asked of the installed metadata: importlib.util.find_spec("pip") would switch off setuptools'
        # distutils shim in this process (its finder takes any lookup of pip for pip running).
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed in {sys.prefix} (needed to build and install the wheel)"
    return None


def _build_path() -> str:
    """PATH for the wheel build: this interpreter's bin folder first (ninja installed with torch's deps)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{output}"
    return proc


@pytest.fixture(scope="module")
def prebuilt_site(tmp_path_factory) -> Path:
    """The wheel built with FASTMAML_BUILD_EXT=1, installed with `pip install --target`: its folder."""
    why = _build_prerequisite_missing()
    if why is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("prebuilt")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGING_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    for name in PACKAGING_DIRS:
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.pyd", "*.egg-info"))
    env = {**os.environ, "FASTMAML_BUILD_EXT": "1", "PATH": _build_path(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    if torch.version.cuda and _ext.find_nvcc() and not env.get("TORCH_CUDA_ARCH_LIST"):
        # Set before the build decides: without a GPU and without a list, setup.py stops on the missing
        # architecture (it would otherwise ship a library without CUDA kernels).
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    wheels = tmp / "wheels"
    start = time.perf_counter()
    # --no-index: the project is given as a path; nothing is fetched from an index.
    _run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-build-isolation", "--no-deps",
          "-w", str(wheels), str(src)], "building the wheel with FASTMAML_BUILD_EXT=1", env=env, cwd=tmp)
    built = sorted(wheels.glob("fastmaml-*.whl"))
    assert len(built) == 1, f"expected one fastmaml wheel in {wheels}, found {built}"
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site), str(built[0])],
         "installing the wheel", env=env, cwd=tmp)
    print(f"built and installed {built[0].name} in {time.perf_counter() - start:.1f} s")
    libraries = sorted((site / "fastmaml").glob("_C*.so"))
    assert len(libraries) == 1, f"the wheel holds no prebuilt fastmaml/_C*.so: {sorted((site / 'fastmaml').iterdir())}"
    assert (site / "fastmaml" / "csrc" / "fastmaml.cpp").is_file(), "the wheel does not ship the C++ sources"
    # setup.py embeds the hash of the sources it ships, as _ext.py computes it where they are installed.
    assert _ext._embedded_hash(libraries[0]) == _ext.source_hash(site / "fastmaml" / "csrc")
    return site


# Run in the isolated subprocess: argv = site, "sources" | "no-sources".
CHECK_SCRIPT = r'''
import json, os, shutil, sys, warnings
from pathlib import Path

site, sources = Path(sys.argv[1]).resolve(), sys.argv[2] == "sources"
ext_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"])
missing = [tool for tool in %(tools)r if shutil.which(tool)]
assert not missing, f"build tools still on PATH: {missing}"

import torch
import fastmaml
from fastmaml import _ext, dispatch
from fastmaml.backends import cuda as cuda_backend

assert Path(fastmaml.__file__).resolve().is_relative_to(site), (
    f"imported {fastmaml.__file__}, not the installed wheel in {site} (sys.path={sys.path})")
expected_csrc = site / "fastmaml" / "csrc" if sources else None
assert _ext.csrc_dir() == expected_csrc, (_ext.csrc_dir(), expected_csrc)

torch.manual_seed(0)
dtype = torch.float64
dims = [3, 16, 16, 2]
params = []
for d_in, d_out in zip(dims[:-1], dims[1:]):
    params += [(torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5).requires_grad_(),
               (0.1 * torch.randn(d_out, dtype=dtype)).requires_grad_()]
T, Ns, Nq = 5, 6, 7
xs, ys = torch.randn(T, Ns, 3, dtype=dtype), torch.randn(T, Ns, 2, dtype=dtype)
xq, yq = torch.randn(T, Nq, 3, dtype=dtype), torch.randn(T, Nq, 2, dtype=dtype)

def train_step(backend):
    out = fastmaml.maml(params, xs, ys, xq, yq, inner_steps=2, inner_lr=0.05, backend=backend)
    return out, torch.autograd.grad(out.loss, params)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, grads = train_step("cpu")
    ref, ref_grads = train_step("reference")
ignored = [str(w.message) for w in caught if "prebuilt" in str(w.message)]
assert not ignored, ignored
assert out.backend == "cpu", out.backend

library = Path(_ext.library_path() or "")
assert library.parent == site / "fastmaml" and library.name.startswith("_C"), f"loaded {library}"
assert _ext.library_is_prebuilt()
loss_err = abs(out.loss.item() - ref.loss.item())
grad_err = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
assert loss_err <= 1e-10 and grad_err <= 1e-10, (loss_err, grad_err)
assert ext_dir.is_dir() and not any(ext_dir.iterdir()), f"something was built: {list(ext_dir.rglob('*'))}"

kernels = cuda_backend.cuda_kernels_registered()
cuda_why = dispatch.get_backend("cuda").unavailable()
if kernels and torch.cuda.is_available():
    assert cuda_why is None, cuda_why  # a wheel with CUDA kernels runs here without nvcc
else:
    assert cuda_why, "the cuda backend cannot run here but gives no reason"
print("RESULT " + json.dumps({"library": str(library), "grad_err": grad_err, "loss_err": loss_err,
                              "cuda_kernels": kernels, "cuda_unavailable": cuda_why}))
''' % {"tools": BUILD_TOOLS}


def _isolated_env(tmp: Path, site: Path) -> tuple[dict, Path, Path]:
    """Environment of a machine without build tools: PATH holds only a link to Python."""
    bin_dir, ext_dir, cwd = tmp / "bin", tmp / "torch_extensions", tmp / "cwd"
    for folder in (bin_dir, ext_dir, cwd):
        folder.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CXX", "CC", "CUDA_HOME", "CUDA_PATH", "PYTHONHOME", "PYTHONSTARTUP")
           and not k.startswith("FASTMAML_")}
    env.update(PATH=str(bin_dir), PYTHONPATH=str(site), TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONNOUSERSITE="1")
    return env, ext_dir, cwd


def _run_isolated(tmp: Path, site: Path, sources: bool) -> dict:
    env, ext_dir, cwd = _isolated_env(tmp, site)
    script = cwd / "check_prebuilt.py"
    script.write_text(CHECK_SCRIPT)
    # The interpreter by its own path (a link elsewhere would lose its virtual environment, and torch).
    proc = subprocess.run([sys.executable, str(script), str(site), "sources" if sources else "no-sources"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the prebuilt library did not run without build tools:\n{output[-6000:]}"
    assert "building the C++ extension" not in output, output[-6000:]
    assert not any(ext_dir.iterdir()), f"something was built in {ext_dir}: {list(ext_dir.rglob('*'))}"
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    print(result)
    return result


def test_prebuilt_runs_without_build_tools(prebuilt_site, tmp_path):
    """With the shipped sources beside it: their hash matches the library's, so it is loaded as is."""
    _run_isolated(tmp_path, prebuilt_site, sources=True)


def test_prebuilt_runs_without_sources(prebuilt_site, tmp_path):
    """Without fastmaml/csrc: the library is used, nothing to compare it with."""
    site = tmp_path / "site"
    shutil.copytree(prebuilt_site, site, symlinks=True)
    shutil.rmtree(site / "fastmaml" / "csrc")
    _run_isolated(tmp_path, site, sources=False)


MISMATCH_SCRIPT = r'''
import warnings
from fastmaml import _ext

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    why = _ext.unavailable()
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert any("ignoring the prebuilt library" in m for m in messages), messages
assert why is not None and "no C++ compiler" in why, why
# The rejected library was not loaded (its static initialisers would have registered the ops).
assert not _ext._ops_registered(), "the rejected prebuilt library registered the fastmaml ops"
print("MISMATCH OK")
'''


def test_prebuilt_from_other_sources_is_ignored_with_a_warning(prebuilt_site, tmp_path):
    """Sources that changed since the wheel was built: the library is not used, a warning says so, and
    without a compiler the extension is unavailable with that reason."""
    site = tmp_path / "site"
    shutil.copytree(prebuilt_site, site, symlinks=True)
    header = site / "fastmaml" / "csrc" / "maml_task.h"
    header.write_text(header.read_text() + "\n// edited after the wheel was built\n")
    env, ext_dir, cwd = _isolated_env(tmp_path, site)
    script = cwd / "check_mismatch.py"
    script.write_text(MISMATCH_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)
    assert proc.returncode == 0 and "MISMATCH OK" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
