"""The encoder of the pretokenizing job: uint8 views -> uint16 multi-scale codes, one tokenizer per process.

:class:`CodeEncoder` is a plain callable class (Ray Data runs it in an actor pool, tests call it directly).
The tokenizer is anything ``nextscale.tokenize.loader.load_tokenizer`` reads: a ``tokenizer.pt``, an
official ``.pth`` (built as ``preset``), the raw bytes of either, or a preset name (seeded random weights).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from nextscale.devices import pick_device
from nextscale.images import to_float
from nextscale.tokenize.loader import load_tokenizer

log = logging.getLogger(__name__)




class CodeEncoder:
    """``batch["views"]`` uint8 (B, K, S, S, 3) -> ``batch["codes"]`` uint16 (B, K, L); other keys pass through.

    Loads the tokenizer once. ``precision="bf16"`` runs the convolutions under autocast on GPU (the quantiser
    stays fp32); on CPU everything is fp32. ``channels_last``: NHWC convolutions (see ``VQVAE.channels_last_``).
    """

    def __init__(self, tokenizer: str | bytes, *, preset: str = "vae_ch160v4096z32", seed: int = 0,
                 precision: str = "fp32", device: str = "auto", channels_last: bool = False):
        self.device = pick_device(device)
        model, self.identity = load_tokenizer(tokenizer, preset=preset, seed=seed)
        self.model = model.to(self.device).channels_last_(channels_last)
        self.amp_dtype = torch.bfloat16 if precision == "bf16" and self.device.type == "cuda" else None
        if self.device.type == "cuda":
            # same convolution algorithms every run: codes are a dataset artefact, reruns must be byte-identical
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.image_size = model.cfg.image_size
        self.num_tokens = model.cfg.num_tokens

    def encode_views(self, views_NHWC: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> uint16 (N, L)."""
        if len(views_NHWC) == 0:
            return np.zeros((0, self.num_tokens), dtype=np.uint16)
        x = torch.from_numpy(to_float(views_NHWC)).to(self.device, non_blocking=True)
        codes = self.model.encode(x, amp_dtype=self.amp_dtype)
        return codes.to(torch.int32).cpu().numpy().astype(np.uint16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = np.asarray(batch["views"])
        B, K = views.shape[:2]
        out = {k: v for k, v in batch.items() if k != "views"}
        out["codes"] = self.encode_views(views.reshape(B * K, *views.shape[2:])).reshape(B, K, self.num_tokens)
        return out
