"""Logging (``logging`` with rank-0 handlers), and where a run's metrics and pictures go besides its log lines:
wandb (in the configured mode) and TensorBoard event files (:class:`Trackers` holds both for the training loops)."""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from nextscale import storage
from nextscale.config import ConfigError, TensorBoardConfig, WandbConfig, dump_yaml, to_dict

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Log to stderr on rank 0; other ranks only report warnings and errors."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    # libraries whose INFO lines are their own housekeeping (matplotlib's font cache on a first run)
    logging.getLogger("matplotlib").setLevel(max(level, logging.WARNING))


class WandbRun:
    """``wandb`` on rank 0 in the configured mode; a no-op everywhere else (and when disabled).

    The import is lazy so that machines without wandb (e.g. a lean GPU image) run with mode=disabled.
    """

    def __init__(self, cfg: WandbConfig, run_id: str, config: Any = None, rank: int = 0, out_dir: str | None = None):
        self._run = None
        if cfg.mode == "disabled" or rank != 0:
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"wandb.mode={cfg.mode} needs wandb: pip install 'nextscale[wandb]', or set "
                              "wandb.mode=disabled") from None

        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.run_name or run_id,
            id=run_id, resume="allow", mode=cfg.mode, dir=out_dir,
            config=to_dict(config) if config is not None else None,
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_image(self, name: str, image_HWC_uint8, caption: str = "", step: int | None = None) -> None:
        if self._run is not None:
            import wandb

            self._run.log({name: wandb.Image(image_HWC_uint8, caption=caption)}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class TensorBoardRun:
    """TensorBoard event files of a run under ``{output}/tensorboard`` on rank 0; a no-op elsewhere and when disabled.

    Scalars go under ``train/<metric>``, pictures under their folder's name, the resolved config as text.
    Event files of a remote output are written locally and uploaded every ``UPLOAD_EVERY_S`` and at the end.
    ``start_step`` > 0 (a resumed run) drops the events a killed run logged after that step, its last checkpoint.
    """

    UPLOAD_EVERY_S = 60.0

    def __init__(self, cfg: TensorBoardConfig, output: str, config: Any = None, rank: int = 0, start_step: int = 0):
        self._writer = None
        if not cfg.enabled or rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

        self.url = storage.join(output, "tensorboard")
        self._remote = storage.is_remote(output)
        # a local output: the path as storage resolves it (a Ray worker runs in a folder of its own)
        self._local = tempfile.mkdtemp(prefix="nextscale-tensorboard-") if self._remote else \
            storage.filesystem(self.url)[1]
        self._writer = SummaryWriter(self._local, purge_step=start_step + 1 if start_step else None, flush_secs=30)
        self._uploaded = time.monotonic()
        if config is not None:
            # four-space indent: TensorBoard renders text as Markdown, and this keeps the YAML as a code block
            self._writer.add_text("config", "".join(f"    {line}\n" for line in dump_yaml(config).splitlines()),
                                  global_step=start_step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, step)
        if self._remote and time.monotonic() - self._uploaded > self.UPLOAD_EVERY_S:
            self._upload()

    def log_image(self, name: str, image_HWC_uint8, caption: str = "", step: int | None = None) -> None:
        if self._writer is not None:
            self._writer.add_image(name, image_HWC_uint8, step, dataformats="HWC")

    def _upload(self) -> None:
        self._writer.flush()
        for name in sorted(os.listdir(self._local)):
            with open(os.path.join(self._local, name), "rb") as f:
                storage.write_bytes(storage.join(self.url, name), f.read())
        self._uploaded = time.monotonic()

    def finish(self) -> None:
        if self._writer is None:
            return
        if self._remote:
            self._upload()
        self._writer.close()
        self._writer = None


class Trackers:
    """The wandb run and the TensorBoard event files of a training loop, logged to together."""

    def __init__(self, cfg: Any, run_id: str, rank: int = 0, start_step: int = 0):
        """``cfg``: a training config (its ``wandb``, ``tensorboard`` and ``output``); ``run_id``: the wandb id."""
        self.runs = (WandbRun(cfg.wandb, run_id=run_id, config=cfg, rank=rank),
                     TensorBoardRun(cfg.tensorboard, cfg.output, config=cfg, rank=rank, start_step=start_step))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for run in self.runs:
            run.log(metrics, step=step)

    def log_image(self, name: str, image_HWC_uint8, caption: str = "", step: int | None = None) -> None:
        for run in self.runs:
            run.log_image(name, image_HWC_uint8, caption=caption, step=step)

    def finish(self) -> None:
        for run in self.runs:
            run.finish()


def write_metrics(output: str, history: Sequence[dict]) -> None:
    """``{output}/metrics.jsonl``: one JSON row per logged window of a training loop, rewritten whole."""
    storage.write_text(storage.join(output, "metrics.jsonl"), "".join(storage.json_text(row) + "\n" for row in history))
