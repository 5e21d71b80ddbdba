"""Zero-shot editing (VAR paper §7): keep the tokens of a given image where a pixel mask says so, at every scale,
and let the prior generate the rest.

- inpainting: keep everything outside a box, regenerate the box (same class);
- outpainting: keep only the box, regenerate around it;
- class-conditional editing: regenerate the box conditioned on another class.

The image is encoded with the tokenizer into multi-scale codes; a token of scale pn x pn is known when
more than half of its area is kept (``known_mask_from_pixels``); the sampler forces known tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from nextscale.config import ConfigError
from nextscale.eval.config import SampleConfig, SamplingConfig
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import sample_batch, seeded_generator
from nextscale.images import center_view, open_image, to_float
from nextscale.prior.model import NextScalePrior
from nextscale.prior.sample import known_mask_from_pixels
from nextscale.tokenize.vqvae import VQVAE

MODES = ("inpaint", "outpaint", "class_edit")


def load_image(url: str, size: int) -> Tensor:
    """(1, 3, size, size) in [-1, 1]: shorter side resized (Lanczos), centre crop."""
    return torch.from_numpy(to_float(np.asarray(center_view(open_image(url), size)))).unsqueeze(0)


def box_mask(size: int, box: tuple[float, float, float, float]) -> Tensor:
    """(size, size) bool, true inside the box (x0, y0, x1, y1) given as fractions of the image."""
    x0, y0, x1, y1 = (round(v * size) for v in box)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@torch.no_grad()
def edit_image(var: NextScalePrior, vqvae: VQVAE, image_13HW: Tensor, keep_HW: Tensor, label: int, generator: torch.Generator,
               sampling: SamplingConfig) -> Tensor:
    """One edited sample, uint8 (1, 3, H, W): the image's tokens where ``keep_HW`` holds, the prior's elsewhere."""
    device = var.pos_start.device
    known_codes_1L = vqvae.encode(image_13HW.to(device))
    known_mask_1L = known_mask_from_pixels(keep_HW.unsqueeze(0).to(device), vqvae.cfg.patch_nums)
    _, img = sample_batch(var, vqvae, [label], generator, sampling, known_codes_BL=known_codes_1L,
                          known_mask_BL=known_mask_1L)
    return img


def edit_rows(var: NextScalePrior, vqvae: VQVAE, cfg: SampleConfig, device: torch.device) -> dict[str, list[Tensor]]:
    """mode -> [the kept pixels (the rest greyed), sample 1, ..., sample n] as uint8 (3, H, W) tiles.

    Sample j of mode m draws from a generator seeded by (seed, 2, m, j).
    """
    e = cfg.edit
    for name, label in (("edit.source_label", e.source_label), ("edit.label", e.label)):
        if not 0 <= label < var.num_classes:
            raise ConfigError(f"{name}={label} is not a class of this prior (it has {var.num_classes})")
    size = vqvae.cfg.image_size
    image = load_image(e.image, size)
    inside = box_mask(size, e.box)
    original = to_uint8(image.add(1).mul(0.5))[0]
    sampling = dataclasses.replace(cfg.sampling, more_smooth=False)  # edits keep the image's exact tokens
    rows = {}
    for mode in e.modes:
        keep = inside if mode == "outpaint" else ~inside
        label = e.label if mode == "class_edit" else e.source_label
        shown = torch.where(keep, original, torch.full_like(original, 128))
        samples = [edit_image(var, vqvae, image, keep, label, seeded_generator(device, cfg.seed, 2, MODES.index(mode), j),
                              sampling)[0] for j in range(e.samples)]
        rows[f"{mode} (class {label})"] = [shown, *samples]
    return rows
