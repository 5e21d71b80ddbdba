"""VAR prior training loop on pretokenized codes (plain PyTorch; run in-process or by the Ray Train launcher).

One step (docs/var.md §2, minus the VQVAE encode): codes (B, L) and labels from the code loader;
the teacher-forcing input x_BlCv built from the codes by the tokenizer's quantizer (codebook + Phi
convs only, fp32, no encoder); logits under autocast; uniform per-token cross-entropy; backward
(GradScaler for fp16); global-norm clip; AdamW step with the official lr / wd schedules.
Checkpoints go through ``nextscale.checkpoint`` (a :class:`~nextscale.checkpoint.TrainState` saved through
the context); a rerun resumes bit for bit from the newest checkpoint that verifies.
The end writes ``{output}/prior.pt`` ({"config": VARConfig, "state_dict": ...}), ``metrics.jsonl``,
``config.yaml`` and ``train_summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from nextscale import checkpoint, progress, storage
from nextscale.codes import CodesError, Manifest, ManifestMismatch
from nextscale.config import ConfigError, dump_yaml, to_dict
from nextscale.devices import peak_flops
from nextscale.logs import Trackers, write_metrics
from nextscale.prior.config import TOKENIZER_FIELDS, PriorTrainConfig
from nextscale.prior.data import CodeLoader
from nextscale.prior.families import FAMILIES, build_prior, flops_per_image, num_params
from nextscale.prior.loader import save_prior
from nextscale.prior.loss import head_cross_entropy
from nextscale.prior.model import VARConfig
from nextscale.prior.optim import build_optimizer
from nextscale.prior.prefetch import DevicePrefetcher
from nextscale.runtime import Pictures, TrainContext, no_pictures
from nextscale.schedule import Schedule
from nextscale.tokenize.loader import load_tokenizer, weights_sha256
from nextscale.tokenize.scales import scale_slices, split_codes
from nextscale.tokenize.vqvae import VQVAE, MultiScaleQuantizer, VQVAEConfig

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Pieces


def load_quantizer(cfg: PriorTrainConfig, manifest: Manifest,
                   device: torch.device) -> tuple[MultiScaleQuantizer, VQVAEConfig, dict]:
    """(frozen quantizer, tokenizer config, tokenizer identity as the manifest records it) for the codes.

    Only the codebook and the Phi convs are kept: the encoder and decoder are dropped at once.
    """
    vqvae, ident = load_codes_tokenizer(cfg, manifest)
    quantizer = vqvae.quantize.to(device).eval().requires_grad_(False)
    log.info("teacher-forcing input from the quantizer of tokenizer %s", ident["source"])
    return quantizer, vqvae.cfg, ident


def load_codes_tokenizer(cfg: PriorTrainConfig, manifest: dict) -> tuple[VQVAE, dict]:
    """(VQVAE on the CPU, identity + "source") of the tokenizer the codes were made with.

    ``data.tokenizer_url`` if set, else what the manifest records: the tokenizer file, or the seed of a
    random-init preset (rebuilt identically). Its sha256 must match the manifest's.
    """
    tok = manifest.tokenizer
    if cfg.data.tokenizer_url:
        vqvae, ident = load_tokenizer(cfg.data.tokenizer_url, preset=cfg.data.tokenizer_preset)
        source = cfg.data.tokenizer_url
    elif tok.get("kind") == "random_init" and tok.get("preset"):
        vqvae, ident = load_tokenizer(tok["preset"], seed=int(tok.get("seed", 0)))
        source = f"random-init preset {tok['preset']} (seed {tok.get('seed', 0)})"
    elif tok.get("url"):
        vqvae, ident = load_tokenizer(tok["url"], preset=tok.get("preset") or cfg.data.tokenizer_preset)
        source = tok["url"]
    else:
        raise CodesError(f"the manifest of {cfg.data.url} records no tokenizer location; set data.tokenizer_url to "
                         "the tokenizer.pt (or official .pth) the codes were made with")
    recorded = tok.get("sha256")
    if recorded and recorded not in (ident["sha256"], weights_sha256(vqvae)):
        raise ManifestMismatch(f"tokenizer {source} (sha256 {ident['sha256'][:12]}…) is not the one the codes in "
                         f"{cfg.data.url} were made with (sha256 {recorded[:12]}…); point data.tokenizer_url at "
                         "that file or re-run `nextscale tokenize` with this tokenizer")
    return vqvae, {**ident, "source": source}


def resolve_var_config(cfg: PriorTrainConfig, vq_cfg: VQVAEConfig, manifest: Manifest) -> VARConfig:
    """The preset + overrides, with vocabulary, latent channels and scales taken from the tokenizer."""
    from_tok = {"vocab_size": vq_cfg.vocab_size, "latent_channels": vq_cfg.z_channels,
                "patch_nums": tuple(vq_cfg.patch_nums)}
    for key in TOKENIZER_FIELDS:
        if key in cfg.model.overrides and to_dict(cfg.model.overrides[key]) != to_dict(from_tok[key]):
            raise ConfigError(f"model.overrides.{key}={cfg.model.overrides[key]} disagrees with the tokenizer's "
                             f"{from_tok[key]}; drop the override (it is taken from the tokenizer)")
    var_cfg = cfg.model.var_config(**from_tok)
    classes = manifest.num_classes
    if classes and classes > var_cfg.num_classes:
        raise ConfigError(f"the codes hold {classes} classes but the model has num_classes={var_cfg.num_classes}; "
                         f"set model.overrides.num_classes={classes}")
    return var_cfg


class Batches:
    """Endless (codes, labels) from one CodeLoader per epoch; its position is part of the checkpoint.

    Every rank gets the same number of full batches per epoch (``equal_batches``), so DDP ranks stay in step.
    """

    def __init__(self, cfg: PriorTrainConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.epoch = 0
        self.loader = self._make(self.epoch)
        self._it: Iterator | None = None

    def _make(self, epoch: int) -> CodeLoader:
        d = self.cfg.data
        return CodeLoader(d.url, batch_size=d.batch_size // self.world_size, rank=self.rank,
                          world_size=self.world_size, num_workers=d.loader_processes, seed=d.seed,
                          shuffle_buffer=d.shuffle_buffer, epoch=epoch, drop_last=True, equal_batches=True)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                self.loader, self._it = self._make(self.epoch), None
        raise ConfigError(f"rank {self.rank} got no batch from {self.cfg.data.url}: fewer samples than "
                         f"data.batch_size / workers.count = {self.cfg.data.batch_size // self.world_size}")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loader, self._it = self._make(self.epoch), None
        self.loader.load_state_dict(state["loader"])


def active_scales(step: int, total_steps: int, num_scales: int, fraction: float, start: int) -> int:
    """Progressive training: scales in use at ``step`` (all of them when ``fraction`` is 0)."""
    if fraction <= 0:
        return num_scales
    grow_steps = max(1, round(fraction * total_steps))
    return min(num_scales, start + math.floor((num_scales - start + 1) * step / grow_steps))


def step_loss(net: torch.nn.Module, quantizer: MultiScaleQuantizer, codes_BL: torch.Tensor, label_B: torch.Tensor,
              patch_nums: tuple[int, ...], scales: int, amp_dtype: torch.dtype | None,
              label_smoothing: float, loss_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-token CE, predicted tokens (B, l) argmax) of one teacher-forced batch over the first ``scales``.

    ``loss_chunk`` > 0: the head and the loss run on that many tokens at a time (``prior.loss``), so the
    batch's fp32 logits never exist; ``net`` is then called with ``head=False``.
    """
    with torch.no_grad():
        x_BlCv = quantizer.teacher_forcing_input(split_codes(codes_BL, patch_nums))
    end = scale_slices(patch_nums)[scales - 1][1]
    target_Bl = codes_BL[:, :end]
    x_BlCv = x_BlCv[:, : end - patch_nums[0] ** 2]
    with torch.autocast(device_type=codes_BL.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        if loss_chunk > 0:
            h_BlC = net(label_B, x_BlCv, head=False)
            loss, pred_N = head_cross_entropy(checkpoint.unwrap_model(net).head, h_BlC.reshape(-1, h_BlC.shape[-1]),
                                              target_Bl.reshape(-1), chunk=loss_chunk,
                                              label_smoothing=label_smoothing)
            return loss, pred_N.view(target_Bl.shape)
        logits_BlV = net(label_B, x_BlCv)
    loss = F.cross_entropy(logits_BlV.reshape(-1, logits_BlV.shape[-1]), target_Bl.reshape(-1),
                           label_smoothing=label_smoothing)
    return loss, logits_BlV.detach().argmax(-1)


# ------------------------------------------------------------------------------------------------
# The run: setup, one step, the end of a logging window, export


class PriorTrainer:
    """One run of prior training, kept apart as the official ``VARTrainer`` keeps ``train_step`` apart from the
    epoch loop: ``__init__`` sets everything up (codes, quantizer, model, optimizer, schedule, resumed state),
    :meth:`train_step` runs one optimizer step, :meth:`end_window` logs, reports and checkpoints, :meth:`export`
    writes ``prior.pt`` and the summary."""

    def __init__(self, cfg: PriorTrainConfig, ctx: TrainContext):
        self.cfg, self.ctx = cfg, ctx
        self.wall_start = time.time()
        device = self.device = ctx.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) \
            if device.type == "cuda" else None

        self.manifest = Manifest.read(cfg.data.url)
        self.quantizer, vq_cfg, tokenizer = load_quantizer(cfg, self.manifest, device)
        self.manifest.check(vq_cfg)
        self.var_cfg = resolve_var_config(cfg, vq_cfg, self.manifest)
        self.patch_nums = tuple(self.var_cfg.patch_nums)
        self.steps_per_epoch = max(1, self.manifest.num_samples // cfg.data.batch_size)  # partial batches dropped
        self.total_steps = cfg.steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        self.schedule = schedule_of(cfg, self.steps_per_epoch, self.total_steps)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_prior(self.var_cfg).to(device).train()
        self.net = ctx.wrap_model(self.model)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, lr=self.schedule.peak_lr, betas=o.betas, eps=o.eps, fused=o.fused)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**11, growth_interval=1000,
                                           enabled=self.amp_dtype is torch.float16)
        if cfg.compile:
            self.net = torch.compile(self.net)

        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # condition dropout / drop path differ per rank
        self.state = checkpoint.TrainState(
            model=self.model, optimizer=self.optimizer, components={"scaler": self.scaler},
            per_rank={"batches": Batches(cfg, ctx.rank, ctx.world_size)}, extra={"history": []},
            info={"var_config": to_dict(self.var_cfg), "config": to_dict(cfg), "tokenizer": tokenizer})
        if checkpoint.restore(ctx, self.state, check=lambda saved, where: _check_same_family(saved, self.var_cfg, cfg,
                                                                                              where)):
            log.info("resumed prior training at step %d of %d", self.state.step, self.total_steps)
        # from here on the prefetcher hands out the batches and its position (the last batch handed out) is saved
        self.batches = self.state.per_rank["batches"] = DevicePrefetcher(self.state.per_rank["batches"], device,
                                                                         enabled=cfg.prefetch)
        self.start_step, self.train_s = self.state.step, 0.0
        self.flops = flops_per_image(self.var_cfg)
        self.peak = peak_flops(device, cfg.precision)
        self.trackers = Trackers(cfg, run_id=checkpoint.run_id("prior", cfg.output), rank=ctx.rank,
                                 start_step=self.step)
        if ctx.rank == 0:
            storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
        self.window = Window(torch.zeros((), device=device))
        self.t_loop = self.window.start  # ETA from wall time: checkpoints and sample grids included
        log.info("VAR %s: %.1f M parameters, %.1f GFLOP per image (fwd+bwd), L=%d; %d steps of %d images on %d "
                 "worker(s) from step %d; peak lr %.2e, warm-up %d steps", cfg.model.preset,
                 num_params(self.var_cfg) / 1e6, self.flops / 1e9, self.var_cfg.num_tokens, self.total_steps,
                 cfg.data.batch_size, ctx.world_size, self.step, self.schedule.peak_lr, self.schedule.warmup_steps)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict]:
        return self.state.extra["history"]

    @functools.cached_property
    def decoder(self) -> VQVAE:
        """The tokenizer of the codes on this rank's device, loaded on first use (for pictures)."""
        return load_codes_tokenizer(self.cfg, self.manifest)[0].to(self.device).eval()

    def train_step(self, codes_BL: torch.Tensor, label_B: torch.Tensor) -> None:
        """One optimizer step on a batch; the window keeps what its metrics need."""
        cfg, o, w = self.cfg, self.cfg.optim, self.window
        w.scales = active_scales(self.step, self.total_steps, len(self.patch_nums), cfg.progressive.fraction,
                                 cfg.progressive.start_scales)
        w.lr, w.wd = self.schedule.apply(self.optimizer, self.step)
        loss, w.pred_Bl = step_loss(self.net, self.quantizer, codes_BL, label_B, self.patch_nums, w.scales,
                                    self.amp_dtype, o.label_smoothing, cfg.loss_chunk)
        w.codes_BL = codes_BL
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        w.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() > 32768.0:
            self.scaler.update(32768.0)  # the official cap of the fp16 loss scale
        self.state.step += 1
        w.loss_sum += loss.detach()
        w.steps += 1

    def window_ends(self) -> tuple[bool, bool]:
        """(a log line is due, a checkpoint is due) after the step just taken."""
        is_ckpt = self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps
        return is_ckpt or self.step % self.cfg.log_every == 0, is_ckpt

    def end_window(self, is_ckpt: bool, pictures: Pictures) -> None:
        """Metrics of the window (averaged over ranks), its log line, then a checkpoint or a report."""
        cfg, w, world = self.cfg, self.window, self.ctx.world_size
        metrics = _window_metrics(w.loss_sum, w.steps, w.pred_Bl, w.codes_BL, self.patch_nums, w.scales, world)
        dt = time.perf_counter() - w.start
        self.train_s += dt
        img_s = w.steps * cfg.data.batch_size / max(dt, 1e-9)
        metrics.update(step=self.step, epoch=self.step / self.steps_per_epoch, lr=w.lr, wd=w.wd,
                       grad_norm=float(w.grad_norm), scales=w.scales, img_per_s=img_s,
                       tokens_per_s=img_s * self.var_cfg.num_tokens,
                       mfu=self.flops * img_s / (self.peak * world) if self.peak else float("nan"))
        self.history.append(metrics)
        log.info("step %d/%d loss %.4f acc first/last %.3f/%.3f lr %.2e grad %.2f %.0f img/s%s %s %s", self.step,
                 self.total_steps, metrics["loss"], metrics["acc_first"], metrics["acc_last"], w.lr,
                 metrics["grad_norm"], img_s, f" MFU {100 * metrics['mfu']:.1f} %" if self.peak else "",
                 progress.eta(self.step - self.start_step, self.total_steps - self.start_step,
                              time.perf_counter() - self.t_loop), progress.peak_memory(self.device))
        self.trackers.log(metrics, step=self.step)
        if is_ckpt:
            if self.ctx.rank == 0:
                write_metrics(cfg.output, self.history)
                pictures.curves(self.history)
            checkpoint.save(self.ctx, self.state, metrics)
        else:
            self.ctx.report(metrics)
        self.window = Window(w.loss_sum.zero_())

    def export(self, pictures: Pictures) -> dict:
        """``prior.pt``, metrics, curves and ``train_summary.json`` (rank 0); the run's summary."""
        cfg, history, step = self.cfg, self.history, self.step
        trained = step - self.start_step
        img_s = trained * cfg.data.batch_size / self.train_s if trained and self.train_s > 0 else float("nan")
        last = history[-1] if history else {}
        summary = {
            "steps": step, "steps_trained": trained, "final_loss": last.get("loss", float("nan")),
            "final_acc_last": last.get("acc_last", float("nan")),
            "img_per_s": img_s, "tokens_per_s": img_s * self.var_cfg.num_tokens,
            "mfu": last.get("mfu", float("nan")), "tokenizer": self.state.info["tokenizer"]["source"],
            "num_params": num_params(self.var_cfg), "gflops_per_image": self.flops / 1e9,
            "workers": self.ctx.world_size, "minutes": (time.time() - self.wall_start) / 60, "output": cfg.output,
            "prior_url": storage.join(cfg.output, "prior.pt"), "metrics_url": storage.join(cfg.output, "metrics.jsonl"),
            "pictures": pictures.where(),
        }
        state_dict = checkpoint.full_model_state(self.model)  # every rank: a collective under FSDP
        if self.ctx.rank == 0:
            save_prior(self.model, summary["prior_url"], state_dict=state_dict, tokenizer=self.state.info["tokenizer"],
                       step=step)
            write_metrics(cfg.output, history)
            pictures.curves(history)
            storage.write_json(storage.join(cfg.output, "train_summary.json"), summary)
            log.info("prior trained: %d steps (%d in this run) in %.1f min, %.1f img/s, final loss %.4f, last-scale "
                     "accuracy %.3f; wrote %s and %s", step, trained, summary["minutes"], img_s,
                     summary["final_loss"], summary["final_acc_last"], summary["prior_url"], summary["metrics_url"])
        self.trackers.finish()
        return summary


