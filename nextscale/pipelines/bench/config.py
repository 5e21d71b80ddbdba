"""The config of ``nextscale bench``: which figures, at which sizes, on which device."""

from __future__ import annotations

import dataclasses
from typing import Literal

from nextscale.config import Device, RayConfig, doc, require

FIGURES = ("train", "sample", "encode", "loader", "tokenize", "mvar")
TRAIN_LEVERS = ("flex", "compile", "chunked_ce", "prefetch", "fused_adamw")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    what: tuple[str, ...] = doc(FIGURES, f"figures to measure, any of {', '.join(FIGURES)}")
    device: Device = doc("auto", "cpu, cuda, or auto = cuda when this process sees a GPU")
    prior_presets: tuple[str, ...] = doc(("auto",), "VAR presets, each measured in turn; auto = d16 on a GPU, "
                                                    "demo on a CPU")
    tokenizer_preset: str = doc("auto", "VQVAE preset paired with a VAR preset other than demo (demo pairs with "
                                        "demo); auto = vae_ch160v4096z32")
    mvar_preset: str = doc("auto", "M-VAR preset measured beside each VAR one; auto = mvar_<VAR preset>")
    levers: tuple[str, ...] = doc(TRAIN_LEVERS, "training levers measured one at a time and all together "
                                                f"(any of {', '.join(TRAIN_LEVERS)}); () = the plain step only")
    batch_size: int = doc(0, "images per step; 0 = 64 on a GPU, 16 on a CPU")
    steps: int = doc(0, "timed calls per side of each ratio, interleaved A B B A ...; 0 = 20 on a GPU, 6 on a CPU")
    warmup: int = doc(0, "untimed calls per side first (compilation happens here); 0 = 5 on a GPU, 1 on a CPU")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "autocast dtype of training and sampling; auto = "
                                                             "bf16 on a GPU, fp32 on a CPU")
    loss_chunk: int = doc(8192, "tokens per chunk of the chunked_ce lever")
    tokenize_images: int = doc(64, "images of the built-in demo dataset run through the tokenize job")
    tokenize_images_dir: str = doc("", "ImageFolder of real images for the tokenize job instead of the demo dataset "
                                       "(e.g. 256-px ImageNet JPEGs)")
    projection_devices: int = doc(8, "devices assumed by the ImageNet cost projection")
    projection_views: int = doc(1, "augmented views per image assumed by the pretokenizing projection")
    projection_epochs: int = doc(200, "epochs assumed by the training projection (d16 recipe: 200)")
    output: str = doc("", "also append the JSON lines to this file (local or object storage)")
    ray: RayConfig = doc(RayConfig(), "Ray cluster for the tokenize figure")

    def __post_init__(self):
        unknown = sorted(set(self.what) - set(FIGURES))
        require(not unknown, f"what: unknown figure {unknown[0] if unknown else ''!r}; choose from {', '.join(FIGURES)}")
        bad = sorted(set(self.levers) - set(TRAIN_LEVERS))
        require(not bad, f"levers: unknown lever {bad[0] if bad else ''!r}; choose from {', '.join(TRAIN_LEVERS)}")
        require(len(self.prior_presets) >= 1, "prior_presets is empty: name at least one VAR preset (or auto)")
        require(self.loss_chunk >= 1, f"loss_chunk={self.loss_chunk} must be >= 1")
