"""``nextscale sample``: the pictures of :mod:`nextscale.eval.pictures` from a trained prior, written to ``output``.

It runs in the driver's process on its device (a few dozen images need no cluster): grid.png,
coarse_to_fine.png, edit.png (when ``edit.image`` is set), summary.json, config.yaml.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from nextscale import storage
from nextscale.config import dump_yaml
from nextscale.devices import pick_device
from nextscale.eval.config import SampleConfig
from nextscale.eval.edit import edit_rows
from nextscale.eval.generate import load_models
from nextscale.eval.pictures import coarse_to_fine, png_bytes, sample_grid, tile_grid
from nextscale.logs import WandbRun
from nextscale.progress import Progress

log = logging.getLogger(__name__)


def run(cfg: SampleConfig) -> dict:
    """Write the pictures of ``cfg`` to ``cfg.output``; returns a JSON-able summary."""
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
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
        save("grid", grid, f"classes {list(cfg.classes)}, {cfg.sampling}")
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
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    log.info("sample: %d images from %s on %s in %.1f s; wrote %s to %s", n, cfg.models.prior_url, device, seconds,
             ", ".join(f"{k}.png" for k in pictures), cfg.output)
    return summary
