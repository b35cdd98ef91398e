"""Omniglot (Lake, Salakhutdinov and Tenenbaum 2015) for few-shot classification: reading, caching and
task sampling.

Omniglot is 1,623 handwritten characters of 50 alphabets, 20 drawings each, as 105x105 black-on-white
PNGs, in two official sets (`images_background.zip`: 30 alphabets, `images_evaluation.zip`: 20) and two
minimal background sets (`images_background_small1.zip`: 5 alphabets, `..._small2.zip`: 5). fastmaml
reads a zip or its extracted folder (`SET/ALPHABET/characterNN/*.png`), turns every drawing into a 28x28
grey image with strokes 1 and background 0 (area-averaged), and caches the result (uint8) so later runs
skip the decoding. It never downloads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SIZE = 28  # the MAML paper's resolution
SOURCE_SIZE = 105  # every Omniglot drawing
DRAWINGS = 20
SETS = {
    "full": ("images_background", "images_evaluation"),
    "minimal": ("images_background_small1", "images_background_small2"),
}
DOWNLOAD = ("download images_background.zip and images_evaluation.zip (or the minimal "
            "images_background_small1.zip and images_background_small2.zip) from the python/ folder of "
            "https://github.com/brendenlake/omniglot into it")


class OmniglotError(ValueError):
    """Data that is missing or is not Omniglot; the message says what and where."""


@dataclass
class Characters:
    """One set's characters: `images [C, 20, 28, 28]` uint8 (stroke 255), `alphabets [C]` (names), and
    `names [C]` (`"ALPHABET/characterNN"`)."""

    images: torch.Tensor
    alphabets: list[str]
    names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, keep: Sequence[bool]) -> "Characters":
        idx = [i for i, k in enumerate(keep) if k]
        return Characters(self.images[idx], [self.alphabets[i] for i in idx], [self.names[i] for i in idx])

    def as_float(self) -> torch.Tensor:
        """`[C, 20, 28, 28]` float32 in [0, 1], strokes 1."""
        return self.images.float() / 255.0


def _locate(data: str, name: str) -> str:
    """The zip or folder of set `name` inside `data` (or `data` itself when it is that zip or folder)."""
    base = os.path.basename(os.path.normpath(data))
    if base in (name, name + ".zip") and os.path.exists(data):
        return data
    for candidate in (os.path.join(data, name), os.path.join(data, name + ".zip")):
        if os.path.exists(candidate):
            return candidate
    raise OmniglotError(f"{data}: no {name}.zip or {name}/ folder in it; {DOWNLOAD}")


def find_sets(data: str, train: Optional[str] = None, test: Optional[str] = None) -> tuple[str, str]:
    """The paths of the meta-training and test sets in `data`: the full sets when present, else the
    minimal ones; `train` / `test` name others (a set name, a zip or a folder)."""
    if not os.path.isdir(data):
        raise OmniglotError(f"--data {data}: no such folder; {DOWNLOAD}")
    if train is None and test is None:
        for kind in ("full", "minimal"):
            names = SETS[kind]
            if all(any(os.path.exists(os.path.join(data, n + ext)) for ext in ("", ".zip")) for n in names):
                return _locate(data, names[0]), _locate(data, names[1])
        raise OmniglotError(f"--data {data}: found neither the full Omniglot sets nor the minimal ones; {DOWNLOAD}")
    if train is None or test is None:
        raise OmniglotError("--train and --test go together (each a set name, zip or folder)")
    return tuple(p if os.path.exists(p) else _locate(data, p) for p in (train, test))  # type: ignore[return-value]


def _entries(source: str):
    """`(alphabet, character, file name, bytes reader)` for every PNG of a set (zip or folder)."""
    if os.path.isfile(source):
        if not zipfile.is_zipfile(source):
            raise OmniglotError(f"{source} is not a zip file")
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                parts = info.filename.rstrip("/").split("/")
                if info.is_dir() or not parts[-1].lower().endswith(".png"):
                    continue
                if len(parts) < 3:
                    raise OmniglotError(f"{source}: {info.filename} is not ALPHABET/characterNN/NAME.png")
                yield parts[-3], parts[-2], parts[-1], (lambda i=info: z.read(i))
        return
    if not os.path.isdir(source):
        raise OmniglotError(f"{source}: no such zip or folder; {DOWNLOAD}")
    for root, _, files in sorted(os.walk(source)):
        for f in sorted(files):
            if f.lower().endswith(".png"):
                rel = os.path.relpath(os.path.join(root, f), source).split(os.sep)
                if len(rel) < 3:
                    raise OmniglotError(f"{source}: {os.path.join(*rel)} is not ALPHABET/characterNN/NAME.png")
                path = os.path.join(root, f)
                yield rel[-3], rel[-2], rel[-1], (lambda p=path: open(p, "rb").read())


def _to_image(raw: bytes, where: str) -> torch.Tensor:
    """A 105x105 black-on-white PNG as a 28x28 uint8 image, strokes 255, area-averaged."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as err:  # PIL raises several types for a file that is not an image
        raise OmniglotError(f"{where} is not a readable PNG ({err})") from None
    if img.size != (SOURCE_SIZE, SOURCE_SIZE):
        raise OmniglotError(f"{where} is {img.size[0]}x{img.size[1]}; Omniglot drawings are "
                            f"{SOURCE_SIZE}x{SOURCE_SIZE}: is this Omniglot?")
    grey = img.convert("L").resize((SIZE, SIZE), Image.Resampling.BOX)
    values = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(SIZE, SIZE)
    return 255 - values  # strokes (black, 0) become 255


