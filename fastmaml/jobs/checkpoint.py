"""Checkpoints a training job can be killed around: written atomically, read back whole or not at all.

`save(path, state)` writes `path` through a temporary file in the same folder, flushed to disk, then
renamed over `path` (`os.replace`, atomic on POSIX and Windows): a process killed at any moment, during
the write included, leaves either the previous checkpoint or the new one, never a torn file.

The state carries a SHA-256 digest of its contents (`DIGEST`), which `load` checks: a byte changed on
disk after the write (torch.load reads a changed tensor byte without complaint, and a resumed run went
on from the damaged value) is refused. The file stays a plain `torch.save` dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Any, Optional, Sequence

import torch

CHECKPOINT = "checkpoint.pt"
DIGEST = "sha256"  # the key of the state's digest
# What every checkpoint of the training driver holds (`driver.train` writes them, with "backend", "buffers"
# and "job"; checkpoints from before those keys are still read).
STATE_KEYS = ("iteration", "params", "optimizer", "tasks_rng", "guard", "seconds", "metrics", "config")


def digest(state: dict[str, Any]) -> str:
    """SHA-256 of `state` without its `DIGEST` entry: every tensor's dtype, shape and bytes, every other
    value's type and repr, containers in order (the same for the state as saved and as loaded back)."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"dict:{len(x)}:".encode())
            for key, value in x.items():
                walk(key)
                walk(value)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}:{len(x)}:".encode())
            for value in x:
                walk(value)
        else:  # numbers, strings, None, bools: their repr is exact and stable
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk({k: v for k, v in state.items() if k != DIGEST})
    return h.hexdigest()


TEMPORARY = (".checkpoint-", ".tmp")  # `save`'s temporary files: prefix, suffix


def remove_leftovers(folder: str) -> None:
    """Remove the temporary files of `save`s that were killed during the write (a kill leaves them, never a
    torn checkpoint). For a job starting in `folder`, before its first write."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(TEMPORARY[0]) and name.endswith(TEMPORARY[1]):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def save(path: str, state: dict[str, Any]) -> None:
    """Write `state` (a dict of what `torch.save` takes) to `path` atomically, with its digest."""
    state = {**{k: v for k, v in state.items() if k != DIGEST}, DIGEST: digest(state)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY[0], suffix=TEMPORARY[1])
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


def check_resumable(path: str, state: dict[str, Any], settings: dict[str, Any], keys: Sequence[str],
                    iterations: int, world: int, tasks: torch.Generator | None = None,
                    job: str | None = None) -> None:
    """That a run of the job `job` with `settings` (of which `keys` must match), `iterations` and `world`
    processes, drawing its tasks from `tasks`, can continue the checkpoint `state` read from `path`;
    `JobError` saying what differs."""
    from .checks import JobError

    written_by = state.get("job")
    if job is not None and written_by is not None and written_by != job:
        raise JobError(f"--resume: {path} was written by the {written_by} job, not by this {job} job")
    saved = state["config"]
    differ = [k for k in keys if saved.get(k) != settings.get(k)]
    if differ:
        raise JobError(f"--resume: {path} was written with other settings "
                       f"({', '.join(f'{k}={saved.get(k)!r}' for k in differ)})")
    if state["iteration"] > iterations:
        raise JobError(f"--resume: {path} is at iteration {state['iteration']}, past --iterations {iterations}")
    if len(state["tasks_rng"]) != world:
        raise JobError(f"--resume: {path} was written by {len(state['tasks_rng'])} process(es), this run has {world}")
    if tasks is not None:
        # A task stream drawn on the training device (the sinusoid job's) has a CPU or a CUDA generator's
        # state, which the other kind cannot take: without this, set_state raised a bare RuntimeError.
        want = tasks.get_state().numel()
        sizes = {int(s.numel()) for s in state["tasks_rng"]}
        if sizes != {want}:
            raise JobError(f"--resume: {path} drew its tasks on another kind of device (device "
                           f"{saved.get('device')!r}; its task stream's state is {'/'.join(map(str, sorted(sizes)))} "
                           f"bytes, this run's {tasks.device.type} generator takes {want}): resume on the kind of "
                           "device it was written on")


def check_tensors(path: str, state: dict[str, Any], params: Sequence[torch.Tensor],
                  buffers: Sequence[torch.Tensor]) -> None:
    """That the checkpoint holds exactly the run's tensors, in number and shape; `JobError` otherwise (the
    copy into them would drop extra tensors and broadcast a smaller one over a larger)."""
    from .checks import JobError

    for kind, mine in (("params", params), ("buffers", buffers)):
        saved = state.get(kind, [])
        if len(saved) != len(mine):
            raise JobError(f"--resume: {path} holds {len(saved)} {kind}, this run's model has {len(mine)}")
        for i, (t, s) in enumerate(zip(mine, saved)):
            if not isinstance(s, torch.Tensor) or s.shape != t.shape:
                shape = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise JobError(f"--resume: {path} holds {kind}[{i}] of shape {shape}, this run's model "
                               f"has {list(t.shape)} (other model settings?)")


def load(path: str) -> Optional[dict[str, Any]]:
    """The state saved at `path` (without its digest), or None when there is none; `JobError` when it
    cannot be read or its contents no longer match its digest. A state saved without a digest (by hand)
    is taken as it is."""
    from .checks import JobError

    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, empty or not a checkpoint: one line, not a traceback
        raise JobError(f"--resume: {path} cannot be read as a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise JobError(f"--resume: {path} holds a {type(state).__name__}, not a checkpoint")
    written = state.pop(DIGEST, None)
    if written is not None and written != digest(state):
        raise JobError(f"--resume: {path} is damaged (its contents no longer match the digest written with "
                       "them); resume from a copy or start again without --resume")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:  # a job's model.pt copied over it, say: the checks below would stop on a KeyError
        raise JobError(f"--resume: {path} is not a training checkpoint (it has no {', '.join(map(repr, missing))}); "
                       "the jobs write one with --checkpoint-every")
    return state
