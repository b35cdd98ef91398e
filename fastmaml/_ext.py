"""Building and loading fastmaml's C++ extension (the `torch.ops.fastmaml.*` operations).

The extension is a shared library that registers the op schemas and the CPU kernels with the
dispatcher (`csrc/fastmaml.cpp`); it is not a Python module. It comes from one of two places:

- a prebuilt library `fastmaml/_C*.so`, made by `FASTMAML_BUILD_EXT=1 pip install --no-build-isolation .`
  (setup.py), used when it was built from the same sources as the ones shipped beside it (the hash it
  embeds, `fastmaml_source_hash()`, equals `source_hash` of those sources) or when no sources are
  shipped. The hash does not depend on this machine's compilers, so a wheel built where nvcc was found
  is still used where it is not: nothing is compiled, and no compiler is needed;
- otherwise a build on first use with `torch.utils.cpp_extension.load` (ninja) against the installed
  torch (with the CUDA kernels of csrc/cuda/ when torch is a CUDA build and nvcc is found: decided
  from the compiler and torch, and from the visible cards only where TORCH_CUDA_ARCH_LIST is unset;
  see `cuda_build_unavailable`), into `$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`),
  in a folder named by the source hash, by whether the build has the CUDA kernels and by their
  architectures (`build_directory`). Later processes load that library directly: nothing is rebuilt
  until one of those changes. Where the CUDA kernels fail to build, the library is built without them
  (`cuda_build_error` says why, and the cuda backend with it).

Whether the loaded library has CUDA kernels is asked of the dispatcher after loading
(fastmaml/backends/cuda.py, `cuda_kernels_registered`), not inferred from nvcc.

Nothing happens at import; `load()` builds or loads once per process and registers the fake (meta)
kernels and the autograd formula. `unavailable()` returns why the extension cannot be had (no compiler,
a build error), or `None`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("fastmaml")

_PACKAGE_DIR = Path(__file__).resolve().parent
# The editable checkout's top-level csrc/, then the copy that setup.py ships inside the package.
_CSRC_CANDIDATES = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc")
_SOURCES = ("fastmaml.cpp", "autograd_fwdbwd.cpp", "cpu/maml_cpu.cpp", "cpu/task_loops_baseline.cpp",
            "cpu/task_loops_avx2.cpp", "cpu/onestep_cpu.cpp")
# The kernels come in one file per reverse-sweep family and dtype, and one each for the float reverse
# sweep's 4- and 6-block variants and its barrier timeline, which ninja compiles in parallel
# (csrc/cuda/kernels.cuh says why).
_CUDA_SOURCES = ("cuda/maml_cuda.cu", "cuda/bwd_f32.cu", "cuda/bwd_f32_min4.cu", "cuda/bwd_f32_min6.cu",
                 "cuda/bwd_f32_timeline.cu", "cuda/bwd_f64.cu", "cuda/fwdbwd_f32.cu", "cuda/fwdbwd_f64.cu",
                 "cuda/lowrank_cuda.cu", "cuda/onestep.cu",
                 "cuda/binding.cpp", "cuda/lowrank_binding.cpp", "cuda/onestep_binding.cpp")
# Every file the library can be built from, CPU and CUDA alike (whichever are shipped): `source_hash`
# hashes them all, whether or not this machine can compile the CUDA ones.
_HASHED_GLOBS = ("*.h", "*.cpp", "task/*.h", "cpu/*.h", "cpu/*.cpp", "cpu/*.inc")
_CUDA_HASHED_GLOBS = ("cuda/*.h", "cuda/*.cuh", "cuda/*.cu", "cuda/*.cpp")
# Portable flags: the library may be shared between machines (no -march=native), and the kernels must
# match the float64 reference to ~1e-12, so no -ffast-math.
#
# OpenMP: with torch's OpenMP backend, at::parallel_for is an inline `#pragma omp parallel` in torch's
# headers, so a library compiled without -fopenmp runs every loop on one thread. With the flag the
# extension shares torch's OpenMP runtime (torch/lib/libgomp.so.1, found by soname), so
# torch.set_num_threads governs the kernels too. Linux gcc/clang; elsewhere the loops run serially.
OPENMP_FLAGS = ("-fopenmp",) if (sys.platform.startswith("linux") and torch._C.has_openmp) else ()
CFLAGS = ("-O3", *OPENMP_FLAGS)
LDFLAGS = OPENMP_FLAGS
# nvcc: no --use_fast_math for the same reason (float64 kernels must match the float64 reference). The
# GPU architectures come from TORCH_CUDA_ARCH_LIST, else from the visible GPU (torch's defaults).
# -lineinfo: line tables only, so that ncu's source view (the GPU check) gives each source line its
# instructions executed and stall samples; the code is the same (sm_90a -O3: onestep.cu's and bwd_f32.cu's
# disassembly identical with and without it, 83,360 and 165,379 lines).
CUDA_FLAGS = ("-O3", "-lineinfo")
LIB_NAME = "fastmaml_cpu"
# Printed before a build: the time of a build on 2 idle cores (benchmarks/RESULTS.md; ninja builds the
# files two at a time; the C++ autograd kernels' torch headers are the slowest).
BUILD_SECONDS = 30
# Added when the CUDA kernels are built: about CUDA_CORE_SECONDS of compiling spread over ninja's jobs, and
# never under CUDA_BUILD_SECONDS, the slowest file's time alone. Measured on this project's 2-core machine
# (benchmarks/RESULTS.md, 2026-12-03): the ten CUDA files 116-150 s each for the large ones, the whole build
# with CUDA kernels 366-404 s. The H200 machine (16 cores) built them in 110-116 s when they were one file.
CUDA_BUILD_SECONDS = 150
CUDA_CORE_SECONDS = 750

# The embedded source hash as it appears in a library's bytes: the literal "h<hash>" with its NUL.
_EMBEDDED_HASH = re.compile(rb"h([0-9a-f]{16})\0")

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "path": None, "cuda_error": None}


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message says why."""


