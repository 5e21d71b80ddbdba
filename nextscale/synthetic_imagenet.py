"""A synthetic dataset with ImageNet's counts, for the scale rehearsal (``make rehearse-scale``, docs/scaling.md).

1,281,167 training and 50,000 validation images in 1,000 classes (scaled by ``fraction``), in the layouts
users have: parquet files as imagenet-1k on the Hugging Face Hub (``data/{split}-00000-of-00294.parquet``, an
``image`` struct of ``{bytes, path}`` and an int ``label``), WebDataset tars (``wds/{split}-000000.tar``, 1,000
for the training split, ``<key>.png`` + ``<key>.cls``) and an ImageFolder of the first tenth of every class's
training images (``imagefolder/train/<wnid>/<wnid>_<index>.png``; 129,000 files at full size).

Image ``i`` of a split has the label ``labels(split, n)[i]`` (classes hold ImageNet-like unequal counts, in a
seeded random order, as the Hub's shuffled files) and is a 20-px PNG whose class can be read back from its
pixels (:func:`class_of_pixels`: three horizontal bands whose red, green and blue levels are the class's
decimal digits). Each class has :data:`VARIANTS` textures, so only 4,000 distinct images are encoded and
their bytes reused; every :data:`BAD_EVERY`-th image is a truncated file that the tokenize job must list as
rejected. Everything is a pure function of the split, the index and :data:`SEED`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SEED = 20260421
COUNTS = {"train": 1_281_167, "val": 50_000}
NUM_CLASSES = 1000
HUB_FILES = {"train": 294, "val": 14}  # imagenet-1k's parquet files on the Hub
WDS_TARS = {"train": 1000, "val": 50}
FOLDER_SHARE = 10  # the ImageFolder holds the first 1/10 of every class's training images
IMAGE_SIZE = 20
VARIANTS = 4
BAD_EVERY = 10_007  # image i is truncated when i % BAD_EVERY == BAD_EVERY - 1
LEVELS = np.arange(10) * 25 + 15  # channel level of a decimal digit


def wnid(label: int) -> str:
    """A WordNet-id-like class folder name; sorted names follow the label order, as ImageNet's do."""
    return f"n{label:08d}"


def split_size(split: str, fraction: float) -> int:
    return max(NUM_CLASSES, round(COUNTS[split] * fraction))


