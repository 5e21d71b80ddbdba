"""Tokenizer figures: the VQVAE's encoder (``encode.fp32`` vs ``encode.bf16`` / ``encode.channels_last`` / both) and
the same variants of its decoder, which the sampling figures time. fp32 stays the default for codes: bf16 changes
some (``nextscale.levers.check_vqvae``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.tokenize.vqvae import build_vqvae


def vqvae_variants(s: measure.Setup, kind: str, make: Callable) -> list[tuple[str, Callable[[], None]]]:
    """(name, call) for fp32, bf16, channels_last and both, each on its own copy of the tokenizer."""
    out = []
    for name, amp, channels_last in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                                     ("channels_last", None, True), ("bf16_channels_last", torch.bfloat16, True)):
        model = measure.vqvae(s).channels_last_(channels_last)
        out.append((f"{kind}.{name}", torch.no_grad()(make(model, amp))))
    return out


def bench_encode(cfg: BenchConfig, s: measure.Setup) -> list[dict]:
    if measure.vqvae_too_slow(s):
        return [measure.figure("encode.fp32", s, skipped="256-px VQVAE encode on a CPU")]
    size = build_vqvae(s.tokenizer).cfg.image_size
    img = torch.rand(s.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(s.device) * 2 - 1
    encoders = vqvae_variants(s, "encode", lambda model, amp: lambda: model.encode(img, amp_dtype=amp))
    return measure.versus_first(encoders, s)