def csrc_dir() -> Optional[Path]:
    """The folder holding the C++ sources (`fastmaml.cpp`, `maml_task.h`, `cpu/`), or None."""
    for path in _CSRC_CANDIDATES:
        if (path / "fastmaml.cpp").is_file():
            return path
    return None


def find_nvcc() -> Optional[str]:
    """The nvcc a CUDA build would use (torch's CUDA_HOME: $CUDA_HOME, nvcc on PATH, /usr/local/cuda)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    return str(nvcc) if nvcc.is_file() else None


# Folders the C++ compiler searches without being told (gcc and clang on Linux).
_SYSTEM_INCLUDE_DIRS = ("/usr/local/include", "/usr/include")


def find_cuda_header() -> Optional[str]:
    """The `cuda_runtime.h` the C++ half of a CUDA build would include, or None.

    torch compiles the bindings with g++ and `-I $CUDA_HOME/include` (and `$CUDA_INC_PATH`). When
    CUDA_HOME is unset and nvcc on PATH is a wrapper script (say /usr/local/bin/nvcc), torch guesses
    CUDA_HOME from the script's folder (/usr/local): nvcc is found there, the header is not, and the
    whole build, CPU kernels included, would fail on a missing header. Asking first lets the extension
    be built without its CUDA kernels instead, with a reason that names CUDA_HOME."""
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = [os.path.join(CUDA_HOME, "include")] if CUDA_HOME is not None else []
    for var in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    for d in (*dirs, *_SYSTEM_INCLUDE_DIRS):
        header = Path(d) / "cuda_runtime.h"
        if header.is_file():
            return str(header)
    return None


def cuda_build_unavailable(csrc: Optional[Path] = None) -> Optional[str]:
    """Why the C++ extension is built without its CUDA kernels here (a CPU-only torch, no nvcc, no CUDA
    headers where the compiler would look, no csrc/cuda sources, no architecture to compile for), or None
    when it is built with them (and `cuda_build_error` says whether that build failed)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (the CUDA kernels need a CUDA build of torch)"
    nvcc = find_nvcc()
    if nvcc is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit, or put nvcc on PATH) to build the CUDA kernels"
    if find_cuda_header() is None:
        from torch.utils.cpp_extension import CUDA_HOME

        origin = ("as set in the environment" if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
                  else f"torch's guess from {nvcc}")
        return (f"no cuda_runtime.h where the build would look: not in {os.path.join(CUDA_HOME, 'include')} "
                f"(CUDA_HOME={CUDA_HOME}, {origin}) nor in CUDA_INC_PATH, CPATH or the system folders; set "
                "CUDA_HOME to the CUDA toolkit (the folder holding bin/nvcc and include/) to build the CUDA kernels")
    csrc = csrc if csrc is not None else csrc_dir()
    if csrc is None or not all((csrc / s).is_file() for s in _CUDA_SOURCES):
        return "the CUDA kernel sources (csrc/cuda/) are not shipped with this installation"
    if _architecture_list() is None:
        # torch compiles for the visible cards, and with none its build stops on an IndexError: the usual
        # CUDA wheel on a machine without a GPU (a login node with a CUDA toolkit) lost its CPU kernels
        # with it.
        cards, error = visible_capabilities()
        if error is not None:
            return (f"{NO_ARCHITECTURE}: TORCH_CUDA_ARCH_LIST is unset and the visible cards' capabilities could "
                    f"not be read ({error}); {_SET_THE_LIST}")
        if not cards:
            return f"{NO_ARCHITECTURE}: TORCH_CUDA_ARCH_LIST is unset and no GPU is visible; {_SET_THE_LIST}"
    return None


