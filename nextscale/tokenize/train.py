"""Tokenizer training loop (plain PyTorch; run in-process with LocalContext or by the Ray Train launcher).

One step: reconstruction (L1 + L2 [+ perceptual]) + quantiser loss [+ adaptive-weighted hinge GAN
loss once ``loss.disc_start`` is reached], AdamW with warm-up + cosine, gradient clipping, an EMA of
the weights, optional re-seeding of dead codes. Checkpoints hold model, EMA, optimisers, step, RNG
and config; the end of the run writes ``{output}/tokenizer.pt`` (EMA weights, see
``nextscale.tokenize.loader.load_tokenizer``), ``{output}/tokenizer_eval.json`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nextscale import checkpoint, progress, storage
from nextscale.config import ConfigError, dump_yaml, to_dict
from nextscale.images import accepted_images, list_image_folder
from nextscale.logs import Trackers, write_metrics
from nextscale.runtime import Pictures, TrainContext, no_pictures
from nextscale.schedule import Schedule
from nextscale.tokenize.config import TokenizerTrainConfig
from nextscale.tokenize.data import EpochSampler, ImageFolderDataset
from nextscale.tokenize.loader import load_tokenizer, save_tokenizer
from nextscale.tokenize.losses import (
    PatchDiscriminator,
    Perceptual,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from nextscale.tokenize.metrics import evaluate_reconstruction, psnr_db
from nextscale.tokenize.vqvae import VQVAE

log = logging.getLogger(__name__)


def split_items(cfg: TokenizerTrainConfig) -> tuple[list, list]:
    """(train, held-out) ImageFolder items: val_url if given, else every k-th image of url."""
    items = accepted_images(list_image_folder(cfg.data.url)[0], cfg.data.url)
    if cfg.data.val_url:
        val = accepted_images(list_image_folder(cfg.data.val_url)[0], cfg.data.val_url)
    elif cfg.data.val_fraction > 0:
        k = max(2, round(1 / cfg.data.val_fraction))
        val = items[k - 1 :: k]
        items = [it for i, it in enumerate(items) if i % k != k - 1]
    else:
        val = []
    if cfg.data.max_images:
        # spread over classes rather than the first class only
        items = items[:: max(1, len(items) // cfg.data.max_images)][: cfg.data.max_images]
    if cfg.data.max_val_images and len(val) > cfg.data.max_val_images:
        val = val[:: math.ceil(len(val) / cfg.data.max_val_images)]
    return items, val


@torch.no_grad()
def ema_update(ema: VQVAE, model: VQVAE, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def restart_dead_codes(model: VQVAE, f_BChw: torch.Tensor, threshold: float, generator: torch.Generator) -> int:
    """Re-seed codes whose EMA hit rate is below ``threshold`` with random quantiser inputs of this batch.

    The inputs of every scale (coarse averages and fine residuals) are candidates, so a re-seeded code
    lands where the quantiser actually searches. Returns the number of re-seeded codes.
    """
    q = model.quantize
    dead = (q.ema_vocab_hit_SV.sum(0) < threshold).nonzero().flatten()
    if len(dead):
        z_NC = q.residual_inputs(f_BChw)
        pick = torch.randint(len(z_NC), (len(dead),), generator=generator).to(z_NC.device)
        q.embedding.weight[dead] = z_NC[pick].to(q.embedding.weight.dtype)
        q.ema_vocab_hit_SV[:, dead] = threshold  # a grace period before it can be declared dead again
    if tdist.is_available() and tdist.is_initialized():
        tdist.broadcast(q.embedding.weight.data, src=0)
        tdist.broadcast(q.ema_vocab_hit_SV, src=0)
    return len(dead)


class TokenizerTrainer:
    """One run of tokenizer training: ``__init__`` sets up (images, model, EMA, optimisers, discriminator, resumed
    state), :meth:`train_step` runs one step, :meth:`end_window` logs, reports and checkpoints, :meth:`export`
    writes ``tokenizer.pt`` and the held-out evaluation."""

    def __init__(self, cfg: TokenizerTrainConfig, ctx: TrainContext):
        self.cfg, self.ctx = cfg, ctx
        self.wall_start, self.cpu_start = time.time(), time.process_time()
        device = self.device = ctx.device
        torch.manual_seed(cfg.seed + ctx.rank)
        np.random.seed(cfg.seed + ctx.rank)
        random.seed(cfg.seed + ctx.rank)
        self.vq_cfg = cfg.vqvae_config()

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.model = VQVAE(self.vq_cfg)
        if cfg.model.init_url:
            model.load_state_dict(load_tokenizer(cfg.model.init_url)[0].state_dict())
        model.to(device).train()
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.net = ctx.wrap_model(model)
        o = cfg.optim
        self.opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.schedule = Schedule(peak_lr=o.lr, warmup_steps=o.warmup, total_steps=o.steps,
                                 start_ratio=1 / o.warmup if o.warmup else 1.0, final_ratio=o.min_lr_ratio,
                                 kind="cos", wd=o.weight_decay, wd_end=o.weight_decay)
        self.disc = self.disc_net = self.disc_opt = None
        if cfg.loss.disc > 0:
            self.disc = PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers).to(device).train()
            self.disc_net = ctx.wrap_model(self.disc)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=o.lr, betas=o.betas,
                                              weight_decay=o.weight_decay)
        self.perceptual = Perceptual(cfg.loss.perceptual_weights_url).to(device) if cfg.loss.perceptual > 0 else None

        self.train_items, self.val_items = split_items(cfg)
        cache = cfg.data.loader_processes == 0 and len(self.train_items) <= 50_000  # small: decode once, in memory
        self.train_ds = ImageFolderDataset(self.train_items, self.vq_cfg.image_size, train=True,
                                           crop_ratio=cfg.data.crop_ratio, hflip=cfg.data.hflip, seed=cfg.seed,
                                           cache=cache)
        sampler_len = len(self.train_ds) // ctx.world_size
        self.batches_per_epoch = sampler_len // cfg.data.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {sampler_len} training images per "
                              "worker; lower data.batch_size or add images")

        self.restart_gen = torch.Generator().manual_seed(cfg.seed + 7)
        components = {"ema": self.ema, "restart_gen": checkpoint.GeneratorState(self.restart_gen)}
        if self.disc is not None:
            components.update(disc=self.disc, disc_opt=self.disc_opt)
        self.state = checkpoint.TrainState(model=model, optimizer=self.opt, components=components,
                                           extra={"history": []}, info={"config": to_dict(cfg)})
        if checkpoint.restore(ctx, self.state):
            log.info("resumed tokenizer training at step %d", self.state.step)
        self.start_step, self.t_run = self.step, time.time()
        self.trackers = Trackers(cfg, run_id=checkpoint.run_id("tokenizer", cfg.output), rank=ctx.rank,
                                 start_step=self.step)
        self.window: dict[str, float] = {}
        self.n_window, self.t_window = 0, time.time()
        self.metrics: dict[str, float] = {}

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict]:
        return self.state.extra["history"]

    @property
    def exported(self) -> VQVAE:
        """The weights the run exports: the EMA when it keeps one."""
        return self.ema if self.cfg.ema_decay > 0 else self.model

    def batches(self) -> Iterator[torch.Tensor]:
        """Image batches from the current step on, epoch after epoch (each epoch's order fixed by the seed)."""
        cfg, ctx = self.cfg, self.ctx
        epoch, start = divmod(self.step, self.batches_per_epoch)
        while True:
            self.train_ds.epoch = epoch
            sampler = EpochSampler(len(self.train_ds), seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                                   epoch=epoch, start=start * cfg.data.batch_size)
            loader = DataLoader(self.train_ds, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.data.loader_processes, pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, start = epoch + 1, 0

    def train_step(self, img: torch.Tensor) -> None:
        """One step: the autoencoder's losses [+ the generator's GAN loss] and update, the discriminator's update,
        the EMA, dead-code restarts; the batch's metrics go into the window."""
        cfg, loss_cfg = self.cfg, self.cfg.loss
        lr, _ = self.schedule.apply(self.opt, self.step)
        rec, vq_loss, hits_V = self.net(img)
        l1 = (rec - img).abs().mean()
        l2 = F.mse_loss(rec, img)
        rec_loss = loss_cfg.l1 * l1 + loss_cfg.l2 * l2
        if self.perceptual is not None:
            rec_loss = rec_loss + loss_cfg.perceptual * self.perceptual(rec, img)
        loss = rec_loss + loss_cfg.vq * vq_loss
        gan = {}
        if self.disc is not None and self.step >= loss_cfg.disc_start:
            g_loss = hinge_g_loss(self.disc_net(rec))
            d_weight = adaptive_weight(rec_loss, g_loss, self.model.decoder.conv_out.weight,
                                       loss_cfg.adaptive_weight_max)
            loss = loss + loss_cfg.disc * d_weight * g_loss
            gan = {"g_loss": g_loss, "d_weight": d_weight}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or float("inf"))
        self.opt.step()
        if gan:
            self.schedule.apply(self.disc_opt, self.step)
            gan["d_loss"] = hinge_d_loss(self.disc_net(img), self.disc_net(rec.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            gan["d_loss"].backward()
            self.disc_opt.step()
        self.state.step += 1
        ema_update(self.ema, self.model, min(cfg.ema_decay, (1 + self.step) / (10 + self.step)))

        restarted = 0
        every = loss_cfg.dead_code_restart_every
        if every and self.step % every == 0 and self.step < cfg.optim.steps * 0.8:  # the last 20 % settle
            with torch.no_grad():
                restarted = restart_dead_codes(self.model, self.model.quant_conv(self.model.encoder(img)),
                                               loss_cfg.dead_code_threshold, self.restart_gen)
        with torch.no_grad():
            batch_metrics = {
                "loss": float(loss), "l1": float(l1), "l2": float(l2), "vq_loss": float(vq_loss),
                "psnr_db": float(psnr_db(rec.detach(), img).mean()), "grad_norm": float(grad_norm),
                "batch_codes_used": float((hits_V > 0).float().mean()), "restarted_codes": float(restarted),
                **{k: float(gan[k]) for k in ("g_loss", "d_loss", "d_weight") if k in gan},
            }
        for k, v in batch_metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.n_window += 1
        self.lr = lr

    def end_window(self, pictures: Pictures) -> None:
        """After a step: the window's metrics and log line every ``log_every`` steps; a checkpoint every
        ``ckpt_every`` steps and at the end (else a report)."""
        cfg, step = self.cfg, self.step
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.optim.steps
        if step % cfg.log_every == 0 or is_ckpt:
            usage_V = self.model.quantize.ema_vocab_hit_SV.sum(0)
            metrics = self.metrics = {k: v / self.n_window for k, v in self.window.items()}
            metrics.update(
                step=step, lr=self.lr, epoch=step / self.batches_per_epoch,
                codebook_usage=float((usage_V >= cfg.loss.dead_code_threshold).float().mean()),
                dead_codes=int((usage_V < cfg.loss.dead_code_threshold).sum()),
                images_per_s=self.n_window * cfg.data.batch_size * self.ctx.world_size
                / max(1e-9, time.time() - self.t_window),
            )
            log.info("step %d/%d loss %.4f psnr %.2f dB vq %.4f codebook usage %.3f (%d dead) lr %.2e %.1f img/s %s %s",
                     step, cfg.optim.steps, metrics["loss"], metrics["psnr_db"], metrics["vq_loss"],
                     metrics["codebook_usage"], metrics["dead_codes"], self.lr, metrics["images_per_s"],
                     progress.eta(step - self.start_step, cfg.optim.steps - self.start_step, time.time() - self.t_run),
                     progress.peak_memory(self.device))
            self.trackers.log(metrics, step=step)
            self.history.append(metrics)
            self.window, self.n_window, self.t_window = {}, 0, time.time()
        if is_ckpt and self.ctx.rank == 0:
            write_metrics(cfg.output, self.history)
            pictures.curves(self.history)
        if is_ckpt:
            checkpoint.save(self.ctx, self.state, self.metrics)
        elif step % cfg.log_every == 0:
            self.ctx.report(self.metrics)

    def export(self, pictures: Pictures) -> dict:
        """``tokenizer.pt`` (the exported weights), ``config.yaml`` and the held-out evaluation (rank 0); the summary."""
        cfg, step = self.cfg, self.step
        # CPU time next to wall time: on a shared machine the wall clock says little about the cost
        summary = {"steps": step, "train_minutes": (time.time() - self.wall_start) / 60,
                   "train_cpu_minutes": (time.process_time() - self.cpu_start) / 60,
                   **{k: self.metrics[k] for k in ("psnr_db", "codebook_usage", "dead_codes") if k in self.metrics}}
        if self.ctx.rank == 0:
            save_tokenizer(self.exported, storage.join(cfg.output, "tokenizer.pt"))
            storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
            if self.val_items:
                evaluation = self.evaluate()
                summary.update(val_psnr_db=evaluation["psnr_db"], val_codebook_usage=evaluation["codebook_usage"],
                               val_dead_codes=evaluation["dead_codes"])
            summary["tokenizer_url"] = storage.join(cfg.output, "tokenizer.pt")
            summary["pictures"] = pictures.where()
            log.info("tokenizer trained: %d steps in %.1f min; held-out PSNR %.2f dB, codebook usage %.1f %%; wrote %s",
                     step, summary["train_minutes"], summary.get("val_psnr_db", float("nan")),
                     100 * summary.get("val_codebook_usage", float("nan")), summary["tokenizer_url"])
        self.trackers.finish()
        return summary

    def evaluate(self) -> dict:
        """Reconstruction metrics of the exported weights on the held-out images (``tokenizer_eval.json``)."""
        cfg = self.cfg
        val_ds = ImageFolderDataset(self.val_items, self.vq_cfg.image_size, train=False)
        val_loader = DataLoader(val_ds, batch_size=max(cfg.data.batch_size, 64), num_workers=cfg.data.loader_processes)
        evaluation = evaluate_reconstruction(self.exported, val_loader, self.device)
        evaluation.update(weights="ema" if cfg.ema_decay > 0 else "raw", steps=self.step,
                          vqvae=to_dict(self.vq_cfg), data=cfg.data.val_url or f"{cfg.data.url} (held out)")
        storage.write_json(storage.join(cfg.output, "tokenizer_eval.json"), evaluation)
        return evaluation


def train_tokenizer(cfg: TokenizerTrainConfig, ctx: TrainContext,
                    pictures: Callable[[TokenizerTrainer], Pictures] = no_pictures) -> dict:
    """Train, checkpoint through ``ctx``, export the EMA tokenizer; returns a JSON-able summary.

    ``pictures`` (given by the driver: ``nextscale.eval.plots.tokenizer_pictures``) draws the curves at each
    checkpoint and the reconstruction strips; by default nothing is drawn.
    """
    trainer = TokenizerTrainer(cfg, ctx)
    drawn = pictures(trainer)
    data = trainer.batches()
    while trainer.step < cfg.optim.steps:
        trainer.train_step(next(data).to(trainer.device, non_blocking=True))
        trainer.end_window(drawn)
        trainer.t_window += drawn(trainer.step)  # drawing time is left out of the throughput
    return trainer.export(drawn)
