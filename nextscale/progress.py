"""Progress of long stages: a tqdm bar (rate, ETA) on a terminal, plain periodic log lines elsewhere.

Cluster logs and files get no carriage-return bars: when stderr is not a terminal, :class:`Progress`
logs one line every ``every_s`` seconds (``sample: 120/500 img (24 %), 3.1 img/s, ETA 2 min 03 s``)
and one when it closes. ``NEXTSCALE_PROGRESS=bar|lines|off`` forces a style. Training loops already
log a line every ``log_every`` steps; they add :func:`eta` and :func:`peak_memory` to it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from nextscale.config import ConfigError

log = logging.getLogger(__name__)

STYLES = ("bar", "lines", "off")


def format_seconds(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta(done: int, total: int, seconds: float) -> str:
    """``ETA 3 min 20 s`` for ``total - done`` more units at the rate of ``done`` units in ``seconds``."""
    if done <= 0 or seconds <= 0:
        return "ETA ?"
    return f"ETA {format_seconds((total - done) * seconds / done)}"


def peak_memory(device: torch.device) -> str:
    """``peak mem 12.3 GiB`` (the most CUDA memory allocated so far on ``device``), or "" off the GPU."""
    if device.type != "cuda":
        return ""
    return f"peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


class Progress:
    """``update(n)`` as work completes; use as a context manager (or call ``close``).

    ``total`` may be None (unknown): lines then give the count and rate without a percentage or ETA.
    ``bar=False``: no bar of ours on a terminal, for stages whose terminal already shows Ray Data's bars
    (two sets of bars garble each other); the lines elsewhere stay.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", *, every_s: float = 30.0,
                 style: str | None = None, bar: bool = True, logger: logging.Logger = log):
        tty_style = "bar" if bar else "off"
        style = style or os.environ.get("NEXTSCALE_PROGRESS") or (tty_style if sys.stderr.isatty() else "lines")
        if style not in STYLES:
            raise ConfigError(f"NEXTSCALE_PROGRESS={style!r}: choose one of {', '.join(STYLES)}")
        self.total, self.desc, self.unit, self.every_s, self.style, self.log = total, desc, unit, every_s, style, logger
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        if style == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.style == "lines" and time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            self.log.info("%s", self.line())

    def line(self) -> str:
        seconds = time.perf_counter() - self.t0
        rate = f"{self.done / seconds:.3g} {self.unit}/s" if seconds > 0 else f"? {self.unit}/s"
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit}, {rate}"
        pct = 100 * self.done / self.total
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), {rate}, " \
               f"{eta(self.done, self.total, seconds)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.style != "off" and self.done:
            seconds = time.perf_counter() - self.t0
            self.log.info("%s: %d %s in %s (%.3g %s/s)", self.desc, self.done, self.unit, format_seconds(seconds),
                          self.done / max(seconds, 1e-9), self.unit)
        self.style = "off"  # closing twice logs once

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
