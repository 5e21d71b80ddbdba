"""Logging setup and the wandb wrapper (disabled / offline; never online in tests)."""

from __future__ import annotations

import logging

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
