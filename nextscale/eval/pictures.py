"""``nextscale sample``: pictures of a trained prior.

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

import io
import json
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nextscale import storage
from nextscale.config import dump_yaml
from nextscale.eval.config import SampleConfig
from nextscale.eval.edit import edit_rows
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import load_models, resolve_device, sample_batch, seeded_generator
from nextscale.logs import WandbRun
from nextscale.progress import Progress

log = logging.getLogger(__name__)


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
            raise ValueError(f"classes: {c} is not a class of this prior (it has {var.num_classes}); "
                             f"use classes in [0, {var.num_classes})")
        row = []
        for j in range(cfg.samples_per_class):
            _, img = sample_batch(var, vqvae, [c], seeded_generator(device, cfg.seed, 0, c, j), cfg=cfg.cfg,
                                  top_k=cfg.top_k, top_p=cfg.top_p, more_smooth=cfg.more_smooth)
            row.append(img[0])
            if progress is not None:
                progress.update()
        rows.append(row)
    return rows


def coarse_to_fine(var, vqvae, cfg: SampleConfig, device: torch.device,
                   progress: Progress | None = None) -> list[list[Tensor]]:
    """Row r: class classes[r % len(classes)], decoded after 1, 2, ..., S scales."""
    rows = []
    for r in range(cfg.coarse_to_fine):
        c = cfg.classes[r % len(cfg.classes)]
        codes, _ = sample_batch(var, vqvae, [c], seeded_generator(device, cfg.seed, 1, r), cfg=cfg.cfg,
                                top_k=cfg.top_k, top_p=cfg.top_p)
        S = len(vqvae.cfg.patch_nums)
        rows.append([to_uint8(vqvae.decode(codes, num_scales=k).add(1).mul(0.5))[0] for k in range(1, S + 1)])
        if progress is not None:
            progress.update()
    return rows


def run(cfg: SampleConfig) -> dict:
    """Write the pictures of ``cfg`` to ``cfg.output``; returns a JSON-able summary."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    var, vqvae = load_models(cfg.models, device)
    storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
    wandb = WandbRun(cfg.wandb, run_id=f"sample-{cfg.output.rstrip('/').rsplit('/', 1)[-1]}", config=cfg)
    pictures: dict[str, dict] = {}

    def save(name: str, image: np.ndarray, caption: str) -> None:
        url = storage.join(cfg.output, f"{name}.png")
        storage.write_bytes(url, png_bytes(image))
        wandb.log_image(name, image, caption=caption)
        pictures[name] = {"url": url, "height": image.shape[0], "width": image.shape[1]}

    n = len(cfg.classes) * cfg.samples_per_class + cfg.coarse_to_fine
    with Progress(n, "sample", unit="img") as progress:
        grid = tile_grid(sample_grid(var, vqvae, cfg, device, progress), upscale=cfg.upscale, padding=cfg.padding)
        save("grid", grid, f"classes {list(cfg.classes)}, cfg {cfg.cfg}, top-k {cfg.top_k}, top-p {cfg.top_p}")
        if cfg.coarse_to_fine:
            save("coarse_to_fine", tile_grid(coarse_to_fine(var, vqvae, cfg, device, progress), upscale=cfg.upscale,
                                             padding=cfg.padding), f"scales {list(vqvae.cfg.patch_nums)}")
    if cfg.edit.image:
        rows = edit_rows(var, vqvae, cfg, device)
        save("edit", tile_grid(list(rows.values()), upscale=cfg.upscale, padding=cfg.padding),
             f"rows: {', '.join(rows)} (first column: the kept pixels)")
    wandb.finish()
    seconds = time.perf_counter() - t0
    summary = {"pictures": pictures, "images_sampled": n, "seconds": round(seconds, 2), "device": str(device)}
    storage.write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=1))
    log.info("sample: %d images from %s on %s in %.1f s; wrote %s to %s", n, cfg.models.prior_url, device, seconds,
             ", ".join(f"{k}.png" for k in pictures), cfg.output)
    return summary
