"""``nextscale bench``: throughput figures, each beside a baseline measured in the same run.

One JSON line per figure on stdout (and in ``output`` when set). Every ratio comes from the two sides
timed interleaved (A B B A ...), so a shared, noisy machine slows both alike; each side reports the
median, min and max of its timed calls (``common``). The figures, one module each, by what they measure:
- ``training``: the prior's training step on codes, every lever off, each on, all on; and the official
  trainer's work per step (encode + step), per VAR preset in ``prior_presets``;
- ``sampling``: token sampling with and without its levers, decoding, and the two together;
- ``tokenizer``: the VQVAE's encoder in fp32, bf16 and channels-last;
- ``mvar``: M-VAR beside VAR, and its stateful sampler vs the official one;
- ``data_path``: the code loader vs what training consumes, and the whole tokenize job vs encode only;
- ``projection`` (here): the cost of full ImageNet work on N devices from the measured rates.
Sizes default to the official ones on a GPU (d16, vae_ch160v4096z32, batch 64) and to the demo
presets on a CPU, so the command is meaningful everywhere; the JSON says which were used. On a CPU the
256-px VQVAE is too slow to time (tens of seconds per image): figures needing it are skipped, with a note.
"""

from __future__ import annotations

import logging

import torch

from nextscale import storage
from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.pipelines.bench.data_path import bench_loader, bench_tokenize
from nextscale.pipelines.bench.mvar import bench_mvar
from nextscale.pipelines.bench.sampling import bench_sample
from nextscale.pipelines.bench.tokenizer import bench_encode
from nextscale.pipelines.bench.training import bench_train

__all__ = ["BenchConfig", "run"]

log = logging.getLogger(__name__)

IMAGENET_TRAIN_IMAGES = 1_281_167
PER_PRESET = {"train": bench_train, "sample": bench_sample, "encode": bench_encode, "mvar": bench_mvar}


def run(cfg: BenchConfig) -> dict:
    setups = [measure.setup(cfg, prior) for prior in cfg.prior_presets]
    if setups[0].gpu:
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

    for s in setups:
        for what, bench in PER_PRESET.items():
            if what in cfg.what:
                emit(bench(cfg, s))
    # loader, tokenize and projections at the first preset
    s = setups[0]
    if "loader" in cfg.what:
        emit(bench_loader(cfg, s, _consumption(_rates(rows, s)).get("img_per_s")))
    if "tokenize" in cfg.what:
        emit(bench_tokenize(cfg, s))
    emit(projection(cfg, _rates(rows, s), s))
    log.info("bench: %d figures on %s", len(rows), rows and rows[0]["device"])
    return {"figures": rows}


def _rates(rows: list[dict], s: measure.Setup) -> dict[str, dict]:
    """The rows of ``s``'s preset that measured a rate, by figure name."""
    return {r["figure"]: r for r in rows if r["prior"] == s.prior and "img_per_s" in r}


def _consumption(figures: dict[str, dict]) -> dict:
    """The training figure the loader must outpace and the projection uses: all levers on, else the plain step."""
    return figures.get("train.all") or figures.get("train.plain") or {}


def projection(cfg: BenchConfig, figures: dict[str, dict], s: measure.Setup) -> list[dict]:
    out = []
    n = cfg.projection_devices
    if "tokenize.job_steady" in figures:
        rate = figures["tokenize.job_steady"]["img_per_s"] * n
        hours = IMAGENET_TRAIN_IMAGES * cfg.projection_views / rate / 3600
        out.append(measure.figure("projection.pretokenize_imagenet", s, devices=n, views=cfg.projection_views,
                          hours=round(hours, 2), note=f"{s.tokenizer} at the measured job rate x {n} devices"))
    if _consumption(figures):
        rate = _consumption(figures)["img_per_s"] * n
        hours = IMAGENET_TRAIN_IMAGES * cfg.projection_epochs / rate / 3600
        out.append(measure.figure("projection.train_imagenet", s, devices=n, epochs=cfg.projection_epochs,
                          hours=round(hours, 1), device_hours=round(hours * n, 1),
                          note=f"{s.prior} at the measured step rate x {n} devices, linear scaling assumed"))
    return out
