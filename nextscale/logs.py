"""Logging (``logging`` with rank-0 handlers) and a thin wandb wrapper whose mode comes from the config."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from nextscale.config import WandbConfig, to_dict

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
            raise RuntimeError(f"wandb.mode={cfg.mode} needs wandb: pip install 'nextscale[wandb]', or set "
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
