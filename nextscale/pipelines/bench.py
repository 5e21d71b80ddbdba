"""``nextscale bench``: throughput figures, each beside a baseline measured in the same run.

One JSON line per figure on stdout (and in ``output`` when set). Every ratio comes from the two sides
timed interleaved (A B B A ...), so a shared, noisy machine slows both alike; each side reports the
median, min and max of its timed calls. Figures, per VAR preset in ``prior_presets``:
- ``train.plain``: the prior's training step on codes (``prior.engine.step_loss``, clip, AdamW) with every
  lever off; ``train.<lever>`` the same step with one lever on (flex, compile, chunked_ce, prefetch,
  fused_adamw), ``train.all`` with all of them, each with its ratio to ``train.plain``; images/s, MFU
  and peak memory. ``train.encode_plus_step``: nextscale's own fp32 VQVAE encode of the pixels before
  the plain step, i.e. the work per step of the official trainer (not the official code itself).
- ``sample.codes_plain`` vs ``sample.static_cache`` (and ``sample.graphs`` on CUDA): token sampling (KV
  cache, CFG 1.5, top-k 900, top-p 0.96) in the configured precision; ``decode.fp32`` vs
  ``decode.bf16`` / ``decode.channels_last`` / ``decode.bf16_channels_last``; ``sample.total_plain`` vs
  ``sample.total_fast``: fp32 sampling + fp32 decode vs every sampling and decode lever on.
- ``encode.fp32`` vs ``encode.bf16`` / ``encode.channels_last``: the tokenizer's encoder (fp32 stays
  the default for codes; bf16 changes some, see ``nextscale.levers.check_vqvae``).
- ``loader``: images/s the code loader delivers from real shards vs images/s training consumes.
- ``tokenize``: the whole Ray Data job (JPEG decode, views, encode, shard writes) on ``tokenize_images_dir``
  (default: the built-in demo dataset) vs encode-only throughput of the same tokenizer.
- ``mvar``: M-VAR beside VAR at the same size and batch (training step and sampling images/s), and
  M-VAR's stateful sampler vs the official one, which re-runs every Mamba2 mixer over the prefix.
- ``projection``: the cost of full ImageNet work on N devices from the measured rates.
Sizes default to the official ones on a GPU (d16, vae_ch160v4096z32, batch 64) and to the demo
presets on a CPU, so the command is meaningful everywhere; the JSON says which were used. On a CPU the
256-px VQVAE is too slow to time (tens of seconds per image): figures needing it are skipped, with a note.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from nextscale import storage
from nextscale.codes import write_synthetic_shards
from nextscale.config import RayConfig, doc, require
from nextscale.demo_data import make_demo_data
from nextscale.devices import peak_flops, pick_device
from nextscale.prior.data import CodeLoader
from nextscale.prior.engine import step_loss
from nextscale.prior.families import build_prior, flops_per_image
from nextscale.prior.optim import build_optimizer
from nextscale.prior.prefetch import DevicePrefetcher
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.tokenize.vqvae import build_vqvae

log = logging.getLogger(__name__)

FIGURES = ("train", "sample", "encode", "loader", "tokenize", "mvar")
TRAIN_LEVERS = ("flex", "compile", "chunked_ce", "prefetch", "fused_adamw")
IMAGENET_TRAIN_IMAGES = 1_281_167

def _consumption(figures: dict[str, dict]) -> dict:
    """The training figure the loader must outpace and the projection uses: all levers on, else the plain step."""
    return figures.get("train.all") or figures.get("train.plain") or {}
CPU_MAX_VQVAE_SIZE = 64  # image side above which a CPU run skips VQVAE encode / decode figures


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    what: tuple[str, ...] = doc(FIGURES, f"figures to measure, any of {', '.join(FIGURES)}")
    device: str = doc("auto", "cuda, cpu or auto")
    prior_presets: tuple[str, ...] = doc(("auto",), "VAR presets, each measured in turn; auto = d16 on a GPU, "
                                                    "demo on a CPU")
    tokenizer_preset: str = doc("auto", "VQVAE preset paired with a VAR preset other than demo (demo pairs with "
                                        "demo); auto = vae_ch160v4096z32")
    mvar_preset: str = doc("auto", "M-VAR preset measured beside each VAR one; auto = mvar_<VAR preset>")
    levers: tuple[str, ...] = doc(TRAIN_LEVERS, "training levers measured one at a time and all together "
                                                f"(any of {', '.join(TRAIN_LEVERS)}); () = the plain step only")
    batch_size: int = doc(0, "images per step; 0 = 64 on a GPU, 16 on a CPU")
    steps: int = doc(0, "timed calls per side of each ratio, interleaved A B B A ...; 0 = 20 on a GPU, 6 on a CPU")
    warmup: int = doc(0, "untimed calls per side first (compilation happens here); 0 = 5 on a GPU, 1 on a CPU")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "autocast dtype of training and sampling; auto = "
                                                             "bf16 on a GPU, fp32 on a CPU")
    loss_chunk: int = doc(8192, "tokens per chunk of the chunked_ce lever")
    tokenize_images: int = doc(64, "images of the built-in demo dataset run through the tokenize job")
    tokenize_images_dir: str = doc("", "ImageFolder of real images for the tokenize job instead of the demo dataset "
                                       "(e.g. 256-px ImageNet JPEGs)")
    projection_devices: int = doc(8, "devices assumed by the ImageNet cost projection")
    projection_views: int = doc(1, "augmented views per image assumed by the pretokenizing projection")
    projection_epochs: int = doc(200, "epochs assumed by the training projection (d16 recipe: 200)")
    output: str = doc("", "also append the JSON lines to this file (local or object storage)")
    ray: RayConfig = doc(RayConfig(), "Ray cluster for the tokenize figure")

    def __post_init__(self):
        unknown = sorted(set(self.what) - set(FIGURES))
        require(not unknown, f"what: unknown figure {unknown[0] if unknown else ''!r}; choose from {', '.join(FIGURES)}")
        bad = sorted(set(self.levers) - set(TRAIN_LEVERS))
        require(not bad, f"levers: unknown lever {bad[0] if bad else ''!r}; choose from {', '.join(TRAIN_LEVERS)}")
        require(len(self.prior_presets) >= 1, "prior_presets is empty: name at least one VAR preset (or auto)")
        require(self.loss_chunk >= 1, f"loss_chunk={self.loss_chunk} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Setup:
    device: torch.device
    prior: str
    tokenizer: str
    batch: int
    steps: int
    warmup: int
    amp: torch.dtype | None

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def _device(cfg: BenchConfig) -> torch.device:
    return pick_device(cfg.device)


def _setup(cfg: BenchConfig, prior: str = "auto") -> Setup:
    device = _device(cfg)
    gpu = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if gpu else None, "fp32": None, "bf16": torch.bfloat16}[cfg.precision]
    prior = prior if prior != "auto" else ("d16" if gpu else "demo")
    tokenizer = "demo" if prior == "demo" else (
        cfg.tokenizer_preset if cfg.tokenizer_preset != "auto" else "vae_ch160v4096z32")
    return Setup(device=device, prior=prior, tokenizer=tokenizer, batch=cfg.batch_size or (64 if gpu else 16),
                 steps=cfg.steps or (20 if gpu else 6), warmup=cfg.warmup or (5 if gpu else 1), amp=amp)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call; CUDA work is synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], None]], s: Setup) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternating order (A B, B A, A B, ...) after warm-up.

    Alternating cancels drifts of a shared machine (other jobs, clocks) that back-to-back blocks would
    book to one side.
    """
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(s.steps):
        for name, fn in order if r % 2 == 0 else reversed(order):
            times[name].append(_timed(fn, s.device))
    return times


