"""A real ``ray start --head`` (dashboard + job API) on 127.0.0.1 for tests, in its own process session.

Every port is a free ephemeral one, so it never meets another Ray instance on the machine; teardown kills
the processes of its session only (never ``ray stop``, which would kill every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (a port whose socket was closed
    can be handed out again at once: CI once got the same port for two of Ray's components)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def dashboard_deps_path() -> str | None:
    """'' when ray[default] (the dashboard's dependencies) is installed, a folder holding them, or None."""
    if importlib.util.find_spec("aiohttp_cors") and importlib.util.find_spec("opencensus"):
        return ""
    for folder in (os.environ.get("NEXTSCALE_RAY_DASHBOARD_DEPS", ""), str(REPO / ".venv" / "ray-default")):
        if folder and (Path(folder) / "aiohttp_cors").is_dir():
            return folder
    return None


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:
                pids.append(int(entry))
    return pids


def kill_session(sid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline and session_pids(sid):
            time.sleep(0.1)


class RayHead:
    """``with RayHead(token=...) as head: head.address`` — http://127.0.0.1:<dashboard port>."""

    def __init__(self, *, num_cpus: int = 2, token: str = "", startup_timeout_s: float = 180.0):
        self.num_cpus, self.token, self.startup_timeout_s = num_cpus, token, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def env(self, deps: str) -> dict[str, str]:
        """The head's environment: the venv's python first on PATH (the "cluster image"), no storage
        credentials and no PYTHONPATH to the checkout (jobs must bring both), auth as asked."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RAY_AUTH", "NEXTSCALE_")) and k != "PYTHONPATH"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if deps:
            env["PYTHONPATH"] = deps
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_AUTH_MODE"] = "token" if self.token else "disabled"
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def __enter__(self) -> RayHead:
        deps = dashboard_deps_path()
        if deps is None:
            raise RuntimeError("ray start --include-dashboard needs ray[default]: pip install 'ray[default]'")
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        self.temp_dir = tempfile.mkdtemp(prefix="nsray", dir="/tmp")  # short: Ray's socket paths have a length limit
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={self.num_cpus}",
               "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
               *(f"--{flag}={port}" for flag, port in ports.items())]
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.proc = subprocess.Popen(cmd, env=self.env(deps), start_new_session=True,
                                     stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        deadline = time.time() + self.startup_timeout_s
        while True:
            try:
                urllib.request.urlopen(self.address + "/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # 401 with token auth: it is up
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"ray start --head failed:\n{self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            kill_session(self.proc.pid)
            self.proc.wait(timeout=10)
            self.proc = None
