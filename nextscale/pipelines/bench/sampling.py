"""Sampling figures: token sampling (KV cache, CFG 1.5, top-k 900, top-p 0.96) in the configured precision,
``sample.codes_plain`` vs ``sample.static_cache`` (and ``sample.graphs`` on CUDA); the decoder's variants
(``decode.*``); and ``sample.total_plain`` vs ``sample.total_fast``: fp32 sampling + fp32 decode vs every sampling
and decode lever on."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.pipelines.bench.tokenizer import vqvae_variants
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.tokenize.vqvae import build_vqvae


class _Sampler:
    """Makes calls that sample one batch of codes with given levers; the last codes drawn stay in ``codes``."""

    def __init__(self, s: measure.Setup):
        vq = build_vqvae(s.tokenizer)
        self.s, self.quantizer, self.var = s, vq.quantize.to(s.device).eval(), measure.prior(s, vq.cfg).eval()
        self.label = torch.arange(s.batch, device=s.device) % self.var.cfg.num_classes
        # the paper's protocol, as fid samples (top-k no larger than the vocabulary)
        self.sampling = SamplingConfig(top_k=min(SamplingConfig().top_k, vq.cfg.vocab_size))
        self.codes: torch.Tensor | None = None

    def call(self, amp: torch.dtype | None, **levers) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(self.s.device).manual_seed(0)
            self.codes = sample_codes(self.var, self.quantizer, self.label, generator=gen, sampling=self.sampling,
                                      autocast=amp is not None, **levers)
        return go


def bench_sample(cfg: BenchConfig, s: measure.Setup) -> list[dict]:
    sampler = _Sampler(s)
    # codes only: the plain sampler (growing KV cache) vs each sampling lever
    variants = [("sample.codes_plain", sampler.call(s.amp)),
                ("sample.static_cache", sampler.call(s.amp, static_cache=True))]
    if s.gpu:
        variants.append(("sample.graphs", sampler.call(s.amp, graphs=True)))
    out = measure.versus_first(variants, s, note="cfg 1.5, top-k 900, top-p 0.96, codes only")
    out[0]["note"] += ", growing KV cache"
    if measure.vqvae_too_slow(s):
        return out + [measure.figure("decode.fp32", s, skipped="256-px VQVAE decode on a CPU")]
    return out + _decode_and_total(sampler, s)


def _decode_and_total(sampler: _Sampler, s: measure.Setup) -> list[dict]:
    """The decoder's variants on sampled codes, then sampling + decode with every lever off vs every lever on."""
    sampler.call(s.amp)()
    codes = sampler.codes
    decoders = vqvae_variants(s, "decode", lambda model, amp: lambda: model.decode(codes, amp_dtype=amp))
    out = measure.versus_first(decoders, s)
    plain_sampler, fast_sampler = sampler.call(None), sampler.call(s.amp, static_cache=True, graphs=s.gpu)
    plain_decoder = dict(decoders)["decode.fp32"]
    fast_decoder = dict(decoders)[f"decode.{'bf16_channels_last' if s.gpu else 'fp32'}"]

    def plain() -> None:
        plain_sampler()
        plain_decoder()

    def fast() -> None:
        fast_sampler()
        fast_decoder()

    times = measure.interleaved({"sample.total_plain": plain, "sample.total_fast": fast}, s)
    out.append(measure.figure("sample.total_plain", s, **measure.rate(times["sample.total_plain"], s.batch),
                              note="fp32 eager sampling (growing KV cache) + fp32 decode"))
    out.append(measure.versus("sample.total_fast", s, times["sample.total_fast"], times["sample.total_plain"],
                              "sample.total_plain", fast,
                              note="static KV cache (+ CUDA graphs and bf16 channels-last decode on a GPU) in the "
                                   "configured precision, decode included"))
    return out
