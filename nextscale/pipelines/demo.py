"""``make demo``: the whole workflow on the built-in demo dataset with a local Ray instance, on a CPU.

data → train-tokenizer → tokenize → train-prior → sample → fid + classifier check, each stage run from
its own config file exactly as ``nextscale <stage>`` would, all in one Ray instance. Every stage resumes
from its outputs, so a second ``make demo`` only redoes what is missing. Writes ``results.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from nextscale import storage
from nextscale.config import RayConfig, doc, load_config, require
from nextscale.demo_data import make_demo_data
from nextscale.eval.classifier import evaluate_demo_samples
from nextscale.eval.plots import docs_copy
from nextscale.stages import STAGES

log = logging.getLogger(__name__)

STAGE_ORDER = ("train-tokenizer", "tokenize", "train-prior", "sample", "fid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    data: str = doc("data/demo", "the built-in dataset (generated here when missing)")
    stages: tuple[str, ...] = doc(STAGE_ORDER, f"stages to run, in order, any of {', '.join(STAGE_ORDER)}")
    tokenizer_config: str = doc("tokenizer_demo", "config of train-tokenizer")
    tokenize_config: str = doc("tokenize_demo", "config of tokenize")
    prior_config: str = doc("prior_demo", "config of train-prior")
    sample_config: str = doc("sample_demo", "config of sample")
    fid_config: str = doc("fid_demo", "config of fid (and the classifier check)")
    overrides: tuple[str, ...] = doc((), "stage overrides as stage:key.sub=value, e.g. train-prior:optim.steps=100")
    results: str = doc("runs/demo/results.json", "where the demo's summary goes")
    docs_images: str = doc("docs/images", "where the README's copies of the sample grid, the coarse-to-fine picture "
                                          "(shrunk to <= 640 px) and the prior's curves go; empty = none")
    ray: RayConfig = doc(RayConfig(), "Ray cluster (a local instance by default)")

    def __post_init__(self):
        unknown = sorted(set(self.stages) - set(STAGE_ORDER))
        require(not unknown, f"stages: unknown stage {unknown[0] if unknown else ''!r}; choose from {', '.join(STAGE_ORDER)}")
        for item in self.overrides:
            stage, sep, _ = item.partition(":")
            require(sep and stage in STAGE_ORDER, f"overrides: {item!r} must look like <stage>:key=value, "
                                                  f"stage one of {', '.join(STAGE_ORDER)}")

    def stage_config(self, stage: str) -> str:
        return {"train-tokenizer": self.tokenizer_config, "tokenize": self.tokenize_config,
                "train-prior": self.prior_config, "sample": self.sample_config, "fid": self.fid_config}[stage]


def run(cfg: DemoConfig) -> dict:
    """Run the stages; returns the headline figures (what ``nextscale demo`` prints), every stage's summary is in
    ``cfg.results``."""
    from nextscale.pipelines.common import init_ray  # imports Ray: not for `nextscale demo --help`

    t_start = time.perf_counter()
    results: dict = {"stages": {}, "minutes": {}}
    t0 = time.perf_counter()
    results["dataset"] = make_demo_data(cfg.data)
    results["minutes"]["data"] = round((time.perf_counter() - t0) / 60, 2)
    init_ray(cfg.ray)
    for stage in STAGE_ORDER:
        if stage not in cfg.stages:
            continue
        overrides = [o.partition(":")[2] for o in cfg.overrides if o.partition(":")[0] == stage]
        stage_cfg = load_config(STAGES[stage].config, cfg.stage_config(stage), overrides)
        log.info("demo: %s (%s)", stage, cfg.stage_config(stage))
        t0 = time.perf_counter()
        results["stages"][stage] = STAGES[stage].run(stage_cfg)
        results["minutes"][stage] = round((time.perf_counter() - t0) / 60, 2)
        if stage == "fid":
            results["classifier"] = evaluate_demo_samples(stage_cfg)
    results["minutes"]["total"] = round((time.perf_counter() - t_start) / 60, 2)
    if cfg.docs_images:
        results["docs_images"] = docs_pictures(results, cfg.docs_images)
    storage.write_json(cfg.results, results, default=str)
    _log_summary(results, cfg)
    clf = results.get("classifier", {})
    return {"minutes": results["minutes"], "sample_accuracy": clf.get("sample_accuracy"),
            "real_accuracy": clf.get("real_accuracy"), "fid": results["stages"].get("fid", {}).get("fid"),
            "results": cfg.results}


# README picture -> (stage, where the stage's summary names it, longest side in the README; 0 = as drawn: the
# curves are drawn at a size whose text reads, shrinking them would blur it)
DOCS_PICTURES = {"demo_grid.png": ("sample", ("pictures", "grid", "url"), 640),
                 "demo_coarse_to_fine.png": ("sample", ("pictures", "coarse_to_fine", "url"), 640),
                 "demo_prior_curves.png": ("train-prior", ("pictures", "curves"), 0)}


def docs_pictures(results: dict, folder: str) -> dict:
    """Copies of the pictures of this run's stages for the README (those whose stage ran)."""
    out = {}
    for name, (stage, keys, max_side) in DOCS_PICTURES.items():
        url = results["stages"].get(stage)
        for key in keys:
            url = url.get(key) if isinstance(url, dict) else None
        if url:
            out[name] = docs_copy(url, storage.join(folder, name), max_side)
    if out:
        log.info("demo: README pictures %s in %s", ", ".join(out), folder)
    return out


def _log_summary(results: dict, cfg: DemoConfig) -> None:
    clf = results.get("classifier", {})
    fid = results["stages"].get("fid", {})
    log.info(
        "demo finished in %.1f min: samples classified as their class %s (real held-out images %s), FID %s "
        "with %s features; results in %s",
        results["minutes"]["total"], clf.get("sample_accuracy"), clf.get("real_accuracy"),
        fid.get("fid"), fid.get("feature_extractor"), cfg.results,
    )
