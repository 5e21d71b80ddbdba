"""The seam between the plain-PyTorch training loops and whatever runs them.

Training loops (``nextscale.prior.engine``, ``nextscale.tokenize.train``) see only a
:class:`TrainContext`: rank, world size, device, ``report(metrics, checkpoint_dir)`` and
``checkpoints()``; what goes into a checkpoint and which one to resume from is decided by
``nextscale.checkpoint``. :class:`LocalContext` runs a loop in this process and keeps checkpoints
under the run's output URL; ``nextscale.pipelines.train`` provides the Ray Train implementation.

Pictures of a run (curves, sample grids, reconstruction strips) sample and decode with the models, code
that sits above the loops (``nextscale.eval.plots``): the driver hands a loop a factory that makes its
:class:`Pictures` from the loop's trainer object; :func:`no_pictures` draws nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from nextscale import storage

log = logging.getLogger(__name__)


class TrainContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        """Publish metrics; if ``checkpoint_dir`` (a local folder) is given, persist it as the latest
        checkpoint. Collective: every rank calls it; each rank that wrote checkpoint files passes its
        folder (rank 0 alone, or every rank for sharded states) and the folders are merged into one."""

    def checkpoints(self) -> Iterator[tuple[str, str]]:
        """(where it is stored, local folder) of each persisted checkpoint, newest first, fetched lazily."""

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap for data parallelism (DDP/FSDP) when world_size > 1; identity otherwise."""


class LocalContext:
    """Single-process context: checkpoints go to ``{output}/checkpoints/step-XXXXXXXX`` (local or object store)."""

    def __init__(self, output_url: str, device: str | torch.device = "cpu", num_to_keep: int = 2):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.checkpoint_root = storage.join(output_url, "checkpoints")
        self.num_to_keep = num_to_keep
        self._tmp = tempfile.mkdtemp(prefix="nextscale-restore-")

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is None:
            return
        step = int(metrics.get("step", 0))
        dest = storage.join(self.checkpoint_root, f"step-{step:08d}")
        for name in sorted(os.listdir(checkpoint_dir)):
            with open(os.path.join(checkpoint_dir, name), "rb") as f:
                storage.write_bytes(storage.join(dest, name), f.read())
        # every file is written whole (temporary name + fsync + rename, or one PUT); the COMMITTED marker
        # makes the checkpoint visible to checkpoints() only once all its files exist
        storage.write_text(storage.join(dest, "COMMITTED"), str(step))
        for old in self._committed()[: -self.num_to_keep]:
            storage.remove(storage.join(self.checkpoint_root, old), recursive=True)

    def _committed(self) -> list[str]:
        return [
            n for n in storage.listdir(self.checkpoint_root)
            if n.startswith("step-") and storage.exists(storage.join(self.checkpoint_root, n, "COMMITTED"))
        ]

    def checkpoints(self) -> Iterator[tuple[str, str]]:
        for name in reversed(self._committed()):
            src = storage.join(self.checkpoint_root, name)
            local = os.path.join(self._tmp, name)
            shutil.rmtree(local, ignore_errors=True)
            os.makedirs(local)
            for file in storage.listdir(src):
                with open(os.path.join(local, file), "wb") as f:
                    f.write(storage.read_bytes(storage.join(src, file)))
            yield src, local

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


class Pictures(Protocol):
    def __call__(self, step: int) -> float:
        """Draw what is due after ``step``; the seconds it took (left out of the throughput)."""

    def curves(self, history: Sequence[dict]) -> None:
        """Draw the metric rows so far (rank 0, at each checkpoint and at the end)."""

    def where(self) -> dict[str, str | None]:
        """Where the pictures are (None for those not drawn), for the run's summary."""


class _NoPictures:
    def __call__(self, step: int) -> float:
        return 0.0

    def curves(self, history: Sequence[dict]) -> None:
        pass

    def where(self) -> dict[str, str | None]:
        return {}


def no_pictures(trainer: Any) -> Pictures:
    """The picture factory of a run that draws nothing."""
    return _NoPictures()