# The start of `cuda_build_unavailable`'s reason when only the architectures are missing (setup.py stops on
# it: a prebuilt library would silently lack the CUDA kernels).
NO_ARCHITECTURE = "no architecture to compile the CUDA kernels for"
_SET_THE_LIST = ("set TORCH_CUDA_ARCH_LIST to the cards' (9.0a for an H100 or H200, 8.0 for an A100) to build "
                 "them here")


def _architecture_list() -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST where it names architectures; None where torch reads it as unset (unset, empty
    or "native": it then compiles for the visible cards)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    return listed if listed and listed != "native" else None


def visible_capabilities() -> tuple[list[tuple[int, int]], Optional[str]]:
    """The visible cards' compute capabilities and None, or what was read and why it could not be.

    Read through NVML while CUDA is not initialised in this process (loading the library must not start
    CUDA: a process that forks workers using CUDA would fail), with the device indices mapped as torch's
    NVML-based queries map them; through torch otherwise, or where NVML does not answer."""
    try:
        count = torch.cuda.device_count()  # NVML first in torch: it starts no CUDA either
    except Exception as err:  # noqa: BLE001 (a driver that cannot answer: no capabilities, and why)
        return [], f"{type(err).__name__}: {err}"
    if count == 0:
        return [], None
    if not torch.cuda.is_initialized():
        try:
            found = _nvml_capabilities(count)
        except Exception:  # noqa: BLE001 (no NVML library, an old torch without the index mapping)
            found = None
        if found is not None:
            return found, None
    try:
        return [tuple(torch.cuda.get_device_capability(i)) for i in range(count)], None
    except Exception as err:  # noqa: BLE001 (a forked child of a CUDA parent, a driver too old for torch)
        return [], f"{type(err).__name__}: {err}"


