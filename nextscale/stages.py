"""The stages of nextscale: the one table the CLI, ``nextscale submit`` and the demo read.

A stage is a typed config (``nextscale <stage> [CONFIG.yaml] key=value``) and a driver in
``nextscale/pipelines`` (``run(cfg) -> summary``). Adding a stage = a config class, a driver, a row here.

The table names its configs and drivers by dotted path (as entry points do) and imports one when a stage
is asked for: the configs import torch and the drivers Ray, ``nextscale --help`` should wait for neither,
and the demo driver, itself a stage, runs the other stages through this table.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str  # one line for --help
    config_class: str  # "module:ClassName" of the stage's config dataclass
    driver: str  # "module:function" of ``run(cfg) -> summary``
    inputs: tuple[str, ...] = ()  # dotted config keys of locations that must exist before the stage starts
    outputs: tuple[str, ...] = ("output",)  # dotted config keys of locations the stage creates

    @property
    def config(self) -> type:
        """The stage's config dataclass."""
        return _resolve(self.config_class)

    @property
    def run(self) -> Callable[[Any], dict]:
        """The stage's driver: ``run(cfg)`` does the work and returns a JSON-able summary."""
        return _resolve(self.driver)


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenize", "Ray Data job: images -> multi-scale VQVAE code shards + manifest",
          "nextscale.tokenize.job_config:TokenizeConfig", "nextscale.pipelines.tokenize:run", ("input", "tokenizer")),
    Stage("train-tokenizer", "Ray Train job: train the multi-scale VQVAE tokenizer",
          "nextscale.tokenize.config:TokenizerTrainConfig", "nextscale.pipelines.train:run_tokenizer",
          ("data.url", "data.val_url", "model.init_url")),
    Stage("train-prior", "Ray Train job: train the VAR prior on code shards",
          "nextscale.prior.config:PriorTrainConfig", "nextscale.pipelines.train:run_prior", ("data.url",)),
    Stage("sample", "sample grids and coarse-to-fine pictures from a trained prior",
          "nextscale.eval.config:SampleConfig", "nextscale.pipelines.sample:run",
          ("models.prior_url", "models.tokenizer_url", "edit.image")),
    Stage("fid", "Ray job: sample N images, FID / IS / precision / recall",
          "nextscale.eval.config:FidConfig", "nextscale.pipelines.fid:run",
          ("models.prior_url", "models.tokenizer_url", "reference.npz", "reference.images")),
    Stage("demo", "the whole workflow on the built-in demo dataset, local Ray, CPU",
          "nextscale.pipelines.demo:DemoConfig", "nextscale.pipelines.demo:run", (), ()),
    Stage("bench", "throughput benchmarks with ratios against baselines measured in the same run",
          "nextscale.pipelines.bench:BenchConfig", "nextscale.pipelines.bench:run", (), ()),
)}
