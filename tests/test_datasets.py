"""Fashion-MNIST from Debian's package: the real files parse, samples are balanced, captions name the label."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lakelens import DataError
from lakelens.train import datasets


def test_reads_the_real_fashion_mnist_files():
    images, labels = datasets.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    train_images, train_labels = datasets.fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and set(train_labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="train or test"):
        datasets.fashion_mnist("validation")


def test_bad_idx_files_are_refused(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x09\x99" + b"\x00" * 20))
    with pytest.raises(ValueError, match="not an IDX"):
        datasets.read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x01\x02"))
    with pytest.raises(ValueError, match="expected"):
        datasets.read_idx(short)


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LAKELENS_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        datasets.fashion_mnist("test")


def test_writes_a_balanced_captioned_sample(tmp_path):
    captions = datasets.write_fashion_mnist(tmp_path / "fm", "test", 50, seed=3)
    df = pd.read_csv(captions)
    assert len(df) == 50 and df["label"].value_counts().tolist() == [5] * 10
    assert (df["caption"] == "a photo of a " + df["label"]).all()
    images, labels = datasets.fashion_mnist("test")
    first = df.iloc[0]
    idx = int(first["path"].rsplit("test", 1)[1][:5])
    assert datasets.LABELS[labels[idx]] == first["label"]
    assert np.array_equal(np.asarray(Image.open(first["path"])), images[idx])  # lossless PNG of the original
    varied = pd.read_csv(datasets.write_fashion_mnist(tmp_path / "tr", "train", 60, seed=3, varied_captions=True))
    assert varied["caption"].nunique() > 10 and all(lab in c for lab, c in zip(varied["label"], varied["caption"]))
