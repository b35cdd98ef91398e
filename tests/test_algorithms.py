"""The MAML family (fastmaml/jobs/algorithms.py), the jobs' training driver (fastmaml/jobs/driver.py) and
`fastmaml compare sinusoid` (fastmaml/jobs/compare.py).

Each algorithm's meta-step is compared in float64 with the independent per-task loop of
`_reference_loop.py`; the driver is shown to skip a non-finite step without touching the parameters, the
learned rates or the optimizer's state, and to resume a killed run to the uninterrupted result; every
algorithm's job runs end to end.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from _jobs_helpers import interrupted_at
from _reference_loop import assert_close, maml_loop, random_data, random_params
import fastmaml
from fastmaml import cli, sinusoid
from fastmaml.jobs import algorithms, driver
from fastmaml.training import bounded_rate

F64 = torch.float64
DIMS = (2, 9, 7, 3)  # widths that are not powers of two
NAMES = list(algorithms.ALGORITHMS)


def _setup(name, iterations=10, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [p.requires_grad_() for p in random_params(DIMS, F64, g)]
    learner = algorithms.Learner(name, params, iterations=iterations, backend=kw.pop("backend", "reference"), **kw)
    batch = random_data(DIMS, 5, 6, 4, "mse", F64, torch.Generator().manual_seed(seed + 1))
    return learner, batch


def _rates_in_loop_form(learner, steps):
    """The learned rates as the reference loop takes them: one tensor per param, `[K, *shape]`."""
    rates = learner.inner_lr_for(steps)
    if isinstance(rates, float):
        return rates
    if learner.algorithm.learn_inner_lr == "per_parameter":
        return [r.unsqueeze(0).expand(steps, *r.shape) for r in rates]
    return rates


# ---- one meta-step of each algorithm against the loop ------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "reptile"])
@pytest.mark.parametrize("iteration", [0, 9])  # MAML++: first order and uniform weights at 0, not at 9
def test_step_matches_the_loop(name, backend, iteration):
    learner, batch = _setup(name, backend=backend)
    values, used = learner.step(batch, iteration)
    assert used == backend
    options = learner.maml_options(iteration)
    expected = maml_loop(learner.params, *batch, inner_steps=learner.inner_steps,
                         inner_lr=_rates_in_loop_form(learner, learner.inner_steps),
                         first_order=options["first_order"], query_loss_weights=options["query_loss_weights"])
    grads = torch.autograd.grad(expected.loss, learner.tensors, allow_unused=True)
    assert_close(values["meta_loss"], expected.loss.detach(), 1e-9, "meta_loss")
    for i, (t, g) in enumerate(zip(learner.tensors, grads)):
        assert t.grad is not None and g is not None, f"tensor {i} got no gradient"
        assert_close(t.grad, g, 1e-8, f"grad {i}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_reptile_direction_is_the_mean_adapted_params(backend):
    learner, batch = _setup("reptile", backend=backend)
    xs, ys, xq, yq = batch
    values, _ = learner.step(batch, 0)
    x, y = torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)
    loop = maml_loop([p.detach() for p in learner.params], x, y, inner_steps=5, inner_lr=0.02)
    for p, adapted in zip(learner.params, loop.adapted):
        assert_close(p.grad, p.detach() - adapted.detach().mean(0), 1e-9, "direction")
    # Reptile's outer step: plain SGD at 0.1, annealed linearly to 0 over the run.
    learner.set_iteration(0)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    learner.set_iteration(5)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert math.isfinite(values["meta_loss"].item())


def test_mamlpp_schedules():
    learner, _ = _setup("mamlpp", iterations=300)
    K = learner.inner_steps
    w0 = learner.maml_options(0)["query_loss_weights"]
    assert w0[0] == 0 and torch.allclose(w0[1:], torch.full((K,), 1.0 / K, dtype=F64))
    late = learner.maml_options(299)["query_loss_weights"]
    assert late.sum().item() == pytest.approx(1.0)
    assert torch.allclose(late[1:K], torch.full((K - 1,), 0.03 / K, dtype=F64)) and late[K] > 0.9
    assert learner.maml_options(99)["first_order"] and not learner.maml_options(100)["first_order"]
    learner.set_iteration(0)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    learner.set_iteration(150)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_rates_stay_in_range(name):
    """Steps far larger than any schedule gives push the raw rates hard both ways: the rates as used stay
    strictly inside the algorithm's range, and start at the inner rate."""
    learner, batch = _setup(name)
    low, high = learner.algorithm.inner_lr_range
    for r in learner.rates():
        assert torch.allclose(r, torch.full_like(r, learner.inner_lr))
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for raw in learner.raw_rates:
                raw.add_(sign * 1e3 * torch.rand_like(raw))
        for r in learner.rates():  # sigmoid(+-1000) rounds to 0 or 1: the bound itself, never past it
            assert bool((r >= low).all()) and bool((r <= high).all())
        values, _ = learner.step(batch, 5)
        assert math.isfinite(values["meta_loss"].item())
    assert float(bounded_rate(torch.tensor(0.0, dtype=F64), low, high)) == pytest.approx((low + high) / 2)


