"""Config of tokenizer (multi-scale VQVAE) training: ``nextscale train-tokenizer CONFIG key.sub=value``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from nextscale.config import (
    RENAMED_WORKER_KEYS,
    RayConfig,
    Renamed,
    StorageConfig,
    TensorBoardConfig,
    WandbConfig,
    WorkersConfig,
    doc,
    from_dict,
    require,
    to_dict,
)
from nextscale.tokenize.vqvae import VQVAE_PRESETS, VQVAEConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerModelConfig:
    preset: str = doc("demo", f"VQVAE preset: one of {', '.join(VQVAE_PRESETS)}")
    overrides: dict[str, Any] = doc({}, "VQVAEConfig fields replacing the preset's, e.g. {vocab_size: 256}",
                                  keys=VQVAEConfig)
    init_url: str = doc("", "optional starting weights: a tokenizer.pt or an official .pth of the same architecture")

    def __post_init__(self) -> None:
        require(self.preset in VQVAE_PRESETS,
                f"model.preset={self.preset!r} is unknown; choose one of {', '.join(VQVAE_PRESETS)}")
        # fail at load time on a bad override, and keep the coerced values (command-line ones are strings)
        coerced = to_dict(self.vqvae_config())
        object.__setattr__(self, "overrides", {k: coerced[k] for k in self.overrides})

    def vqvae_config(self, **extra: Any) -> VQVAEConfig:
        """The preset with ``overrides`` (and ``extra``) applied; values coerced by the declared types."""
        return from_dict(VQVAEConfig, {**to_dict(VQVAE_PRESETS[self.preset]), **self.overrides, **extra},
                         prefix="model.overrides.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerDataConfig:
    url: str = doc("data/demo/train", "training ImageFolder (class sub-folders of images), local path or s3://")
    val_url: str = doc("data/demo/val", "held-out ImageFolder for evaluation; empty = hold out val_fraction of url")
    val_fraction: float = doc(0.02, "share of url held out when val_url is empty")
    image_size: int = doc(0, "training crop side in pixels; 0 = the model's image_size")
    crop_ratio: float = doc(1.125, "resize the shorter side to image_size * crop_ratio, then random-crop")
    hflip: bool = doc(True, "random horizontal flips")
    batch_size: int = doc(32, "images per step per worker")
    loader_processes: int = doc(2, "DataLoader processes decoding images (0 = decode once into memory when small)")
    max_images: int = doc(0, "use only the first N training images (0 = all; for smoke tests)")
    max_val_images: int = doc(500, "evaluate on at most this many held-out images (0 = all)")

    RENAMED: ClassVar[dict[str, str]] = {"num_workers": "loader_processes"}

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        require(self.crop_ratio >= 1.0, f"data.crop_ratio={self.crop_ratio} must be >= 1 (1 = no random crop)")
        require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerOptimConfig:
    lr: float = doc(2e-4, "peak Adam learning rate (also the discriminator's)")
    betas: tuple[float, float] = doc((0.5, 0.9), "Adam betas (VQGAN practice)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    steps: int = doc(2000, "optimizer steps")
    warmup: int = doc(100, "linear warm-up steps, then cosine decay to lr * min_lr_ratio")
    min_lr_ratio: float = doc(0.1, "final learning rate as a fraction of lr")
    grad_clip: float = doc(1.0, "gradient-norm clip (0 = off)")

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"optim.steps={self.steps} must be >= 1")
        require(self.warmup >= 0, f"optim.warmup={self.warmup} must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerLossConfig:
    l1: float = doc(1.0, "weight of the L1 reconstruction loss")
    l2: float = doc(1.0, "weight of the L2 (MSE) reconstruction loss")
    vq: float = doc(1.0, "weight of the quantiser loss (commitment + codebook)")
    vq_beta: float = doc(0.25, "commitment weight beta inside the quantiser loss")
    perceptual: float = doc(0.0, "weight of the LPIPS-like perceptual loss (0 = off)")
    perceptual_weights_url: str = doc("", "local/storage file with VGG16 features (+ optional LPIPS lin) weights; no download")
    disc: float = doc(0.0, "weight of the adversarial loss (0 = no discriminator)")
    disc_start: int = doc(0, "step at which the discriminator starts training and the adversarial loss is applied")
    disc_channels: int = doc(64, "base width of the PatchGAN discriminator")
    disc_layers: int = doc(3, "stride-2 layers of the PatchGAN discriminator")
    adaptive_weight_max: float = doc(1e4, "clamp of the adaptive adversarial weight (VQGAN)")
    dead_code_restart_every: int = doc(0, "every N steps re-seed dead codes with random latents of the batch (0 = off)")
    dead_code_threshold: float = doc(1e-2, "a code is dead when its EMA hits per step fall below this")

    def __post_init__(self) -> None:
        require(self.l1 > 0 or self.l2 > 0 or self.perceptual > 0,
                "loss.l1, loss.l2 and loss.perceptual are all 0: set at least one reconstruction loss")
        require(self.perceptual == 0 or bool(self.perceptual_weights_url),
                "loss.perceptual > 0 needs loss.perceptual_weights_url (weights are never downloaded)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig:
    """Train a multi-scale VQVAE tokenizer (the official VAR release ships none)."""

    model: TokenizerModelConfig = doc(TokenizerModelConfig(), "architecture")
    data: TokenizerDataConfig = doc(TokenizerDataConfig(), "images")
    optim: TokenizerOptimConfig = doc(TokenizerOptimConfig(), "optimizer and schedule")
    loss: TokenizerLossConfig = doc(TokenizerLossConfig(), "loss weights")
    ema_decay: float = doc(0.999, "EMA of the weights, the one exported (0 = export the raw weights)")
    log_every: int = doc(50, "steps between metric reports")
    ckpt_every: int = doc(500, "steps between checkpoints (and at the end); each also writes metrics.jsonl and "
                               "curves.png")
    sample_every: int = doc(500, "steps between reconstruction strips {output}/reconstructions/step-N.png of fixed "
                                 "held-out images; 0 = none")
    output: str = doc("runs/tokenizer", "output URL: tokenizer.pt, tokenizer_eval.json, config.yaml, checkpoints/")
    seed: int = doc(0, "seed of weights, data order and augmentation")
    keep_checkpoints: int = doc(2, "checkpoints kept (older ones are deleted)")
    workers: WorkersConfig = doc(WorkersConfig(), "Ray Train workers")
    ray: RayConfig = doc(RayConfig(), "Ray cluster")
    storage: StorageConfig = doc(StorageConfig(), "object storage")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases")
    tensorboard: TensorBoardConfig = doc(TensorBoardConfig(), "TensorBoard")

    RENAMED: ClassVar[dict[str, str | Renamed]] = RENAMED_WORKER_KEYS

    def __post_init__(self) -> None:
        vq = self.vqvae_config()
        require(self.data.image_size in (0, vq.image_size),
                f"data.image_size={self.data.image_size} differs from the model's image_size {vq.image_size}; "
                "set model.overrides.image_size (with matching patch_nums) or data.image_size=0")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay} must be in [0, 1)")
        require(self.log_every >= 1 and self.ckpt_every >= 1, "log_every and ckpt_every must be >= 1")
        require(self.sample_every >= 0, f"sample_every={self.sample_every} must be >= 0 (0 = no pictures)")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        require(self.workers.count >= 1, f"workers.count={self.workers.count} must be >= 1 (train-tokenizer runs on Ray)")
        require(self.workers.strategy == "ddp", "workers.strategy=fsdp is for train-prior; the tokenizer trains with ddp")

    def vqvae_config(self) -> VQVAEConfig:
        """The trained architecture (beta from loss.vq_beta)."""
        return self.model.vqvae_config(beta=self.loss.vq_beta)
