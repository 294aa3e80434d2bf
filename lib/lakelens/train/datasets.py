"""Fashion-MNIST from Debian's dataset-fashion-mnist package, written out as PNG files plus a captions table."""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np

from lakelens.errors import DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Several phrasings in training, so the text tower learns the item names rather than one sentence.
TRAIN_TEMPLATES = ("a photo of a {}", "a {}", "a product photo of a {}", "a black and white photo of a {}",
                   "a small picture of a {}", "a {} on a dark background")
QUERY_TEMPLATE = "a photo of a {}"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _dir() -> Path:
    return Path(os.environ.get("LAKELENS_FASHION_MNIST", FASHION_DIR))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'd or not): magic 0x0801 = uint8 vector, 0x0803 = uint8 images (n, rows, cols)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in (0x0801, 0x0803):
        raise ValueError(f"{path}: not an IDX uint8 file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {arr.size}")
    return arr.reshape(shape)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int (n,)) of the train (60k) or test (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be train or test, got {split!r}")
    folder = _dir()
    paths = [folder / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found ({', '.join(missing)}): install Debian's "
                                f"dataset-fashion-mnist (make setup does) or set LAKELENS_FASHION_MNIST")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def balanced_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of about n // 10 items of every label, seeded, in a shuffled order."""
    rng = np.random.default_rng(seed)
    per = max(1, n // len(LABELS))
    picked = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(len(LABELS))])
    return rng.permutation(picked)


def write_fashion_mnist(folder: str | Path, split: str, n: int, seed: int = 0, varied_captions: bool = False) -> Path:
    """Write a label-balanced sample of n images as PNG under `folder`, and FOLDER.captions.csv beside it
    with path, caption, label. Training sets get varied captions; query sets 'a photo of a <label>'."""
    from PIL import Image

    images, labels = fashion_mnist(split)
    idx = balanced_sample(labels, n, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for i in idx:
        label = LABELS[labels[i]]
        path = folder / f"{split}{i:05d}.png"
        Image.fromarray(images[i], "L").save(path)
        template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))] if varied_captions else QUERY_TEMPLATE
        rows.append({"path": str(path.resolve()), "caption": template.format(label), "label": label})
    captions = folder.parent / f"{folder.name}.captions.csv"
    with open(captions, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return captions
