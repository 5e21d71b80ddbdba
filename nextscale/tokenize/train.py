"""Tokenizer training loop (plain PyTorch; run in-process with LocalContext or by the Ray Train launcher).

One step: reconstruction (L1 + L2 [+ perceptual]) + quantiser loss [+ adaptive-weighted hinge GAN
loss once ``loss.disc_start`` is reached], AdamW with warm-up + cosine, gradient clipping, an EMA of
the weights, optional re-seeding of dead codes. Checkpoints hold model, EMA, optimisers, step, RNG
and config; the end of the run writes ``{output}/tokenizer.pt`` (EMA weights, see
``nextscale.tokenize.convert.load_tokenizer``), ``{output}/tokenizer_eval.json`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nextscale import checkpoint, progress, storage
from nextscale.config import dump_yaml, to_dict
from nextscale.eval import plots
from nextscale.images import accepted_images, list_image_folder
from nextscale.logs import Trackers
from nextscale.runtime import TrainContext
from nextscale.tokenize.config import TokenizerTrainConfig
from nextscale.tokenize.convert import load_tokenizer, save_tokenizer
from nextscale.tokenize.data import EpochSampler, ImageFolderDataset
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


def lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    t = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


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


def train_tokenizer(cfg: TokenizerTrainConfig, ctx: TrainContext) -> dict:
    """Train, checkpoint through ``ctx``, export the EMA tokenizer; returns a JSON-able summary."""
    t_start, cpu_start = time.time(), time.process_time()
    device = ctx.device
    torch.manual_seed(cfg.seed + ctx.rank)
    np.random.seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)
    vq_cfg = cfg.vqvae_config()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = VQVAE(vq_cfg)
    if cfg.model.init_url:
        model.load_state_dict(load_tokenizer(cfg.model.init_url)[0].state_dict())
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = ctx.wrap_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay)
    disc = disc_net = disc_opt = None
    if cfg.loss.disc > 0:
        disc = PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers).to(device).train()
        disc_net = ctx.wrap_model(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay)
    perceptual = Perceptual(cfg.loss.perceptual_weights_url).to(device) if cfg.loss.perceptual > 0 else None

    train_items, val_items = split_items(cfg)
    cache = cfg.data.loader_processes == 0 and len(train_items) <= 50_000  # small data: decode once, augment in memory
    train_ds = ImageFolderDataset(train_items, vq_cfg.image_size, train=True, crop_ratio=cfg.data.crop_ratio,
                                  hflip=cfg.data.hflip, seed=cfg.seed, cache=cache)
    sampler_len = len(train_ds) // ctx.world_size
    batches_per_epoch = sampler_len // cfg.data.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} exceeds the {sampler_len} training images per "
                         "worker; lower data.batch_size or add images")

    restart_gen = torch.Generator().manual_seed(cfg.seed + 7)
    components = {"ema": ema, "restart_gen": checkpoint.GeneratorState(restart_gen)}
    if disc is not None:
        components.update(disc=disc, disc_opt=disc_opt)
    state = checkpoint.TrainState(model=model, optimizer=opt, components=components, extra={"history": []},
                                  info={"config": to_dict(cfg)})
    if checkpoint.restore(ctx, state):
        log.info("resumed tokenizer training at step %d", state.step)
    step, history = state.step, state.extra["history"]

    trackers = Trackers(cfg, run_id=checkpoint.run_id("tokenizer", cfg.output), rank=ctx.rank, start_step=step)
    # the same few held-out images at every step (training images when there are none), center-cropped
    strip_items = (val_items or train_items)[:: max(1, len(val_items or train_items) // plots.STRIP_IMAGES)]
    strip_img = torch.stack(list(ImageFolderDataset(strip_items[: plots.STRIP_IMAGES], vq_cfg.image_size,
                                                    train=False))).to(device) if ctx.rank == 0 and cfg.sample_every else None
    strips = plots.TrainingPictures(
        cfg.output, "reconstructions", cfg.sample_every if ctx.rank == 0 else 0,
        lambda _: plots.reconstruction_strip(ema if cfg.ema_decay > 0 else model, strip_img), trackers,
        caption="original, then decoded from the first 1, 2, ... scales")
    last_layer = model.decoder.conv_out.weight
    window: dict[str, float] = {}
    metrics: dict[str, float] = {}
    n_window = 0
    t_window = time.time()

    def batches():
        epoch, start = divmod(step, batches_per_epoch)
        while True:
            train_ds.epoch = epoch
            sampler = EpochSampler(len(train_ds), seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                                   epoch=epoch, start=start * cfg.data.batch_size)
            loader = DataLoader(train_ds, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.data.loader_processes, pin_memory=device.type == "cuda")
            yield from loader
            epoch, start = epoch + 1, 0

    data_iter = batches()
    start_step, t_run = step, time.time()
    while step < cfg.optim.steps:
        img = next(data_iter).to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr

        rec, vq_loss, hits_V = net(img)
        l1 = (rec - img).abs().mean()
        l2 = F.mse_loss(rec, img)
        rec_loss = cfg.loss.l1 * l1 + cfg.loss.l2 * l2
        if perceptual is not None:
            rec_loss = rec_loss + cfg.loss.perceptual * perceptual(rec, img)
        loss = rec_loss + cfg.loss.vq * vq_loss
        gan_on = disc is not None and step >= cfg.loss.disc_start
        if gan_on:
            g_loss = hinge_g_loss(disc_net(rec))
            d_weight = adaptive_weight(rec_loss, g_loss, last_layer, cfg.loss.adaptive_weight_max)
            loss = loss + cfg.loss.disc * d_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        if gan_on:
            for group in disc_opt.param_groups:
                group["lr"] = lr
            d_loss = hinge_d_loss(disc_net(img), disc_net(rec.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))

        restarted = 0
        if cfg.loss.dead_code_restart_every and step % cfg.loss.dead_code_restart_every == 0 \
                and step < cfg.optim.steps * 0.8:  # leave the last 20 % to settle
            with torch.no_grad():
                restarted = restart_dead_codes(model, model.quant_conv(model.encoder(img)),
                                               cfg.loss.dead_code_threshold, restart_gen)

        with torch.no_grad():
            batch_metrics = {
                "loss": float(loss), "l1": float(l1), "l2": float(l2), "vq_loss": float(vq_loss),
                "psnr_db": float(psnr_db(rec.detach(), img).mean()), "grad_norm": float(grad_norm),
                "batch_codes_used": float((hits_V > 0).float().mean()), "restarted_codes": float(restarted),
            }
            if gan_on:
                batch_metrics.update(g_loss=float(g_loss), d_loss=float(d_loss), d_weight=float(d_weight))
        for k, v in batch_metrics.items():
            window[k] = window.get(k, 0.0) + v
        n_window += 1

        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.optim.steps
        if step % cfg.log_every == 0 or is_ckpt:
            usage_V = model.quantize.ema_vocab_hit_SV.sum(0)
            metrics = {k: v / n_window for k, v in window.items()}
            metrics.update(
                step=step, lr=lr, epoch=step / batches_per_epoch,
                codebook_usage=float((usage_V >= cfg.loss.dead_code_threshold).float().mean()),
                dead_codes=int((usage_V < cfg.loss.dead_code_threshold).sum()),
                images_per_s=n_window * cfg.data.batch_size * ctx.world_size / max(1e-9, time.time() - t_window),
            )
            log.info("step %d/%d loss %.4f psnr %.2f dB vq %.4f codebook usage %.3f (%d dead) lr %.2e %.1f img/s %s %s",
                     step, cfg.optim.steps, metrics["loss"], metrics["psnr_db"], metrics["vq_loss"],
                     metrics["codebook_usage"], metrics["dead_codes"], lr, metrics["images_per_s"],
                     progress.eta(step - start_step, cfg.optim.steps - start_step, time.time() - t_run),
                     progress.peak_memory(device))
            trackers.log(metrics, step=step)
            history.append(metrics)
            window, n_window, t_window = {}, 0, time.time()
        if is_ckpt and ctx.rank == 0:
            _write_metrics(cfg.output, history)
        if is_ckpt:
            state.step = step
            checkpoint.save(ctx, state, metrics)
        elif step % cfg.log_every == 0:
            ctx.report(metrics)
        t_window += strips(step)  # drawing time is left out of the throughput

    # CPU time next to wall time: on a shared machine the wall clock says little about the cost
    summary = {"steps": step, "train_minutes": (time.time() - t_start) / 60,
               "train_cpu_minutes": (time.process_time() - cpu_start) / 60, **{
        k: metrics[k] for k in ("psnr_db", "codebook_usage", "dead_codes") if k in metrics}}
    if ctx.rank == 0:
        exported = ema if cfg.ema_decay > 0 else model
        save_tokenizer(exported, storage.join(cfg.output, "tokenizer.pt"))
        storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
        if val_items:
            val_ds = ImageFolderDataset(val_items, vq_cfg.image_size, train=False)
            val_loader = DataLoader(val_ds, batch_size=max(cfg.data.batch_size, 64), num_workers=cfg.data.loader_processes)
            evaluation = evaluate_reconstruction(exported, val_loader, device)
            evaluation.update(weights="ema" if cfg.ema_decay > 0 else "raw", steps=step,
                              vqvae=to_dict(vq_cfg), data=cfg.data.val_url or f"{cfg.data.url} (held out)")
            storage.write_json(storage.join(cfg.output, "tokenizer_eval.json"), evaluation)
            summary.update(val_psnr_db=evaluation["psnr_db"], val_codebook_usage=evaluation["codebook_usage"],
                           val_dead_codes=evaluation["dead_codes"])
        summary["tokenizer_url"] = storage.join(cfg.output, "tokenizer.pt")
        summary["pictures"] = {"curves": storage.join(cfg.output, "curves.png"),
                               "reconstructions": strips.where if strips.every else None}
        log.info("pictures: PSNR / codebook-usage / loss curves in %s, reconstruction strips in %s",
                 summary["pictures"]["curves"], summary["pictures"]["reconstructions"])
        log.info("tokenizer trained: %d steps in %.1f min; held-out PSNR %.2f dB, codebook usage %.1f %%; wrote %s",
                 step, summary["train_minutes"], summary.get("val_psnr_db", float("nan")),
                 100 * summary.get("val_codebook_usage", float("nan")), summary["tokenizer_url"])
    trackers.finish()
    return summary


def _write_metrics(output: str, history: list[dict]) -> None:
    storage.write_text(storage.join(output, "metrics.jsonl"), "".join(storage.json_text(row) + "\n" for row in history))
    plots.write_curves(storage.join(output, "curves.png"), history, plots.TOKENIZER_CURVES)
