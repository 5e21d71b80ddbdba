"""The Python API for notebooks and scripts: load a tokenizer and a prior, sample, encode, decode, share.

    import nextscale
    tokenizer = nextscale.load_tokenizer("hf://FoundationVision/var/vae_ch160v4096z32.pth")
    prior = nextscale.load_prior("hf://FoundationVision/var/var_d16.pth")
    images = nextscale.sample(prior, tokenizer, classes=[207, 360, 387], seed=0)   # list of PIL images
    codes = nextscale.encode(tokenizer, images)                                   # (B, L) int64
    again = nextscale.decode(tokenizer, codes)

Every location may be a local path or an ``s3://``, ``gs://``, ``hf://`` or ``https://`` URL (see
``docs/api.md``). The functions are thin fronts over the stages' own code (the same loaders, sampler and
preprocessing as ``nextscale tokenize`` / ``sample`` / ``fid``), so a notebook sees the numbers the jobs see.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from nextscale import pretrained
from nextscale.config import to_dict
from nextscale.devices import pick_device
from nextscale.eval.config import SamplingConfig
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import sample_batch, seeded_generator
from nextscale.images import make_views, to_float, to_rgb
from nextscale.prior import loader as prior_loader
from nextscale.prior.model import NextScalePrior
from nextscale.tokenize import loader as tokenizer_loader
from nextscale.tokenize.vqvae import VQVAE

__all__ = ["load_tokenizer", "load_prior", "sample", "encode", "decode", "save_pretrained", "from_pretrained"]


def load_tokenizer(source: str, preset: str = "vae_ch160v4096z32", *, seed: int = 0,
                   device: str | torch.device | None = None) -> VQVAE:
    """A VQVAE tokenizer in eval mode on ``device`` (default: CUDA when available) from

    - an official ``.pth`` (e.g. ``hf://FoundationVision/var/vae_ch160v4096z32.pth``), built as ``preset``
      (``vae_ch160v4096z32``; ``vae_ch160v4096z32_512`` for the 512-px VAR-d36);
    - a ``tokenizer.pt`` from ``nextscale train-tokenizer``, or a folder from :func:`save_pretrained`;
    - a preset name: seeded random weights (tests, trying the API offline).
    """
    return tokenizer_loader.load_tokenizer(source, preset=preset, seed=seed, device=pick_device(device or "auto"))[0]


def load_prior(source: str, preset: str | None = None, *, seed: int = 0,
               device: str | torch.device | None = None) -> NextScalePrior:
    """A prior (VAR, M-VAR, ...) in eval mode on ``device`` (default: CUDA when available) from

    - an official ``.pth`` (e.g. ``hf://FoundationVision/var/var_d16.pth``); ``preset`` None picks the preset
      whose family, depth and width the file has (d16, d20, d24, d30, d36, mvar_d16, ...);
    - a ``prior.pt`` from ``nextscale train-prior``, or a folder from :func:`save_pretrained`;
    - a preset name: seeded random weights (tests, trying the API offline).
    """
    return prior_loader.load_prior(source, preset, seed=seed, device=pick_device(device or "auto"))[0]


def save_pretrained(model: nn.Module, url: str) -> None:
    """Write a prior or tokenizer as ``url/config.json`` + ``url/model.safetensors`` (a local folder, ``s3://``,
    ``gs://``, ``hf://<user>/<repo>``); :func:`from_pretrained` and both loaders read it back bitwise."""
    if isinstance(model, NextScalePrior):
        kind = "var"
    elif isinstance(model, VQVAE):
        kind = "vqvae"
    else:
        raise TypeError(f"save_pretrained takes a nextscale prior or VQVAE, not {type(model).__name__}")
    pretrained.write_folder(url, kind, to_dict(model.cfg), model.state_dict())


def from_pretrained(url: str, kind: str = "") -> nn.Module:
    """The model saved at ``url`` by :func:`save_pretrained` (eval mode, gradients off, on the CPU); ``kind``
    ("var" | "vqvae") refuses the other."""
    kind = kind or pretrained.read_config(url)["model"]
    if kind == "var":
        return prior_loader.load_prior(url)[0]
    return tokenizer_loader.load_tokenizer(url)[0]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_pil(img_B3HW_uint8: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in img_B3HW_uint8.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def sample(prior: NextScalePrior, tokenizer: VQVAE, classes: Sequence[int] | Tensor, *, seed: int = 0, guidance: float = 1.5,
           top_k: int = 900, top_p: float = 0.96, more_smooth: bool = False, batch_size: int = 32,
           pil: bool = True) -> list[Image.Image] | Tensor:
    """One image per entry of ``classes`` (``prior.num_classes`` = unconditional): PIL images, or with
    ``pil=False`` a uint8 tensor (B, 3, H, W). Defaults are the paper's FID protocol (guidance 1.5, top-k 900,
    top-p 0.96; ``guidance`` is the official ``cfg``); ``more_smooth=True`` gives smoother pictures (never for FID).

    Batch b of ``batch_size`` classes draws from a generator seeded by (seed, b) alone: the same call gives
    the same images on the same device.
    """
    device = prior.pos_start.device
    labels = torch.as_tensor(classes, dtype=torch.long).view(-1)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > prior.num_classes):
        raise ValueError(f"classes must be in [0, {prior.num_classes}] ({prior.num_classes} = unconditional)")
    sampling = SamplingConfig(guidance=guidance, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
    out = []
    for b, start in enumerate(range(0, len(labels), batch_size)):
        gen = seeded_generator(device, seed, b)
        _, img = sample_batch(prior, tokenizer, labels[start:start + batch_size], gen, sampling)
        out.append(img.cpu())
    images = torch.cat(out) if out else torch.zeros(0, 3, tokenizer.cfg.image_size, tokenizer.cfg.image_size,
                                                       dtype=torch.uint8)
    return _to_pil(images) if pil else images


def _as_batch(tokenizer: VQVAE, images: Image.Image | Sequence[Image.Image] | Tensor | np.ndarray) -> Tensor:
    """Images -> float (B, 3, S, S) in [-1, 1] on the tokenizer's device."""
    s = tokenizer.cfg.image_size
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (Tensor, np.ndarray)):
        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be (B, 3, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = torch.from_numpy(to_float(x.permute(0, 2, 3, 1).numpy()))
        return x.to(_model_device(tokenizer), torch.float32)
    views = [make_views(to_rgb(im), "", image_size=s, views=1, augmentation="center", seed=0)[0] for im in images]
    x = torch.from_numpy(to_float(np.stack(views))) if views else torch.zeros(0, 3, s, s)
    return x.to(_model_device(tokenizer))


@torch.no_grad()
def encode(tokenizer: VQVAE, images: Image.Image | Sequence[Image.Image] | Tensor | np.ndarray) -> Tensor:
    """Codes (B, L) int64, scale-major, of PIL images (resized so the shorter side is the tokenizer's size,
    then centre-cropped, as ``nextscale tokenize augmentation=center``) or of a tensor (B, 3, S, S): uint8,
    or float in [-1, 1]."""
    return tokenizer.encode(_as_batch(tokenizer, images)).cpu()


@torch.no_grad()
def decode(tokenizer: VQVAE, codes_BL: Tensor, *, pil: bool = True) -> list[Image.Image] | Tensor:
    """Images of codes (B, L): PIL images, or with ``pil=False`` a uint8 tensor (B, 3, H, W)."""
    codes_BL = torch.as_tensor(codes_BL, device=_model_device(tokenizer)).long()
    if codes_BL.ndim != 2 or codes_BL.shape[1] != tokenizer.cfg.num_tokens:
        raise ValueError(f"codes must be (B, {tokenizer.cfg.num_tokens}) for this tokenizer, got {tuple(codes_BL.shape)}")
    images = to_uint8(tokenizer.decode(codes_BL).add(1).mul(0.5)).cpu()
    return _to_pil(images) if pil else images