def labels(split: str, n: int) -> np.ndarray:
    """Labels (n,) int16: class c holds n // 1000 images, plus one for c < n % 1000, in a seeded shuffled order."""
    per_class = np.full(NUM_CLASSES, n // NUM_CLASSES) + (np.arange(NUM_CLASSES) < n % NUM_CLASSES)
    out = np.repeat(np.arange(NUM_CLASSES, dtype=np.int16), per_class)
    np.random.default_rng((SEED, list(COUNTS).index(split))).shuffle(out)
    return out


def is_bad(i: int) -> bool:
    return i % BAD_EVERY == BAD_EVERY - 1


@functools.cache
def class_image(label: int, variant: int) -> bytes:
    """PNG bytes of one of the class's :data:`VARIANTS` images."""
    rng = np.random.default_rng((SEED, label, variant))
    img = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # texture in the other channels
    digits = (label // 100, label // 10 % 10, label % 10)
    for band, (rows, digit) in enumerate(zip(np.array_split(np.arange(IMAGE_SIZE), 3), digits)):
        img[rows, :, band] = LEVELS[digit]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(i: int, label: int) -> bytes:
    """The file of image ``i``: its class's variant ``i % VARIANTS``, or a truncated PNG for a planted bad one."""
    data = class_image(int(label), i % VARIANTS)
    return data[: len(data) // 2] if is_bad(i) else data


def class_of_pixels(image) -> int:
    """The class drawn into an image of this dataset (a PIL image or an (H, W, 3) uint8 array)."""
    arr = np.asarray(image)
    digits = [int(np.abs(LEVELS - np.median(arr[rows, :, band])).argmin())
              for band, rows in enumerate(np.array_split(np.arange(arr.shape[0]), 3))]
    return digits[0] * 100 + digits[1] * 10 + digits[2]


# ------------------------------------------------------------------------------------------------
# Writers


def _hub_name(split: str, k: int, files: int) -> str:
    return f"{split}-{k:05d}-of-{files:05d}.parquet"


def write_parquet(folder: str, split: str, y: np.ndarray, files: int) -> list[str]:
    """imagenet-1k's Hub layout: ``files`` parquet files of consecutive images (row groups of 1,000)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    names = []
    for k, idx in enumerate(np.array_split(np.arange(len(y)), files)):
        data = pa.array([image_bytes(int(i), y[i]) for i in idx], pa.binary())
        paths = pa.array([f"{wnid(int(y[i]))}_{i}.png" for i in idx], pa.string())
        table = pa.table({"image": pa.StructArray.from_arrays([data, paths], names=["bytes", "path"]),
                          "label": pa.array(y[idx].astype(np.int64))})
        names.append(_hub_name(split, k, files))
        pq.write_table(table, os.path.join(folder, names[-1]), row_group_size=1000)
    return names


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder: str, split: str, y: np.ndarray, tars: int) -> list[str]:
    """WebDataset tars of consecutive images: ``<split>_<index>.png`` and ``.cls`` members."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for k, idx in enumerate(np.array_split(np.arange(len(y)), tars)):
        names.append(f"{split}-{k:06d}.tar")
        with tarfile.open(os.path.join(folder, names[-1]), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx.tolist():
                _add(tar, f"{split}_{i:07d}.png", image_bytes(i, y[i]))
                _add(tar, f"{split}_{i:07d}.cls", str(int(y[i])).encode())
    return names


def folder_share(y: np.ndarray) -> np.ndarray:
    """Indices of the ImageFolder's images: the first 1/:data:`FOLDER_SHARE` of every class (rounded up)."""
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=NUM_CLASSES)
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.flatnonzero(rank < -(-counts[y] // FOLDER_SHARE))


def write_image_folder(root: str, y: np.ndarray, indices: np.ndarray) -> None:
    """``root/<wnid>/<wnid>_<index>.png`` for the images ``indices`` of labels ``y``."""
    for c in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, wnid(c)), exist_ok=True)
    for i in indices.tolist():
        with open(os.path.join(root, wnid(int(y[i])), f"{wnid(int(y[i]))}_{i:07d}.png"), "wb") as f:
            f.write(image_bytes(i, y[i]))


def expected(y: np.ndarray, indices: np.ndarray | None = None) -> dict:
    """What tokenizing the images ``indices`` (default: all) of labels ``y`` must give: listed, accepted, rejected,
    accepted per class."""
    indices = np.arange(len(y)) if indices is None else indices
    ok = indices % BAD_EVERY != BAD_EVERY - 1
    per_class = np.bincount(y[indices][ok], minlength=NUM_CLASSES)
    return {"listed": len(indices), "accepted": int(ok.sum()), "rejected": int((~ok).sum()),
            "accepted_per_class": per_class.tolist()}


FORMATS = ("parquet", "webdataset", "imagefolder")


def make_synthetic_imagenet(out: str, fraction: float = 1.0, formats: tuple[str, ...] = FORMATS) -> dict:
    """Write the dataset at ``fraction`` of ImageNet's counts in ``formats`` under ``out`` (kept when its
    ``dataset.json`` matches) and return its summary: locations, counts and what tokenizing each input must give."""
    summary_path = os.path.join(out, "dataset.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if (summary.get("fraction"), summary.get("seed"), summary.get("formats")) == (fraction, SEED, list(formats)):
            log.info("synthetic ImageNet (%g) already at %s", fraction, out)
            return summary
    sizes = {split: split_size(split, fraction) for split in COUNTS}
    y = {split: labels(split, n) for split, n in sizes.items()}
    summary = {"fraction": fraction, "seed": SEED, "formats": list(formats), "num_classes": NUM_CLASSES,
               "image_size": IMAGE_SIZE, "sizes": sizes, "inputs": {}}
    for split in COUNTS:
        files = max(1, round(HUB_FILES[split] * fraction))  # the key -> index map needs them in every format
        summary["inputs"][f"{split}_parquet"] = {"url": os.path.join(out, "data", f"{split}-*.parquet"),
                                                 "files": files, **expected(y[split])}
        if "parquet" in formats:
            write_parquet(os.path.join(out, "data"), split, y[split], files)
        if "webdataset" in formats:
            tars = max(1, round(WDS_TARS[split] * fraction))
            write_tars(os.path.join(out, "wds", split), split, y[split], tars)
            summary["inputs"][f"{split}_wds"] = {"url": os.path.join(out, "wds", split), "files": tars,
                                                 **expected(y[split])}
    if "imagefolder" in formats:
        share = folder_share(y["train"])
        write_image_folder(os.path.join(out, "imagefolder", "train"), y["train"], share)
        summary["inputs"]["train_imagefolder"] = {"url": os.path.join(out, "imagefolder", "train"),
                                                  "files": len(share), **expected(y["train"], share)}
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    log.info("wrote synthetic ImageNet at %g of its counts (%s) to %s", fraction, sizes, out)
    return summary
