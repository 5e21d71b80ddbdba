"""The encoder of the pretokenizing job: uint8 views -> uint16 multi-scale codes, one tokenizer per process.

:class:`CodeEncoder` is a plain callable class (Ray Data runs it in an actor pool, tests call it directly).
The tokenizer comes from a ``tokenizer.pt`` written by train-tokenizer, an official ``.pth`` (built as
``preset``), the raw bytes of either, or a preset name with seeded random weights (tests and benchmarks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch

from nextscale import storage
from nextscale.config import to_dict
from nextscale.tokenize.preprocess import to_float
from nextscale.tokenize.vqvae import VQVAE, VQVAE_PRESETS, build_vqvae

log = logging.getLogger(__name__)


def is_preset(spec: str) -> bool:
    """A bare preset name (not a file that happens to share it)."""
    return spec in VQVAE_PRESETS and not os.path.exists(spec)


def weights_sha256(model: VQVAE) -> str:
    """sha256 over the state dict's names, shapes and float32 bytes (identity of preset-built weights)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().float().contiguous().cpu()
        h.update(f"{k}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_job_tokenizer(spec: str | bytes, *, preset: str = "vae_ch160v4096z32", seed: int = 0,
                       url: str = "") -> tuple[VQVAE, dict[str, Any]]:
    """(tokenizer in eval mode, identity dict for the manifest) from a URL, file bytes or preset name.

    The identity holds ``url``, ``kind`` (file | random_init), ``preset``, ``sha256`` (of the checkpoint file,
    or of the weights for random init) and ``config``.
    """
    from nextscale.tokenize.convert import load_tokenizer

    if isinstance(spec, str) and is_preset(spec):
        torch.manual_seed(seed)  # deterministic random weights, the same in every process
        model = build_vqvae(spec).eval().requires_grad_(False)
        ident = {"url": "", "kind": "random_init", "preset": spec, "seed": seed, "sha256": weights_sha256(model)}
    else:
        if isinstance(spec, str):
            url = spec
            try:
                data = storage.read_bytes(spec)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"tokenizer {spec!r} does not exist: give a tokenizer.pt from `nextscale train-tokenizer`, an "
                    f"official .pth, or a preset name ({', '.join(VQVAE_PRESETS)})") from None
        else:
            data = spec
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tokenizer.pt")
            with open(path, "wb") as f:
                f.write(data)
            model = load_tokenizer(path, preset)
        ident = {"url": url, "kind": "file", "preset": preset, "sha256": hashlib.sha256(data).hexdigest()}
    ident["config"] = to_dict(model.cfg)
    return model, ident


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CodeEncoder:
    """``batch["views"]`` uint8 (B, K, S, S, 3) -> ``batch["codes"]`` uint16 (B, K, L); other keys pass through.

    Loads the tokenizer once. ``precision="bf16"`` runs the convolutions under autocast on GPU (the quantiser
    stays fp32); on CPU everything is fp32.
    """

    def __init__(self, tokenizer: str | bytes, *, preset: str = "vae_ch160v4096z32", seed: int = 0,
                 precision: str = "fp32", device: str = "auto"):
        self.device = pick_device(device)
        model, self.identity = load_job_tokenizer(tokenizer, preset=preset, seed=seed)
        self.model = model.to(self.device)
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