def _nvml_capabilities(count: int) -> Optional[list[tuple[int, int]]]:
    """The first `count` visible cards' capabilities from NVML, or None where it does not answer."""
    from ctypes import CDLL, byref, c_int, c_void_p

    nvml = CDLL("libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() != 0:
        return None
    found = []
    for i in range(count):
        handle, major, minor = c_void_p(), c_int(), c_int()
        if nvml.nvmlDeviceGetHandleByIndex_v2(torch.cuda._get_nvml_device_index(i), byref(handle)) != 0:
            return None
        if nvml.nvmlDeviceGetCudaComputeCapability(handle, byref(major), byref(minor)) != 0:
            return None
        found.append((major.value, minor.value))
    return found


def cuda_architectures() -> Optional[str]:
    """What a CUDA build compiles for: TORCH_CUDA_ARCH_LIST where it names architectures, else the visible
    cards' capabilities (`visible_capabilities`), `"visible:8.0;9.0"`, or None when there are none."""
    listed = _architecture_list()
    if listed is not None:
        return listed
    cards, _ = visible_capabilities()
    return "visible:" + ";".join(f"{major}.{minor}" for major, minor in sorted(set(cards))) if cards else None


def source_hash(csrc: Path) -> str:
    """The identity of a library built from `csrc`: a hash of every source file it can be built from
    (CPU and CUDA), the torch and Python versions and the compiler flags (CFLAGS and CUDA_FLAGS).

    It does not depend on this machine's compilers (whether nvcc is found) nor on the GPU, so a
    prebuilt library embeds the same value on the machine that built it (setup.py) as the one computed
    where it is installed. Whether a JIT build has the CUDA kernels is in its folder's name
    (`build_directory`) instead."""
    h = hashlib.sha256()
    patterns = _HASHED_GLOBS + _CUDA_HASHED_GLOBS
    files = sorted({p for pattern in patterns for p in csrc.glob(pattern) if p.is_file()})
    for path in files:
        rel = path.relative_to(csrc).as_posix().encode()
        data = path.read_bytes()
        h.update(b"%d:%s%d:" % (len(rel), rel, len(data)))  # lengths: no two file sets hash alike
        h.update(data)
    h.update(f"torch={torch.__version__};python={sys.version_info[:2]};flags={CFLAGS};"
             f"cuda_flags={CUDA_FLAGS}".encode())
    return h.hexdigest()[:16]


def source_hash_flag(csrc: Path) -> str:
    """The compiler flag that embeds `source_hash(csrc)` in the library (setup.py and the JIT build)."""
    return f"-DFASTMAML_SOURCE_HASH=h{source_hash(csrc)}"


def _cache_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_extensions"


def build_directory(csrc: Path, with_cuda: Optional[bool] = None) -> Path:
    """Where the JIT build of these sources lives: `fastmaml_<source_hash>_cpu` for a build without the
    CUDA kernels, `fastmaml_<source_hash>_cu<CUDA version>_<hash of the architectures>` for one with
    them (`cuda_architectures`). `with_cuda` defaults to what this machine builds
    (`cuda_build_unavailable(csrc) is None`)."""
    if with_cuda is None:
        with_cuda = cuda_build_unavailable(csrc) is None
    name = f"fastmaml_{source_hash(csrc)}"
    if with_cuda:
        cuda = (torch.version.cuda or "unknown").replace(".", "")
        # Without TORCH_CUDA_ARCH_LIST torch compiles for the visible cards: their capabilities name the
        # folder, so a cache shared by an A100 and an H100 machine keeps one build for each (an sm_90
        # build loaded on an A100 has no kernel image for it).
        arch = hashlib.sha256((cuda_architectures() or "").encode()).hexdigest()[:8]
        return _cache_root() / f"{name}_cu{cuda}_{arch}"
    return _cache_root() / f"{name}_cpu"


def _prebuilt() -> Optional[Path]:
    found = sorted(glob.glob(str(_PACKAGE_DIR / "_C*.so")) + glob.glob(str(_PACKAGE_DIR / "_C*.pyd")))
    return Path(found[0]) if found else None


def _embedded_hash(path: Path) -> Optional[str]:
    """The source hash a prebuilt library was compiled with (`fastmaml_source_hash()` returns it), read
    from the file's bytes, or None when none is found.

    The library is not loaded to ask it: loading runs its static initialisers, which register the
    `fastmaml` ops with the dispatcher, and a JIT-built library loaded after a rejected prebuilt one
    would then fail to register them again. The hash is a string literal `h<16 hex digits>` in the
    library's read-only data (csrc/fastmaml.cpp, `-DFASTMAML_SOURCE_HASH=h<hash>`)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    found = _EMBEDDED_HASH.search(data)
    return found.group(1).decode() if found else None


def _has_embedded_hash(path: Path, expected: str) -> bool:
    """Whether the prebuilt library at `path` embeds `expected` (see `_embedded_hash`)."""
    try:
        # The digits and their NUL: the compiler may keep the literal without its leading "h".
        return expected.encode() + b"\0" in path.read_bytes()
    except OSError:
        return False


def _ops_registered() -> bool:
    try:
        torch.ops.fastmaml.maml_fwd  # noqa: B018 (attribute lookup raises when the schema is absent)
        return True
    except (AttributeError, RuntimeError):
        return False


def _short(err: BaseException, lines: int = 3, limit: int = 800) -> str:
    """The gist of a build error: its first line and the compiler's first `error` lines (not the long
    command lines before them), cut to `limit` characters."""
    text = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not text:
        return type(err).__name__
    # nvcc reports some failures (an architecture it does not know) as "nvcc fatal", without "error".
    errors = [ln for ln in text[1:] if ("error" in ln.lower() or ln.startswith("nvcc fatal"))
              and not ln.startswith(("c++ ", "g++ ", "FAILED"))]
    errors = list(dict.fromkeys(errors))  # the same header error arrives once per file that includes it
    out = " | ".join([text[0].split(": [1/")[0]] + errors[:lines])
    return out if len(out) <= limit else out[: limit - 3] + "..."


# How a failed build's error begins (`_run_build`); a failed CUDA build's reason is given without it.
BUILD_FAILED = "building the C++ extension failed: "
# Written into a CUDA build's folder when its build fails: later processes of the same sources, torch and
# architectures then build and load the library without CUDA kernels at once, instead of spending the
# CUDA build's minutes on the same failure each time.
CUDA_FAILED_FILE = "fastmaml.cuda_failed"
# A build that failed for the machine's state rather than for the sources or the toolkit (a compiler killed
# for memory, a full disk) is not marked: the next process's build may well succeed. The texts are gcc's,
# nvcc's and the kernel's for those causes.
_TRANSIENT_FAILURES = ("killed signal", "died due to signal", "signal 9", "no space left on device",
                       "cannot allocate memory", "out of memory", "virtual memory exhausted")


def _transient_failure(err: BaseException) -> bool:
    """Whether a failed build's error (the compiler's whole output, kept as its cause) reads as the machine's
    state at the time: memory or disk, not a fault every later build would repeat."""
    text = str(err.__cause__ if err.__cause__ is not None else err).lower()
    return any(sign in text for sign in _TRANSIENT_FAILURES)


def cuda_build_error() -> Optional[str]:
    """Why this process's library has no CUDA kernels although they could be built here: their build
    failed (in this process, or in an earlier one that left `CUDA_FAILED_FILE`), or None."""
    return _state["cuda_error"]


def _jit_build(csrc: Path) -> Path:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionUnavailable(f"no C++ compiler found ({compiler!r} is not on PATH; set CXX or install g++)")
    if cuda_build_unavailable(csrc) is None:
        cuda_dir = build_directory(csrc, with_cuda=True)
        failed = cuda_dir / CUDA_FAILED_FILE
        try:
            return _build_in(csrc, cuda_dir, with_cuda=True, failed=failed)
        except ExtensionUnavailable as err:
            reason = str(err).removeprefix(BUILD_FAILED)
        # The CPU kernels do not need the CUDA ones: a failed nvcc (too old for these kernels, out of
        # memory) must not take them down. The cuda backend gives this reason as its own.
        retry = (f"remove {failed} to try their build again" if failed.is_file()
                 else "not marked as failed (memory, disk or a folder not writable): the next process tries "
                      "their build again")
        _state["cuda_error"] = f"{reason}; {retry}"
        warnings.warn(f"fastmaml: the CUDA kernels failed to build, so the C++ extension is built without "
                      f"them: {_state['cuda_error']}", RuntimeWarning, stacklevel=4)
    return _build_in(csrc, build_directory(csrc, with_cuda=False), with_cuda=False)


def _build_in(csrc: Path, build_dir: Path, with_cuda: bool, failed: Optional[Path] = None) -> Path:
    """The library in `build_dir`, built there first unless a finished build is found. With `failed`, a
    failed build leaves its error in that file, and while the file exists the build is not tried again:
    ExtensionUnavailable with the error it holds (also for the processes that waited on the failed build:
    the ranks of a torchrun job would otherwise fail the same build one after another). A build that failed
    for memory or disk (`_transient_failure`) leaves no file."""
    lib = build_dir / f"{LIB_NAME}.so"
    stamp = build_dir / "fastmaml.ok"

    def failed_before() -> None:
        if failed is not None and failed.is_file():
            try:
                text = failed.read_text().strip()
            except OSError as err:
                text = f"(its error could not be read: {err})"
            raise ExtensionUnavailable(text or "(no error recorded)")

    if lib.is_file() and stamp.is_file():
        return lib
    failed_before()
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir):
        if lib.is_file() and stamp.is_file():  # another process built it while this one waited
            return lib
        failed_before()  # or failed to
        # torch's own lock file: left behind when a build is killed, it would make every later process
        # wait forever. Under our lock no other process is building here, so any such file is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            return _run_build(csrc, build_dir, stamp, with_cuda)
        except ExtensionUnavailable as err:
            if failed is not None and not _transient_failure(err):
                with contextlib.suppress(OSError):  # a folder this process cannot write: the next one tries again
                    partial = failed.with_name(f"{failed.name}.{os.getpid()}")
                    partial.write_text(f"{err}\n")
                    os.replace(partial, failed)  # whole or absent for a reader outside the lock
            raise


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An exclusive lock on the build folder held by this process: the OS releases it if the process
    dies, so a killed build never blocks the next one (unlike a lock file that must be deleted)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; builds rely on torch's lock file alone
        yield
        return
    with open(build_dir / "fastmaml.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_seconds_estimate(with_cuda: bool) -> int:
    """The time a first-use build is announced to take: ninja runs `MAX_JOBS` compiles at once (torch's
    setting), else one a core this process may use."""
    if not with_cuda:
        return BUILD_SECONDS
    jobs = os.environ.get("MAX_JOBS", "")
    if jobs.isdigit() and int(jobs) > 0:
        cores = int(jobs)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return BUILD_SECONDS + max(CUDA_BUILD_SECONDS, CUDA_CORE_SECONDS // cores)


def _run_build(csrc: Path, build_dir: Path, stamp: Path, with_cuda: bool) -> Path:
    from torch.utils import cpp_extension

    sources = [*_SOURCES, *(_CUDA_SOURCES if with_cuda else ())]
    seconds = build_seconds_estimate(with_cuda)
    print(f"fastmaml: building the C++ extension{' with its CUDA kernels' if with_cuda else ''} "
          f"(once, ~{seconds} s) in {build_dir} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    hash_flag = source_hash_flag(csrc)
    try:
        path = cpp_extension.load(
            name=LIB_NAME,
            sources=[str(csrc / s) for s in sources],
            extra_cflags=[*CFLAGS, hash_flag],
            extra_ldflags=list(LDFLAGS),
            extra_cuda_cflags=[*CUDA_FLAGS, hash_flag],
            build_directory=str(build_dir),
            verbose=os.environ.get("FASTMAML_VERBOSE_BUILD", "") == "1",
            is_python_module=False,
            with_cuda=with_cuda,
        )
    except Exception as err:  # compiler or ninja errors arrive as RuntimeError/OSError/CalledProcessError
        raise ExtensionUnavailable(f"{BUILD_FAILED}{_short(err)}") from err
    stamp.write_text(f"built in {time.perf_counter() - start:.1f} s\n")
    log.info("fastmaml: built the C++ extension in %.1f s", time.perf_counter() - start)
    return Path(path)


def _locate() -> Path:
    """The library to load: a prebuilt one matching the sources (or any prebuilt one when no sources are
    shipped), else the JIT build."""
    csrc = csrc_dir()
    prebuilt = _prebuilt()
    if prebuilt is not None:
        if csrc is None:
            log.debug("fastmaml: using %s (no C++ sources shipped to compare it with)", prebuilt)
            return prebuilt
        expected = source_hash(csrc)
        if _has_embedded_hash(prebuilt, expected):
            log.debug("fastmaml: using %s (built from the sources in %s)", prebuilt, csrc)
            return prebuilt
        # A surprise worth seeing: the install shipped a library that cannot be used, and a compiler is
        # now needed (and its minutes spent) to build the same thing again.
        embedded = _embedded_hash(prebuilt)
        warnings.warn(
            f"fastmaml: ignoring the prebuilt library {prebuilt}: it was built from other sources or for "
            f"another torch/Python ({f'it embeds the hash {embedded}' if embedded else 'it embeds no hash'}, "
            f"the sources in {csrc} hash to {expected}); building the extension from those sources instead "
            "(needs a C++ compiler). Rebuild the package with FASTMAML_BUILD_EXT=1 against this torch to ship "
            "a matching library.", RuntimeWarning, stacklevel=3)
    if csrc is None:
        raise ExtensionUnavailable(
            f"no prebuilt library and no C++ sources (looked in {', '.join(map(str, _CSRC_CANDIDATES))})"
        )
    return _jit_build(csrc)


def load() -> None:
    """Build (once) or load the extension and register its Python-side parts. Raises
    `ExtensionUnavailable` with the reason when that is impossible (the reason is cached)."""
    if _state["loaded"]:  # the common case, without the lock (which torch.compile cannot trace)
        return
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise ExtensionUnavailable(_state["error"])
        try:
            if not _ops_registered():
                path = _locate()
                torch.ops.load_library(str(path))
                _state["path"] = str(path)
            _register_python_parts()
            _tag_compile_caches(_state["path"])
        except ExtensionUnavailable as err:
            _state["error"] = str(err)
            raise
        except Exception as err:  # a library that exists but cannot be loaded (ABI mismatch, ...)
            _state["error"] = f"loading the C++ extension failed: {_short(err)}"
            raise ExtensionUnavailable(_state["error"]) from err
        _state["loaded"] = True


def _tag_compile_caches(path: Optional[str]) -> None:
    """Add this library's source hash to torch.compile's cache-key tag.

    What torch.compile makes of a call of these ops depends on the library (maml_train's autograd
    kernel is C++, traced through when a graph is compiled), but torch's on-disk caches (FX graph,
    AOTAutograd) key a graph by its ops' names only: a graph compiled against an older fastmaml would be
    reused, calling ops whose schema or backward has changed since. The tag is stable for one library,
    so the caches still serve from one run to the next; a tag the user set is kept in front."""
    config = getattr(getattr(torch, "compiler", None), "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    digest = _embedded_hash(Path(path)) if path else None
    tag = f"fastmaml-{digest or 'unknown'}"
    current = config.cache_key_tag or ""
    if tag not in current:
        config.cache_key_tag = f"{current}|{tag}" if current else tag


def unavailable() -> Optional[str]:
    """Why the extension cannot be used here (building it on first call if needed), or None."""
    try:
        load()
    except ExtensionUnavailable as err:
        return str(err)
    return None


def library_path() -> Optional[str]:
    """The loaded library's path (None before `load()` or when it was loaded by someone else)."""
    return _state["path"]


