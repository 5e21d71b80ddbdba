"""Config of VAR prior training: ``nextscale train-prior CONFIG key.sub=value``.

The official recipe (docs/var.md §2): AdamW (0.9, 0.95), peak lr = base_lr * global_batch / 256,
linear warm-up from 0.5 % over ``epochs / 50``, then the 'lin0' schedule down to ``final_lr_ratio``,
weight decay 0.05 (cosine to ``weight_decay_end``), gradient clip 2.0, no label smoothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from nextscale.config import (
    RENAMED_WORKER_KEYS,
    RayConfig,
    Renamed,
    StorageConfig,
    TensorBoardConfig,
    WandbConfig,
    WorkersConfig,
    doc,
    require,
    to_dict,
)
from nextscale.prior.families import PRESETS, config_from_dict
from nextscale.prior.model import VARConfig

# the tokenizer decides these; a model override that disagrees is an error caught at start
TOKENIZER_FIELDS = ("vocab_size", "latent_channels", "patch_nums")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriorModelConfig:
    preset: str = doc("demo", f"prior preset (its family: var, mvar, ...): one of {', '.join(PRESETS)}")
    overrides: dict[str, Any] = doc({}, "VARConfig fields replacing the preset's, e.g. {depth: 12, drop_path_rate: 0.05}",
                                  keys=VARConfig)

    def __post_init__(self) -> None:
        require(self.preset in PRESETS,
                f"model.preset={self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        coerced = to_dict(self.var_config())  # fail at load time on a bad key or value
        object.__setattr__(self, "overrides", {k: coerced[k] for k in self.overrides if k in coerced})

    def var_config(self, **extra: Any) -> VARConfig:
        """The preset with ``extra`` (tokenizer fields) then ``overrides`` applied, coerced by declared types."""
        return config_from_dict({**to_dict(PRESETS[self.preset]), **extra, **self.overrides}, prefix="model.overrides.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriorDataConfig:
    url: str = doc("runs/demo/codes", "code shards written by `nextscale tokenize` (manifest.json + codes-*.tar)")
    tokenizer_url: str = doc("", "tokenizer weights (codebook + Phi convs build the teacher-forcing input); "
                                 "empty = the tokenizer recorded in the codes' manifest")
    tokenizer_preset: str = doc("vae_ch160v4096z32", "VQVAE preset used when tokenizer_url is an official .pth")
    batch_size: int = doc(64, "global batch size (images per step over all workers)")
    loader_processes: int = doc(0, "code-loader processes per training worker (0 = read in the training process)")
    shuffle_buffer: int = doc(2048, "samples in the shuffle buffer of the code loader")
    seed: int = doc(0, "seed of the data order (shard order, shuffling, view choice)")

    RENAMED: ClassVar[dict[str, str]] = {"num_workers": "loader_processes"}

    def __post_init__(self) -> None:
        require(bool(self.url), "data.url is empty: point it at the code shards written by `nextscale tokenize`")
        require(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        require(self.loader_processes >= 0, f"data.loader_processes={self.loader_processes} must be >= 0")
        require(self.shuffle_buffer >= 1, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1 (1 = no shuffling)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriorOptimConfig:
    base_lr: float = doc(1e-4, "learning rate per 256 images (official tblr); peak lr = base_lr * batch_size / 256")
    lr: float = doc(0.0, "peak learning rate; 0 = derived from base_lr and the global batch size")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    weight_decay: float = doc(0.05, "weight decay at the start (official twd)")
    weight_decay_end: float = doc(-1.0, "weight decay at the end, cosine from weight_decay; < 0 = constant (twde)")
    warmup_steps: int = doc(-1, "linear warm-up steps; < 0 = warmup_epochs")
    warmup_epochs: float = doc(-1.0, "warm-up in epochs; < 0 = 1/50 of the run (official wp = ep/50)")
    warmup_start_ratio: float = doc(0.005, "lr ratio at step 0 of the warm-up (official wp0)")
    schedule: Literal["lin0", "cos", "const"] = doc("lin0", "lr schedule after warm-up: lin0 = flat for 5 %, then "
                                                            "linear to final_lr_ratio; cos; const")
    final_lr_ratio: float = doc(0.01, "final lr / peak lr (official wpe: 0.1 for d16/d20, 0.01 for d24+)")
    grad_clip: float = doc(2.0, "global gradient-norm clip (0 = off)")
    label_smoothing: float = doc(0.0, "cross-entropy label smoothing (official ls = 0)")
    fused: bool = doc(True, "fused AdamW kernel (CUDA and CPU)")

    def __post_init__(self) -> None:
        require(self.base_lr > 0 or self.lr > 0, "optim.base_lr and optim.lr are both 0: set one of them")
        require(all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas={self.betas} must be in [0, 1)")
        require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        require(0.0 < self.warmup_start_ratio <= 1.0, f"optim.warmup_start_ratio={self.warmup_start_ratio} must be in (0, 1]")
        require(0.0 <= self.final_lr_ratio <= 1.0, f"optim.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        require(0.0 <= self.label_smoothing < 1.0, f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)")

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr > 0 else self.base_lr * global_batch / 256

    @property
    def wd_end(self) -> float:
        return self.weight_decay if self.weight_decay_end < 0 else self.weight_decay_end


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressiveConfig:
    """Progressive training (official --pg, off in every released model): train on the first scales only,
    adding scales linearly over the first ``fraction`` of the run."""

    fraction: float = doc(0.0, "share of the run over which the active scales grow to all (official pg); 0 = off")
    start_scales: int = doc(4, "active scales at step 0 (official pg0)")

    def __post_init__(self) -> None:
        require(0.0 <= self.fraction <= 1.0, f"progressive.fraction={self.fraction} must be in [0, 1]")
        require(self.start_scales >= 1, f"progressive.start_scales={self.start_scales} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PriorTrainConfig:
    """Train the VAR prior on pretokenized multi-scale codes (no VQVAE encoder in the loop)."""

    model: PriorModelConfig = doc(PriorModelConfig(), "architecture")
    data: PriorDataConfig = doc(PriorDataConfig(), "code shards and loader")
    optim: PriorOptimConfig = doc(PriorOptimConfig(), "optimizer and schedules")
    progressive: ProgressiveConfig = doc(ProgressiveConfig(), "progressive training (optional)")
    steps: int = doc(0, "optimizer steps; 0 = derived from epochs")
    epochs: float = doc(0.0, "passes over the code shards (used when steps = 0)")
    precision: Literal["fp32", "bf16", "fp16"] = doc("bf16", "autocast dtype on GPU (fp16 adds a GradScaler, as "
                                                             "the official README runs); CPU always runs fp32")
    compile: bool = doc(False, "torch.compile the model (the whole teacher-forced forward and its backward)")
    loss_chunk: int = doc(0, "tokens per chunk of the head + cross-entropy (recomputed in the backward), so the "
                             "batch's fp32 logits never exist; 0 = one full-size head and F.cross_entropy")
    prefetch: bool = doc(True, "copy the next batch to the device while the current step runs (pinned memory, "
                               "non-blocking copies on a side stream on CUDA)")
    log_every: int = doc(50, "steps between metric logs/reports")
    ckpt_every: int = doc(1000, "steps between checkpoints (and one at the end); each also draws {output}/curves.png")
    sample_every: int = doc(1000, "steps between sample grids {output}/samples/step-N.png (fixed classes and "
                                  "seeds, so successive grids compare); 0 = none")
    keep_checkpoints: int = doc(2, "checkpoints kept (older ones are deleted)")
    output: str = doc("runs/prior", "output URL: prior.pt, metrics.jsonl, config.yaml, checkpoints")
    seed: int = doc(0, "seed of the initial weights and of condition dropout / drop path")
    workers: WorkersConfig = doc(WorkersConfig(), "Ray Train workers")
    ray: RayConfig = doc(RayConfig(), "Ray cluster")
    storage: StorageConfig = doc(StorageConfig(), "object storage")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases")
    tensorboard: TensorBoardConfig = doc(TensorBoardConfig(), "TensorBoard")

    RENAMED: ClassVar[dict[str, str | Renamed]] = RENAMED_WORKER_KEYS

    def __post_init__(self) -> None:
        require((self.steps > 0) != (self.epochs > 0),
                f"set exactly one of steps (={self.steps}) and epochs (={self.epochs}) to a positive value")
        require(self.steps >= 0 and self.epochs >= 0, "steps and epochs must be >= 0")
        require(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        require(self.ckpt_every >= 1, f"ckpt_every={self.ckpt_every} must be >= 1")
        require(self.sample_every >= 0, f"sample_every={self.sample_every} must be >= 0 (0 = no sample grids)")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        require(bool(self.output), "output is empty: set it to a local folder or s3:// URL")
        ranks = max(1, self.workers.count)
        require(self.data.batch_size % ranks == 0,
                f"data.batch_size={self.data.batch_size} is the global batch and must be divisible by "
                f"workers.count={ranks}; change one of them")
        require(self.loss_chunk >= 0, f"loss_chunk={self.loss_chunk} must be >= 0 (0 = the plain loss)")
        require(self.loss_chunk == 0 or self.workers.strategy == "ddp",
                "loss_chunk runs the head outside the wrapped forward, which FSDP shards; use loss_chunk=0 with "
                "workers.strategy=fsdp")
