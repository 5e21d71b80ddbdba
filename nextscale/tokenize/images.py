"""Images for tokenizer training: an ImageFolder (local or any ``nextscale.storage`` URL) as a torch Dataset.

Training samples: shorter side resized (Lanczos) to ``round(image_size * crop_ratio)``, a random
``image_size`` crop and an optional horizontal flip. Held-out samples: shorter side resized to
``image_size`` and a centre crop. Augmentation randomness comes from ``(seed, epoch, index)`` only, so
a run is reproducible whatever the number of loader workers, and :class:`EpochSampler` can resume in
the middle of an epoch.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from nextscale import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_image_folder(url: str) -> list[tuple[str, int]]:
    """(image URL, class index) for ``url/<class>/<image>``, classes and files in sorted order."""
    classes = [c for c in storage.listdir(url) if not c.startswith(".") and not c.lower().endswith(IMAGE_EXTENSIONS)]
    items = [(storage.join(url, c, f), label) for label, c in enumerate(classes)
             for f in storage.listdir(storage.join(url, c)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise FileNotFoundError(
            f"no images under {url!r}: expected an ImageFolder (url/<class>/<image>.jpg); "
            "for the demo run `nextscale make-demo-data data/demo`"
        )
    return items


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Resize (Lanczos) so that the shorter side is ``side`` pixels."""
    w, h = img.size
    if min(w, h) == side:
        return img
    s = side / min(w, h)
    return img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.LANCZOS)


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def center_crop(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


class ImageFolderDataset(Dataset):
    """Images of an ImageFolder as (3, S, S) tensors in [-1, 1]; ``train`` picks the augmentation.

    ``cache`` decodes and resizes every image once into memory (small datasets such as the demo one).
    """

    def __init__(self, items: list[tuple[str, int]], image_size: int, *, train: bool, crop_ratio: float = 1.125,
                 hflip: bool = True, seed: int = 0, cache: bool = False):
        self.items = items
        self.image_size = image_size
        self.train = train
        self.base_size = round(image_size * crop_ratio) if train else image_size
        self.hflip = hflip and train
        self.seed = seed
        self.epoch = 0
        self._cache = [self._load(i) for i in range(len(items))] if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int) -> Image.Image:
        url = self.items[i][0]
        try:
            img = Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot decode image {url}: {e}; remove or replace the file") from e
        img = resize_shorter(img, self.base_size)
        return img if self.train else center_crop(img, self.image_size)

    def __getitem__(self, i: int) -> Tensor:
        img = self._cache[i] if self._cache is not None else self._load(i)
        if not self.train:
            return to_tensor(img)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        w, h = img.size
        left, top = int(rng.integers(0, w - self.image_size + 1)), int(rng.integers(0, h - self.image_size + 1))
        img = img.crop((left, top, left + self.image_size, top + self.image_size))
        x = to_tensor(img)
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return x


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, this rank's share of it, resumable at any batch.

    Every rank gets ``len(dataset) // world_size`` indices (the remainder is dropped, so ranks stay in step).
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.start = epoch, start
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise ValueError(f"{n} images cannot be split over {world_size} workers; use more images or fewer workers")

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        mine = perm[self.rank :: self.world_size].tolist()
        return iter(mine[self.start :])
