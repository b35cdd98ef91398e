"""`fastmaml.MAML` under `torch.nn.parallel.DistributedDataParallel` (gloo, 2 processes on the CPU).

The meta-gradient is a mean over tasks: 2 ranks with 8 tasks each, DDP averaging their gradients, must
train exactly like one process with the 16 tasks, learned per-parameter rates included (DDP all-reduces
them like any parameter). Each rank is a process started by the test (torch.multiprocessing, spawn).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmaml
from _reference_loop import random_data

F64 = torch.float64
STEPS, GLOBAL_BATCH, WORLD = 5, 16, 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches():
    """The same STEPS global meta-batches in every process."""
    g = torch.Generator().manual_seed(1)
    return [random_data((2, 9, 7, 3), GLOBAL_BATCH, 5, 6, "mse", F64, g) for _ in range(STEPS)]


def _train(backend: str, rank: int = 0, world: int = 1, wrap=None) -> list[torch.Tensor]:
    maml = fastmaml.MAML(_model(), inner_lr=0.1, inner_steps=2, learn_inner_lr="per_parameter", backend=backend)
    module = wrap(maml) if wrap is not None else maml
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    for batch in _batches():
        part = [t[rank * per_rank:(rank + 1) * per_rank] for t in batch]
        opt.zero_grad()
        out = module(*part)
        assert out.backend == backend
        out.loss.backward()
        opt.step()
    return [p.detach().clone() for p in maml.parameters()]


def _rank_main(rank: int, backend: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        params = _train(backend, rank, WORLD, wrap=lambda m: nn.parallel.DistributedDataParallel(m))
        torch.save(params, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_two_ranks_train_like_one_process(backend, tmp_path):
    """2 ranks x 8 tasks under DDP give the parameters (rates included) of 1 process x 16 tasks after 5
    Adam steps, to 1e-6 relative; both ranks hold the same parameters."""
    mp.spawn(_rank_main, args=(backend, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _train(backend)
    start = [p.detach() for p in fastmaml.MAML(_model(), inner_lr=0.1, inner_steps=2,
                                               learn_inner_lr="per_parameter").parameters()]
    for i, (a, b, s, p0) in enumerate(zip(ranks[0], ranks[1], single, start)):
        assert torch.equal(a, b), f"parameter {i} differs between the ranks"
        assert not torch.equal(s, p0), "training should move every parameter (a test that cannot fail)"
        scale = s.abs().max().item()
        assert (a - s).abs().max().item() <= 1e-6 * scale, f"parameter {i}: {(a - s).abs().max().item():.3e}"


def _world_of_one(backend: str, device: str, folder: str) -> list[torch.Tensor]:
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{folder}/one",
                            rank=0, world_size=1)
    try:
        maml = fastmaml.MAML(_model().to(device), inner_lr=0.1, inner_steps=2, learn_inner_lr="per_parameter",
                             backend=backend).to(device)
        ddp = nn.parallel.DistributedDataParallel(maml)
        opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
        for batch in _batches():
            opt.zero_grad()
            out = ddp(*[t.to(device) for t in batch])
            assert out.backend == backend
            out.loss.backward()
            opt.step()
        return [p.detach().cpu() for p in maml.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (NCCL): the GPU check runs it")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ddp_world_of_one_on_the_gpu(backend, tmp_path):
    """With one GPU: the DDP wrapper over NCCL with a world of one trains as the plain module does."""
    if fastmaml.dispatch.get_backend(backend).unavailable():
        pytest.skip(f"backend {backend!r} unavailable: {fastmaml.dispatch.get_backend(backend).unavailable()}")
    wrapped = _world_of_one(backend, "cuda", str(tmp_path))
    plain = fastmaml.MAML(_model().cuda(), inner_lr=0.1, inner_steps=2, learn_inner_lr="per_parameter",
                          backend=backend).cuda()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for batch in _batches():
        opt.zero_grad()
        plain(*[t.cuda() for t in batch]).loss.backward()
        opt.step()
    for a, b in zip(wrapped, plain.parameters()):
        assert torch.allclose(a, b.detach().cpu(), rtol=1e-9, atol=1e-12)


def test_a_malformed_world_size_is_named(monkeypatch, tmp_path, capsys):
    """A WORLD_SIZE that is not a number is refused with the variable's name, not a bare int() error: by
    the process group's setup and, in one error line, by every job (their checks read it first)."""
    from fastmaml import cli
    from fastmaml.jobs import ranks
    from fastmaml.jobs.checks import JobError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(JobError, match="WORLD_SIZE must be a whole number of processes .* got 'two'"):
        ranks.from_environment(torch.device("cpu"))
    for job in (["train", "sinusoid"], ["train", "omniglot", "--data", str(tmp_path)], ["compare", "sinusoid"]):
        assert cli.main([*job, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("error: WORLD_SIZE must be a whole number of processes (torchrun sets it), got 'two'"), err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ranks.from_environment(torch.device("cpu")).world == 1


def _job_rank(rank: int, folder: str, phase: str) -> None:
    """One rank of a 2-rank sinusoid job (gloo) whose checkpoint folder is its own "disk": only rank 0's
    ever holds the checkpoint, as on two nodes without a shared file system."""
    from fastmaml import sinusoid
    from fastmaml.jobs.ranks import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{phase}", rank=rank, world_size=WORLD)
    try:
        iterations = 12 if phase == "first" else 24
        config = sinusoid.SinusoidConfig(iterations=iterations, meta_batch=4, backend="cpu", seed=3, log_every=4)
        disk = os.path.join(folder, f"{phase if phase == 'whole' else 'run'}-disk{rank}")
        os.makedirs(disk, exist_ok=True)
        result = sinusoid.train(config, progress=False, log=lambda *a: None, checkpoint_dir=disk,
                                checkpoint_every=6 if phase != "whole" else 0, resume=phase == "resumed",
                                ranks=Ranks(rank, WORLD))
        torch.save(result.params, os.path.join(folder, f"{phase}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _eval_rank(rank: int, folder: str) -> None:
    """One rank of a 2-rank evaluation of one held-out task: rank 1's share is empty."""
    from fastmaml import sinusoid
    from fastmaml.jobs.ranks import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-eval", rank=rank, world_size=WORLD)
    try:
        config = sinusoid.SinusoidConfig(eval_tasks=1, eval_steps=2, backend="cpu", seed=3)
        params = sinusoid.init_params(torch.Generator().manual_seed(4), config.hidden, torch.device("cpu"))
        torch.save(sinusoid.task_errors(params, config, "cpu", ranks=Ranks(rank, WORLD)),
                   os.path.join(folder, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fewer_held_out_tasks_than_ranks(tmp_path):
    """`--eval-tasks 1` under 2 processes: rank 1 scores no task. It used to fail on the empty share after
    training (an IndexError on rank 1, rank 0 then stuck in the gather); every rank now gets the one task's
    errors, those of a single process."""
    from fastmaml import sinusoid

    _spawn_or_fail(_eval_rank, (str(tmp_path),), 90)
    config = sinusoid.SinusoidConfig(eval_tasks=1, eval_steps=2, backend="cpu", seed=3)
    params = sinusoid.init_params(torch.Generator().manual_seed(4), config.hidden, torch.device("cpu"))
    alone = sinusoid.task_errors(params, config, "cpu")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"eval{rank}.pt")
        assert got.keys() == alone.keys()
        for shot, errors in alone.items():
            assert errors.shape == (3, 1) and torch.equal(got[shot], errors), (rank, shot)


def _spawn_or_fail(fn, args, seconds: float) -> None:
    """mp.spawn with a deadline: ranks that disagree block in a collective, which must fail the test, not
    hang it."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + seconds
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {seconds} s (blocked in a collective?)")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    """A resume is decided by rank 0, whose checkpoint every rank takes: where rank 1 could not see the
    file (another node, no shared file system) it started over at iteration 0 while rank 0 resumed, and
    the ranks blocked in their all-reduces. Both ranks end with the parameters of an uninterrupted run."""
    for phase in ("first", "resumed", "whole"):
        _spawn_or_fail(_job_rank, (str(tmp_path), phase), 90)
    assert (tmp_path / "run-disk0" / "checkpoint.pt").exists()
    assert not (tmp_path / "run-disk1" / "checkpoint.pt").exists(), "a test that cannot fail"
    whole = torch.load(tmp_path / "whole0.pt")
    for rank in range(WORLD):
        for a, b in zip(torch.load(tmp_path / f"resumed{rank}.pt"), whole):
            assert torch.equal(a, b), f"rank {rank} did not resume to the uninterrupted run"
