"""Progress of long stages: a bar with rate and ETA on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from nextscale.progress import Progress, eta, format_seconds, peak_memory


def test_durations_and_eta_read_like_a_person_would_write_them():
    assert [format_seconds(s) for s in (0.4, 45, 200, 7500)] == ["0 s", "45 s", "3 min 20 s", "2 h 05 min"]
    assert eta(10, 40, 20.0) == "ETA 1 min 00 s"  # 30 more at 2 s each
    assert eta(0, 40, 5.0) == "ETA ?"
    assert peak_memory(torch.device("cpu")) == ""


def test_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="nextscale.progress")
    with Progress(4, "sample", unit="img", every_s=0, style="lines") as p:
        p.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("sample: 3/4 img (75 %), ") and " img/s, ETA " in lines[0]
    assert lines[1].startswith("sample: 3 img in ") and lines[1].endswith("img/s)")
    caplog.clear()
    with Progress(None, "fid: reference features", every_s=3600, style="lines") as p:
        p.update(5)  # within the interval: no line until the closing one
    assert [r.getMessage()[:32] for r in caplog.records] == ["fid: reference features: 5 img i"]


def test_bar_on_a_terminal_and_off(capsys, caplog, monkeypatch):
    with Progress(4, "tokenize", unit="shard", style="bar") as p:
        time.sleep(0.15)  # tqdm redraws at most every 0.1 s
        p.update(2)
    err = capsys.readouterr().err
    assert "tokenize" in err and "2/4" in err and "shard/s" in err
    caplog.set_level(logging.INFO, logger="nextscale.progress")
    caplog.clear()
    monkeypatch.setenv("NEXTSCALE_PROGRESS", "off")
    with Progress(4, "quiet") as p:
        p.update(4)
    assert not caplog.records and not capsys.readouterr().err
    monkeypatch.setenv("NEXTSCALE_PROGRESS", "loud")
    with pytest.raises(ValueError, match="NEXTSCALE_PROGRESS='loud': choose one of bar, lines, off"):
        Progress(1, "x")


class _Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text = getattr(self, "text", "") + text
        return len(text)

    def flush(self) -> None:
        pass


def test_stages_with_ray_data_bars_draw_none_of_their_own_on_a_terminal(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="nextscale.progress")
    monkeypatch.delenv("NEXTSCALE_PROGRESS", raising=False)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert Progress(2, "tokenize", unit="shard", bar=False).style == "off"
    with Progress(2, "sample") as p:
        assert p.style == "bar"
        p.update(2)
    assert "sample" in terminal.text
