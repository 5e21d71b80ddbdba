"""Ray Train (V2) launcher shared by the tokenizer and the prior trainings.

The training loops are plain PyTorch functions of ``(cfg, ctx, pictures)``; here they run in a ``TorchTrainer``
whose workers see a :class:`RayTrainContext`, and draw the pictures of ``nextscale.eval.plots``. The run's name is derived from the output URL and its
storage lives under ``{output}/ray``, so rerunning the same command resumes from the latest
checkpoint (and a finished run trains nothing); ``FailureConfig(workers.max_failures)`` restarts the worker
group from the latest checkpoint when a worker dies. ``workers.count=0`` (prior only) runs the loop in
this process with a :class:`~nextscale.runtime.LocalContext`, no Ray at all.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from nextscale import storage
from nextscale.checkpoint import run_id
from nextscale.eval.plots import prior_pictures, tokenizer_pictures
from nextscale.logs import setup_logging
from nextscale.pipelines.common import dashboard_url, init_ray
from nextscale.prior.config import PriorTrainConfig
from nextscale.prior.engine import train_prior
from nextscale.prior.parallelize import parallelize
from nextscale.runtime import LocalContext
from nextscale.tokenize.train import train_tokenizer

log = logging.getLogger(__name__)


class RayTrainContext:
    """The :class:`~nextscale.runtime.TrainContext` of a Ray Train worker."""

    def __init__(self, strategy: str = "ddp"):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.strategy = strategy

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        # collective: every rank reports; a rank that wrote checkpoint files attaches its folder (rank 0 alone
        # under DDP, every rank under FSDP) and Ray Train merges the folders into one checkpoint
        if checkpoint_dir is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
        else:
            ray.train.report(metrics)

    def checkpoints(self) -> Iterator[tuple[str, str]]:
        # get_checkpoint() gives only the latest; the run's other kept checkpoints (num_to_keep) are what
        # nextscale.checkpoint falls back to when the latest is damaged
        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
        older = [r.checkpoint for r in sorted(reported, key=lambda r: r.metrics.get("step", -1), reverse=True)
                 if r.checkpoint.path != latest.path]
        for ckpt in [latest, *older]:
            yield ckpt.path, ckpt.to_directory(tempfile.mkdtemp(prefix="nextscale-restore-"))

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model if self.world_size == 1 else parallelize(model, self.strategy, self.device)


class Trainer(TorchTrainer):
    """``TorchTrainer`` without Ray Train's placement-group cleaner where Ray runs no dashboard (a local instance).

    The cleaner watches the controller through the state API, which the dashboard serves: without one it can
    never see the controller die (so never cleans up), and it logs a warning every second of the run. A local
    instance needs no cleaner: it dies with the driver (``watchdog.py``); a cluster has a dashboard.
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if dashboard_url():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def _worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    cfg, kind = config["cfg"], config["kind"]
    ctx = config["context_cls"](strategy=cfg.workers.strategy)
    setup_logging(ctx.rank)
    # Ray Train logs every report at INFO; keep the worker's log to the training lines and real warnings
    ray_dir = os.path.dirname(ray.__file__)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.pathname.startswith(ray_dir))
    storage.configure(cfg.storage)
    if kind == "prior":
        train_prior(cfg, ctx, prior_pictures)
    else:
        train_tokenizer(cfg, ctx, tokenizer_pictures)


def fit(kind: str, cfg: Any, context_cls: type = RayTrainContext) -> ray.train.Result:
    """Run the ``kind`` ("prior" | "tokenizer") loop on ``cfg.workers.count`` Ray Train workers; raises on failure.

    ``context_cls`` builds each worker's context (tests pass a subclass that injects a failure).
    """
    storage.configure(cfg.storage)
    init_ray(cfg.ray)
    fs, path = storage.pyarrow_filesystem(storage.join(cfg.output, "ray"))
    if not storage.is_remote(cfg.output):
        os.makedirs(path, exist_ok=True)
    workers = cfg.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = 1
    trainer = Trainer(
        _worker,
        train_loop_config={"cfg": cfg, "kind": kind, "context_cls": context_cls},
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=workers.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_id(kind, cfg.output), storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            # Ray Train's own lines (resources requested, worker group started, each checkpoint's folder) are
            # not the user's business; its warnings and errors still show
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    log.info("Ray Train: %s on %d worker(s) (%s), run %s, storage %s", kind, workers.count,
             "GPU" if workers.use_gpu else "CPU", run_id(kind, cfg.output), storage.join(cfg.output, "ray"))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def run_prior(cfg: PriorTrainConfig) -> dict:
    """``nextscale train-prior``: train the VAR prior on code shards; returns the run's summary."""
    storage.configure(cfg.storage)
    if cfg.workers.count == 0:
        device = "cuda" if cfg.workers.use_gpu and torch.cuda.is_available() else "cpu"
        ctx = LocalContext(cfg.output, device=device, num_to_keep=cfg.keep_checkpoints)
        summary = train_prior(cfg, ctx, prior_pictures)
    else:
        result = fit("prior", cfg)
        summary = json.loads(storage.read_text(storage.join(cfg.output, "train_summary.json")))
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        summary["ray_run"] = run_id("prior", cfg.output)
    log.info("train-prior: %d steps (%d trained now) on %d worker(s) at %.1f img/s, final loss %.4f; prior in %s, "
             "loss curve in %s, checkpoints under %s", summary["steps"], summary["steps_trained"],
             summary["workers"], summary["img_per_s"], summary["final_loss"], summary["prior_url"],
             summary["metrics_url"], cfg.output)
    return summary


def run_tokenizer(cfg) -> dict:
    """``nextscale train-tokenizer``: train the multi-scale VQVAE on ``cfg.workers.count`` Ray Train workers."""
    result = fit("tokenizer", cfg)
    summary: dict[str, Any] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    summary["tokenizer_url"] = storage.join(cfg.output, "tokenizer.pt")
    summary["pictures"] = {"curves": storage.join(cfg.output, "curves.png"),
                           "reconstructions": storage.join(cfg.output, "reconstructions") if cfg.sample_every else None}
    eval_url = storage.join(cfg.output, "tokenizer_eval.json")
    if storage.exists(eval_url):
        summary["eval"] = json.loads(storage.read_text(eval_url))
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    log.info("train-tokenizer: %s steps on %d worker(s); tokenizer in %s, held-out PSNR %s dB", summary.get("step"),
             cfg.workers.count, summary["tokenizer_url"], summary.get("eval", {}).get("psnr_db"))
    return summary
