"""Data-path figures: images/s the code loader delivers from real shards (with and without its shard checks) vs
images/s training consumes; and the whole tokenize job (Ray Data: JPEG decode, views, encode, shard writes) on
``tokenize_images_dir`` (default: the built-in demo dataset) vs encode-only throughput of the same tokenizer."""

from __future__ import annotations

import os
import tempfile
import time

from nextscale.codes import write_synthetic_shards
from nextscale.demo_data import make_demo_data
from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig
from nextscale.prior.data import CodeLoader
from nextscale.tokenize.vqvae import build_vqvae


def bench_loader(cfg: BenchConfig, s: measure.Setup, consumption_img_per_s: float | None) -> list[dict]:
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
    return [measure.figure("loader.unverified", s, img_per_s=rates[False], note="the loader without the shard checks"),
            measure.figure("loader", s, img_per_s=rate, ratio=ratio, ratio_vs="train (all levers, else plain)",
                   verified_vs_unverified=rate / rates[False],
                   note="2 loader workers, local shards, sha256 + code range checked; target ratio >= 10")]


def bench_tokenize(cfg: BenchConfig, s: measure.Setup) -> list[dict]:
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
        measure.figure("tokenize.encode_only", s, img_per_s=result["encode_img_per_s"]),
        measure.figure("tokenize.job", s, img_per_s=result["job_img_per_s"],
               ratio=result["job_img_per_s"] / result["encode_img_per_s"], ratio_vs="tokenize.encode_only",
               note="whole Ray Data job incl. JPEG decode, shard writes and Ray start-up (wall clock)"),
        measure.figure("tokenize.job_steady", s, img_per_s=result["steady_img_per_s"],
               ratio=result["steady_img_per_s"] / result["encode_img_per_s"], ratio_vs="tokenize.encode_only",
               encoder_busy_fraction=result["encoder_busy_fraction"],
               note="the job from the encoder's first batch to its last; target ratio >= 0.8 on a GPU"),
    ]
