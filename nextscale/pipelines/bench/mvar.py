"""M-VAR figures: M-VAR beside VAR at the same size and batch (training step and sampling images/s), and M-VAR's
stateful sampler vs the official one, which re-runs every Mamba2 mixer over the whole prefix at each scale."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch

from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.prior.engine import step_loss
from nextscale.prior.optim import build_optimizer
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.tokenize.vqvae import build_vqvae


def bench_mvar(cfg: BenchConfig, s: measure.Setup) -> list[dict]:
    mvar_preset = cfg.mvar_preset if cfg.mvar_preset != "auto" else f"mvar_{s.prior}"
    vq = build_vqvae(s.tokenizer)
    quantizer = vq.quantize.to(s.device).eval().requires_grad_(False)
    var, mvar = measure.prior(s, vq.cfg), measure.prior(dataclasses.replace(s, prior=mvar_preset), vq.cfg)
    patch_nums = tuple(vq.cfg.patch_nums)
    label = torch.arange(s.batch, device=s.device) % var.cfg.num_classes
    codes = next(measure.host_batches(s, var.L, var.V, var.num_classes))[0].to(s.device)
    sampling = SamplingConfig(top_k=min(900, vq.cfg.vocab_size), top_p=0.96)

    def train_step(model) -> Callable[[], None]:
        opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95))

        def go() -> None:
            loss, _ = step_loss(model, quantizer, codes, label, patch_nums, len(patch_nums), s.amp, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    def sample(model) -> Callable[[], None]:
        def go() -> None:
            with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
                sample_codes(model, quantizer, label, generator=torch.Generator(s.device).manual_seed(0),
                             sampling=sampling)
        return go

    def rerun_prefix() -> None:
        mvar.sample_by_rerunning_prefix(True)
        try:
            sample(mvar)()
        finally:
            mvar.sample_by_rerunning_prefix(False)

    train = measure.interleaved({"var": train_step(var.train()), "mvar": train_step(mvar.train())}, s)
    var.eval(), mvar.eval()
    sampled = measure.interleaved({"var": sample(var), "mvar": sample(mvar)}, s)
    rerun = measure.interleaved({"mvar": sample(mvar), "rerun": rerun_prefix}, s)
    times = {"var.train": train["var"], "mvar.train": train["mvar"], "var.sample": sampled["var"],
             "mvar.sample": sampled["mvar"], "mvar.sample_rerun": rerun["rerun"]}
    return _rows(s, mvar_preset, {k: s.batch / statistics.median(v) for k, v in times.items()})


def _rows(s: measure.Setup, mvar_preset: str, rates: dict[str, float]) -> list[dict]:
    row = measure.figure
    return [
        row("mvar.var_train_step", s, img_per_s=rates["var.train"], note=f"{s.prior}, teacher forcing on codes"),
        row("mvar.mvar_train_step", s, img_per_s=rates["mvar.train"], ratio=rates["mvar.train"] / rates["var.train"],
            ratio_vs="mvar.var_train_step", mvar=mvar_preset, note=f"{s.prior} vs {mvar_preset}"),
        row("mvar.var_sample", s, img_per_s=rates["var.sample"], note="KV cache, cfg 1.5, codes only (no decode)"),
        row("mvar.mvar_sample", s, img_per_s=rates["mvar.sample"], ratio=rates["mvar.sample"] / rates["var.sample"],
            ratio_vs="mvar.var_sample", mvar=mvar_preset, note="Mamba state carried from scale to scale"),
        row("mvar.mvar_sample_rerun_prefix", s, img_per_s=rates["mvar.sample_rerun"], mvar=mvar_preset,
            note="the official M-VAR sampler's scheme: every mixer re-run over the whole prefix at each scale"),
        row("mvar.stateful_speedup", s, ratio=rates["mvar.sample"] / rates["mvar.sample_rerun"],
            ratio_vs="mvar.mvar_sample_rerun_prefix", mvar=mvar_preset),
    ]
