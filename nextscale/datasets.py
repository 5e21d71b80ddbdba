"""``nextscale import-dataset mnist|cifar10 OUT``: torchvision's dataset files -> an ImageFolder for the stages.

Reads the files torchvision downloads (MNIST's IDX files, plain or gzipped; CIFAR-10's python batches) from
``source`` (a folder holding them anywhere below it, e.g. torchvision's ``root``), or downloads them with
torchvision when no source is given. Writes lossless PNGs ``OUT/<split>/<class>/<split>_<index>.png`` for
every split found (``train``, ``test``) and ``OUT/classes.json`` (class names in label order, the
``class_list`` of ``nextscale tokenize``). ``holdout=K`` moves every K-th image of a split to
``OUT/<split>_holdout/`` (a held-out set for the classifier check). The output is a pure function of the
input files; an existing image is not rewritten.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(ValueError):
    """The dataset cannot be imported; the message names the file or name and the fix."""


def _find(source: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` anywhere below ``source`` (first in sorted order)."""
    hits = sorted(p for p in source.rglob(f"{name}*") if p.name in (name, f"{name}.gz") and p.is_file())
    return hits[0] if hits else None


def _read_idx(path: Path, reader) -> np.ndarray:
    """An IDX file (plain or gzipped) through torchvision's reader, which takes uncompressed files only."""
    if path.suffix != ".gz":
        return reader(str(path)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp, path.stem)
        with gzip.open(path, "rb") as f:
            plain.write_bytes(f.read())
        return reader(str(plain)).numpy()


def mnist_splits(source: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(split, uint8 images (N, 28, 28), int labels (N,)) for each split whose two files are in ``source``."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for split, (images_name, labels_name) in MNIST_FILES.items():
        images, labels = _find(source, images_name), _find(source, labels_name)
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise DatasetError(f"MNIST {split}: {images or labels} is in {source} but not its "
                               f"{labels_name if labels is None else images_name}[.gz]; add it or remove the other")
        x, y = _read_idx(images, read_image_file), _read_idx(labels, read_label_file)
        if len(x) != len(y):
            raise DatasetError(f"MNIST {split}: {len(x)} images but {len(y)} labels in {images} / {labels}")
        yield split, x, y


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow the numpy reconstruction they need and nothing else, so a
    tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds arrays only")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch ({e})") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch (no 'data' and 'labels')")
    x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(labels, dtype=np.int64)


def cifar10_splits(source: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(split, uint8 images (N, 32, 32, 3), labels (N,)) for each split whose batches are in ``source``."""
    for split, names in CIFAR10_FILES.items():
        paths = [_find(source, n) for n in names]
        if not any(paths):
            continue
        missing = [n for n, p in zip(names, paths) if p is None]
        if missing:
            raise DatasetError(f"CIFAR-10 {split}: {', '.join(missing)} missing in {source}")
        parts = [_cifar_batch(p) for p in paths]
        yield split, np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


DATASETS = {"mnist": (mnist_splits, tuple(str(i) for i in range(10))), "cifar10": (cifar10_splits, CIFAR10_CLASSES)}


def _download(name: str, root: Path) -> Path:
    """Fetch the files with torchvision (checksummed) into ``root``; returns the folder holding them."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)
    return root


def import_dataset(name: str, out: str, source: str = "", holdout: int = 0, limit: int = 0) -> dict:
    """Write the ImageFolder of dataset ``name`` under ``out`` (``limit`` > 0: the first images of each split
    only); returns {split: count} and the classes."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if holdout == 1 or holdout < 0:
        raise DatasetError(f"holdout={holdout}: give 0 (none) or K >= 2 (every K-th image is held out)")
    reader, classes = DATASETS[name]
    if source:
        src = Path(source)
        if not src.is_dir():
            raise DatasetError(f"source {source!r} is not a folder; give the folder holding the {name} files")
    else:
        src = _download(name, Path(out) / "download")
    counts: dict[str, int] = {}
    for split, images, labels in reader(src):
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{name} {split}: labels outside 0..{len(classes) - 1}")
        if limit:
            images, labels = images[:limit], labels[:limit]
        for i, (img, label) in enumerate(zip(images, labels)):
            part = f"{split}_holdout" if holdout and i % holdout == holdout - 1 else split
            path = Path(out, part, classes[int(label)], f"{split}_{i:05d}.png")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                Image.fromarray(img).save(tmp, format="PNG")
                os.replace(tmp, path)
            counts[part] = counts.get(part, 0) + 1
    if not counts:
        want = " / ".join(f"{'/'.join(v)}" for v in (MNIST_FILES if name == "mnist" else CIFAR10_FILES).values())
        raise DatasetError(f"no {name} files under {src}: expected {want} (as torchvision downloads them)")
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "classes.json").write_text(json.dumps(list(classes)) + "\n")
    log.info("import-dataset %s: %s written to %s (classes.json beside them)", name,
             ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), out)
    return {"dataset": name, "output": out, "splits": dict(sorted(counts.items())), "classes": list(classes)}
