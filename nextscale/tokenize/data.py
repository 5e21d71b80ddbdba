"""Data for tokenizer training: the images of an ImageFolder (listed by ``nextscale.images``) as a torch Dataset.

Training samples: shorter side resized (Lanczos) to ``round(image_size * crop_ratio)``, a random
``image_size`` crop and an optional horizontal flip. Held-out samples: shorter side resized to
``image_size`` and a centre crop (``nextscale.images.center_view``). Augmentation randomness comes from
``(seed, epoch, index)`` only, so a run is reproducible whatever the number of loader workers, and
:class:`EpochSampler` can resume in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from nextscale.config import ConfigError
from nextscale.images import center_view, open_image, resize_shorter, to_float


class ImageFolderDataset(Dataset):
    """Images of an ImageFolder as (3, S, S) tensors in [-1, 1]; ``train`` picks the augmentation.

    ``cache`` decodes and resizes every image once into memory (small datasets such as the demo one).
    """

    def __init__(self, items: list[tuple[str, int]], image_size: int, *, train: bool, crop_ratio: float = 1.125,
                 hflip: bool = True, seed: int = 0, cache: bool = False):
        self.items = items
        self.image_size = image_size
        self.train = train
        self.base_size = round(image_size * crop_ratio)
        self.hflip = hflip and train
        self.seed = seed
        self.epoch = 0
        self._cache = [self._load(i) for i in range(len(items))] if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int) -> Image.Image:
        img = open_image(self.items[i][0])
        return resize_shorter(img, self.base_size) if self.train else center_view(img, self.image_size)

    def __getitem__(self, i: int) -> Tensor:
        img = self._cache[i] if self._cache is not None else self._load(i)
        if not self.train:
            return torch.from_numpy(to_float(np.asarray(img)))
        rng = np.random.default_rng((self.seed, self.epoch, i))
        w, h = img.size
        left, top = int(rng.integers(0, w - self.image_size + 1)), int(rng.integers(0, h - self.image_size + 1))
        img = img.crop((left, top, left + self.image_size, top + self.image_size))
        x = torch.from_numpy(to_float(np.asarray(img)))
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
            raise ConfigError(f"{n} images cannot be split over {world_size} workers; use more images or fewer workers")

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        mine = perm[self.rank :: self.world_size].tolist()
        return iter(mine[self.start :])
