"""The Omniglot job (fastmaml/omniglot.py, fastmaml/omniglot_data.py, fastmaml/jobs/omniglot.py).

A fixture builds a few characters of synthetic "Omniglot" (105x105 black-on-white PNGs in
`SET/ALPHABET/characterNN/`, zipped like the official sets) so the job runs end to end in CI with both
models; the loader's refusals are checked on broken copies of it. With the real minimal sets present
(`../shared/data/omniglot/` beside the project), their decoding is checked too.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import pytest
import torch

from _jobs_helpers import interrupted_at
from fastmaml import cli, omniglot
from fastmaml import omniglot_data as data

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")


def _png(seed: int, size: int = 105) -> bytes:
    """A black-on-white drawing: a few random strokes, the same character for seeds of one character."""
    import io

    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed // 100)  # the character's strokes
    jitter = torch.Generator().manual_seed(seed)  # this drawing's
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        pts = (torch.rand(4, generator=g) * (size - 20) + 10 + torch.randn(4, generator=jitter) * 2).tolist()
        draw.line(pts, fill=0, width=5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_set(path, name: str, alphabets: dict[str, int], drawings: int = 20, size: int = 105, seed: int = 0) -> str:
    """Write `path/name.zip` with `alphabets[a]` characters of `drawings` drawings each."""
    target = os.path.join(path, name + ".zip")
    with zipfile.ZipFile(target, "w") as z:
        for a_i, (alphabet, count) in enumerate(alphabets.items()):
            for c in range(count):
                for d in range(drawings):
                    char_seed = seed * 10_000 + a_i * 1000 + c
                    z.writestr(f"{name}/{alphabet}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png",
                               _png(char_seed * 100 + d, size))
    return target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A minimal-layout data folder: 3 training alphabets, a test set sharing one of them."""
    root = tmp_path_factory.mktemp("omniglot")
    make_set(root, "images_background_small1", {"Alpha": 3, "Beta": 2, "Gamma": 2}, seed=1)
    make_set(root, "images_background_small2", {"Alpha": 3, "Delta": 4, "Epsilon": 3}, seed=2)
    return str(root)


def test_loader_reads_splits_and_caches(tiny, tmp_path):
    train, test = data.find_sets(tiny)
    assert train.endswith("images_background_small1.zip") and test.endswith("images_background_small2.zip")
    cache = str(tmp_path / "cache")
    chars = data.load_set(train, cache)
    assert chars.images.shape == (7, 20, 28, 28) and chars.images.dtype == torch.uint8
    assert chars.names[0] == "Alpha/character01" and len(set(chars.alphabets)) == 3
    # Strokes are 1, the background 0: a drawing is mostly background.
    x = chars.as_float()
    assert 0.02 < x.mean().item() < 0.4 and x.max().item() == 1.0 and x.min().item() == 0.0
    assert len(os.listdir(cache)) == 1
    again = data.load_set(train, cache)
    assert torch.equal(again.images, chars.images)
    meta_train, held_out = data.split(chars, data.load_set(test, cache))
    assert sorted(set(held_out.alphabets)) == ["Delta", "Epsilon"] and len(held_out) == 7
    # An extracted folder reads the same as its zip.
    with zipfile.ZipFile(train) as z:
        z.extractall(tmp_path / "extracted")
    folder = data.read_set(str(tmp_path / "extracted" / "images_background_small1"))
    assert torch.equal(folder.images, chars.images) and folder.names == chars.names


def test_rotations_and_task_sampling():
    images = torch.rand(6, 20, 28, 28)
    rotated = data.with_rotations(images)
    assert rotated.shape == (24, 20, 28, 28)
    assert torch.equal(rotated[6 + 2], torch.rot90(images[2], 1, dims=(-2, -1)))
    xs, ys, xq, yq = data.sample_tasks(rotated, 50, 5, 2, 3, torch.Generator().manual_seed(0))
    assert xs.shape == (50, 10, 28, 28) and xq.shape == (50, 15, 28, 28)
    assert ys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and yq[0].tolist() == sum(([c] * 3 for c in range(5)), [])
    flat = rotated.flatten(2)
    for t in range(5):
        # Every example is one of the set's drawings; support and query of a class are distinct drawings of
        # the same class, and a task's classes are distinct.
        ids = [(flat == x.flatten()).all(-1).nonzero()[0].tolist() for x in torch.cat([xs[t], xq[t]])]
        classes = [i[0] for i in ids]
        assert len(set(classes)) == 5 and len(set(map(tuple, ids))) == 25
        for label, cls in zip(torch.cat([ys[t], yq[t]]).tolist(), classes):
            assert cls == classes[2 * label]
    with pytest.raises(ValueError, match="need 30 classes"):
        data.sample_tasks(rotated, 1, 30, 1, 1, torch.Generator())