@dataclasses.dataclass
class Window:
    """The steps since the last log line: their summed loss and what the last one left for the metrics."""

    loss_sum: torch.Tensor
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    scales: int = 0
    lr: float = 0.0
    wd: float = 0.0
    grad_norm: torch.Tensor | float = 0.0
    pred_Bl: torch.Tensor | None = None
    codes_BL: torch.Tensor | None = None


def train_prior(cfg: PriorTrainConfig, ctx: TrainContext,
                pictures: Callable[[PriorTrainer], Pictures] = no_pictures) -> dict:
    """Train (or resume) the prior described by ``cfg``; returns a JSON-able summary (rank 0's is complete).

    ``pictures`` (given by the driver: ``nextscale.eval.plots.prior_pictures``) draws the curves at each
    checkpoint and the sample grids; by default nothing is drawn.
    """
    trainer = PriorTrainer(cfg, ctx)
    drawn = pictures(trainer)
    while trainer.step < trainer.total_steps:
        trainer.train_step(*next(trainer.batches))
        log_due, is_ckpt = trainer.window_ends()
        if log_due:
            trainer.end_window(is_ckpt, drawn)
        trainer.window.start += drawn(trainer.step)  # sampling time is left out of the throughput
    return trainer.export(drawn)


def schedule_of(cfg: PriorTrainConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    """The run's lr / wd schedule: warm-up in steps, else epochs, else the official 1/50 of the run."""
    o = cfg.optim
    if o.warmup_steps >= 0:
        warmup = o.warmup_steps
    elif o.warmup_epochs >= 0:
        warmup = round(o.warmup_epochs * steps_per_epoch)
    else:
        warmup = round(total_steps / 50)
    return Schedule(peak_lr=o.peak_lr(cfg.data.batch_size), warmup_steps=min(warmup, total_steps),
                    total_steps=total_steps, start_ratio=o.warmup_start_ratio, final_ratio=o.final_lr_ratio,
                    kind=o.schedule, wd=o.weight_decay, wd_end=o.wd_end)


def _check_same_family(state: dict, var_cfg: VARConfig, cfg: PriorTrainConfig, restore_dir: str) -> None:
    """An output folder holding another model family's checkpoint is a user mistake: name both."""
    saved = state.get("var_config", {}).get("arch", "var")
    if saved != var_cfg.arch:
        def title(arch: str) -> str:
            return FAMILIES[arch].title if arch in FAMILIES else f"a model of family {arch}"

        saved_preset = state.get("config", {}).get("model", {}).get("preset", "?")
        raise ConfigError(f"the checkpoint in {restore_dir} holds {title(saved)} (model.preset={saved_preset}) but "
                          f"model.preset={cfg.model.preset} is {title(var_cfg.arch)}; resume with "
                          f"model.preset={saved_preset} or write to another output")


def _window_metrics(loss_sum: torch.Tensor, n: int, pred_Bl: torch.Tensor, codes_BL: torch.Tensor,
                    patch_nums: tuple[int, ...], scales: int, world: int) -> dict[str, float]:
    """Mean loss over the window and token accuracy of the first / last active scale on the last batch,
    averaged over ranks."""
    with torch.no_grad():
        slices = scale_slices(patch_nums)
        (b0, e0), (b1, e1) = slices[0], slices[scales - 1]
        acc_first = (pred_Bl[:, b0:e0] == codes_BL[:, b0:e0]).float().mean()
        acc_last = (pred_Bl[:, b1:e1] == codes_BL[:, b1:e1]).float().mean()
        vals = torch.stack([loss_sum / n, acc_first, acc_last])
        if world > 1 and tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(vals)
            vals = vals / world
        loss, a0, a1 = vals.tolist()
    return {"loss": loss, "acc_first": a0, "acc_last": a1}