def test_rate_outside_the_range_is_refused():
    with pytest.raises(ValueError, match=r"keeps its learned rates in \(0.0, 0.1\)"):
        _setup("metasgd", inner_lr=0.5)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        algorithms.get("sgd")


# ---- the driver -----------------------------------------------------------------------------------------


class _Poisoned:
    """Wraps a learner; at the listed iterations its loss (or one gradient) is made nan."""

    def __init__(self, learner, bad: dict[int, str]):
        self.inner, self.bad = learner, bad
        self.tensors, self.optimizer, self.metric_names = learner.tensors, learner.optimizer, learner.metric_names
        self.seen = []

    def set_iteration(self, it):
        self.inner.set_iteration(it)

    def step(self, batch, it):
        values, used = self.inner.step(batch, it)
        # The moments and step counts (the groups' rates follow the schedule, by iteration).
        self.seen.append(([t.detach().clone() for t in self.tensors],
                          copy.deepcopy(self.optimizer.state_dict()["state"])))
        how = self.bad.get(it)
        if how == "loss":
            values = {"meta_loss": values["meta_loss"] * math.nan}
        elif how == "gradient":
            self.tensors[-1].grad[..., 0] = math.inf
        return values, used


def _equal_state(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp"])
def test_driver_skips_a_non_finite_step(name):
    """A nan meta-loss at iteration 2 and an inf gradient (of a learned rate, where there is one) at 4:
    both steps are skipped and counted; the tensors and the optimizer's state after each equal those
    before it; the other steps are taken and the result is finite."""
    learner, batch = _setup(name, iterations=7, backend="cpu")
    poisoned = _Poisoned(learner, {2: "loss", 4: "gradient"})
    result = driver.train(poisoned, lambda g: batch, torch.Generator(), iterations=7, name="test", config={},
                          resume_keys=(), device=torch.device("cpu"), log_every=3, progress=False, log=lambda *a: None)
    assert result.skipped == 2
    for it in (2, 4):
        before, after = poisoned.seen[it], poisoned.seen[it + 1]
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), f"tensors changed at {it}"
        assert _equal_state(before[1], after[1]), f"optimizer state changed at {it}"
    assert not all(torch.equal(a, b) for a, b in zip(poisoned.seen[0][0], poisoned.seen[1][0]))
    assert all(bool(torch.isfinite(t).all()) for t in result.tensors)
    # The logged meta-loss is the mean of the steps taken: a skipped step's nan does not reach it.
    assert len(result.history) == 3 and all(math.isfinite(v) for v in result.history)


@pytest.mark.parametrize("name", ["metasgd", "mamlpp", "reptile"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, name, monkeypatch):
    """A run stopped by an exception after its checkpoint at iteration 20 and resumed takes the 20
    iterations left and ends with the uninterrupted run's parameters and rates, bit for bit (scheduled
    algorithms included)."""
    from test_checkpoint import counted_steps

    config = sinusoid.SinusoidConfig(iterations=40, algorithm=name, backend="cpu", seed=4, log_every=10, eval_tasks=3)
    quiet = dict(progress=False, log=lambda *a: None)
    whole = sinusoid.train(config, **quiet)

    with interrupted_at(monkeypatch, algorithms.Learner, 27):
        sinusoid.train(config, checkpoint_dir=str(tmp_path), checkpoint_every=10, **quiet)
    steps = counted_steps(monkeypatch)
    resumed = sinusoid.train(config, checkpoint_dir=str(tmp_path), checkpoint_every=10, resume=True, **quiet)
    assert len(steps) == 20
    for a, b in zip(resumed.params, whole.params):
        assert torch.equal(a, b)
    for a, b in zip(resumed.rates.get("rates", []), whole.rates.get("rates", [])):
        assert torch.equal(a, b)
    assert resumed.history == pytest.approx(whole.history, rel=1e-6)


# ---- evaluation -----------------------------------------------------------------------------------------


def test_summarize_leaves_diverged_tasks_out_of_the_mean():
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, math.inf, 500.0, math.nan]])
    stats = sinusoid.summarize({"5": e})
    assert stats["mean"]["5"] == pytest.approx([2.5, 1.0])
    assert stats["median"]["5"][0] == pytest.approx(2.0)  # torch's median: the lower of the middle two
    assert stats["median"]["5"][1] == pytest.approx(500.0)
    assert stats["diverged"]["5"] == [0, 3]
    assert math.isnan(sinusoid.summarize({"5": torch.full((1, 2), math.inf)})["mean"]["5"][0])


