"""The stages of nextscale: the one table the CLI, ``nextscale submit`` and the demo read.

A stage is a typed config (``nextscale <stage> [CONFIG.yaml] key=value``) and a driver in
``nextscale/pipelines`` (``run(cfg) -> summary``). Adding a stage = a config class, a driver, a row here.

The configs and the drivers are imported when a stage is asked for, not with this module: the
configs import torch and the drivers Ray, and ``nextscale --help`` should not wait for either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str  # one line for --help
    inputs: tuple[str, ...] = ()  # dotted config keys of locations that must exist before the stage starts
    outputs: tuple[str, ...] = ("output",)  # dotted config keys of locations the stage creates

    @property
    def config(self) -> type:
        """The stage's config dataclass."""
        return _configs()[self.name]

    @property
    def run(self) -> Callable[[Any], dict]:
        """The stage's driver: ``run(cfg)`` does the work and returns a JSON-able summary."""
        return _drivers()[self.name]


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenize", "Ray Data job: images -> multi-scale VQVAE code shards + manifest", ("input", "tokenizer")),
    Stage("train-tokenizer", "Ray Train job: train the multi-scale VQVAE tokenizer", ("data.url", "data.val_url", "model.init_url")),
    Stage("train-prior", "Ray Train job: train the VAR prior on code shards", ("data.url",)),
    Stage("sample", "sample grids and coarse-to-fine pictures from a trained prior",
          ("models.prior_url", "models.tokenizer_url", "edit.image")),
    Stage("fid", "Ray job: sample N images, FID / IS / precision / recall",
          ("models.prior_url", "models.tokenizer_url", "reference.npz", "reference.images")),
    Stage("demo", "the whole workflow on the built-in demo dataset, local Ray, CPU", (), ()),
    Stage("bench", "throughput benchmarks with ratios against baselines measured in the same run", (), ()),
)}


def _configs() -> dict[str, type]:
    from nextscale.eval.config import FidConfig, SampleConfig
    from nextscale.pipelines.bench import BenchConfig
    from nextscale.pipelines.demo import DemoConfig
    from nextscale.prior.config import PriorTrainConfig
    from nextscale.tokenize.config import TokenizerTrainConfig
    from nextscale.tokenize.job_config import TokenizeConfig

    return {"tokenize": TokenizeConfig, "train-tokenizer": TokenizerTrainConfig, "train-prior": PriorTrainConfig,
            "sample": SampleConfig, "fid": FidConfig, "demo": DemoConfig, "bench": BenchConfig}


def _drivers() -> dict[str, Callable[[Any], dict]]:
    from nextscale.pipelines import bench, demo, fid, sample, tokenize, train

    return {"tokenize": tokenize.run, "train-tokenizer": train.run_tokenizer, "train-prior": train.run_prior,
            "sample": sample.run, "fid": fid.run, "demo": demo.run, "bench": bench.run}
