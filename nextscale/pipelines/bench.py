"""``nextscale bench``: throughput figures, each beside a baseline measured in the same run.

One JSON line per figure on stdout (and in ``output`` when set). Figures:
- ``train``: the prior's training step on codes vs the official step, which re-encodes every image
  with the VQVAE in fp32 before the same transformer step; images/s, ratio, MFU, peak memory.
- ``sample``: the sampler (KV cache + CFG, decode included) in the configured precision vs the same
  sampler in plain fp32 eager mode.
- ``loader``: images/s the code loader delivers from real shards vs images/s training consumes.
- ``tokenize``: the whole Ray Data job (JPEG decode, views, encode, shard writes) vs encode-only
  throughput of the same tokenizer.
- ``mvar``: M-VAR beside VAR at the same size and batch (training step and sampling images/s), and
  M-VAR's stateful sampler vs the official one, which re-runs every Mamba2 mixer over the prefix.
- ``projection``: the cost of full ImageNet work on N devices from the measured rates.
Sizes default to the official ones on a GPU (d16, vae_ch160v4096z32, batch 64) and to the demo
presets on a CPU, so the command is meaningful everywhere; the JSON says which were used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from nextscale import storage
from nextscale.config import RayConfig, doc, require
from nextscale.prior.model import build_var, flops_per_image
from nextscale.prior.sample import sample_codes
from nextscale.tokenize.scales import split_codes
from nextscale.tokenize.vqvae import build_vqvae

log = logging.getLogger(__name__)

FIGURES = ("train", "sample", "loader", "tokenize", "mvar")
# dense bf16 tensor-core peak (FLOP/s) for MFU; the H100 SXM figure is NVIDIA's datasheet number
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    what: tuple[str, ...] = doc(FIGURES, f"figures to measure, any of {', '.join(FIGURES)}")
    device: str = doc("auto", "cuda, cpu or auto")
    prior_preset: str = doc("auto", "VAR preset; auto = d16 on a GPU, demo on a CPU")
    mvar_preset: str = doc("auto", "M-VAR preset measured beside the VAR one; auto = mvar_<VAR preset>")
    tokenizer_preset: str = doc("auto", "VQVAE preset; auto = vae_ch160v4096z32 on a GPU, demo on a CPU")
    batch_size: int = doc(0, "images per step; 0 = 64 on a GPU, 16 on a CPU")
    steps: int = doc(0, "timed steps per figure; 0 = 20 on a GPU, 5 on a CPU")
    warmup: int = doc(0, "untimed steps first; 0 = 5 on a GPU, 1 on a CPU")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "autocast dtype of the fast paths; auto = bf16 on a GPU")
    compile: bool = doc(False, "torch.compile the transformer in the fast paths")
    tokenize_images: int = doc(64, "images of the built-in demo dataset run through the tokenize job")
    projection_devices: int = doc(8, "devices assumed by the ImageNet cost projection")
    projection_views: int = doc(1, "augmented views per image assumed by the pretokenizing projection")
    projection_epochs: int = doc(200, "epochs assumed by the training projection (d16 recipe: 200)")
    output: str = doc("", "also append the JSON lines to this file (local or object storage)")
    ray: RayConfig = doc(RayConfig(), "Ray cluster for the tokenize figure")

    def __post_init__(self):
        unknown = sorted(set(self.what) - set(FIGURES))
        require(not unknown, f"what: unknown figure {unknown[0] if unknown else ''!r}; choose from {', '.join(FIGURES)}")


@dataclasses.dataclass(frozen=True)
class Setup:
    device: torch.device
    prior: str
    tokenizer: str
    batch: int
    steps: int
    warmup: int
    amp: torch.dtype | None


def _setup(cfg: BenchConfig) -> Setup:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    gpu = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if gpu else None, "fp32": None, "bf16": torch.bfloat16}[cfg.precision]
    return Setup(
        device=device,
        prior=cfg.prior_preset if cfg.prior_preset != "auto" else ("d16" if gpu else "demo"),
        tokenizer=cfg.tokenizer_preset if cfg.tokenizer_preset != "auto" else ("vae_ch160v4096z32" if gpu else "demo"),
        batch=cfg.batch_size or (64 if gpu else 16), steps=cfg.steps or (20 if gpu else 5),
        warmup=cfg.warmup or (5 if gpu else 1), amp=amp,
    )


def _time(fn: Callable[[], None], s: Setup) -> float:
    """Median seconds of one call, after warm-up; CUDA work is synchronised around each call."""
    for _ in range(s.warmup):
        fn()
    times = []
    for _ in range(s.steps):
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _models(s: Setup, prior: str = ""):
    torch.manual_seed(0)
    vqvae = build_vqvae(s.tokenizer).to(s.device).eval().requires_grad_(False)
    var = build_var(prior or s.prior, vocab_size=vqvae.cfg.vocab_size, latent_channels=vqvae.cfg.z_channels,
                    patch_nums=tuple(vqvae.cfg.patch_nums)).to(s.device)
    return vqvae, var


# ------------------------------------------------------------------------------------------------
# Figures


def bench_train(cfg: BenchConfig, s: Setup) -> list[dict]:
    vqvae, var = _models(s)
    size = vqvae.cfg.image_size
    img = torch.rand(s.batch, 3, size, size, device=s.device) * 2 - 1
    label = torch.randint(0, var.cfg.num_classes, (s.batch,), device=s.device)
    with torch.no_grad():
        codes = vqvae.encode(img)
    model = torch.compile(var) if cfg.compile else var
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=s.device.type == "cuda")
    patch_nums = tuple(vqvae.cfg.patch_nums)

    def transformer_step(codes_BL: torch.Tensor) -> None:
        x_BlCv = vqvae.quantize.teacher_forcing_input(split_codes(codes_BL, patch_nums))
        with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
            logits = model(label, x_BlCv)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), codes_BL.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def official_step() -> None:  # the official trainer: fp32 VQVAE encode of the pixels, every step
        with torch.no_grad():
            codes_BL = vqvae.encode(img)
        transformer_step(codes_BL)

    official_step_s = _time(official_step, s)
    official_mem = _peak_memory_gib(s.device)
    codes_step_s = _time(lambda: transformer_step(codes), s)
    codes_mem = _peak_memory_gib(s.device)
    flops = flops_per_image(var.cfg)
    peak = _peak_flops(s.device)
    ours = s.batch / codes_step_s
    return [
        _figure("train.official_step", s, img_per_s=s.batch / official_step_s, peak_memory_gib=official_mem,
                note="VQVAE fp32 encode of pixels + transformer step, as the official trainer does"),
        _figure("train.codes_step", s, img_per_s=ours, ratio=official_step_s / codes_step_s,
                ratio_vs="train.official_step", tflops=ours * flops / 1e12,
                mfu=ours * flops / peak if peak else None, peak_memory_gib=codes_mem, compile=cfg.compile),
    ]


def bench_sample(cfg: BenchConfig, s: Setup) -> list[dict]:
    vqvae, var = _models(s)
    var.eval()
    label = torch.arange(s.batch, device=s.device) % var.cfg.num_classes
    top_k = min(900, vqvae.cfg.vocab_size)

    def run(amp: torch.dtype | None) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(s.device).manual_seed(0)
            with torch.autocast(s.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                codes = sample_codes(var, vqvae.quantize, label, generator=gen, cfg=1.5, top_k=top_k, top_p=0.96)
                vqvae.decode(codes)
        return go

    plain_s = _time(run(None), s)
    fast_s = _time(run(s.amp), s)
    return [
        _figure("sample.fp32_eager", s, img_per_s=s.batch / plain_s, note="cfg 1.5, top-k 900, top-p 0.96, decode included"),
        _figure("sample.fast", s, img_per_s=s.batch / fast_s, ratio=plain_s / fast_s, ratio_vs="sample.fp32_eager",
                peak_memory_gib=_peak_memory_gib(s.device)),
    ]


def bench_mvar(cfg: BenchConfig, s: Setup) -> list[dict]:
    mvar_preset = cfg.mvar_preset if cfg.mvar_preset != "auto" else f"mvar_{s.prior}"
    vqvae, var = _models(s)
    mvar = _models(s, mvar_preset)[1]
    size, patch_nums = vqvae.cfg.image_size, tuple(vqvae.cfg.patch_nums)
    label = torch.arange(s.batch, device=s.device) % var.cfg.num_classes
    with torch.no_grad():
        codes = vqvae.encode(torch.rand(s.batch, 3, size, size, device=s.device) * 2 - 1)
    top_k = min(900, vqvae.cfg.vocab_size)

    def train_step(model) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=s.device.type == "cuda")
        net = torch.compile(model) if cfg.compile else model

        def go() -> None:
            x_BlCv = vqvae.quantize.teacher_forcing_input(split_codes(codes, patch_nums))
            with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
                logits = net(label, x_BlCv)
            F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), codes.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    def sample(model) -> Callable[[], None]:
        def go() -> None:
            with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
                sample_codes(model, vqvae.quantize, label, generator=torch.Generator(s.device).manual_seed(0),
                             top_k=top_k, top_p=0.96)
        return go

    rates = {}
    for name, model in (("var", var), ("mvar", mvar)):
        rates[f"{name}.train"] = s.batch / _time(train_step(model.train()), s)
        rates[f"{name}.sample"] = s.batch / _time(sample(model.eval()), s)
    mvar.sample_by_rerunning_prefix(True)
    rates["mvar.sample_rerun"] = s.batch / _time(sample(mvar), s)
    mvar.sample_by_rerunning_prefix(False)
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
    from nextscale.codes import write_synthetic_shards
    from nextscale.prior.data import CodeLoader

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
            _figure("loader", s, img_per_s=rate, ratio=ratio, ratio_vs="train.codes_step",
                    verified_vs_unverified=rate / rates[False],
                    note="2 loader workers, local shards, sha256 + code range checked; target ratio >= 10")]


def bench_tokenize(cfg: BenchConfig, s: Setup) -> list[dict]:
    from nextscale.demo_data import make_demo_data
    from nextscale.pipelines.tokenize import measure_throughput

    with tempfile.TemporaryDirectory() as tmp:
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
    if "train.codes_step" in figures:
        rate = figures["train.codes_step"]["img_per_s"] * n
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
    s = _setup(cfg)
    if s.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    figures: dict[str, dict] = {}

    def emit(rows: list[dict]) -> None:
        for row in rows:
            figures[row["figure"]] = row
            line = json.dumps(row)
            print(line, flush=True)
            if cfg.output:
                previous = storage.read_text(cfg.output) if storage.exists(cfg.output) else ""
                storage.write_text(cfg.output, previous + line + "\n")

    if "train" in cfg.what:
        emit(bench_train(cfg, s))
    if "sample" in cfg.what:
        emit(bench_sample(cfg, s))
    if "loader" in cfg.what:
        emit(bench_loader(cfg, s, figures.get("train.codes_step", {}).get("img_per_s")))
    if "tokenize" in cfg.what:
        emit(bench_tokenize(cfg, s))
    if "mvar" in cfg.what:
        emit(bench_mvar(cfg, s))
    emit(projection(cfg, figures, s))
    log.info("bench: %d figures on %s", len(figures), figures and next(iter(figures.values()))["device"])
    return {"figures": list(figures.values())}

