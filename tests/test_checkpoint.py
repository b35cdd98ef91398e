"""Checkpoints of the training jobs (fastmaml/jobs/checkpoint.py, `fastmaml train sinusoid
--checkpoint-every N --resume`): a run killed at any moment and resumed ends with exactly the parameters
of an uninterrupted run, and a kill during the write leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmaml import cli, jobs, sinusoid

ITERATIONS, EVERY = 4000, 250


def _config(**kw):
    base = dict(iterations=ITERATIONS, backend="cpu", eval_tasks=3, threads=1, seed=5)
    base.update(kw)
    return sinusoid.SinusoidConfig(**base)


def _checkpoint_iteration(path):
    try:
        return torch.load(path, weights_only=False)["iteration"]
    except Exception:  # not written yet
        return 0


def counted_steps(monkeypatch) -> list:
    """The meta-steps the driver takes from now on (one FiniteStep.step an iteration): a resume that
    started over would end with the same parameters (training is deterministic), but not the same count."""
    from fastmaml.training import FiniteStep

    calls, real = [], FiniteStep.step
    monkeypatch.setattr(FiniteStep, "step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """SIGKILL a job once its checkpoint has passed a few saves, resume it: the resumed run takes only the
    iterations left, and its parameters equal those of an uninterrupted run bit for bit (cpu backend,
    one process)."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastmaml", "train", "sinusoid", "--iterations", str(ITERATIONS),
           "--checkpoint-every", str(EVERY), "--backend", "cpu", "--seed", "5", "--eval-tasks", "3",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while proc.poll() is None and _checkpoint_iteration(ckpt) < 2 * EVERY and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = _checkpoint_iteration(ckpt)
    assert reached >= 2 * EVERY, proc.stderr.read().decode()[-2000:]
    if reached == ITERATIONS:
        pytest.skip("the job finished before it could be killed (a machine much faster than this test expects)")

    steps = counted_steps(monkeypatch)
    resumed = sinusoid.train(_config(), progress=False, log=lambda *a: None, checkpoint_dir=str(out),
                             checkpoint_every=EVERY, resume=True)
    assert len(steps) == ITERATIONS - reached, (len(steps), reached)
    whole = sinusoid.train(_config(), progress=False, log=lambda *a: None)
    for a, b in zip(resumed.params, whole.params):
        assert torch.equal(a, b)
    assert _checkpoint_iteration(ckpt) == ITERATIONS


