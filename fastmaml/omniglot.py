"""Few-shot classification on Omniglot: the MAML paper's MLP and ANIL, trained with fastmaml.

`fastmaml train omniglot --data DIR` meta-trains one model per (ways, shots) and evaluates it on held-out
alphabets. Two models:

- `mlp`: the MAML paper's fully connected network (Finn et al. 2017), 784-256-128-64-64-N ReLU on the
  flattened 28x28 image, every layer adapted per task by the fused kernels (the paper's network has
  batch normalisation after each hidden layer, which the fused MLP does not compute; this one has none).
- `anil` (default): "almost no inner loop" (Raghu et al. 2020). A conv backbone (four blocks of 3x3
  conv with 64 channels, batch norm, ReLU, 2x2 max-pool: 28x28 -> 64 features) is meta-trained through
  the input gradients of `fastmaml.maml`; the head on its 64 features (linear by default, ANIL's choice:
  `head_hidden` adds hidden layers) is adapted per task by the fused kernels. Batch norm normalises each
  task over its own support and query images (`TaskBatchNorm`), in training and evaluation alike.

Training: meta-batches of `meta_batch` N-way K-shot tasks from the meta-training characters and their
rotations by 90, 180 and 270 degrees (each a class of its own), `queries` query drawings per class,
`inner_steps` SGD steps of `inner_lr` (MAML, exact second order) or learned per-parameter rates
(`learn_inner_lr`, Meta-SGD), Adam. Evaluation: `eval_tasks` tasks of the held-out characters (no
rotations), accuracy after 0..`eval_steps` steps with its 95% interval, beside two baselines on the same
tasks: nearest neighbour in pixel space, and the same network trained without meta-learning (ordinary
classification of every meta-training class, then its head fine-tuned on each task's support set).

Outputs, in `--out DIR`: `results.json`, `accuracy.png`, `model.pt` (`load(path)` returns a predictor).
The command line is fastmaml/jobs/omniglot.py; the networks fastmaml/omniglot_model.py; data reading and task
sampling fastmaml/omniglot_data.py.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import api, jobs
from . import omniglot_data as data
from .jobs import algorithms, driver
from .jobs.driver import torch_threads
from .omniglot_model import CHANNELS, HEAD_HIDDEN, MLP_HIDDEN, Backbone, Network, TaskBatchNorm, backbone

# The job's public names; the networks (fastmaml/omniglot_model.py) are also this module's (omniglot.Network).
__all__ = ["CHANNELS", "HEAD_HIDDEN", "MLP_HIDDEN", "IMAGES_IN_15_MIN", "Backbone", "TaskBatchNorm", "backbone",
           "Network", "OmniglotConfig", "default_iterations", "Learner", "load_data", "Trained", "train",
           "held_out_tasks", "accuracy_curve", "interval95", "pixel_nn", "pretrained_baseline", "Predictor", "save",
           "load", "run", "format_results", "plot"]

# Images a 2-core machine meta-trains on in about 15 minutes (fixed so the default is reproducible):
# the default iteration count is this over the images of one meta-batch, by model.
IMAGES_IN_15_MIN = {"anil": 300_000, "mlp": 6_000_000}


@dataclass
class OmniglotConfig:
    """Every setting of the job; stored in results.json and model.pt."""

    model: str = "anil"
    head_hidden: tuple = HEAD_HIDDEN  # anil: hidden widths of the adapted head (() for a linear head)
    ways: int = 5
    shots: int = 1
    queries: int = 0  # query drawings per class in meta-training; 0: as many as shots (the MAML paper)
    iterations: int = 0  # 0: as many as take about 15 minutes here (`default_iterations`)
    meta_batch: int = 32
    inner_steps: int = 1
    inner_lr: float = 0.4
    learn_inner_lr: bool = False  # Meta-SGD: a learned rate per parameter of the adapted part
    inner_lr_range: tuple = (0.0, 1.0)  # bounds of learned rates
    first_order: bool = False
    meta_lr: float = 1e-3
    test_steps: int = 3  # the steps the predictor and the headline figure use
    backend: str = "auto"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0: torch's default (the convolutions use them)
    eval_tasks: int = 600
    eval_queries: int = 5  # query drawings per class at evaluation
    eval_steps: int = 10
    eval_seed: int = 20_151_211
    pretrain_iterations: int = 300
    pretrain_batch: int = 128
    finetune_steps: int = 50
    finetune_lr: float = 0.4
    log_every: int = 10
    train_set: str = ""
    test_set: str = ""

    def __post_init__(self):
        if self.queries == 0:
            self.queries = self.shots
        if self.iterations == 0:
            self.iterations = default_iterations(self.model, self.meta_batch, self.ways, self.shots, self.queries)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def default_iterations(model: str, meta_batch: int, ways: int, shots: int, queries: int) -> int:
    """Meta-iterations that take about 15 minutes on a 2-core CPU: a fixed image budget per model over
    the images of one meta-batch (at least 100)."""
    return max(100, IMAGES_IN_15_MIN[model] // (meta_batch * ways * (shots + queries)))


# ------------------------------------------------------------------------------------------ models


class Learner:
    """The job's meta-step: the network's features of support and query images, then the algorithm's
    step (`fastmaml.jobs.algorithms.Learner`, MAML or Meta-SGD) on the adapted MLP, whose gradients reach
    the backbone through the features."""

    def __init__(self, net: Network, config: OmniglotConfig):
        self.net = net
        extra, self.buffers = net.backbone_tensors()
        self.inner = algorithms.Learner(
            "metasgd" if config.learn_inner_lr else "maml", [p.requires_grad_() for p in net.params],
            iterations=config.iterations, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
            meta_lr=config.meta_lr, first_order=config.first_order, inner_lr_range=config.inner_lr_range,
            extra=[t.requires_grad_() for t in extra], loss="cross_entropy", backend=config.backend,
        )
        self.tensors, self.optimizer, self.metric_names = self.inner.tensors, self.inner.optimizer, self.inner.metric_names

    def set_iteration(self, iteration: int) -> None:
        self.inner.set_iteration(iteration)

    def step(self, batch, iteration: int):
        xs, ys, xq, yq = batch
        # One pass over support and query images: a task's normalisation statistics cover both.
        both = self.net.features(torch.cat([xs, xq], dim=1))
        fs, fq = both[:, : xs.shape[1]], both[:, xs.shape[1]:]
        return self.inner.step((fs, ys, fq, yq), iteration)


# --------------------------------------------------------------------------------------- the job


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def load_data(data_dir: str, train: Optional[str] = None, test: Optional[str] = None,
              cache: Optional[str] = None) -> tuple[data.Characters, data.Characters, str, str]:
    """Meta-training and held-out characters from `data_dir` (see `fastmaml.omniglot_data.find_sets`),
    and the two sets' paths."""
    train_path, test_path = data.find_sets(data_dir, train, test)
    meta_train, held_out = data.split(data.load_set(train_path, cache), data.load_set(test_path, cache))
    return meta_train, held_out, train_path, test_path