@pytest.mark.parametrize("broken,message", [
    ("missing", "no such folder"),
    ("not_zip", "is not a zip file"),
    ("not_omniglot", "no PNG drawings"),
    ("wrong_size", "is 64x64; Omniglot drawings are 105x105"),
    ("few_drawings", "has 7 drawings, Omniglot has 20"),
    ("no_sets", "found neither the full Omniglot sets nor the minimal ones"),
])
def test_loader_refusals_are_one_line_errors(tmp_path, broken, message, capsys):
    root = tmp_path / "data"
    root.mkdir()
    if broken == "not_zip":
        (root / "images_background_small1.zip").write_text("hello")
        make_set(root, "images_background_small2", {"A": 1}, drawings=20)
    elif broken == "not_omniglot":
        with zipfile.ZipFile(root / "images_background_small1.zip", "w") as z:
            z.writestr("readme.txt", "not omniglot")
        make_set(root, "images_background_small2", {"A": 1})
    elif broken == "wrong_size":
        make_set(root, "images_background_small1", {"A": 2}, size=64)
        make_set(root, "images_background_small2", {"B": 2})
    elif broken == "few_drawings":
        make_set(root, "images_background_small1", {"A": 2}, drawings=7)
        make_set(root, "images_background_small2", {"B": 2})
    elif broken == "no_sets":
        (root / "something_else.zip").write_text("x")
    target = str(tmp_path / "nowhere") if broken == "missing" else str(root)
    code = cli.main(["train", "omniglot", "--data", target, "--cache", "", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmaml train omniglot: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_learned_rates_without_steps_are_one_error_line(tiny, tmp_path, capsys):
    """--learn-inner-lr with --inner-steps 0 would learn rates no step uses: refused before training, in
    one line (it raised from inside training)."""
    code = cli.main(["train", "omniglot", "--data", tiny, "--cache", "", "--learn-inner-lr", "--inner-steps", "0",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("fastmaml train omniglot: error: Meta-SGD needs inner_steps >= 1 (it adapts on "
                                 "the support set to train), got 0"), err


def test_a_cache_that_cannot_be_written_is_one_error_line(tiny, tmp_path, capsys):
    """--cache naming a file (or a folder without permission, a full disk) raised FileExistsError from the
    loader; it is one error line naming the cache and the way around it."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = cli.main(["train", "omniglot", "--data", tiny, "--cache", str(blocker), "--out", str(tmp_path / "out"),
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"fastmaml train omniglot: error: the cache folder {blocker} cannot be written "
                          "(FileExistsError") and err.endswith("or --cache '' for none"), err


@pytest.mark.parametrize("model", ["anil", "mlp"])
def test_job_end_to_end(tiny, tmp_path, model, capsys):
    out = tmp_path / model
    code = cli.main(["train", "omniglot", "--data", tiny, "--cache", str(tmp_path / "cache"), "--model", model,
                     "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "4", "--iterations", "6",
                     "--eval-tasks", "8", "--pretrain-iterations", "3", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["setting"] == {"model": model, "ways": 3, "shots": 1}
    ev = results["eval"]
    assert len(ev["maml"]) == 11 and len(ev["maml_ci95"]) == 11
    assert all(0.0 <= a <= 1.0 for a in ev["maml"]) and all(c >= 0 for c in ev["maml_ci95"])
    for key in ("pixel_nn", "pretrained"):
        assert isinstance(ev[key], float) and 0.0 <= ev[key] <= 1.0
    # The synthetic characters are easy for a nearest neighbour: a wrong label order would show here.
    assert ev["pixel_nn"] > 0.6
    assert results["train_seconds"] > 0 and results["backend"] in ("cpu", "reference")
    assert results["processes"] == 1  # as the sinusoid job's results say
    assert results["config"]["iterations"] == 6 and results["config"]["train_set"] == "images_background_small1.zip"
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The predictor from model.pt reproduces the evaluation's accuracy after 3 steps on the same tasks.
    predictor = omniglot.load(str(out / "model.pt"))
    config = omniglot.OmniglotConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in results["config"].items()})
    _, held_out = data.split(data.load_set(os.path.join(tiny, "images_background_small1.zip"), ""),
                             data.load_set(os.path.join(tiny, "images_background_small2.zip"), ""))
    xs, ys, xq, yq = omniglot.held_out_tasks(config, held_out)
    logits = predictor.predict(xs, ys, xq, inner_steps=3)
    assert logits.shape == (8, 3 * 5, 3)
    assert (logits.argmax(-1) == yq).double().mean().item() == pytest.approx(ev["maml"][3], abs=1e-9)
    # Without inner_steps, the job's --test-steps (it was a fixed 3).
    predictor.config["test_steps"] = 1
    assert torch.equal(predictor.predict(xs, ys, xq), predictor.predict(xs, ys, xq, inner_steps=1))
    assert not torch.equal(predictor.predict(xs, ys, xq), logits)
    assert "<- --test-steps" in omniglot.format_results(results).splitlines()[1 + results["config"]["test_steps"]]


def test_predictor_refuses_bad_inputs(tiny, tmp_path):
    out = tmp_path / "m"
    assert cli.main(["train", "omniglot", "--data", tiny, "--cache", "", "--model", "mlp", "--ways", "3",
                     "--meta-batch", "2", "--iterations", "2", "--eval-tasks", "2", "--pretrain-iterations", "1",
                     "--out", str(out), "--no-progress"]) == 0
    p = omniglot.load(str(out / "model.pt"))
    x = torch.rand(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"x_support must be a tensor \[T, N, 28, 28\]"):
        p.predict(torch.rand(1, 3, 32, 32), torch.zeros(1, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        p.predict(x, torch.tensor([[0, 1, 3]]), x)
    with pytest.raises(ValueError, match="not a fastmaml Omniglot model"):
        torch.save({"params": []}, tmp_path / "other.pt")
        omniglot.load(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="map_location must be a device"):
        omniglot.load(str(out / "model.pt"), map_location={"cuda:0": "cpu"})


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the minimal Omniglot sets are not at ../shared/data/omniglot "
                    "(only this project's development machines have them)")
def test_minimal_sets_decode(tmp_path):
    meta_train, held_out, _, _ = omniglot.load_data(SHARED, cache=str(tmp_path))
    assert meta_train.images.shape == (136, 20, 28, 28)
    assert sorted(set(held_out.alphabets)) == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    assert len(held_out) == 106
    assert not math.isnan(held_out.as_float().mean().item())


def test_task_batch_norm_normalises_each_task_over_its_own_images():
    """Equal to batch norm (batch statistics, no running ones) applied to each task's images separately,
    with the same affine parameters; one task's images do not change another's output."""
    g = torch.Generator().manual_seed(3)
    norm = omniglot.TaskBatchNorm(5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        norm.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    x = torch.randn(3 * 4, 5, 6, 7, generator=g, dtype=torch.float64) * 3 + 1
    out = norm(x, 3)
    for t in range(3):
        part = x[4 * t:4 * (t + 1)]
        expected = torch.nn.functional.batch_norm(part, None, None, norm.weight, norm.bias, training=True)
        torch.testing.assert_close(out[4 * t:4 * (t + 1)], expected, rtol=1e-12, atol=1e-12)
    changed = x.clone()
    changed[:4] *= 10
    torch.testing.assert_close(norm(changed, 3)[4:], out[4:], rtol=1e-12, atol=1e-12)


def test_network_init_touches_no_global_generator(monkeypatch):
    """The backbone's layers take their seed from the job's generator: the same weights from the same
    generator, torch's CPU generator as it was, and no other device's generator seeded (torch.manual_seed
    reseeded every CUDA generator of the process, which a user's program calling omniglot.load() would
    then draw from)."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    before = torch.get_rng_state()
    nets = [omniglot.Network("anil", 5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before) and seeded == []
    for a, b in zip(nets[0].backbone.parameters(), nets[1].backbone.parameters()):
        assert torch.equal(a, b)


def test_interrupted_training_resumes_to_the_uninterrupted_result(tiny, tmp_path, monkeypatch):
    """ANIL's backbone, head and Adam state go through the jobs' checkpoint: a run stopped after its
    checkpoint at iteration 4 and resumed takes the 4 iterations left and ends with the uninterrupted
    run's tensors."""
    from test_checkpoint import counted_steps

    meta_train, _, _, _ = omniglot.load_data(tiny, cache="")
    config = omniglot.OmniglotConfig(ways=3, meta_batch=2, iterations=8, log_every=2, threads=1)
    quiet = dict(progress=False, log=lambda *a: None)
    whole = omniglot.train(config, meta_train, **quiet)
    with interrupted_at(monkeypatch, omniglot.Learner, 6):
        omniglot.train(config, meta_train, checkpoint_dir=str(tmp_path), checkpoint_every=4, **quiet)
    steps = counted_steps(monkeypatch)
    resumed = omniglot.train(config, meta_train, checkpoint_dir=str(tmp_path), checkpoint_every=4, resume=True, **quiet)
    assert len(steps) == 4
    for a, b in zip(resumed.net.params + list(resumed.net.backbone.parameters()),
                    whole.net.params + list(whole.net.backbone.parameters())):
        assert torch.equal(a.detach(), b.detach())
