"""nextscale import-dataset: torchvision's MNIST files (the real t10k split of the shared_data fixture) and CIFAR-10
python batches -> an ImageFolder with the exact pixels and labels; bad names and tampered pickles refused."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from nextscale.cli import main
from nextscale.datasets import CIFAR10_CLASSES, DatasetError, import_dataset


def test_mnist_from_the_real_idx_files(shared_data, tmp_path):
    summary = import_dataset("mnist", str(tmp_path / "out"), str(shared_data / "mnist"), holdout=10, limit=30)
    assert summary["splits"] == {"test": 27, "test_holdout": 3}
    # the IDX bytes, read independently: 16-byte header then 28x28 uint8 images; 8-byte header then labels
    with gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in (0, 9, 29):
        part = "test_holdout" if i % 10 == 9 else "test"
        path = tmp_path / "out" / part / str(labels[i]) / f"test_{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(path)), images[i])
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == [str(i) for i in range(10)]
    n_files = sum(len(files) for _, _, files in os.walk(tmp_path / "out" / "test"))
    assert n_files == 27 and sorted(os.listdir(tmp_path / "out" / "test")) == sorted({str(x) for x in labels[:30]})


def _batch(path, rng, n):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    path.write_bytes(pickle.dumps({"batch_label": "b", "labels": labels, "data": data, "filenames": ["x"] * n}))
    return data, labels


def test_cifar10_batches_and_a_tampered_pickle(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = [_batch(src / f"data_batch_{i}", rng, 2) for i in range(1, 6)]
    test_data, test_labels = _batch(src / "test_batch", rng, 3)
    summary = import_dataset("cifar10", str(tmp_path / "out"), str(tmp_path))
    assert summary["splits"] == {"test": 3, "train": 10}
    data, labels = batches[2]  # train images 4, 5 come from data_batch_3
    img = np.asarray(Image.open(tmp_path / "out" / "train" / CIFAR10_CLASSES[labels[1]] / "train_00005.png"))
    assert np.array_equal(img, data[1].reshape(3, 32, 32).transpose(1, 2, 0))

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    (src / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(DatasetError, match=r"refusing to load (posix|os)\.system"):
        import_dataset("cifar10", str(tmp_path / "out2"), str(tmp_path))


def test_unknown_dataset_lists_the_known_ones(tmp_path, capsys):
    assert main(["import-dataset", "svhn", str(tmp_path)]) == 2
    assert "unknown dataset 'svhn'; known: mnist, cifar10" in capsys.readouterr().err
