"""Pluggable feature extractors for FID / IS / precision-recall; input is uint8 (N, 3, H, W), as PNGs hold.

An extractor maps images to ``{"pool": (N, D) float32, "logits": (N, K) float32 or None}``: ``pool``
feeds FID and precision/recall, ``logits`` the Inception Score.

- ``inception-v3-compat``: torch-fidelity's port of the TensorFlow Inception graph of the ADM evaluator
  (TF1-exact bilinear resize to 299; pool3 2048-d; the 1008 unbiased logits that ADM's softmax uses).
- ``random-conv-test``: fixed random conv features (seeded, no download) for tests and offline smoke runs.
Register more with :func:`register`.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale.errors import UserError
from nextscale.eval.config import INCEPTION_FILE

log = logging.getLogger(__name__)


class InceptionWeightsMissing(UserError, FileNotFoundError):
    """The Inception weights file is not there and cannot be downloaded; the message says where to put it."""


def to_uint8(img_B3HW: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8 by rounding, exactly as writing them as PNG does (ADM/DiT sample scripts)."""
    return img_B3HW.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


class FeatureExtractor(nn.Module):
    """uint8 (N, 3, H, W) -> {"pool": (N, dim), "logits": (N, num_logits) or None}."""

    dim: int
    num_logits: int

    def forward(self, images_B3HW: Tensor) -> dict[str, Tensor | None]:
        raise NotImplementedError


def _check_input(images_B3HW: Tensor) -> None:
    if images_B3HW.dtype != torch.uint8 or images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ValueError(f"feature extractors take uint8 (N, 3, H, W) images, got {images_B3HW.dtype} "
                         f"{tuple(images_B3HW.shape)}; convert [0, 1] images with to_uint8")


def default_inception_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


class InceptionV3Compat(FeatureExtractor):
    """torch-fidelity's ``inception-v3-compat`` (pool3 features and unbiased logits), fp32."""

    dim, num_logits = 2048, 1008

    def __init__(self, weights_path: str = ""):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        where = (f"put the file at {default_inception_path()} (that is $TORCH_HOME/hub/checkpoints/{INCEPTION_FILE}; "
                 "download it from https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 f"{INCEPTION_FILE}) or set inception_weights=/path/to/{INCEPTION_FILE}")
        if weights_path and not os.path.isfile(weights_path):
            raise InceptionWeightsMissing(f"inception_weights={weights_path!r} does not exist: {where}")
        path = weights_path or (default_inception_path() if os.path.isfile(default_inception_path()) else None)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=path)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise InceptionWeightsMissing(f"the Inception weights could not be downloaded ({e}): {where}") from e

    def forward(self, images_B3HW: Tensor) -> dict[str, Tensor | None]:
        _check_input(images_B3HW)
        pool, logits = self.net(images_B3HW)
        return {"pool": pool.float(), "logits": logits.float()}


class RandomConvTest(FeatureExtractor):
    """Fixed random features: 32x32 bilinear resize, two seeded convs with ReLU, mean+max pool; logits = a
    seeded linear map to 10 classes. Deterministic for a seed on every machine; no weights to download."""

    dim, num_logits = 64, 10

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(16, 3, 3, 3, generator=g) / 27 ** 0.5)
        self.register_buffer("w2", torch.randn(32, 16, 3, 3, generator=g) / 144 ** 0.5)
        self.register_buffer("w_head", torch.randn(10, 64, generator=g) / 8)

    def forward(self, images_B3HW: Tensor) -> dict[str, Tensor | None]:
        _check_input(images_B3HW)
        x = images_B3HW.float().div(127.5).sub(1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        x = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.w2, stride=2, padding=1))
        pool = torch.cat((x.mean((2, 3)), x.amax((2, 3))), dim=1)
        return {"pool": pool, "logits": pool @ self.w_head.T}


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {
    "inception-v3-compat": lambda weights_path="": InceptionV3Compat(weights_path),
    "random-conv-test": lambda weights_path="": RandomConvTest(),
}


def register(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``factory(weights_path=...)`` available as feature_extractor=name."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, weights_path: str = "", device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor ``name`` in eval mode on ``device``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature_extractor {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name](weights_path=weights_path).eval().requires_grad_(False).to(device)


@torch.no_grad()
def extract(extractor: FeatureExtractor, images_NHWC: Tensor, batch_size: int = 64) -> dict[str, Tensor | None]:
    """Features of uint8 (N, H, W, 3) images (CPU tensors out), in batches on the extractor's device."""
    device = next(iter(extractor.buffers()), next(iter(extractor.parameters()), None))
    device = device.device if device is not None else torch.device("cpu")
    pools, logits = [], []
    for begin in range(0, len(images_NHWC), batch_size):
        out = extractor(images_NHWC[begin:begin + batch_size].to(device).permute(0, 3, 1, 2))
        pools.append(out["pool"].float().cpu())
        if out["logits"] is not None:
            logits.append(out["logits"].float().cpu())
    return {"pool": torch.cat(pools), "logits": torch.cat(logits) if logits else None}
