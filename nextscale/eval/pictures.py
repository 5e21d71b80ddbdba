"""The pictures ``nextscale sample`` makes of a trained prior (its driver: ``nextscale.pipelines.sample``).

- ``grid.png``: one row per class of ``classes``, ``samples_per_class`` columns.
- ``coarse_to_fine.png``: one row per sample, one column per scale: the image decoded from the first k
  scales (``VQVAE.decode(codes, num_scales=k)``), as the VAR analysis figures show it.
- ``edit.png`` (when ``edit.image`` is set): zero-shot inpainting / outpainting / class editing, see
  :mod:`nextscale.eval.edit`.

Seeds are index-addressed: sample j of class c in the grid draws from a generator seeded by
(seed, 0, c, j), row r of the coarse-to-fine figure by (seed, 1, r), so a picture does not change
when other classes or more columns are added.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nextscale.config import ConfigError
from nextscale.eval.config import SampleConfig
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import sample_batch, seeded_generator
from nextscale.progress import Progress


def tile_grid(rows: Sequence[Sequence[Tensor]], *, upscale: int = 1, padding: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (H, W, 3) picture of uint8 (3, h, w) tiles, row by row; ``padding`` pixels around and between tiles.

    Size: rows * (h * upscale) + (rows + 1) * padding by cols * (w * upscale) + (cols + 1) * padding,
    cols = the longest row (shorter rows are left blank on the right).
    """
    h, w = rows[0][0].shape[-2:]
    th, tw = h * upscale, w * upscale
    R, C = len(rows), max(len(r) for r in rows)
    out = np.full((R * th + (R + 1) * padding, C * tw + (C + 1) * padding, 3), fill, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            arr = tile.detach().cpu().permute(1, 2, 0).numpy()
            if upscale > 1:
                arr = arr.repeat(upscale, axis=0).repeat(upscale, axis=1)
            y, x = padding + r * (th + padding), padding + c * (tw + padding)
            out[y:y + th, x:x + tw] = arr
    return out


def png_bytes(image_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG")
    return buf.getvalue()


def sample_grid(var, vqvae, cfg: SampleConfig, device: torch.device, progress: Progress | None = None) -> list[list[Tensor]]:
    rows = []
    for c in cfg.classes:
        if c >= var.num_classes:
            raise ConfigError(f"classes: {c} is not a class of this prior (it has {var.num_classes}); "
                             f"use classes in [0, {var.num_classes})")
        row = []
        for j in range(cfg.samples_per_class):
            _, img = sample_batch(var, vqvae, [c], seeded_generator(device, cfg.seed, 0, c, j), cfg.sampling)
            row.append(img[0])
            if progress is not None:
                progress.update()
        rows.append(row)
    return rows


def coarse_to_fine(var, vqvae, cfg: SampleConfig, device: torch.device,
                   progress: Progress | None = None) -> list[list[Tensor]]:
    """Row r: class classes[r % len(classes)], decoded after 1, 2, ..., S scales."""
    sampling = dataclasses.replace(cfg.sampling, more_smooth=False)  # the figure decodes the hard codes
    rows = []
    for r in range(cfg.coarse_to_fine):
        c = cfg.classes[r % len(cfg.classes)]
        codes, _ = sample_batch(var, vqvae, [c], seeded_generator(device, cfg.seed, 1, r), sampling)
        S = len(vqvae.cfg.patch_nums)
        rows.append([to_uint8(vqvae.decode(codes, num_scales=k).add(1).mul(0.5))[0] for k in range(1, S + 1)])
        if progress is not None:
            progress.update()
    return rows
