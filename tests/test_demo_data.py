"""The built-in demo dataset is deterministic, complete and class-distinct."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from nextscale.demo_data import CLASSES, make_demo_data, render


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".jpg"):
                h.update(f.encode())
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def test_same_bytes_on_every_run_and_imagefolder_layout(tmp_path):
    counts = {"train": 3, "val": 2}
    a = make_demo_data(str(tmp_path / "a"), counts)
    make_demo_data(str(tmp_path / "b"), counts)
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))
    assert a["classes"] == sorted(a["classes"]) == sorted(os.listdir(tmp_path / "a" / "train"))
    for split, n in counts.items():
        for name in a["classes"]:
            files = sorted(os.listdir(tmp_path / "a" / split / name))
            assert len(files) == n
            img = Image.open(tmp_path / "a" / split / name / files[0])
            assert img.size == (64, 64) and img.mode == "RGB" and img.format == "JPEG"


def test_splits_differ_and_classes_have_distinct_colours():
    assert not np.array_equal(np.asarray(render(0, 0, 0)), np.asarray(render(0, 1, 0)))
    # the shape colour dominates the centre of the image: nearest base colour identifies the class
    hits = 0
    for c in range(len(CLASSES)):
        for j in range(5):
            centre = np.asarray(render(c, 0, j), dtype=np.float32)[24:40, 24:40].reshape(-1, 3)
            dists = [np.abs(centre - np.array(col)).sum(1).min() for _, _, col in CLASSES]
            hits += int(np.argmin(dists) == c)
    assert hits >= 45
