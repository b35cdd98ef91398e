"""The `fastmaml` command line and its sinusoid job (fastmaml/cli.py, fastmaml/sinusoid.py).

The job runs end to end with tiny settings, in process through `cli.main` and once as
`python -m fastmaml`; the pieces it is built from (task sampling, init, evaluation) are checked
against independent computations.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml import cli, jobs, sinusoid

SHOTS = ("5", "10", "20")


def check_outputs(out_dir, iterations, eval_steps=10, processes=1):
    """results.json has exactly the documented schema; the PNG and model.pt exist and load."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    assert set(results) == {"eval", "eval_median", "eval_diverged", "train_seconds", "backend", "skipped_steps",
                            "processes", "config"}
    assert all(results["eval_diverged"][shot] == [0] * (eval_steps + 1) for shot in SHOTS)
    assert results["skipped_steps"] == 0 and results["processes"] == processes
    assert set(results["eval"]) == set(SHOTS)
    for shot in SHOTS:
        curve = results["eval"][shot]
        assert len(curve) == eval_steps + 1
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in curve)
    assert isinstance(results["train_seconds"], float) and results["train_seconds"] > 0
    assert results["backend"] in fastmaml.list_backends()
    config = results["config"]
    assert config["iterations"] == iterations
    for key in ("meta_batch", "n_support", "n_query", "inner_steps", "inner_lr", "meta_lr", "first_order",
                "backend", "seed", "eval_tasks", "eval_seed", "eval_shots"):
        assert key in config

    with open(os.path.join(out_dir, "adaptation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    params = sinusoid.load_model(os.path.join(out_dir, "model.pt"))
    assert [tuple(p.shape) for p in params] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    return results, params


def test_job_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    # The reference backend: this test is about the job, and a fused backend may need a build first.
    code = cli.main(["train", "sinusoid", "--iterations", "30", "--eval-tasks", "24", "--seed", "3",
                     "--backend", "reference", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "training on backend" in printed and "5-shot" in printed
    results, params = check_outputs(out, iterations=30)
    assert results["config"]["seed"] == 3 and results["config"]["eval_tasks"] == 24
    assert results["backend"] == "reference"
    # model.pt holds the trained params: evaluating them again gives the stored numbers.
    config = sinusoid.SinusoidConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in results["config"].items()})
    again = sinusoid.evaluate(params, config)
    for shot in SHOTS:
        assert again[shot] == pytest.approx(results["eval"][shot], rel=1e-5)


def test_job_subprocess(tmp_path):
    """The console entry point with the default backend (`auto`)."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fastmaml", "train", "sinusoid", "--iterations", "5", "--eval-tasks", "10",
         "--eval-steps", "4", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "training on backend" in proc.stdout
    check_outputs(out, iterations=5, eval_steps=4)


def test_help_and_usage_errors(capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "sinusoid", "--help"])
    assert exit_info.value.code == 0
    assert "--iterations" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "no-such-job"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-job" in err and "sinusoid" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "sinusoid", "--iterations", "-1"])
    assert "--iterations" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--inner-lr", "nan"], "argument --inner-lr: must be a finite number > 0, got nan"),
    (["--meta-lr", "inf"], "argument --meta-lr: must be a finite number > 0, got inf"),
    (["--out", "{file}/run"], "--out"),
    (["--backend", "bogus"], "--backend 'bogus' is not one of auto"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "cuda:7"], "--device 'cuda:7'"),
    (["--backend", "cuda"], "--backend 'cuda' cannot run this job's"),
    (["--algorithm", "metasgd", "--inner-lr", "0.2"], "Meta-SGD keeps its learned rates in (0.0, 0.1)"),
    (["--algorithm", "reptile", "--first-order"], "first_order does not apply"),
    (["--seed", "20170702"], "seed 20170702 draws the training tasks from the held-out stream"),
    (["--algorithm", "mamlpp", "--inner-steps", "0"], "MAML++ needs inner_steps >= 1"),
    (["--algorithm", "reptile", "--inner-steps", "0"], "Reptile needs inner_steps >= 1"),
    (["--algorithm", "metasgd", "--inner-steps", "0"], "Meta-SGD needs inner_steps >= 1"),
    (["--seed", "99999999999999999999999"], "argument --seed: must be a whole number in [-2**62, 2**62]"),
    (["--seed", "18446744073709551615"], "argument --seed: must be a whole number in [-2**62, 2**62]"),
    (["--threads", "100000"], "argument --threads: must be between 0 and 1024, got 100000"),
], ids=["nan_inner_lr", "inf_meta_lr", "out_under_a_file", "unknown_backend", "unknown_device", "no_such_gpu",
        "cuda_backend_on_cpu", "learned_rate_out_of_range", "reptile_first_order", "seed_of_the_held_out_tasks",
        "mamlpp_without_steps", "reptile_without_steps", "metasgd_without_steps", "seed_past_64_bits",
        "seed_whose_task_stream_overflows", "threads_past_what_torch_takes"])
def test_bad_arguments_are_one_line_before_training(tmp_path, capsys, monkeypatch, extra, message):
    """A bad argument or one this machine cannot serve is reported as one error line with exit code 2,
    before training starts (the trainer must not run), never as a traceback."""
    if extra == ["--backend", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine can run the cuda backend")
    if extra == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra = [a.replace("{file}", str(blocker)) for a in extra]
    monkeypatch.setattr(sinusoid, "run", lambda *a, **k: pytest.fail("training started despite a bad argument"))
    argv = ["train", "sinusoid", "--iterations", "1", "--out", str(tmp_path / "out"), "--no-progress", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("fastmaml train sinusoid: error: ") and message in lines[0], err


def test_progress_in_a_log_file_is_plain_lines(tmp_path, capsys):
    """Where stderr is not a terminal (a log file, a pipe; here pytest's capture) the bar's redrawn frames
    piled up in one line of carriage returns (187 frames, 17 KB for 20,000 iterations): the driver prints
    a plain line each tenth of the run instead."""
    config = sinusoid.SinusoidConfig(iterations=40, log_every=4, backend="reference", eval_tasks=2, threads=1)
    sinusoid.train(config, progress=True, log=lambda *a: None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "meta-train" in ln]
    assert "\r" not in err and len(lines) == 10, err
    assert lines[0].startswith("fastmaml sinusoid: meta-train 4/40 (10%), ") and "loss " in lines[0], lines[0]
    assert lines[-1].startswith("fastmaml sinusoid: meta-train 40/40 (100%)")


def test_no_rank_trains_on_the_held_out_tasks():
    """Every rank's task stream differs from the held-out one; where a seed would make them one, training
    refuses (the evaluation would measure tasks the model was trained on)."""
    sinusoid.check_task_streams(sinusoid.SinusoidConfig(iterations=1, seed=5), 8)
    eval_seed = sinusoid.SinusoidConfig().eval_seed
    colliding = sinusoid.SinusoidConfig(iterations=1, seed=eval_seed - 1 - 1_000_003 * 3)
    assert jobs.ranks.task_stream_seed(colliding.seed, 3) == colliding.eval_seed
    sinusoid.check_task_streams(colliding, 3)  # ranks 0-2 draw other tasks
    with pytest.raises(ValueError, match="on rank 3 of 4 from the held-out stream"):
        sinusoid.check_task_streams(colliding, 4)
    with pytest.raises(ValueError, match="from the held-out stream"):
        sinusoid.train(sinusoid.SinusoidConfig(iterations=1, seed=colliding.eval_seed - 1), progress=False)


def test_training_reduces_loss_and_adaptation_helps():
    config = sinusoid.SinusoidConfig(iterations=400, log_every=50, eval_tasks=100, seed=1, backend="reference")
    trained = sinusoid.train(config, progress=False, log=lambda *a: None)
    assert len(trained.history) == 8
    # Measured: the block means fall from about 3.7 to about 2.2 over these 400 iterations.
    assert sum(trained.history[-2:]) / 2 < 0.8 * trained.history[0]
    results = sinusoid.evaluate(trained.params, config)
    for shot in SHOTS:
        assert results[shot][1] < results[shot][0]
    # More support points give a better adapted model on the same tasks.
    assert results["20"][10] < results["5"][10]


def test_sample_tasks():
    gen = torch.Generator().manual_seed(7)
    x, y, amplitude, phase = sinusoid.sample_tasks(37, 13, gen)
    assert x.shape == (37, 13, 1) and y.shape == (37, 13, 1)
    assert amplitude.shape == (37,) and phase.shape == (37,)
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5.0
    assert phase.min() >= 0.0 and phase.max() <= math.pi
    assert x.min() >= -5.0 and x.max() <= 5.0
    expected = amplitude.double()[:, None] * torch.sin(x[..., 0].double() - phase.double()[:, None])
    torch.testing.assert_close(y[..., 0].double(), expected, rtol=1e-5, atol=1e-5)
    # The draws spread over the ranges (not a constant) and repeat with the seed.
    assert amplitude.std() > 0.5 and x.std() > 1.0
    x2, *_ = sinusoid.sample_tasks(37, 13, torch.Generator().manual_seed(7))
    assert torch.equal(x, x2)

    xs, ys, xq, yq = sinusoid.sample_batch(5, 3, 4, torch.Generator().manual_seed(1), "cpu")
    assert xs.shape == (5, 3, 1) and yq.shape == (5, 4, 1)
    # Support and query are points of the same sinusoid: the same amplitude bounds them.
    bound = torch.cat([ys, yq], 1).abs().amax(1)
    assert torch.all(bound <= 5.0)


def test_init_params_matches_nn_linear_bounds():
    params = sinusoid.init_params(torch.Generator().manual_seed(0), hidden=(40, 40))
    assert [tuple(p.shape) for p in params] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    for p, fan_in in zip(params, (1, 1, 40, 40, 40, 40)):
        bound = 1 / math.sqrt(fan_in)
        assert p.abs().max() <= bound
    # Uniform on [-b, b]: the big matrix fills its range (nn.Linear's kaiming_uniform(a=sqrt(5))).
    assert params[2].abs().max() > 0.9 / math.sqrt(40)
    assert params[2].std().item() == pytest.approx(1 / math.sqrt(40) / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_held_out_tasks_are_the_cpus_on_every_device(device):
    """A GPU run is scored on the tasks of the CPU figures: they are drawn on the CPU and moved (a CUDA
    generator of the seed draws other numbers, and a meta one none). On the meta device only the shapes
    and the device can be compared."""
    config = sinusoid.SinusoidConfig(eval_tasks=7, eval_query=9, eval_shots=(3, 5))
    cpu = sinusoid.held_out_tasks(config, "cpu")
    there = sinusoid.held_out_tasks(config, device)
    assert cpu.keys() == there.keys() and cpu["x_support"].shape == (7, 20, 1) and cpu["x_query"].shape == (7, 9, 1)
    for key, t in there.items():
        assert t.device.type == device and t.shape == cpu[key].shape and t.dtype == cpu[key].dtype
        if device != "meta":
            torch.testing.assert_close(t.cpu(), cpu[key], rtol=0, atol=0)


def test_evaluate_matches_manual_sgd():
    """`evaluate` after k steps equals k plain SGD steps per task written with autograd, for k past
    the training K."""
    config = sinusoid.SinusoidConfig(eval_tasks=6, eval_steps=3, eval_shots=(5, 20), inner_lr=0.03)
    params = sinusoid.init_params(torch.Generator().manual_seed(5))
    results = sinusoid.evaluate(params, config)
    data = sinusoid.held_out_tasks(config, "cpu")
    for shot in (5, 20):
        xs, ys = data["x_support"][:, :shot].double(), data["y_support"][:, :shot].double()
        xq, yq = data["x_query"].double(), data["y_query"].double()
        for steps in range(config.eval_steps + 1):
            errors = []
            for t in range(config.eval_tasks):
                theta = [p.double().clone().requires_grad_() for p in params]
                for _ in range(steps):
                    pred = _mlp(theta, xs[t])
                    grads = torch.autograd.grad(((pred - ys[t]) ** 2).mean(), theta)
                    theta = [(p - config.inner_lr * g).detach().requires_grad_() for p, g in zip(theta, grads)]
                errors.append(((_mlp(theta, xq[t]) - yq[t]) ** 2).mean().item())
            assert results[str(shot)][steps] == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    # The rate is large enough that the steps change the error (the comparison above is not trivial).
    assert results["20"][3] < results["20"][0] * 0.95


def _mlp(params, x):
    h = torch.relu(x @ params[0].T + params[1])
    h = torch.relu(h @ params[2].T + params[3])
    return h @ params[4].T + params[5]


def test_load_model_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": [torch.ones(2)]}, path)
    with pytest.raises(ValueError, match="params"):
        sinusoid.load_model(str(path))


def test_job_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m fastmaml train sinusoid`: the global meta-batch split over 2 gloo
    ranks, one set of outputs (rank 0), the evaluation shared; a checkpoint of both ranks' task streams
    resumes under torchrun and is refused by a run with another process count."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "ddp"
    job = ["-m", "fastmaml", "train", "sinusoid", "--meta-batch", "10", "--backend", "cpu", "--eval-tasks", "7",
           "--eval-steps", "2", "--out", str(out), "--no-progress", "--checkpoint-every", "5"]
    base = [torchrun, "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*base, *job, "--iterations", "10"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    check_outputs(out, iterations=10, eval_steps=2, processes=2)
    assert run.stdout.count("wrote ") == 1  # rank 0 only
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 10 and len(ckpt["tasks_rng"]) == 2
    assert not torch.equal(ckpt["tasks_rng"][0], ckpt["tasks_rng"][1])  # each rank its own tasks
    again = subprocess.run([*base, *job, "--iterations", "15", "--resume"], capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    single = subprocess.run([sys.executable, *job, "--iterations", "20", "--resume"], capture_output=True,
                            text=True, timeout=180)
    assert single.returncode == 2 and "written by 2 process(es), this run has 1" in single.stderr


def test_results_json_is_strict_json(tmp_path):
    """A mean over no task that did not diverge is nan, and Python's json wrote it as NaN, which strict
    parsers refuse: the jobs' JSON files write null there."""
    path = tmp_path / "r.json"
    jobs.driver.write_json(str(path), {"eval": {"5": [0.5, math.nan, math.inf]}, "ci": (-math.inf, 1), "n": 3})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"eval": {"5": [0.5, None, None]},
                                                                   "ci": [None, 1], "n": 3}