def test_learned_rates_reach_evaluation_and_model_file(tmp_path):
    """The job evaluates a MAML++ model with its learned per-step rates (the last one reused past K), and
    `load_inner_lr` gives the same rates back from model.pt."""
    config = sinusoid.SinusoidConfig(iterations=30, algorithm="mamlpp", backend="cpu", eval_tasks=7, eval_steps=7,
                                     eval_shots=(5,), threads=1)
    sinusoid.run(config, str(tmp_path), progress=False, log=lambda *a: None)
    params = sinusoid.load_model(str(tmp_path / "model.pt"))
    data = sinusoid.held_out_tasks(config, "cpu")
    xs, ys = data["x_support"][:, :5].double(), data["y_support"][:, :5].double()
    lr = sinusoid.load_inner_lr(str(tmp_path / "model.pt"), 7)
    assert [tuple(r.shape) for r in lr] == [(7, 1, 1), (7, 1), (7, 1, 1), (7, 1), (7, 1, 1), (7, 1)]
    assert all(torch.equal(r[4], r[6]) for r in lr) and not all(torch.equal(r[0], r[4]) for r in lr)
    loop = maml_loop([p.double() for p in params], xs, ys, inner_steps=7, inner_lr=[r.double() for r in lr])
    preds = fastmaml.mlp([a.detach() for a in loop.adapted], data["x_query"].double())
    mse = ((preds - data["y_query"].double()) ** 2).mean().item()
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["eval"]["5"][7] == pytest.approx(mse, rel=1e-4)
    assert results["eval_diverged"]["5"] == [0] * 8


# ---- every algorithm's job end to end -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_job_end_to_end(tmp_path, name, capsys):
    out = tmp_path / name
    code = cli.main(["train", "sinusoid", "--algorithm", name, "--iterations", "12", "--eval-tasks", "6",
                     "--eval-steps", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    spec = algorithms.get(name)
    assert results["config"]["algorithm"] == name and results["config"]["inner_steps"] == spec.inner_steps
    assert results["config"]["inner_lr"] == spec.inner_lr and results["config"]["meta_lr"] == spec.meta_lr
    for key in ("eval", "eval_median", "eval_diverged"):
        assert all(len(v) == 4 for v in results[key].values())
    assert all(math.isfinite(v) for curve in results["eval"].values() for v in curve)
    assert os.path.getsize(out / "adaptation.png") > 1000
    assert "evaluation on 6 held-out tasks" in capsys.readouterr().out


def test_compare_writes_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(["compare", "sinusoid", "--iterations", "8", "--eval-tasks", "5", "--out", str(out),
                     "--no-progress", "--algorithms", "maml,reptile,mamlpp"])
    assert code == 0
    with open(out / "compare.json") as f:
        results = json.load(f)
    assert list(results) == ["maml", "reptile", "mamlpp"]
    for r in results.values():
        for key in ("mean", "median", "diverged"):
            assert set(r[key]) == {"1", "5", "10"}
        assert all(math.isfinite(v) for v in r["mean"].values())
        assert isinstance(r["train_seconds"], float) and r["train_seconds"] > 0
        assert len(r["curve"]["mean"]) == 11
    printed = capsys.readouterr().out
    assert "| MAML++ |" in printed and (out / "compare.md").read_text().count("\n| ") == 4
    with open(out / "compare.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_stopped_on_the_way_leaves_no_table_of_another_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a compare into a folder of an earlier one left the new run's models beside the earlier
    run's compare.json, .md and .png, with nothing to tell them apart: those are removed at the start, and the
    interrupt is one line with the shell's code for SIGINT."""
    out = tmp_path / "cmp"
    out.mkdir()
    for name in ("compare.json", "compare.md", "compare.png"):
        (out / name).write_text("an earlier run's")
    (out / "keep.txt").write_text("not the job's")
    real = sinusoid.train
    trained = []

    def train_then_interrupt(config, **kw):
        if trained:
            raise KeyboardInterrupt
        trained.append(config.algorithm)
        return real(config, **kw)

    monkeypatch.setattr(sinusoid, "train", train_then_interrupt)
    assert cli.main(["compare", "sinusoid", "--iterations", "4", "--eval-tasks", "2", "--out", str(out),
                     "--no-progress", "--algorithms", "maml,fomaml"]) == 130
    assert capsys.readouterr().err.strip() == "fastmaml compare sinusoid: interrupted"
    assert sorted(os.listdir(out)) == ["keep.txt", "models"] and os.listdir(out / "models") == ["maml.pt"]


def test_compare_refuses_unknown_algorithms(tmp_path, capsys):
    assert cli.main(["compare", "sinusoid", "--algorithms", "maml,sgd", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmaml compare sinusoid: error: --algorithms: unknown 'sgd'") and "metasgd" in err
    assert len(err.strip().splitlines()) == 1
