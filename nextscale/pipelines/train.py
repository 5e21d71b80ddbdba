"""Ray Train (V2) launcher shared by the tokenizer and the prior trainings.

The training loops are plain PyTorch functions of ``(cfg, ctx)``; here they run in a ``TorchTrainer``
whose workers see a :class:`RayTrainContext`. The run's name is derived from the output URL and its
storage lives under ``{output}/ray``, so rerunning the same command resumes from the latest
checkpoint (and a finished run trains nothing); ``FailureConfig(max_failures)`` restarts the worker
group from the latest checkpoint when a worker dies. ``num_workers=0`` (prior only) runs the loop in
this process with a :class:`~nextscale.runtime.LocalContext`, no Ray at all.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nextscale import storage
from nextscale.logs import setup_logging
from nextscale.pipelines.common import init_ray
from nextscale.prior.config import PriorTrainConfig
from nextscale.prior.engine import run_id, train_prior
from nextscale.runtime import LocalContext

log = logging.getLogger(__name__)


class RayTrainContext:
    """The :class:`~nextscale.runtime.TrainContext` of a Ray Train worker."""

    def __init__(self, strategy: str = "ddp"):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.strategy = strategy
        self._restore_dir: str | None = None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        # collective: every rank reports; only rank 0 attaches the checkpoint (others pass none)
        if checkpoint_dir is not None and self.rank == 0:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
        else:
            ray.train.report(metrics)

    def restore(self) -> str | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        self._restore_dir = ckpt.to_directory(tempfile.mkdtemp(prefix="nextscale-restore-"))
        log.info("resuming from %s", ckpt.path)
        return self._restore_dir

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # one shard unit per transformer block, the embeddings and head in the root unit
            for block in getattr(model, "blocks", []):
                fully_shard(block)
            return fully_shard(model)
        return ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy="ddp",
            # the official DDP settings; the buffers (mask, level ids) are constants, no need to sync them
            parallel_strategy_kwargs={"find_unused_parameters": False, "forward_sync_buffers": False})


def run_name(kind: str, output: str) -> str:
    """Ray run name (and wandb id) of a ``kind`` run writing to ``output``; stable across reruns."""
    return run_id(output, kind)


def _worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    cfg, kind = config["cfg"], config["kind"]
    ctx = config["context_cls"](strategy=getattr(cfg, "strategy", "ddp"))
    setup_logging(ctx.rank)
    # Ray Train logs every report at INFO; keep the worker's log to the training lines and real warnings
    ray_dir = os.path.dirname(ray.__file__)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.pathname.startswith(ray_dir))
    storage.configure(cfg.storage)
    if kind == "prior":
        train_prior(cfg, ctx)
    else:
        from nextscale.tokenize.train import train_tokenizer

        train_tokenizer(cfg, ctx)


def fit(kind: str, cfg: Any, context_cls: type = RayTrainContext) -> ray.train.Result:
    """Run the ``kind`` ("prior" | "tokenizer") loop on ``cfg.num_workers`` Ray Train workers; raises on failure.

    ``context_cls`` builds each worker's context (tests pass a subclass that injects a failure).
    """
    storage.configure(cfg.storage)
    init_ray(cfg.ray)
    fs, path = storage.pyarrow_filesystem(storage.join(cfg.output, "ray"))
    if not storage.is_remote(cfg.output):
        os.makedirs(path, exist_ok=True)
    resources = {"CPU": getattr(cfg, "cpus_per_worker", 1.0)}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "kind": kind, "context_cls": context_cls},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(kind, cfg.output), storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=getattr(cfg, "max_failures", 3)),
            checkpoint_config=CheckpointConfig(num_to_keep=getattr(cfg, "keep_checkpoints", 2)),
        ),
    )
    log.info("Ray Train: %s on %d worker(s) (%s), run %s, storage %s", kind, cfg.num_workers,
             "GPU" if cfg.use_gpu else "CPU", run_name(kind, cfg.output), storage.join(cfg.output, "ray"))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def run_prior(cfg: PriorTrainConfig) -> dict:
    """``nextscale train-prior``: train the VAR prior on code shards; returns the run's summary."""
    storage.configure(cfg.storage)
    if cfg.num_workers == 0:
        device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        ctx = LocalContext(cfg.output, device=device, num_to_keep=cfg.keep_checkpoints)
        summary = train_prior(cfg, ctx)
    else:
        result = fit("prior", cfg)
        summary = json.loads(storage.read_text(storage.join(cfg.output, "train_summary.json")))
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        summary["ray_run"] = run_name("prior", cfg.output)
    log.info("train-prior: %d steps (%d trained now) on %d worker(s) at %.1f img/s, final loss %.4f; prior in %s, "
             "loss curve in %s, checkpoints under %s", summary["steps"], summary["steps_trained"],
             summary["workers"], summary["img_per_s"], summary["final_loss"], summary["prior_url"],
             summary["metrics_url"], cfg.output)
    return summary


def run_tokenizer(cfg) -> dict:
    """``nextscale train-tokenizer``: train the multi-scale VQVAE on ``cfg.num_workers`` Ray Train workers."""
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
             cfg.num_workers, summary["tokenizer_url"], summary.get("eval", {}).get("psnr_db"))
    return summary
