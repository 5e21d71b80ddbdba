"""Tokenizer training losses beyond L1/L2: PatchGAN hinge loss with VQGAN's adaptive weight, LPIPS-like perceptual.

Shape legend: B batch, img_B3HW images in [-1, 1], logits_B1hw per-patch real/fake scores.
"""

from __future__ import annotations

import io
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale import storage
from nextscale.checkpoint import CheckpointMismatch

log = logging.getLogger(__name__)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator) with GroupNorm instead of BatchNorm (DDP-safe)."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        return self.main(img_B3HW)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN: balance the adversarial gradient against the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class Perceptual(nn.Module):
    """LPIPS-like distance on VGG16 features (relu1_2 ... relu5_3), from a local weights file only.

    The file is a state dict with torchvision ``vgg16`` keys (``features.N.weight``; classifier keys
    ignored) and, optionally, LPIPS's learned channel weights (``lin{k}.model.1.weight``, shape
    [1, C, 1, 1]); without them every channel weighs the same.
    """

    LAYER_ENDS = (4, 9, 16, 23, 30)  # slices of vgg16.features ending after relu1_2, 2_2, 3_3, 4_3, 5_3
    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(self, weights_url: str):
        super().__init__()
        from torchvision.models import vgg16

        sd = torch.load(io.BytesIO(storage.read_bytes(weights_url)), map_location="cpu", weights_only=True)
        features = vgg16(weights=None).features
        feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        missing = features.load_state_dict(feats, strict=False).missing_keys
        if missing:
            raise CheckpointMismatch(f"{weights_url} lacks VGG16 key features.{missing[0]}; pass torchvision vgg16 weights")
        self.slices = nn.ModuleList(
            features[a:b] for a, b in zip((0,) + self.LAYER_ENDS[:-1], self.LAYER_ENDS)
        )
        for k, c in enumerate(self.WIDTHS):
            w = sd.get(f"lin{k}.model.1.weight", torch.full((1, c, 1, 1), 1.0 / c))
            self.register_buffer(f"lin{k}", w.float().reshape(1, c, 1, 1))
        # LPIPS input scaling: images in [-1, 1] -> ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Perceptual:
        return super().train(False)  # frozen feature extractor: never in training mode

    def forward(self, a_B3HW: Tensor, b_B3HW: Tensor) -> Tensor:
        """Mean perceptual distance (scalar)."""
        x, y = (a_B3HW - self.shift) / self.scale, (b_B3HW - self.shift) / self.scale
        total = x.new_zeros(())
        for k, block in enumerate(self.slices):
            x, y = block(x), block(y)
            nx = x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = y / (y.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((nx - ny).square() * getattr(self, f"lin{k}")).sum(1).mean()
        return total