@dataclass
class Trained:
    net: Network
    rates: dict  # algorithms.Learner.eval_rates()
    backend: str
    seconds: float
    skipped: int
    history: dict


def train(config: OmniglotConfig, meta_train: data.Characters, progress: bool = True, log=print,
          checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
          ranks: Optional[jobs.ranks.Ranks] = None) -> Trained:
    """Meta-train the network on `meta_train`'s characters and their rotations with the jobs' driver."""
    ranks = ranks or jobs.ranks.Ranks()
    per_rank = jobs.ranks.split(config.meta_batch, ranks.world)
    device = jobs.check_device(config.device)
    images = data.with_rotations(meta_train.as_float())  # sampled on the CPU, moved per batch
    net = Network(config.model, config.ways, _generator(config.seed), device, config.head_hidden)
    learner = Learner(net, config)
    tasks = _generator(jobs.ranks.task_stream_seed(config.seed, ranks.rank))

    def sample(g):
        return tuple(t.to(device) for t in data.sample_tasks(images, per_rank, config.ways, config.shots,
                                                             config.queries, g))

    result = driver.train(
        learner, sample, tasks, iterations=config.iterations, name="omniglot", config=config.to_dict(),
        resume_keys=_RESUME_KEYS, device=device, log_every=config.log_every, progress=progress, log=log,
        warm_batch=sample(_generator(config.seed + 2)), checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=resume, ranks=ranks,
    )
    return Trained(net, learner.inner.eval_rates(), result.backend, result.seconds, result.skipped, result.metrics)