def test_kill_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A process that dies while writing (here: torch.save writes half a file and raises) leaves the
    previous checkpoint whole and loadable, and no temporary file."""
    path = str(tmp_path / "checkpoint.pt")
    first = {**{k: {} for k in jobs.checkpoint.STATE_KEYS}, "iteration": 10, "params": [torch.arange(5.0)]}
    jobs.checkpoint.save(path, first)
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"iteration": 20, "params": [torch.zeros(10_000)]}, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        jobs.checkpoint.save(path, {"iteration": 20})
    monkeypatch.setattr(torch, "save", real_save)
    loaded = jobs.checkpoint.load(path)
    assert loaded["iteration"] == 10 and torch.equal(loaded["params"][0], first["params"][0])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_killed_writes_leftover_is_removed_by_the_next_run(tmp_path):
    """A SIGKILL during the write leaves `save`'s temporary file (never a torn checkpoint), which no later
    run removed: the next run in the folder removes it before its first write, and keeps other files."""
    leftover, other = tmp_path / ".checkpoint-k1ll3d.tmp", tmp_path / "notes.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other.write_text("mine")
    sinusoid.train(_config(iterations=10), progress=False, log=lambda *a: None, checkpoint_dir=str(tmp_path),
                   checkpoint_every=5)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "notes.tmp"]


def test_resume_with_other_settings_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "sinusoid", "--backend", "cpu", "--eval-tasks", "3", "--out", str(out), "--no-progress"]
    assert cli.main([*base, "--iterations", "20", "--checkpoint-every", "10"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--iterations", "30", "--resume", "--inner-lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fastmaml train sinusoid: error: --resume:" in err and "inner_lr" in err
    # The same settings with more iterations continue from the checkpoint.
    assert cli.main([*base, "--iterations", "30", "--resume", "--checkpoint-every", "10"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert _checkpoint_iteration(out / "checkpoint.pt") == 30
    # A resume with nothing left to run reports the checkpoint's backend (it said 'none'), and two held-out
    # tasks are enough for the plot (it drew three panels and failed).
    assert cli.main([*base[:5], "2", *base[6:], "--iterations", "30", "--resume"]) == 0
    assert "on backend 'cpu'" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["backend"] == "cpu"
    # Another backend may continue the run (the same function), and the log says the result's rounding
    # then differs from an uninterrupted run's.
    base[3] = "reference"
    assert cli.main([*base, "--iterations", "35", "--resume"]) == 0
    logged = capsys.readouterr().out
    assert "training on backend 'reference' (cpu); the checkpoint was written on 'cpu'" in logged, logged


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "edited", "fewer params", "other shape",
                                    "cuda task stream", "model.pt", "other job"])
def test_a_damaged_or_foreign_checkpoint_is_one_error_line(tmp_path, capsys, damage):
    """A checkpoint cut short, one with a byte of a tensor changed on disk (torch.load reads it without
    complaint: the run resumed from the damaged weight), one edited and saved without its digest changed,
    or one whose tensors are not this model's (fewer, or another shape: the copy into the model dropped
    extra tensors and broadcast a smaller one over a larger, so that a resume with another omniglot
    --head-hidden ran on, its 64 rows copies of one), or one whose task stream was drawn on another kind of
    device (a CUDA generator's 16-byte state, which a CPU generator cannot take, nor the reverse: the
    sinusoid job draws its tasks on the training device), or a file that is not one (the job's own model.pt
    copied over it: a KeyError), or another job's checkpoint (a dozen settings said to differ), is refused
    in one line."""
    out = tmp_path / "run"
    base = ["train", "sinusoid", "--backend", "cpu", "--eval-tasks", "3", "--out", str(out), "--no-progress"]
    assert cli.main([*base, "--iterations", "20", "--checkpoint-every", "10"]) == 0
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert state[jobs.checkpoint.DIGEST] == jobs.checkpoint.digest(state)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "flipped byte":
        raw = bytearray(path.read_bytes())
        at = raw.find(state["params"][2].numpy().tobytes())  # W2, 40 x 40 float32, stored as is
        assert at > 0 and raw.find(state["params"][2].numpy().tobytes(), at + 1) < 0
        raw[at + 801] ^= 0x10
        path.write_bytes(bytes(raw))
        torch.load(path, weights_only=False)  # still loads
    elif damage == "edited":
        state["params"][2][3, 4] += 1
        torch.save(state, path)
    elif damage == "model.pt":
        path.write_bytes((out / "model.pt").read_bytes())
    else:  # foreign tensors, saved with their own digest
        if damage == "cuda task stream":
            state["tasks_rng"] = [torch.zeros(16, dtype=torch.uint8)]
        elif damage == "other job":
            assert state["job"] == "sinusoid"
            state["job"] = "omniglot"
        elif damage == "fewer params":
            state["params"] = state["params"][:-1]
        else:
            state["params"][0] = state["params"][0][:1]
        jobs.checkpoint.save(str(path), state)
    capsys.readouterr()
    assert cli.main([*base, "--iterations", "30", "--resume"]) == 2
    err = capsys.readouterr().err
    want = {"truncated": "cannot be read", "flipped byte": "is damaged", "edited": "is damaged",
            "fewer params": "holds 5 params", "other shape": "params[0] of shape [1, 1]",
            "cuda task stream": "drew its tasks on another kind of device",
            "model.pt": "is not a training checkpoint (it has no 'iteration', 'optimizer', 'tasks_rng'",
            "other job": "was written by the omniglot job, not by this sinusoid job"}
    assert "Traceback" not in err and "error: --resume:" in err and want[damage] in err, err


def test_a_checkpoint_without_a_digest_is_read_as_it_is(tmp_path):
    """A state saved by hand (torch.save, no digest) loads; the digest does not depend on where the state
    lives or whether it went through a file."""
    state = {"iteration": 3, "params": [torch.randn(4, 3)], "config": {"hidden": [40, 40], "seed": None},
             "metrics": {"loss": [0.5, float("nan")]}, "optimizer": {"param_groups": [{"betas": (0.9, 0.999)}]},
             "tasks_rng": [torch.zeros(5, dtype=torch.uint8)], "guard": {}, "seconds": 1.5}
    torch.save(state, tmp_path / "plain.pt")
    assert jobs.checkpoint.load(str(tmp_path / "plain.pt"))["iteration"] == 3
    jobs.checkpoint.save(str(tmp_path / "c.pt"), state)
    loaded = jobs.checkpoint.load(str(tmp_path / "c.pt"))
    assert jobs.checkpoint.DIGEST not in loaded and jobs.checkpoint.digest(loaded) == jobs.checkpoint.digest(state)
    assert jobs.checkpoint.digest({**state, "iteration": 4}) != jobs.checkpoint.digest(state)
