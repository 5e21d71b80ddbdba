"""Training-step figures: the prior's step on codes with every lever off (``train.plain``), each lever on alone
(``train.<lever>``) and all together (``train.all``), images/s, MFU and peak memory; and ``train.encode_plus_step``,
nextscale's own fp32 VQVAE encode of the pixels before the plain step, i.e. the official trainer's work per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextscale.devices import peak_flops
from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.prior.engine import step_loss
from nextscale.prior.families import flops_per_image
from nextscale.prior.optim import build_optimizer
from nextscale.prior.prefetch import DevicePrefetcher
from nextscale.tokenize.vqvae import build_vqvae


def train_step(cfg: BenchConfig, s: measure.Setup, levers: frozenset[str]) -> Callable[[], None]:
    """One training step on codes (host batch -> device, step_loss, backward, clip, AdamW) with ``levers`` on."""
    vq = build_vqvae(s.tokenizer)
    quantizer = vq.quantize.to(s.device).eval().requires_grad_(False)
    var = measure.prior(s, vq.cfg, attn_impl="flex" if "flex" in levers else "sdpa").train()
    net = torch.compile(var) if "compile" in levers else var
    opt = build_optimizer(var, lr=1e-4, betas=(0.9, 0.95), fused="fused_adamw" in levers)
    host = measure.host_batches(s, var.L, var.V, var.num_classes)
    batches = DevicePrefetcher(host, s.device, enabled="prefetch" in levers)
    patch_nums, chunk = var.patch_nums, cfg.loss_chunk if "chunked_ce" in levers else 0

    def step() -> None:
        codes_BL, label_B = next(batches)
        loss, _ = step_loss(net, quantizer, codes_BL, label_B, patch_nums, len(patch_nums), s.amp, 0.0, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()

    step.flops = flops_per_image(var.cfg)
    return step


def _timeable_levers(cfg: BenchConfig, s: measure.Setup) -> tuple[list[str], dict[str, str]]:
    """The levers this device can time, and why the others are skipped."""
    skipped = {}
    if not s.gpu and "flex" in cfg.levers:
        skipped["flex"] = "FlexAttention has no CPU backward: CPU training keeps SDPA"
    return [lv for lv in cfg.levers if lv not in skipped], skipped


def _step_figure(name: str, s: measure.Setup, times: list[float], step: Callable[[], None], levers: frozenset[str],
                 **values) -> dict:
    """A training-step row: images/s, TFLOP/s and MFU from the family's own FLOPs, peak memory."""
    r = measure.rate(times, s.batch)
    peak = peak_flops(s.device, "bf16")
    return measure.figure(name, s, **r, **values, levers=sorted(levers), tflops=r["img_per_s"] * step.flops / 1e12,
                          mfu=r["img_per_s"] * step.flops / peak if peak else None,
                          peak_memory_gib=measure.peak_memory_gib(step, s.device))


def bench_train(cfg: BenchConfig, s: measure.Setup) -> list[dict]:
    levers, skipped = _timeable_levers(cfg, s)
    plain = train_step(cfg, s, frozenset())
    variants = {lv: frozenset([lv]) for lv in levers}
    if len(levers) > 1:
        variants["all"] = frozenset(levers)
    plain_times: list[float] = []
    rows = []
    for name, on in variants.items():
        fast = train_step(cfg, s, on)
        times = measure.interleaved({"plain": plain, name: fast}, s)
        plain_times += times["plain"]
        rows.append(_step_figure(f"train.{name}", s, times[name], fast, on,
                                 **measure.ratio(times[name], times["plain"]), ratio_vs="train.plain"))
        del fast
    if not variants:
        plain_times = measure.interleaved({"plain": plain}, s)["plain"]
    out = [_step_figure("train.plain", s, plain_times, plain, frozenset()), *rows]
    out += [measure.figure(f"train.{lv}", s, skipped=why) for lv, why in skipped.items()]
    return out + [encode_plus_step(s, plain)]


def encode_plus_step(s: measure.Setup, plain: Callable[[], None]) -> dict:
    """The official trainer's work per step: an fp32 encode of the pixels, then the step."""
    if measure.vqvae_too_slow(s):
        return measure.figure("train.encode_plus_step", s, skipped="256-px VQVAE encode on a CPU")
    vq = measure.vqvae(s)
    size = vq.cfg.image_size
    img = torch.rand(s.batch, 3, size, size, device=s.device) * 2 - 1

    def encode_then_step() -> None:
        with torch.no_grad():
            vq.encode(img)
        plain()

    times = measure.interleaved({"train.plain": plain, "train.encode_plus_step": encode_then_step}, s)
    return measure.versus("train.encode_plus_step", s, times["train.encode_plus_step"], times["train.plain"],
                          "train.plain", encode_then_step,
                          note="nextscale's own fp32 VQVAE encode + the plain step: the official trainer's work per "
                               "step, not the official code (ratio < 1: the cost of encoding every step)")
