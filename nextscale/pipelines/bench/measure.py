"""What every bench figure shares: the sizes of a run, interleaved timing, the row format and the seeded models."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from nextscale.devices import pick_device
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.prior.families import build_prior
from nextscale.tokenize.vqvae import VQVAE, build_vqvae

CPU_MAX_VQVAE_SIZE = 64  # image side above which a CPU run skips VQVAE encode / decode figures


@dataclasses.dataclass(frozen=True)
class Setup:
    """The sizes one preset is measured at (``BenchConfig``'s zeros and autos resolved for the device)."""

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


def setup(cfg: BenchConfig, prior: str = "auto") -> Setup:
    device = pick_device(cfg.device)
    gpu = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if gpu else None, "fp32": None, "bf16": torch.bfloat16}[cfg.precision]
    prior = prior if prior != "auto" else ("d16" if gpu else "demo")
    tokenizer = "demo" if prior == "demo" else (
        cfg.tokenizer_preset if cfg.tokenizer_preset != "auto" else "vae_ch160v4096z32")
    return Setup(device=device, prior=prior, tokenizer=tokenizer, batch=cfg.batch_size or (64 if gpu else 16),
                 steps=cfg.steps or (20 if gpu else 6), warmup=cfg.warmup or (5 if gpu else 1), amp=amp)


# ------------------------------------------------------------------------------------------------
# Timing


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


def rate(times: list[float], per_call: int) -> dict[str, float]:
    """img/s at the median call, and at the slowest / fastest calls."""
    return {"img_per_s": per_call / statistics.median(times), "img_per_s_min": per_call / max(times),
            "img_per_s_max": per_call / min(times), "calls": len(times)}


def ratio(fast: list[float], base: list[float]) -> dict[str, float]:
    """base / fast at the medians, and the range of the round-by-round ratios (same round = neighbours in time)."""
    rounds = [b / f for b, f in zip(base, fast)]
    return {"ratio": statistics.median(base) / statistics.median(fast), "ratio_min": min(rounds),
            "ratio_max": max(rounds)}


def peak_memory_gib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` alone (the interleaved timing mixes the two sides' peaks)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def versus_first(variants: list[tuple[str, Callable[[], None]]], s: Setup, **values) -> list[dict]:
    """Rows for every variant, each timed interleaved with the first, which is the baseline of their ratios."""
    (base_name, base), rest = variants[0], variants[1:]
    base_times: list[float] = []
    out = []
    for name, fn in rest:
        times = interleaved({base_name: base, name: fn}, s)
        base_times += times[base_name]
        out.append(versus(name, s, times[name], times[base_name], base_name, fn, **values))
    base_row = figure(base_name, s, **rate(base_times, s.batch), peak_memory_gib=peak_memory_gib(base, s.device),
                      **values)
    return [base_row, *out]


def versus(name: str, s: Setup, times: list[float], base_times: list[float], base_name: str, fn: Callable[[], None],
           **values) -> dict:
    """The row of ``fn`` timed beside a baseline: its images/s, the ratio to the baseline, its peak memory alone."""
    return figure(name, s, **rate(times, s.batch), **ratio(times, base_times), ratio_vs=base_name,
                  peak_memory_gib=peak_memory_gib(fn, s.device), **values)


def figure(name: str, s: Setup, **values) -> dict:
    """One JSON row: the figure's name, what it ran on and at which sizes, then its values (floats to 4 places)."""
    row = {"figure": name, "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
           "prior": s.prior, "tokenizer": s.tokenizer, "batch": s.batch,
           "precision": str(s.amp).removeprefix("torch.") if s.amp else "fp32"}
    for k, v in values.items():
        row[k] = round(v, 4) if isinstance(v, float) else v
    return row


# ------------------------------------------------------------------------------------------------
# Seeded models and inputs: the same weights and batches on both sides of every ratio


def vqvae(s: Setup) -> VQVAE:
    torch.manual_seed(0)
    return build_vqvae(s.tokenizer).to(s.device).eval().requires_grad_(False)


def vqvae_too_slow(s: Setup) -> bool:
    return not s.gpu and build_vqvae(s.tokenizer).cfg.image_size > CPU_MAX_VQVAE_SIZE


def prior(s: Setup, vq_cfg, **overrides):
    torch.manual_seed(0)
    return build_prior(s.prior, vocab_size=vq_cfg.vocab_size, latent_channels=vq_cfg.z_channels,
                       patch_nums=tuple(vq_cfg.patch_nums), **overrides).to(s.device)


def host_batches(s: Setup, L: int, V: int, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless host batches (int64 codes and labels, as the code loader yields them), four distinct ones."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (s.batch, L), generator=g), torch.randint(0, num_classes, (s.batch,), generator=g))
               for _ in range(4)]
    return itertools.cycle(batches)