_RESUME_KEYS = ("model", "head_hidden", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr",
                "learn_inner_lr", "inner_lr_range", "first_order", "meta_lr", "seed", "log_every", "train_set")


# -------------------------------------------------------------------------------------- evaluation


def held_out_tasks(config: OmniglotConfig, held_out: data.Characters):
    """The evaluation tasks (fixed seed, independent of training)."""
    return data.sample_tasks(held_out.as_float(), config.eval_tasks, config.ways, config.shots, config.eval_queries,
                             _generator(config.eval_seed))


@torch.no_grad()
def _features(net: Network, xs: torch.Tensor, xq: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query features of every task, `chunk` tasks at a time (each task normalised over its
    support and query images, as in training)."""
    device, ns = net.params[0].device, xs.shape[1]
    both = torch.cat([net.features(torch.cat([xs[i:i + chunk], xq[i:i + chunk]], dim=1).to(device))
                      for i in range(0, xs.shape[0], chunk)])
    return both[:, :ns], both[:, ns:]


@torch.no_grad()
def accuracy_curve(net: Network, rates: dict, tasks, steps: int, backend: str = "auto",
                   default_lr: float = 0.4) -> torch.Tensor:
    """Query accuracy of every task after 0..`steps` inner steps: `[steps + 1, T]` (CPU)."""
    xs, ys, xq, yq = tasks
    fs, fq = _features(net, xs, xq)
    ys, yq = ys.to(fs.device), yq.to(fs.device)
    rows = []
    params = [p.detach() for p in net.params]
    for k in range(steps + 1):
        theta = algorithms.adapted_params(params, fs, ys, k, algorithms.inner_lr_for(rates, k, default_lr), backend,
                                          loss="cross_entropy")
        rows.append((api.mlp(theta, fq).argmax(-1) == yq).double().mean(dim=1).cpu())
    return torch.stack(rows)


def interval95(acc: torch.Tensor) -> torch.Tensor:
    """Half-width of the 95% interval of the mean over the last dim (normal approximation)."""
    return 1.96 * acc.std(dim=-1) / math.sqrt(acc.shape[-1])


def pixel_nn(tasks) -> torch.Tensor:
    """Per-task accuracy of nearest neighbour in pixel space (L2 on the flattened images)."""
    xs, ys, xq, yq = tasks
    d = torch.cdist(xq.flatten(2), xs.flatten(2))  # [T, Nq, Ns]
    pred = ys.gather(1, d.argmin(-1))
    return (pred == yq).double().mean(dim=1)


def pretrained_baseline(config: OmniglotConfig, meta_train: data.Characters, tasks, log=print,
                        progress: bool = True) -> torch.Tensor:
    """Per-task accuracy of the same network trained without meta-learning: ordinary classification of
    every meta-training class (rotations included) with Adam, then, per task, its head (ANIL: the head's
    hidden layers, none by default, and a new zero-initialised N-way layer; MLP: a new last layer on the
    frozen hidden ones)
    fine-tuned on the support set with `finetune_steps` SGD steps of `finetune_lr` (`fastmaml.adapt`)."""
    device = jobs.check_device(config.device)
    images = data.with_rotations(meta_train.as_float())
    classes = images.shape[0]
    net = Network(config.model, classes, _generator(config.seed + 7), device, config.head_hidden)
    params = [p.requires_grad_() for p in net.params]
    extra, _ = net.backbone_tensors()
    opt = torch.optim.Adam(params + extra, lr=config.meta_lr)
    g = _generator(config.seed + 8)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.pretrain_iterations, desc="pretrain baseline", unit="it", dynamic_ncols=True)
    for _ in range(config.pretrain_iterations):
        c = torch.randint(0, classes, (config.pretrain_batch,), generator=g)
        d = torch.randint(0, images.shape[1], (config.pretrain_batch,), generator=g)
        # The batch is one "task" for the backbone's normalisation.
        logits = api.mlp([p.unsqueeze(0) for p in params], net.features(images[c, d].unsqueeze(0).to(device)))[0]
        loss = nn.functional.cross_entropy(logits, c.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    xs, ys, xq, yq = tasks
    with torch.no_grad():
        fs, fq = _features(net, xs, xq)
        ys, yq = ys.to(device), yq.to(device)
        hidden = [p.detach() for p in params[:-2]]
        if net.backbone is None:  # MLP: the hidden layers are frozen features, a new last layer the head
            fs, fq = (api.mlp([p.unsqueeze(0).expand(f.shape[0], *p.shape) for p in hidden], f).relu()
                      for f in (fs, fq))
            hidden = []
        width = hidden[-2].shape[0] if hidden else fs.shape[-1]
        head = hidden + [torch.zeros(config.ways, width, device=device), torch.zeros(config.ways, device=device)]
        theta = api.adapt(head, fs, ys, inner_steps=config.finetune_steps, inner_lr=config.finetune_lr,
                          loss="cross_entropy", backend=config.backend)
        return (api.mlp(theta, fq).argmax(-1) == yq).double().mean(dim=1).cpu()


# ----------------------------------------------------------------------------------- the predictor


class Predictor:
    """A trained model that adapts to new tasks: `predict(x_support [T, Ns, 28, 28], y_support [T, Ns]
    int64 in 0..ways-1, x_query [T, Nq, 28, 28], inner_steps=None) -> logits [T, Nq, ways]`; inner_steps
    defaults to the job's --test-steps. Images are floats in [0, 1] with strokes 1 (invert black-on-white
    scans: `1 - x`)."""

    def __init__(self, net: Network, rates: dict, config: dict):
        self.net, self.rates, self.config = net, rates, config
        self.ways = int(config["ways"])

    @torch.no_grad()
    def predict(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                inner_steps: Optional[int] = None) -> torch.Tensor:
        if inner_steps is None:  # the job's --test-steps (it was a fixed 3 whatever the job was given)
            inner_steps = int(self.config.get("test_steps", 3))
        for name, x in (("x_support", x_support), ("x_query", x_query)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[2:]) != (data.SIZE, data.SIZE):
                raise ValueError(f"{name} must be a tensor [T, N, {data.SIZE}, {data.SIZE}], got "
                                 f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if y_support.shape != x_support.shape[:2] or y_support.dtype != torch.int64:
            raise ValueError(f"y_support must be int64 [T, Ns] = {list(x_support.shape[:2])}")
        if y_support.numel() and (int(y_support.min()) < 0 or int(y_support.max()) >= self.ways):
            raise ValueError(f"y_support labels must lie in 0..{self.ways - 1} (this model is {self.ways}-way)")
        device = self.net.params[0].device
        fs, fq = _features(self.net, x_support.float(), x_query.float())
        theta = api.adapt([p.detach() for p in self.net.params], fs, y_support.to(device), inner_steps=inner_steps,
                          inner_lr=algorithms.inner_lr_for(self.rates, inner_steps, self.config["inner_lr"]),
                          loss="cross_entropy")
        return api.mlp(theta, fq)


def save(path: str, trained: Trained, config: OmniglotConfig) -> None:
    net = trained.net
    rates = dict(trained.rates)
    if "rates" in rates:
        rates["rates"] = [r.cpu() for r in rates["rates"]]
    torch.save({"kind": "fastmaml-omniglot", "params": [p.detach().cpu() for p in net.params],
                "backbone": None if net.backbone is None else {k: v.cpu() for k, v in net.backbone.state_dict().items()},
                "rates": rates, "config": config.to_dict()}, path)


def load(path: str, map_location="cpu") -> Predictor:
    """The predictor of a `model.pt` written by `fastmaml train omniglot`, on the device `map_location` (a
    device or its name, such as "cuda:0"; not `torch.load`'s dict or function forms: the backbone is built
    there)."""
    try:
        device = torch.device(map_location)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"map_location must be a device or its name (such as 'cpu' or 'cuda:0'), got "
                         f"{map_location!r}") from None
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("kind") != "fastmaml-omniglot":
        raise ValueError(f"{path} is not a fastmaml Omniglot model")
    config = state["config"]
    net = Network(config["model"], config["ways"], _generator(0), device, config.get("head_hidden", HEAD_HIDDEN))
    net.params = list(state["params"])
    if net.backbone is not None:
        net.backbone.load_state_dict(state["backbone"])
    return Predictor(net, state["rates"], config)


# ------------------------------------------------------------------------------------------- run


def run(config: OmniglotConfig, meta_train: data.Characters, held_out: data.Characters, out_dir: str,
        progress: bool = True, log=print, checkpoint_every: int = 0, resume: bool = False,
        ranks: Optional[jobs.ranks.Ranks] = None) -> dict:
    """Train, evaluate with both baselines, write results.json, accuracy.png and model.pt."""
    ranks = ranks or jobs.ranks.Ranks()
    if ranks.is_main:
        os.makedirs(out_dir, exist_ok=True)
    else:
        log = lambda *a, **k: None  # noqa: E731
        progress = False
    with torch_threads(config.threads):
        trained = train(config, meta_train, progress, log, out_dir, checkpoint_every, resume, ranks)
        log(f"fastmaml omniglot: trained {config.iterations} iterations in {trained.seconds:.1f} s on backend "
            f"{trained.backend!r}")
        if not ranks.is_main:
            return {}
        start = time.perf_counter()
        tasks = held_out_tasks(config, held_out)
        acc = accuracy_curve(trained.net, trained.rates, tasks, config.eval_steps, config.backend, config.inner_lr)
        nn_acc = pixel_nn(tasks)
        pre = pretrained_baseline(config, meta_train, tasks, log, progress)
        log(f"evaluated on {config.eval_tasks} held-out tasks in {time.perf_counter() - start:.1f} s")
    means, ci = acc.mean(dim=1), interval95(acc)
    results = {
        "setting": {"model": config.model, "ways": config.ways, "shots": config.shots},
        "eval": {"maml": means.tolist(), "maml_ci95": ci.tolist(), "pixel_nn": nn_acc.mean().item(),
                 "pixel_nn_ci95": interval95(nn_acc).item(), "pretrained": pre.mean().item(),
                 "pretrained_ci95": interval95(pre).item()},
        "train_seconds": trained.seconds, "backend": trained.backend, "skipped_steps": trained.skipped,
        "processes": ranks.world, "config": config.to_dict(),
    }
    log(format_results(results))
    driver.write_json(os.path.join(out_dir, "results.json"), results)
    save(os.path.join(out_dir, "model.pt"), trained, config)
    plot(os.path.join(out_dir, "accuracy.png"), results)
    log(f"wrote {out_dir}/results.json, accuracy.png, model.pt")
    return results


def format_results(results: dict) -> str:
    s, e = results["setting"], results["eval"]
    lines = [f"{s['ways']}-way {s['shots']}-shot, model {s['model']}: held-out accuracy after n steps (95% interval)"]
    test_steps = results.get("config", {}).get("test_steps")
    for k, (m, c) in enumerate(zip(e["maml"], e["maml_ci95"])):
        mark = "   <- --test-steps, the predictor's" if k == test_steps else ""
        lines.append(f"  {k:>2} steps: {100 * m:5.1f}% +- {100 * c:.1f}{mark}")
    lines.append(f"  pixel nearest neighbour: {100 * e['pixel_nn']:.1f}% +- {100 * e['pixel_nn_ci95']:.1f}")
    lines.append(f"  pretrained, head fine-tuned: {100 * e['pretrained']:.1f}% +- {100 * e['pretrained_ci95']:.1f}")
    return "\n".join(lines)


def plot(path: str, results: dict) -> None:
    """Accuracy against test steps with its 95% band, the two baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e, s = results["eval"], results["setting"]
    steps = list(range(len(e["maml"])))
    m = torch.tensor(e["maml"]) * 100
    c = torch.tensor(e["maml_ci95"]) * 100
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(steps, m, marker="o", label=f"{s['model'].upper()} meta-trained with fastmaml")
    ax.fill_between(steps, m - c, m + c, alpha=0.2)
    ax.axhline(100 * e["pretrained"], color="tab:green", ls="--", label="pretrained, head fine-tuned")
    ax.axhline(100 * e["pixel_nn"], color="tab:grey", ls=":", label="pixel nearest neighbour")
    ax.axhline(100 / s["ways"], color="black", lw=0.6, label="chance")
    ax.axvline(results["config"]["test_steps"], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("inner steps at test time")
    ax.set_ylabel("held-out query accuracy (%)")
    ax.set_title(f"Omniglot, {s['ways']}-way {s['shots']}-shot, {results['config']['eval_tasks']} held-out tasks")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
