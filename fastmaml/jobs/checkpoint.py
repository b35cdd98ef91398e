"""Checkpoints a training job can be killed around: written atomically, read back whole or not at all.

`save(path, state)` writes `path` through a temporary file in the same folder, flushed to disk, then
renamed over `path` (`os.replace`, atomic on POSIX and Windows): a process killed at any moment, during
the write included, leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch

CHECKPOINT = "checkpoint.pt"


def save(path: str, state: dict[str, Any]) -> None:
    """Write `state` (anything `torch.save` takes) to `path` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself reaches the disk with the folder's entry
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(path: str) -> Optional[dict[str, Any]]:
    """The state saved at `path`, or None when there is none."""
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
