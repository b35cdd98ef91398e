"""Packaging of fastmaml beyond pyproject.toml: the C++ sources and, on request, a prebuilt extension.

- Every build ships the C++ sources (top-level `csrc/`) inside the package as `fastmaml/csrc/`, so a
  non-editable install can build the extension on first use (fastmaml/_ext.py); an editable install
  reads them from the checkout.
- `FASTMAML_BUILD_EXT=1 pip install --no-build-isolation .` (or `-e .`) also compiles the extension now,
  against the torch already installed, as `fastmaml/_C*.so` (with the CUDA kernels when torch is a
  CUDA build and nvcc is found). `--no-build-isolation` is needed because pip's isolated build
  environment has no torch. The library embeds `_ext.source_hash` of the shipped sources; where the
  package is installed it is loaded as is (no compiler needed) while that hash matches.

Without FASTMAML_BUILD_EXT this file does not import torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ to fastmaml/csrc/ in the build (sources only, no objects)."""

    def run(self):
        super().run()
        if CSRC.is_dir() and not self.editable_mode:
            shutil.copytree(CSRC, Path(self.build_lib) / "fastmaml" / "csrc", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _ext_module():
    """fastmaml/_ext.py loaded on its own (the package's __init__ would import the whole API)."""
    spec = importlib.util.spec_from_file_location("_fastmaml_ext_for_setup", ROOT / "fastmaml" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prebuilt_extension():
    """The extension module and build command, when FASTMAML_BUILD_EXT=1 asks for them."""
    if os.environ.get("FASTMAML_BUILD_EXT", "") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    ext = _ext_module()
    # The prebuilt library carries the hash of its sources (the same csrc/ that build_py ships as
    # fastmaml/csrc/): _ext.py uses it only while they match. The hash does not depend on whether nvcc is
    # found here, so the library is used as well on a machine without nvcc or any compiler.
    hash_flag = ext.source_hash_flag(CSRC)
    sources = [f"csrc/{s}" for s in ext._SOURCES]
    why_not_cuda = ext.cuda_build_unavailable(CSRC)
    if why_not_cuda is not None and why_not_cuda.startswith(ext.NO_ARCHITECTURE):
        # A CUDA torch and nvcc, but no GPU here and no TORCH_CUDA_ARCH_LIST: the library a user asked to
        # prebuild would lack its CUDA kernels, noticed only where it is used.
        sys.exit(f"fastmaml: {why_not_cuda}")
    with_cuda = why_not_cuda is None
    if not with_cuda:
        print(f"fastmaml: the prebuilt library has no CUDA kernels: {why_not_cuda}", file=sys.stderr)
    if with_cuda:
        module = CUDAExtension(
            "fastmaml._C", sources + [f"csrc/{s}" for s in ext._CUDA_SOURCES],
            extra_compile_args={"cxx": [*ext.CFLAGS, hash_flag], "nvcc": [*ext.CUDA_FLAGS, hash_flag]},
            extra_link_args=list(ext.LDFLAGS),
        )
    else:
        module = CppExtension("fastmaml._C", sources, extra_compile_args=[*ext.CFLAGS, hash_flag],
                              extra_link_args=list(ext.LDFLAGS))
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = prebuilt_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