def library_is_prebuilt() -> bool:
    """Whether the loaded library is the prebuilt `fastmaml/_C*.so` (not a build on first use)."""
    prebuilt = _prebuilt()
    return _state["path"] is not None and prebuilt is not None and Path(_state["path"]) == prebuilt


def _register_python_parts() -> None:
    """Fake kernels (shapes only, for torch.compile and meta tensors) and the Python autograd formulas."""
    from .backends._fused import register_fused_autograd, register_task_sum_autograd

    @torch.library.register_fake("fastmaml::maml_fwd")
    def _(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order):
        T, Nq = x_query.shape[0], x_query.shape[1]
        return theta.new_empty((T,)), theta.new_empty((T, Nq, dims[-1]))

    @torch.library.register_fake("fastmaml::maml_bwd")
    def _(theta, lr, x_support, y_support, x_query, y_query, qw, g_task_losses, g_query_preds, dims,
          activation, loss, first_order, need_lr_grad, need_x_grad):
        g_lr = lr.new_empty(lr.shape) if need_lr_grad else lr.new_empty((0,))
        g_xs = x_support.new_empty(x_support.shape) if need_x_grad else x_support.new_empty((0,))
        g_xq = x_query.new_empty(x_query.shape) if need_x_grad else x_query.new_empty((0,))
        return theta.new_empty(theta.shape), g_lr, g_xs, g_xq

    @torch.library.register_fake("fastmaml::maml_adapt")
    def _(theta, lr, x_support, y_support, dims, activation, loss):
        return theta.new_empty((x_support.shape[0], theta.shape[0]))

    @torch.library.register_fake("fastmaml::maml_fwdbwd")
    def fwdbwd_fake(theta, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order,
                    need_lr_grad, need_x_grad):
        T, Nq = x_query.shape[0], x_query.shape[1]
        g_lr = lr.new_empty((T, *lr.shape)) if need_lr_grad else lr.new_empty((0,))
        g_xs = x_support.new_empty(x_support.shape) if need_x_grad else x_support.new_empty((0,))
        g_xq = x_query.new_empty(x_query.shape) if need_x_grad else x_query.new_empty((0,))
        return (theta.new_empty((T,)), theta.new_empty((T, Nq, dims[-1])), theta.new_empty((T, theta.shape[0])),
                g_lr, g_xs, g_xq)

    @torch.library.register_fake("fastmaml::maml_train")
    def _(params, lr, x_support, y_support, x_query, y_query, qw, dims, activation, loss, first_order,
          need_lr_grad, need_x_grad):
        T, Nq = x_query.shape[0], x_query.shape[1]
        return params[0].new_empty((T,)), params[0].new_empty((T, Nq, dims[-1])), params[0].new_empty(())

    @torch.library.register_fake("fastmaml::maml_fwdbwd_sum")
    def _(theta, lr, *rest):
        *rest, keep_rows = rest
        need_lr_grad = rest[-2]
        sum_lr = lr.new_empty(lr.shape) if need_lr_grad else lr.new_empty((0,))
        out = list(fwdbwd_fake(theta, lr, *rest))
        if not keep_rows:  # the parameter rows are not returned, only their sums
            out[2], out[3] = theta.new_empty((0,)), theta.new_empty((0,))
        return (*out, theta.new_empty(theta.shape), sum_lr)

    @torch.library.register_fake("fastmaml::weighted_task_sum")
    def _(rows, weights):
        return rows.new_empty(rows.shape[1:])

    register_fused_autograd(torch.ops.fastmaml.maml_fwd.default, torch.ops.fastmaml.maml_bwd.default)
    # maml_fwdbwd's and maml_train's autograd kernels are C++ (csrc/autograd_fwdbwd.cpp); the reduction
    # they call only refuses.
    register_task_sum_autograd(torch.ops.fastmaml.weighted_task_sum.default)
