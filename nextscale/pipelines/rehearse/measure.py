"""Measuring one stage of the rehearsal, as its own process (:func:`run_stage`; the child is :func:`stage_main`), so
its driver's peak RSS (VmHWM, :func:`peak_rss_mb`) is its own; Ray's worker processes (children of that process)
are sampled from /proc every 0.2 s and grouped by their process title (``ray::ShardChunkEncoder``,
``ray::RayTrainWorker`` ...). Also: the bytes a stage wrote, and the requests an S3 server answered."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

from nextscale import codes
from nextscale.config import load_config, split_config_args
from nextscale.logs import setup_logging
from nextscale.stages import STAGES

log = logging.getLogger(__name__)

STAGE_ATTEMPTS = 2  # a stage that fails (a local Ray instance that did not start in time) runs once more: it resumes
TITLE = re.compile(r"^ray::(?:\w+\()*(\w+)")


# ------------------------------------------------------------------------------------------------
# Processes: peak RSS of a stage's driver and of its Ray workers


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, process title, RSS bytes) of every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{name}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (ppid, title, rss)
    return out


class RssSampler:
    """Peak sampled RSS (MB) per Ray worker kind among the descendants of one process."""

    def __init__(self, root: int, every_s: float = 0.2):
        self.root, self.every_s, self.peak_mb = root, every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            table = _proc_table()
            for pid in _descendants(self.root, table):
                m = TITLE.match(table[pid][1])
                if m and m.group(1) != "IDLE":
                    kind = m.group(1)
                    self.peak_mb[kind] = max(self.peak_mb.get(kind, 0.0), round(table[pid][2] / 2**20, 1))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.peak_mb.items()))


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's own peak RSS in MB: VmHWM, the high-water mark of its address space. Not getrusage's ru_maxrss:
    Linux carries the spawning process's high-water mark across exec into the child, so every stage started after
    the rehearsal's own checks at size 1 (1.5 GB) reported their 1.5 GB as its driver's peak."""
    with open(f"/proc/{pid}/status") as f:
        return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmHWM:"))


def _descendants(root: int, table: dict[int, tuple[int, str, int]]) -> list[int]:
    """The processes under ``root`` in ``table`` (:func:`_proc_table`)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kill_tree(root: int) -> None:
    """SIGKILL a stage's process and everything it started (its local Ray instance), then wait until all are gone."""
    pids = [root, *_descendants(root, _proc_table())]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids[1:]):
        time.sleep(0.2)


def run_stage(name: str, config: str, overrides: list[str], *, log_path: str, kill_when=None,
              env: dict[str, str] | None = None) -> dict:
    """Run stage ``name`` (config + overrides) in a child process: its summary, wall time, peak RSS of the driver and
    of each Ray worker kind, and the object store's spill.

    ``kill_when()`` (polled every 0.5 s) True kills the child and its Ray instance with SIGKILL, as a lost node
    or an operator's kill -9 would: the result then says ``killed`` and has no summary. A failed child is run
    again up to :data:`STAGE_ATTEMPTS` times in all (``attempts`` in the result).
    """
    for attempt in range(1, STAGE_ATTEMPTS + 1):
        result = _run_child(name, config, overrides, log_path=log_path, kill_when=kill_when, env=env)
        if result is not None:
            return {**result, "attempts": attempt}
        log.warning("stage %s failed (attempt %d of %d); its log is %s", name, attempt, STAGE_ATTEMPTS, log_path)
    raise RuntimeError(f"stage {name} failed {STAGE_ATTEMPTS} times; its log is {log_path}")


def _run_child(name: str, config: str, overrides: list[str], *, log_path: str, kill_when,
               env: dict[str, str] | None) -> dict | None:
    """One child process of :func:`run_stage`; None when it failed."""
    cmd = [sys.executable, "-m", "nextscale.pipelines.rehearse", "--stage", name, config, *overrides]
    t0 = time.perf_counter()
    chunks: list[bytes] = []
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, env={**os.environ, **(env or {})})
        sampler = RssSampler(proc.pid)
        reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
        reader.start()
        killed = False
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                _kill_tree(proc.pid)
                killed = True
                break
            time.sleep(0.5)
        proc.wait()
        reader.join()
    seconds = time.perf_counter() - t0
    workers = sampler.stop()
    if killed:
        return {"killed": True, "seconds": round(seconds, 2), "peak_rss_mb": workers}
    if proc.returncode != 0:
        return None
    result = json.loads(b"".join(chunks).decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = {"driver": result.pop("driver_peak_rss_mb"), **workers}
    result["seconds"] = round(seconds, 2)
    return result


def stage_main(argv: list[str]) -> int:
    """The child: run one stage in this process; print its summary, peak RSS and object-store spill as JSON."""
    setup_logging()
    name, rest = argv[0], argv[1:]
    path, overrides = split_config_args(rest)
    cfg = load_config(STAGES[name].config, path, overrides)
    summary = STAGES[name].run(cfg)
    summary = {"summary": summary, "spilled_mb": _spilled_mb(),
               "driver_peak_rss_mb": peak_rss_mb()}
    print(json.dumps(summary, default=str), flush=True)
    return 0


def _spilled_mb() -> float:
    """MB the object store spilled to disk in this Ray instance (0 when nothing was)."""
    import ray
    from ray._private.internal_api import memory_summary

    if not ray.is_initialized():
        return 0.0
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", summary)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------------------------------
# What a stage wrote


def folder_bytes(path: str, pattern: str = "") -> dict[str, int]:
    """{"files", "bytes"} of the files under ``path`` whose relative path matches ``pattern`` (regex)."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if not pattern or re.search(pattern, rel):
                files += 1
                size += os.path.getsize(os.path.join(dirpath, n))
    return {"files": files, "bytes": size}


def codes_written(url: str) -> dict:
    return {"shards": folder_bytes(url, r"^codes-\d+\.tar$"), "resume_records": folder_bytes(url, r"^parts/"),
            "manifest_bytes": os.path.getsize(os.path.join(url, codes.MANIFEST)),
            "index_bytes": os.path.getsize(os.path.join(url, codes.INDEX))}


# ------------------------------------------------------------------------------------------------
# Storage requests against an S3 server


class CountingS3:
    """A moto S3 server on 127.0.0.1 (the tests' object store) that counts the requests it answers, by method."""

    def __enter__(self) -> CountingS3:
        from moto.server import ThreadedMotoServer

        self.counts: collections.Counter = collections.Counter()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        app = self.server._server.app

        def counted(environ, start_response):
            self.counts[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self.server._server.app = counted
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "rehearsal",
                    "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def take(self) -> dict[str, int]:
        """The requests since the last call, by method, and their total."""
        out = dict(sorted(self.counts.items()))
        self.counts.clear()
        return {**out, "total": sum(out.values())}