def _rate(times: list[float], per_call: int) -> dict[str, float]:
    """img/s at the median call, and at the slowest / fastest calls."""
    return {"img_per_s": per_call / statistics.median(times), "img_per_s_min": per_call / max(times),
            "img_per_s_max": per_call / min(times), "calls": len(times)}


def _ratio(fast: list[float], base: list[float]) -> dict[str, float]:
    """base / fast at the medians, and the range of the round-by-round ratios (same round = neighbours in time)."""
    rounds = [b / f for b, f in zip(base, fast)]
    return {"ratio": statistics.median(base) / statistics.median(fast), "ratio_min": min(rounds),
            "ratio_max": max(rounds)}


def _peak_memory_gib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` alone (the interleaved timing mixes the two sides' peaks)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _vqvae(s: Setup):
    torch.manual_seed(0)
    return build_vqvae(s.tokenizer).to(s.device).eval().requires_grad_(False)


def _vqvae_too_slow(s: Setup) -> bool:
    return not s.gpu and build_vqvae(s.tokenizer).cfg.image_size > CPU_MAX_VQVAE_SIZE


def _var(s: Setup, vq_cfg, **overrides):
    torch.manual_seed(0)
    return build_prior(s.prior, vocab_size=vq_cfg.vocab_size, latent_channels=vq_cfg.z_channels,
                     patch_nums=tuple(vq_cfg.patch_nums), **overrides).to(s.device)


# ------------------------------------------------------------------------------------------------
# Figures


def _host_batches(s: Setup, L: int, V: int, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless host batches (int64 codes and labels, as the code loader yields them), four distinct ones."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (s.batch, L), generator=g), torch.randint(0, num_classes, (s.batch,), generator=g))
               for _ in range(4)]
    return itertools.cycle(batches)


def train_step(cfg: BenchConfig, s: Setup, levers: frozenset[str]) -> Callable[[], None]:
    """One training step on codes (host batch -> device, step_loss, backward, clip, AdamW) with ``levers`` on."""
    vqvae = build_vqvae(s.tokenizer)
    quantizer = vqvae.quantize.to(s.device).eval().requires_grad_(False)
    var = _var(s, vqvae.cfg, attn_impl="flex" if "flex" in levers else "sdpa").train()
    net = torch.compile(var) if "compile" in levers else var
    opt = build_optimizer(var, lr=1e-4, betas=(0.9, 0.95), fused="fused_adamw" in levers)
    batches = DevicePrefetcher(_host_batches(s, var.L, var.V, var.num_classes), s.device, enabled="prefetch" in levers)
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


def _train_levers(cfg: BenchConfig, s: Setup) -> tuple[list[str], dict[str, str]]:
    """The levers this device can time, and why the others are skipped."""
    skipped = {}
    if not s.gpu and "flex" in cfg.levers:
        skipped["flex"] = "FlexAttention has no CPU backward: CPU training keeps SDPA"
    return [lv for lv in cfg.levers if lv not in skipped], skipped


def bench_train(cfg: BenchConfig, s: Setup) -> list[dict]:
    levers, skipped = _train_levers(cfg, s)
    plain = train_step(cfg, s, frozenset())
    peak = peak_flops(s.device, "bf16")
    variants = {lv: frozenset([lv]) for lv in levers}
    if len(levers) > 1:
        variants["all"] = frozenset(levers)
    plain_times: list[float] = []
    rows = []
    for name, on in variants.items():
        fast = train_step(cfg, s, on)
        times = interleaved({"plain": plain, name: fast}, s)
        plain_times += times["plain"]
        rate = _rate(times[name], s.batch)
        rows.append(_figure(f"train.{name}", s, **rate, **_ratio(times[name], times["plain"]), ratio_vs="train.plain",
                            levers=sorted(on), tflops=rate["img_per_s"] * fast.flops / 1e12,
                            mfu=rate["img_per_s"] * fast.flops / peak if peak else None,
                            peak_memory_gib=_peak_memory_gib(fast, s.device)))
        del fast
    if not variants:
        plain_times = interleaved({"plain": plain}, s)["plain"]
    rate = _rate(plain_times, s.batch)
    out = [_figure("train.plain", s, **rate, levers=[], tflops=rate["img_per_s"] * plain.flops / 1e12,
                   mfu=rate["img_per_s"] * plain.flops / peak if peak else None,
                   peak_memory_gib=_peak_memory_gib(plain, s.device))]
    out += rows
    out += [_figure(f"train.{lv}", s, skipped=why) for lv, why in skipped.items()]
    if _vqvae_too_slow(s):
        out.append(_figure("train.encode_plus_step", s, skipped="256-px VQVAE encode on a CPU"))
        return out
    vqvae = _vqvae(s)
    size = vqvae.cfg.image_size
    img = torch.rand(s.batch, 3, size, size, device=s.device) * 2 - 1

    def encode_plus_step() -> None:  # what the official trainer does per step: fp32 encode of the pixels, then the step
        with torch.no_grad():
            vqvae.encode(img)
        plain()

    times = interleaved({"train.plain": plain, "train.encode_plus_step": encode_plus_step}, s)
    out.append(_figure("train.encode_plus_step", s, **_rate(times["train.encode_plus_step"], s.batch),
                       **_ratio(times["train.encode_plus_step"], times["train.plain"]), ratio_vs="train.plain",
                       peak_memory_gib=_peak_memory_gib(encode_plus_step, s.device),
                       note="nextscale's own fp32 VQVAE encode + the plain step: the official trainer's work per step, "
                            "not the official code (ratio < 1: the cost of encoding every step)"))
    return out


def bench_sample(cfg: BenchConfig, s: Setup) -> list[dict]:
    vqvae = build_vqvae(s.tokenizer)
    quantizer = vqvae.quantize.to(s.device).eval()
    var = _var(s, vqvae.cfg).eval()
    label = torch.arange(s.batch, device=s.device) % var.cfg.num_classes
    # the paper's protocol, as fid samples (top-k no larger than the vocabulary)
    sampling = SamplingConfig(top_k=min(SamplingConfig().top_k, vqvae.cfg.vocab_size))
    codes_box: list[torch.Tensor] = []

    def sampler(amp: torch.dtype | None, **kw) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(s.device).manual_seed(0)
            codes_box[:] = [sample_codes(var, quantizer, label, generator=gen, sampling=sampling,
                                         autocast=amp is not None, **kw)]
        return go

    note = "cfg 1.5, top-k 900, top-p 0.96, codes only"
    variants = {"sample.static_cache": sampler(s.amp, static_cache=True)}
    if s.gpu:
        variants["sample.graphs"] = sampler(s.amp, graphs=True)
    plain = sampler(s.amp)
    plain_times: list[float] = []
    out = []
    for name, fn in variants.items():
        times = interleaved({"plain": plain, name: fn}, s)
        plain_times += times["plain"]
        out.append(_figure(name, s, **_rate(times[name], s.batch), **_ratio(times[name], times["plain"]),
                           ratio_vs="sample.codes_plain", peak_memory_gib=_peak_memory_gib(fn, s.device), note=note))
    out.insert(0, _figure("sample.codes_plain", s, **_rate(plain_times, s.batch),
                          peak_memory_gib=_peak_memory_gib(plain, s.device), note=note + ", growing KV cache"))
    if _vqvae_too_slow(s):
        return out + [_figure("decode.fp32", s, skipped="256-px VQVAE decode on a CPU")]

    plain()
    codes = codes_box[0]
    decoders = _vqvae_variants(s, "decode", lambda model, amp: lambda: model.decode(codes, amp_dtype=amp))
    out += _vs_first(decoders, s, "decode")
    fast = sampler(s.amp, static_cache=True, graphs=s.gpu)
    fast_decoder = dict(decoders)[f"decode.{'bf16_channels_last' if s.gpu else 'fp32'}"]
    fp32_decoder = dict(decoders)["decode.fp32"]
    total = {"sample.total_plain": lambda: (sampler(None)(), fp32_decoder()),
             "sample.total_fast": lambda: (fast(), fast_decoder())}
    times = interleaved(total, s)
    out.append(_figure("sample.total_plain", s, **_rate(times["sample.total_plain"], s.batch),
                       note="fp32 eager sampling (growing KV cache) + fp32 decode"))
    out.append(_figure("sample.total_fast", s, **_rate(times["sample.total_fast"], s.batch),
                       **_ratio(times["sample.total_fast"], times["sample.total_plain"]), ratio_vs="sample.total_plain",
                       peak_memory_gib=_peak_memory_gib(total["sample.total_fast"], s.device),
                       note="static KV cache (+ CUDA graphs and bf16 channels-last decode on a GPU) in the "
                            "configured precision, decode included"))
    return out


def _vqvae_variants(s: Setup, kind: str, make: Callable) -> list[tuple[str, Callable[[], None]]]:
    """(name, call) for fp32, bf16, channels_last and both, each on its own copy of the tokenizer."""
    out = []
    for name, amp, channels_last in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                                     ("channels_last", None, True), ("bf16_channels_last", torch.bfloat16, True)):
        model = _vqvae(s).channels_last_(channels_last)
        out.append((f"{kind}.{name}", torch.no_grad()(make(model, amp))))
    return out


def _vs_first(variants: list[tuple[str, Callable[[], None]]], s: Setup, kind: str) -> list[dict]:
    (base_name, base), rest = variants[0], variants[1:]
    base_times: list[float] = []
    out = []
    for name, fn in rest:
        times = interleaved({base_name: base, name: fn}, s)
        base_times += times[base_name]
        out.append(_figure(name, s, **_rate(times[name], s.batch), **_ratio(times[name], times[base_name]),
                           ratio_vs=base_name, peak_memory_gib=_peak_memory_gib(fn, s.device)))
    return [_figure(base_name, s, **_rate(base_times, s.batch), peak_memory_gib=_peak_memory_gib(base, s.device))] + out


def bench_encode(cfg: BenchConfig, s: Setup) -> list[dict]:
    if _vqvae_too_slow(s):
        return [_figure("encode.fp32", s, skipped="256-px VQVAE encode on a CPU")]
    size = build_vqvae(s.tokenizer).cfg.image_size
    img = torch.rand(s.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(s.device) * 2 - 1
    encoders = _vqvae_variants(s, "encode", lambda model, amp: lambda: model.encode(img, amp_dtype=amp))
    return _vs_first(encoders, s, "encode")


def bench_mvar(cfg: BenchConfig, s: Setup) -> list[dict]:
    mvar_preset = cfg.mvar_preset if cfg.mvar_preset != "auto" else f"mvar_{s.prior}"
    vqvae = build_vqvae(s.tokenizer)
    quantizer = vqvae.quantize.to(s.device).eval().requires_grad_(False)
    var, mvar = _var(s, vqvae.cfg), _var(dataclasses.replace(s, prior=mvar_preset), vqvae.cfg)
    patch_nums = tuple(vqvae.cfg.patch_nums)
    label = torch.arange(s.batch, device=s.device) % var.cfg.num_classes
    codes = next(_host_batches(s, var.L, var.V, var.num_classes))[0].to(s.device)
    top_k = min(900, vqvae.cfg.vocab_size)

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
                             sampling=SamplingConfig(top_k=top_k, top_p=0.96))
        return go

    train = interleaved({"var": train_step(var.train()), "mvar": train_step(mvar.train())}, s)
    var.eval(), mvar.eval()
    sampling = interleaved({"var": sample(var), "mvar": sample(mvar)}, s)

    def rerun_prefix() -> None:
        mvar.sample_by_rerunning_prefix(True)
        try:
            sample(mvar)()
        finally:
            mvar.sample_by_rerunning_prefix(False)

    rerun = interleaved({"mvar": sample(mvar), "rerun": rerun_prefix}, s)
    rates = {"var.train": s.batch / statistics.median(train["var"]),
             "mvar.train": s.batch / statistics.median(train["mvar"]),
             "var.sample": s.batch / statistics.median(sampling["var"]),
             "mvar.sample": s.batch / statistics.median(sampling["mvar"]),
             "mvar.sample_rerun": s.batch / statistics.median(rerun["rerun"])}
    sizes = f"{s.prior} vs {mvar_preset}"
    return [
        _figure("mvar.var_train_step", s, img_per_s=rates["var.train"], note=f"{s.prior}, teacher forcing on codes"),
        _figure("mvar.mvar_train_step", s, img_per_s=rates["mvar.train"], ratio=rates["mvar.train"] / rates["var.train"],
                ratio_vs="mvar.var_train_step", mvar=mvar_preset, note=sizes),
        _figure("mvar.var_sample", s, img_per_s=rates["var.sample"], note="KV cache, cfg 1.5, codes only (no decode)"),
        _figure("mvar.mvar_sample", s, img_per_s=rates["mvar.sample"], ratio=rates["mvar.sample"] / rates["var.sample"],
                ratio_vs="mvar.var_sample", mvar=mvar_preset, note="Mamba state carried from scale to scale"),
        _figure("mvar.mvar_sample_rerun_prefix", s, img_per_s=rates["mvar.sample_rerun"], mvar=mvar_preset,
                note="the official M-VAR sampler's scheme: every mixer re-run over the whole prefix at each scale"),
        _figure("mvar.stateful_speedup", s, ratio=rates["mvar.sample"] / rates["mvar.sample_rerun"],
                ratio_vs="mvar.mvar_sample_rerun_prefix", mvar=mvar_preset),
    ]


def bench_loader(cfg: BenchConfig, s: Setup, consumption_img_per_s: float | None) -> list[dict]:

    vqvae_cfg = build_vqvae(s.tokenizer).cfg if s.tokenizer != "vae_ch160v4096z32" else None
    L = vqvae_cfg.num_tokens if vqvae_cfg else 680
    V = vqvae_cfg.vocab_size if vqvae_cfg else 4096
    num_images = max(4096, 8 * s.batch)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_shards(tmp, num_samples=num_images, num_tokens=L, vocab_size=V, views=2, samples_per_shard=512)
        rates: dict[bool, float] = {}
        for verify in (False, True, False, True):  # alternated, best of two: the shard checks' cost, not noise
            t0 = time.perf_counter()
            seen = sum(codes.shape[0] for codes, _ in CodeLoader(tmp, batch_size=s.batch, num_workers=2, verify=verify))
            rates[verify] = max(rates.get(verify, 0.0), seen / (time.perf_counter() - t0))
    rate = rates[True]
    ratio = rate / consumption_img_per_s if consumption_img_per_s else None
    return [_figure("loader.unverified", s, img_per_s=rates[False], note="the loader without the shard checks"),
            _figure("loader", s, img_per_s=rate, ratio=ratio, ratio_vs="train (all levers, else plain)",
                    verified_vs_unverified=rate / rates[False],
                    note="2 loader workers, local shards, sha256 + code range checked; target ratio >= 10")]


def bench_tokenize(cfg: BenchConfig, s: Setup) -> list[dict]:
    from nextscale.pipelines.tokenize import (
        measure_throughput,  # imports Ray: not for `nextscale bench --help`
    )

    with tempfile.TemporaryDirectory() as tmp:
        if cfg.tokenize_images_dir:
            data = cfg.tokenize_images_dir
        else:
            per_class = max(1, cfg.tokenize_images // 10)
            data = make_demo_data(os.path.join(tmp, "data"), {"train": per_class})["splits"]["train"]
        result = measure_throughput(data, os.path.join(tmp, "codes"), tokenizer_preset=s.tokenizer,
                                    batch_size=s.batch, ray_cfg=cfg.ray)
    return [
        _figure("tokenize.encode_only", s, img_per_s=result["encode_img_per_s"]),
        _figure("tokenize.job", s, img_per_s=result["job_img_per_s"],
                ratio=result["job_img_per_s"] / result["encode_img_per_s"], ratio_vs="tokenize.encode_only",
                note="whole Ray Data job incl. JPEG decode, shard writes and Ray start-up (wall clock)"),
        _figure("tokenize.job_steady", s, img_per_s=result["steady_img_per_s"],
                ratio=result["steady_img_per_s"] / result["encode_img_per_s"], ratio_vs="tokenize.encode_only",
                encoder_busy_fraction=result["encoder_busy_fraction"],
                note="the job from the encoder's first batch to its last; target ratio >= 0.8 on a GPU"),
    ]


def projection(cfg: BenchConfig, figures: dict[str, dict], s: Setup) -> list[dict]:
    out = []
    n = cfg.projection_devices
    if "tokenize.job_steady" in figures:
        rate = figures["tokenize.job_steady"]["img_per_s"] * n
        hours = IMAGENET_TRAIN_IMAGES * cfg.projection_views / rate / 3600
        out.append(_figure("projection.pretokenize_imagenet", s, devices=n, views=cfg.projection_views,
                           hours=round(hours, 2), note=f"{s.tokenizer} at the measured job rate x {n} devices"))
    if _consumption(figures):
        rate = _consumption(figures)["img_per_s"] * n
        hours = IMAGENET_TRAIN_IMAGES * cfg.projection_epochs / rate / 3600
        out.append(_figure("projection.train_imagenet", s, devices=n, epochs=cfg.projection_epochs,
                           hours=round(hours, 1), device_hours=round(hours * n, 1),
                           note=f"{s.prior} at the measured step rate x {n} devices, linear scaling assumed"))
    return out


def _figure(name: str, s: Setup, **values) -> dict:
    row = {"figure": name, "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
           "prior": s.prior, "tokenizer": s.tokenizer, "batch": s.batch,
           "precision": str(s.amp).removeprefix("torch.") if s.amp else "fp32"}
    for k, v in values.items():
        row[k] = round(v, 4) if isinstance(v, float) else v
    return row


def run(cfg: BenchConfig) -> dict:
    device = _device(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows: list[dict] = []

    def emit(new_rows: list[dict]) -> None:
        for row in new_rows:
            rows.append(row)
            line = storage.json_text(row)
            print(line, flush=True)
            if cfg.output:
                previous = storage.read_text(cfg.output) if storage.exists(cfg.output) else ""
                storage.write_text(cfg.output, previous + line + "\n")

    setups = [_setup(cfg, prior) for prior in cfg.prior_presets]
    for s in setups:
        if "train" in cfg.what:
            emit(bench_train(cfg, s))
        if "sample" in cfg.what:
            emit(bench_sample(cfg, s))
        if "encode" in cfg.what:
            emit(bench_encode(cfg, s))
        if "mvar" in cfg.what:
            emit(bench_mvar(cfg, s))
    # loader, tokenize and projections at the first preset
    s = setups[0]
    first = {r["figure"]: r for r in rows if r["prior"] == s.prior and "img_per_s" in r}
    if "loader" in cfg.what:
        emit(bench_loader(cfg, s, _consumption(first).get("img_per_s")))
    if "tokenize" in cfg.what:
        emit(bench_tokenize(cfg, s))
    first.update({r["figure"]: r for r in rows if r["prior"] == s.prior and "img_per_s" in r})
    emit(projection(cfg, first, s))
    log.info("bench: %d figures on %s", len(rows), rows and rows[0]["device"])
    return {"figures": rows}
