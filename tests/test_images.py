"""nextscale.images: the preprocessing is torchvision's as the official VAR code uses it, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from nextscale.images import center_view, make_views, resize_shorter, to_float

# landscape, portrait, odd and even margins, already at size, smaller than the target (upsampling)
SIZES = [(90, 70), (70, 90), (257, 300), (301, 256), (64, 64), (72, 72), (40, 50), (101, 77)]


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_resize_and_center_crop_equal_torchvision(size):
    img = _photo(sum(size), size)
    for side in (64, 72):
        official = transforms.Compose([transforms.Resize(side, interpolation=InterpolationMode.LANCZOS),
                                       transforms.CenterCrop(side)])
        resized = transforms.Resize(side, interpolation=InterpolationMode.LANCZOS)(img)
        assert resize_shorter(img, side).size == resized.size
        assert np.array_equal(np.asarray(resize_shorter(img, side)), np.asarray(resized))
        assert np.array_equal(np.asarray(center_view(img, side)), np.asarray(official(img)))
        view = make_views(img, "k", image_size=side, views=1, augmentation="center", seed=0)[0]
        assert np.array_equal(view, np.asarray(official(img)))


@pytest.mark.parametrize("size", SIZES)
def test_official_views_are_torchvision_random_crops_of_the_lanczos_resize(size):
    """The official training transform: Resize(round(1.125 * S), LANCZOS) then RandomCrop(S), no flip.
    Every view must be exactly torchvision's crop of that resize at some offset (the offsets are ours, seeded)."""
    img, side = _photo(7 + sum(size), size), 64
    resized = transforms.Resize(round(1.125 * side), interpolation=InterpolationMode.LANCZOS)(img)
    w, h = resized.size
    crops = {(top, left): np.asarray(TF.crop(resized, top, left, side, side))
             for top in range(h - side + 1) for left in range(w - side + 1)}
    views = make_views(img, "cat/a", image_size=side, views=6, augmentation="official", seed=0, crop_ratio=1.125)
    offsets = [next((o for o, c in crops.items() if np.array_equal(c, v)), None) for v in views]
    assert None not in offsets
    assert len(set(offsets)) > 1 or len(crops) == 1


def test_to_float_equals_totensor_and_normalize_01_into_pm1():
    img = _photo(3, (33, 21))
    t = transforms.ToTensor()(img)
    official = t.add(t).add_(-1)  # VAR utils/data.py normalize_01_into_pm1
    ours = torch.from_numpy(to_float(np.asarray(img)))
    assert ours.dtype == torch.float32 and torch.equal(ours, official)
    batch = np.stack([np.asarray(img)] * 2)
    assert torch.equal(torch.from_numpy(to_float(batch))[1], official)
