"""A local Ray instance dies with the driver that started it, even when the driver is SIGKILLed.

Ray ties its raylet and GCS to the driver (PR_SET_PDEATHSIG), but the processes the raylet starts do not
follow at once: workers take seconds, and the dashboard and runtime-env agents were measured alive 25 s
after the driver was killed (they report the raylet's death to the dead GCS and wait on it). Their
environment and command line cannot mark them (``setproctitle`` overwrites both), and once their parent
is gone they are re-parented away from the driver. So the driver starts this watchdog in its own session
(a Ctrl-C to the terminal does not reach it) just before the instance: while the driver lives, it
records the driver's descendants (pid and start time, so a reused pid is never mistaken for one); when
the driver is gone (the watchdog's parent changes), it SIGKILLs every recorded process that still runs,
and their children, until none is left. Linux only (it reads ``/proc``); elsewhere it only waits.

    python watchdog.py <driver pid>
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.1  # how soon the driver's death is noticed
SCAN_S = 0.5  # how often the driver's descendants are recorded


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process (from ``/proc/<pid>/stat``)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the name in parentheses may hold spaces
        except (OSError, IndexError):  # gone meanwhile
            continue
        out[int(name)] = (int(fields[1]), int(fields[19]))  # fields 4 and 22 of proc(5), counted after the name
    return out


def descendants(roots: dict[int, int], procs: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every process below ``roots`` (pid -> start time), roots excluded."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [pid for pid, start in roots.items() if procs.get(pid, (0, start))[1] == start]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = procs[child][1]
                stack.append(child)
    return found


def alive(recorded: dict[int, int]) -> list[int]:
    """The recorded processes (pid -> start time) that are still running."""
    procs = processes()
    return [pid for pid, start in recorded.items() if procs.get(pid, (0, -1))[1] == start]


def wait_gone(recorded: dict[int, int], timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for the recorded processes to end; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(recorded)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def reap(recorded: dict[int, int], timeout_s: float = 30.0) -> int:
    """SIGKILL the recorded processes still running (same pid and start time) and anything below them, until
    none is left; returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs = processes()
        targets = {pid: start for pid, start in recorded.items() if procs.get(pid, (0, -1))[1] == start}
        targets.update(descendants(targets, procs))
        targets.pop(os.getpid(), None)
        if not targets:
            break
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        recorded.update(targets)
        time.sleep(POLL_S)
    return len(killed)


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is the driver's business
    if not os.path.isdir("/proc"):
        return 0
    procs = processes()
    root = {driver: procs[driver][1]} if driver in procs else {}
    recorded: dict[int, int] = {}
    next_scan = 0.0
    while os.getppid() == driver:
        if time.monotonic() >= next_scan:
            recorded.update(descendants(root, processes()))
            recorded.pop(os.getpid(), None)
            next_scan = time.monotonic() + SCAN_S
        time.sleep(POLL_S)
    reap(recorded)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
