"""Ctrl-C stops a stage promptly, every time, and what the stage wrote so far stays usable.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; when that
is inside a finalizer (``__del__``) or a library's cleanup path, the exception is printed and dropped
and the job runs on (measured: one tokenize job in seven ran to completion after a Ctrl-C). Within
:func:`stop_promptly`, the first SIGINT still raises KeyboardInterrupt, so a stage unwinds normally,
and also arms a timer that ends the process with exit code 130 if it is still alive ``grace_s`` later;
a second SIGINT ends it at once. Ending hard is safe: every stage publishes its outputs atomically
(shards, records, checkpoints), a rerun resumes from them, and a local Ray instance is cleaned up by
its watchdog (``nextscale.pipelines.watchdog``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _exit_now(reason: str) -> None:
    print(f"nextscale: {reason}; exiting now (a rerun of the same command continues)", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def stop_promptly(grace_s: float = 10.0) -> Iterator[None]:
    """Run the body with the SIGINT handling described in the module docstring (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = 0

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            _exit_now("second Ctrl-C")
        log.warning("interrupted (Ctrl-C): stopping within %.0f s; what was written so far is kept and the same "
                    "command continues from it (Ctrl-C again to quit at once)", grace_s)
        timer = threading.Timer(grace_s, _exit_now, args=(f"still running {grace_s:.0f} s after Ctrl-C",))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
