"""The demo's check that needs no Inception weights: a small CNN trained on the real training images
classifies generated samples; its per-class accuracy on samples is reported beside its accuracy on
held-out real images (the baseline a good generator approaches).

Training is seeded (weights and batch order) and small: 400 AdamW steps of batch 64 at 32 px (about
1 GFLOP a step), well under a minute on two idle CPU cores.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale import storage
from nextscale.config import ConfigError
from nextscale.errors import NotFound
from nextscale.eval.config import FidConfig
from nextscale.images import accepted_images, center_view, list_image_folder, open_image

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages (16, 32, 64 channels) and a linear head on the pooled features."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        return self.head(self.features(img_B3HW).mean((2, 3)))


def _as_input(images_NHWC: np.ndarray | Tensor, size: int) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images_NHWC)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_image_folder(url: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 (N, size, size, 3) images, int64 (N,) labels, class folder names) of an ImageFolder."""
    items, classes = list_image_folder(url)
    files = accepted_images(items, url)
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, (source, _) in enumerate(files):
        images[i] = np.asarray(center_view(open_image(source), size))
    return images, np.array([label for _, label in files], dtype=np.int64), classes


def train_classifier(images_NHWC: np.ndarray, labels_N: np.ndarray, num_classes: int, *, size: int = 32,
                     steps: int = 400, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> SmallCNN:
    """A SmallCNN fitted to the images (random 4-px shifts and horizontal flips); eval mode on return."""
    x_all, y_all = _as_input(images_NHWC, size), torch.as_tensor(labels_N)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the weight init draws from the global RNG: keep it untouched
        torch.manual_seed(seed)
        model = SmallCNN(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x = F.pad(x_all[idx], (4, 4, 4, 4), mode="replicate")
        dx, dy = torch.randint(9, (2,), generator=g).tolist()
        x = x[:, :, dy:dy + size, dx:dx + size]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def per_class_accuracy(model: SmallCNN, images_NHWC: np.ndarray, labels_N: np.ndarray, num_classes: int,
                       size: int = 32) -> dict:
    """{"accuracy": overall, "per_class": [accuracy of class c or None without images], "count": N}."""
    x = _as_input(images_NHWC, size)
    pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
    labels = np.asarray(labels_N)
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class, "count": int(len(labels))}


def evaluate_demo_samples(cfg: FidConfig) -> dict:
    """Train the classifier on ``cfg.classifier.train_images`` and score ``{cfg.output}/samples.npz`` (written by
    ``nextscale fid`` with save_npz) and the held-out real images.

    Returns {"sample_accuracy", "real_accuracy", "per_class": {class name: {"samples", "real"}}, "num_samples",
    "num_real", "train_images", "seconds"}.
    """
    c = cfg.classifier
    if not c.train_images:
        raise ConfigError("classifier.train_images is empty: set it (and classifier.heldout_images) to run the check")
    t0 = time.perf_counter()
    samples_url = storage.join(cfg.output, "samples.npz")
    if not storage.exists(samples_url):
        raise NotFound(f"{samples_url} does not exist: run `nextscale fid` with save_npz=true first")
    with np.load(io.BytesIO(storage.read_bytes(samples_url))) as npz:
        samples, sample_labels = npz["arr_0"], npz["labels"]
    train_x, train_y, classes = load_image_folder(c.train_images, c.image_size)
    real_x, real_y, _ = load_image_folder(c.heldout_images, c.image_size)
    num_classes = len(classes)
    if sample_labels.max() >= num_classes:
        raise ConfigError(f"samples use class {int(sample_labels.max())} but {c.train_images} has {num_classes} classes")
    model = train_classifier(train_x, train_y, num_classes, size=c.image_size, steps=c.steps, seed=c.seed)
    on_samples = per_class_accuracy(model, samples, sample_labels, num_classes, c.image_size)
    on_real = per_class_accuracy(model, real_x, real_y, num_classes, c.image_size)
    result = {
        "sample_accuracy": on_samples["accuracy"], "real_accuracy": on_real["accuracy"],
        "per_class": {name: {"samples": on_samples["per_class"][i], "real": on_real["per_class"][i]}
                      for i, name in enumerate(classes)},
        "num_samples": on_samples["count"], "num_real": on_real["count"], "train_images": int(len(train_y)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    storage.write_json(storage.join(cfg.output, "classifier.json"), result)
    log.info("classifier check: generated samples classified as their class %.1f %% (held-out real images %.1f %%), "
             "classifier trained on %d real images in %.0f s", 100 * result["sample_accuracy"],
             100 * result["real_accuracy"], result["train_images"], result["seconds"])
    return result
