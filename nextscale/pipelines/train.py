"""Ray Train (V2) launcher shared by the tokenizer and the prior trainings.

The training loops are plain PyTorch functions of ``(cfg, ctx, pictures)``; here they run in a ``TorchTrainer``
whose workers see a :class:`RayTrainContext`, and draw the pictures of ``nextscale.eval.plots``. The run's name is derived from the output URL and its
storage lives under ``{output}/ray``, so rerunning the same command resumes from the latest
checkpoint (and a finished run trains nothing). ``workers.count=0`` (prior only) runs the loop in
this process with a :class:`~nextscale.runtime.LocalContext`, no Ray at all.

A Ray Train stage stops and fails like the other stages (:class:`Trainer`): Ctrl-C is handled by
``nextscale.interrupts`` (exit 130 within seconds; the run's actors die with this driver and a rerun
resumes), not by Ray Train's graceful abort (measured ~8-15 s, then exit 1). Only a failure a restart can
cure (a worker or node lost, storage or network trouble) restarts the worker group from the latest
checkpoint, at most ``workers.max_failures`` times; a :class:`~nextscale.errors.UserError` raised in a worker
(a damaged shard, a code outside the vocabulary, a tokenizer that did not make the codes) and any bug fail the
run at once, and a UserError reaches the command as itself: one line, exit status 2.
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
from ray.train.v2._internal.exceptions import RayTrainError
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from nextscale import storage
from nextscale.checkpoint import run_id
from nextscale.devices import pick_device
from nextscale.errors import UserError, is_transient
from nextscale.eval.plots import prior_pictures, tokenizer_pictures
from nextscale.logs import setup_logging
from nextscale.pipelines.common import dashboard_url, init_ray, use_gpus
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


# where Ray Train 2.60 logs a worker's exception with its traceback (ray.train.v2._internal.util)
RAY_TRAIN_ERROR_LOGGER, RAY_TRAIN_ERROR = "ray.train.v2._internal.util", "Error in training function"


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
    try:
        if kind == "prior":
            train_prior(cfg, ctx, prior_pictures)
        else:
            train_tokenizer(cfg, ctx, tokenizer_pictures)
    except UserError:
        # the command shows its message on one line; Ray Train would log this worker's traceback as well
        logging.getLogger(RAY_TRAIN_ERROR_LOGGER).addFilter(lambda r: not r.getMessage().startswith(RAY_TRAIN_ERROR))
        raise


def restart_may_help(error: WorkerGroupError) -> bool:
    """Whether the workers failed for reasons a restart may cure: Ray's word on a worker (its process or node
    died, its health check failed) or storage or network trouble met by its code. The other workers' collectives
    then fail too (the peer is gone): that says nothing either way. A user's mistake, damaged data or a bug is
    met again by every restart."""
    failures = list(error.worker_failures.values())
    if any(isinstance(e, UserError) for e in failures):
        return False
    causes = [e for e in failures if not _broken_collective(e)]
    return all(isinstance(e, (ray.exceptions.RayError, RayTrainError)) or is_transient(e) for e in causes)


def _broken_collective(error: BaseException) -> bool:
    # gloo reports a lost peer as a plain RuntimeError ("[.../gloo/transport/tcp/pair.cc] Connection closed by peer")
    return isinstance(error, torch.distributed.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


class RestartOnlyTransient(FailurePolicy):
    """Ray Train's own policy (its ``max_failures`` budget) for failures a restart may cure; the others fail at once."""

    def __init__(self, default: FailurePolicy):
        super().__init__(default.failure_config)
        self.default = default

    def make_decision(self, training_failed_error) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and not restart_may_help(training_failed_error):
            return FailureDecision.RAISE
        return self.default.make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """``TorchTrainer`` that stops and fails like the other stages (module docstring), without Ray Train's
    placement-group cleaner where Ray runs no dashboard (a local instance). It overrides private methods of
    Ray Train 2.60 (pyproject pins the version; tests/test_train_ray.py and test_interrupts.py check them).

    The cleaner watches the controller through the state API, which the dashboard serves: without one it can
    never see the controller die (so never cleans up), and it logs a warning every second of the run. A local
    instance needs no cleaner: it dies with the driver (``watchdog.py``); a cluster has a dashboard.
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if dashboard_url():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    def _register_sigint_handler(self, controller) -> None:
        pass  # Ctrl-C stays with nextscale.interrupts: the actors of the run die with this driver

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = RestartOnlyTransient(controller_init_kwargs.pop("failure_policy"))
        return super()._initialize_and_run_controller(failure_policy=policy, **controller_init_kwargs)


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
    gpu = use_gpus(workers.device, "workers.device")
    resources = {"CPU": workers.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    trainer = Trainer(
        _worker,
        train_loop_config={"cfg": cfg, "kind": kind, "context_cls": context_cls},
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=gpu,
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
             "GPU" if gpu else "CPU", run_id(kind, cfg.output), storage.join(cfg.output, "ray"))
    try:
        result = trainer.fit()
    except WorkerGroupError as e:
        user_error = next((err for err in e.worker_failures.values() if isinstance(err, UserError)), None)
        if user_error is not None:
            raise user_error from e
        raise
    if result.error is not None:
        raise result.error
    return result


def run_prior(cfg: PriorTrainConfig) -> dict:
    """``nextscale train-prior``: train the VAR prior on code shards; returns the run's summary."""
    storage.configure(cfg.storage)
    if cfg.workers.count == 0:
        device = pick_device(cfg.workers.device, key="workers.device")
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
