"""The GPU machine's C++ extension, built ahead on a machine without a GPU and carried to the GPU machine.

A GPU session's device time is the scarcest thing this project has, and the GPU check's first stage spent
up to two and a half minutes of it compiling the CUDA kernels (110 s on the H200 at a75ae00, with one core
a file; the slowest file takes 150 s here). Every call that starts a fresh machine pays it again. The
library does not depend on the GPU: it depends on the sources, torch, Python, the flags and the
architectures (`fastmaml._ext.build_directory` names all of them), so a machine with the GPU machine's
torch and nvcc builds the same thing.

    # here, once the sources are final (a venv with the GPU machine's torch: benchmarks/cuda_build_check.sh)
    TORCH_CUDA_ARCH_LIST=9.0a PYTHON=~/venv-cu/bin/python benchmarks/cuda_build_check.sh --carry
    # the device call names the folder: carry [".gpu_prebuilt"]; benchmarks/gpu_check.sh installs it

`pack` copies a finished build's library and stamp into `.gpu_prebuilt/<build folder>/` with a manifest;
`install` (run by gpu_check.sh before its build) copies the folder whose name is the one this machine's
build would use into the extension cache, so the build finds a finished library and compiles nothing. A
library built from other sources, for another torch, Python or architecture list has another folder name
and is not used: the build then runs as before. `uninstall` removes a folder `install` made (never a
build of this machine), for when the library does not load there (other system libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastmaml import _ext  # noqa: E402

MANIFEST = "prebuilt.json"
# What a build folder holds that loading needs: the library and the stamp that says it finished.
_FILES = (f"{_ext.LIB_NAME}.so", "fastmaml.ok")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=20)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "csrc"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def expected_folder(with_cuda: bool | None = None) -> Path:
    """The build folder this machine's first use would build into and load from (sources, torch, Python,
    flags, TORCH_CUDA_ARCH_LIST and TORCH_EXTENSIONS_DIR as set now)."""
    csrc = _ext.csrc_dir()
    if csrc is None:
        raise SystemExit("prebuilt.py: no C++ sources found (csrc/)")
    return _ext.build_directory(csrc, with_cuda)


def pack(dest: Path, with_cuda: bool | None = None) -> Path:
    """Copy this machine's finished build of the current sources into `dest/<folder name>/` with a
    manifest; earlier packs in `dest` are removed (one library travels, not a history)."""
    build = expected_folder(with_cuda)
    missing = [name for name in _FILES if not (build / name).is_file()]
    if missing:
        raise SystemExit(f"prebuilt.py: {build} has no finished build ({', '.join(missing)} missing); build "
                         "it first (benchmarks/cuda_build_check.sh)")
    import torch

    if dest.exists():
        for old in dest.iterdir():
            if old.is_dir() and (old / MANIFEST).is_file():
                shutil.rmtree(old)
    target = dest / build.name
    target.mkdir(parents=True, exist_ok=True)  # a folder left without its manifest is written over
    for name in _FILES:
        shutil.copy2(build / name, target / name)
    manifest = {
        "folder": build.name,
        "commit": _commit(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime((build / _FILES[0]).stat().st_mtime)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        "source_root": str(_ext.csrc_dir()),
        "bytes": (target / _FILES[0]).stat().st_size,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return target


def _packs(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        try:
            # The folder's own name, which is what a build looks for (its manifest's is what was built).
            found.append({**json.loads(path.read_text()), "folder": path.parent.name})
        except (OSError, ValueError):
            continue
    return found


def install(root: Path) -> str:
    """Put the pack for this machine's build folder where the build looks; a line saying what was done."""
    want = expected_folder()
    if (want / _FILES[0]).is_file() and (want / _FILES[1]).is_file():
        return f"prebuilt: not needed, {want} already holds a finished build"
    source = root / want.name
    if not all((source / name).is_file() for name in (*_FILES, MANIFEST)):
        have = ", ".join(f"{p['folder']} ({p['commit']}, torch {p['torch']}, arch {p['arch_list'] or 'unset'})"
                         for p in _packs(root)) or "none"
        return (f"prebuilt: none for this build ({want.name}: sources, torch, Python, flags and "
                f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}); packs found: {have}; "
                "the extension is compiled here")
    want.mkdir(parents=True, exist_ok=True)
    # The stamp last: a folder with a library and no stamp is not taken for a finished build.
    for name in (_FILES[0], MANIFEST, _FILES[1]):
        shutil.copy2(source / name, want / name)
    info = json.loads((source / MANIFEST).read_text())
    note = ""
    if info.get("source_root") and info["source_root"] != str(_ext.csrc_dir()):
        note = (f"; its line tables name {info['source_root']}, not {_ext.csrc_dir()}: ncu's source view "
                "cannot import the files")
    return (f"prebuilt: installed {want} (commit {info['commit']}, built {info['built']}, torch {info['torch']}, "
            f"Python {info['python']}, arch {info['arch_list'] or 'unset'}){note}")


def uninstall() -> str:
    """Remove the folder `install` made for this build (one with a manifest), so that the build runs."""
    want = expected_folder()
    if not (want / MANIFEST).is_file():
        return f"prebuilt: nothing to remove ({want} was not installed from a pack)"
    shutil.rmtree(want)
    return f"prebuilt: removed {want}; the extension is compiled here"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="copy this machine's finished build of the sources into DEST")
    pk.add_argument("dest", type=Path, nargs="?", default=REPO / ".gpu_prebuilt")
    ins = sub.add_parser("install", help="put the matching pack of ROOT where the build looks")
    ins.add_argument("root", type=Path, nargs="?", default=REPO / ".gpu_prebuilt")
    sub.add_parser("uninstall", help="remove what install put there")
    sub.add_parser("folder", help="print the build folder this machine would use")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        target = pack(args.dest)
        size = (target / _FILES[0]).stat().st_size
        print(f"prebuilt: packed {target} ({size / 2**20:.1f} MiB); name its folder in the device call's carry")
    elif args.cmd == "install":
        print(install(args.root))
    elif args.cmd == "uninstall":
        print(uninstall())
    else:
        print(expected_folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