def read_set(source: str) -> Characters:
    """Decode a set (zip or folder) into `Characters`, characters sorted by alphabet and name."""
    groups: dict[tuple[str, str], list[tuple[str, torch.Tensor]]] = {}
    for alphabet, character, name, read in _entries(source):
        groups.setdefault((alphabet, character), []).append((name, _to_image(read(), f"{source}: {alphabet}/{character}/{name}")))
    if not groups:
        raise OmniglotError(f"{source}: no PNG drawings in ALPHABET/characterNN/ folders: is this Omniglot?")
    images, alphabets, names = [], [], []
    for (alphabet, character), drawings in sorted(groups.items()):
        if len(drawings) != DRAWINGS:
            raise OmniglotError(f"{source}: {alphabet}/{character} has {len(drawings)} drawings, Omniglot has "
                                f"{DRAWINGS} per character")
        images.append(torch.stack([img for _, img in sorted(drawings, key=lambda d: d[0])]))
        alphabets.append(alphabet)
        names.append(f"{alphabet}/{character}")
    return Characters(torch.stack(images), alphabets, names)


def default_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastmaml", "omniglot")


def _cache_key(source: str) -> str:
    """Name, size and modification time of the source (every file's, for a folder): a changed source is
    decoded again."""
    h = hashlib.sha256(f"{SIZE}".encode())
    paths = [source] if os.path.isfile(source) else [os.path.join(r, f) for r, _, fs in sorted(os.walk(source))
                                                     for f in sorted(fs)]
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, source)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{os.path.basename(os.path.normpath(source)).removesuffix('.zip')}-{h.hexdigest()[:16]}.pt"


def load_set(source: str, cache: Optional[str] = None) -> Characters:
    """`read_set(source)`, through the cache folder `cache` (default `~/.cache/fastmaml/omniglot`; "" for
    none): the first run decodes and writes it, later runs read it (about 100x faster)."""
    cache = default_cache() if cache is None else cache
    path = os.path.join(cache, _cache_key(source)) if cache else None
    if path and os.path.exists(path):
        state = torch.load(path, weights_only=True)
        return Characters(state["images"], list(state["alphabets"]), list(state["names"]))
    chars = read_set(source)
    if path:
        tmp = path + f".{os.getpid()}.tmp"
        try:
            os.makedirs(cache, exist_ok=True)
            torch.save({"images": chars.images, "alphabets": chars.alphabets, "names": chars.names}, tmp)
            os.replace(tmp, path)
        except OSError as err:  # a file in the folder's place, no permission, a full disk
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OmniglotError(f"the cache folder {cache} cannot be written ({type(err).__name__}: {err}); "
                                "give another with --cache, or --cache '' for none") from None
    return chars


def split(train: Characters, test: Characters) -> tuple[Characters, Characters]:
    """Meta-training and test characters, split by alphabet: the test set's alphabets that the training
    set lacks (the minimal sets share Greek and Latin; the full sets share none)."""
    seen = set(train.alphabets)
    held_out = test.subset([a not in seen for a in test.alphabets])
    if len(held_out) == 0:
        raise OmniglotError("every test alphabet is also a training alphabet: nothing is held out")
    return train, held_out


def with_rotations(images: torch.Tensor) -> torch.Tensor:
    """`[C, D, H, W]` -> `[4C, D, H, W]`: each character rotated by 0, 90, 180 and 270 degrees, each a
    class of its own (the MAML paper's augmentation of the meta-training classes)."""
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])


def sample_tasks(images: torch.Tensor, tasks: int, ways: int, shots: int, queries: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tasks` N-way K-shot tasks from `images [C, D, 28, 28]` (float): each draws `ways` distinct classes
    and `shots + queries` distinct drawings of each; class i of a task is label i.

    Returns `(x_support [T, N*K, 28, 28], y_support [T, N*K] int64, x_query [T, N*Q, 28, 28], y_query)`,
    examples ordered by class (the models treat them as a set)."""
    C, D = images.shape[:2]
    if ways > C:
        raise ValueError(f"{ways}-way tasks need {ways} classes; this set has {C}")
    if shots + queries > D:
        raise ValueError(f"{shots} shots + {queries} queries exceed the {D} drawings of a character")
    classes = torch.rand(tasks, C, generator=generator).argsort(dim=1)[:, :ways]  # [T, N]
    drawings = torch.rand(tasks, ways, D, generator=generator).argsort(dim=2)[..., : shots + queries]  # [T, N, K+Q]
    chosen = images[classes[..., None], drawings]  # [T, N, K+Q, 28, 28]
    labels = torch.arange(ways).view(1, ways, 1)
    xs = chosen[:, :, :shots].reshape(tasks, ways * shots, *images.shape[2:])
    xq = chosen[:, :, shots:].reshape(tasks, ways * queries, *images.shape[2:])
    ys = labels.expand(tasks, ways, shots).reshape(tasks, ways * shots)
    yq = labels.expand(tasks, ways, queries).reshape(tasks, ways * queries)
    return xs, ys, xq, yq
