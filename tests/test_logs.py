"""Logging setup and the wandb wrapper (disabled / offline; never online in tests)."""

from __future__ import annotations

import logging

import pytest

from nextscale.config import WandbConfig
from nextscale.logs import WandbRun, setup_logging


def test_rank0_logs_info_other_ranks_only_warnings():
    setup_logging(rank=0)
    assert logging.getLogger("nextscale.x").isEnabledFor(logging.INFO)
    setup_logging(rank=1)
    assert not logging.getLogger("nextscale.x").isEnabledFor(logging.INFO)
    assert logging.getLogger("nextscale.x").isEnabledFor(logging.WARNING)
    setup_logging(rank=0)


def test_disabled_and_nonzero_ranks_write_nothing(tmp_path):
    run = WandbRun(WandbConfig(mode="offline"), "r1", rank=1, out_dir=str(tmp_path / "w"))
    run.log({"loss": 1.0}, step=0)
    run.finish()
    WandbRun(WandbConfig(mode="disabled"), "r2", out_dir=str(tmp_path / "w")).log({"x": 1})
    assert not (tmp_path / "w").exists()


def test_offline_mode_records_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = WandbRun(WandbConfig(mode="offline"), "offline-run", config={"a": 1}, out_dir=str(tmp_path))
    run.log({"loss": 0.5}, step=1)
    run.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_tensorboard_events_of_a_remote_output_reach_object_storage(s3_bucket, tmp_path):
    import fsspec
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nextscale.config import TensorBoardConfig
    from nextscale.logs import TensorBoardRun

    TensorBoardRun(TensorBoardConfig(), f"{s3_bucket}/run", rank=1).log({"loss": 1.0}, step=1)  # rank 1: nothing
    run = TensorBoardRun(TensorBoardConfig(), f"{s3_bucket}/run", config={"steps": 3})
    for step in (1, 2, 3):
        run.log({"loss": 1.0 / step, "mfu": float("nan"), "note": "text is no scalar"}, step=step)
    run.finish()
    fs = fsspec.filesystem("s3")
    files = fs.ls(f"{s3_bucket}/run/tensorboard")
    assert len(files) == 1
    fs.get(files[0], str(tmp_path) + "/")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
