"""Ctrl-C and SIGKILL of a stage's driver: the process stops promptly, its local Ray instance goes with it,
and a rerun completes to the bytes of an uninterrupted run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextscale.pipelines.watchdog import descendants, processes, wait_gone
from nextscale.tokenize.job_config import TokenizeConfig

REPO = Path(__file__).resolve().parent.parent
ARGS = dict(tokenizer="golden_tiny", views=1, samples_per_shard=2, batch_size=2)

# a stage whose code swallows the KeyboardInterrupt (as a finalizer or a library's cleanup path may) and goes on
SWALLOWS = """
import sys, time
from nextscale.interrupts import stop_promptly

def work():
    print("ready", flush=True)
    while True:
        time.sleep(0.01)

with stop_promptly(grace_s=float(sys.argv[1])):
    try:
        work()
    except KeyboardInterrupt:
        pass
    time.sleep(120)
"""


@pytest.mark.parametrize("grace_s, signals", [(1.0, 1), (60.0, 2)])
def test_an_interrupt_lost_inside_the_stage_still_stops_it(grace_s, signals):
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWS, str(grace_s)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        assert proc.wait(timeout=20) == 130  # after grace_s, or at once on the second Ctrl-C
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "interrupted (Ctrl-C)" in err
    assert ("second Ctrl-C" if signals == 2 else "still running 1 s after Ctrl-C") in err


# a driver that starts the watchdog, then a child that starts a grandchild (a raylet and its agent)
DRIVER = """
import os, subprocess, sys, time
from nextscale.pipelines import watchdog
subprocess.Popen([sys.executable, watchdog.__file__, str(os.getpid())], start_new_session=True)
child = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_the_watchdog_kills_what_the_killed_driver_started_even_orphans():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = int(driver.stdout.readline())
        deadline = time.time() + 30
        while time.time() < deadline and len(descendants({driver.pid: processes()[driver.pid][1]}, processes())) < 3:
            time.sleep(0.1)  # the watchdog, the child and its sleep
        time.sleep(1.0)  # the watchdog records the tree every 0.5 s
        procs = processes()
        started = {p: s for p, s in descendants({driver.pid: procs[driver.pid][1]}, procs).items()}
        assert len(started) == 3
        os.kill(child, signal.SIGKILL)  # the grandchild is orphaned: no longer below the driver
        driver.kill()
        driver.wait()
        assert not wait_gone(started, 10)
    finally:
        driver.kill()


def _write_photos(root: Path, n: int) -> None:
    for i in range(n):
        rng = np.random.default_rng(i)
        p = root / f"c{i % 3}" / f"img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


def _shards(out: Path) -> int:
    return sum(n.endswith(".tar") for n in os.listdir(out)) if out.is_dir() else 0


def _tokenize(tmp_path: Path, out: Path) -> list[str]:
    return ["tokenize", f"input={tmp_path / 'in'}", f"output={out}", "ray.num_cpus=2",
            *(f"{k}={v}" for k, v in ARGS.items())]


def _interrupt(tmp_path: Path, args: list[str], sig: int, ready, group: bool = False) -> tuple[int, dict[int, int]]:
    """Run ``nextscale ARGS`` with its own local Ray instance until ``ready(log text)``, send ``sig`` to the driver
    alone (or to its process group, as a terminal's Ctrl-C); returns (exit code, the processes it had started) once
    all of those are gone (both bounded in time)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "nextscale.cli", *args]
    log_path = tmp_path / f"job-{sig}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not ready(log_path.read_text()):
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended too early:\n" + log_path.read_text()[-3000:]
        procs = processes()
        started = descendants({proc.pid: procs[proc.pid][1]}, procs)
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=30)  # promptly, even when an interrupt is lost inside a library
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = wait_gone(started, 20)
    assert not left, f"still running after {sig!r}: {left}\n{log_path.read_text()[-2000:]}"
    return code, started


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_ctrl_c_and_sigkill_stop_the_job_and_its_ray_and_a_rerun_completes(ray_local, tmp_path):
    from nextscale.pipelines.tokenize import run

    _write_photos(tmp_path / "in", 24)
    run(TokenizeConfig(input=str(tmp_path / "in"), output=str(tmp_path / "a"), **ARGS))
    reference = _outputs(tmp_path / "a")
    out = tmp_path / "b"

    # Ctrl-C while the local Ray instance starts
    code, started = _interrupt(tmp_path, _tokenize(tmp_path, out), signal.SIGINT, lambda text: "starting a local Ray instance" in text)
    assert code == 130
    # Ctrl-C once the first shard is written, then SIGKILL once one more is: each time nothing stays behind
    code, started = _interrupt(tmp_path, _tokenize(tmp_path, out), signal.SIGINT, lambda text: _shards(out) >= 1)
    assert code == 130 and len(started) >= 4  # raylet, GCS, agents, workers: there was an instance to stop
    before = _shards(out)
    assert before < 12
    code, started = _interrupt(tmp_path, _tokenize(tmp_path, out), signal.SIGKILL, lambda text: _shards(out) > before)
    assert code == -signal.SIGKILL and len(started) >= 4

    summary = run(TokenizeConfig(input=str(tmp_path / "in"), output=str(out), **ARGS))
    assert summary["shards_skipped"] >= 2 and summary["shards_made"] + summary["shards_skipped"] == 12
    assert _outputs(out) == reference


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_ctrl_c_stops_a_ray_train_stage_at_once_and_the_same_command_resumes(ray_local, tmp_path):
    """Ray Train's own SIGINT handler (a graceful abort, then exit 1) is not in the way: Ctrl-C to the process
    group of train-prior on 2 Ray Train workers ends it with 130 and nothing left running."""
    from prior_codes import write_codes

    from nextscale.config import load_config
    from nextscale.pipelines.train import run_prior
    from nextscale.prior.config import PriorTrainConfig
    from nextscale.tokenize.loader import save_tokenizer
    from nextscale.tokenize.vqvae import build_vqvae

    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(tmp_path / "tokenizer.pt"))
    codes = write_codes(str(tmp_path / "codes"), str(tmp_path / "tokenizer.pt"), num_samples=32, views=1, seed=0)
    # Ctrl-C three steps after the first checkpoint (time for Ray Train to register it), 13 steps before the end;
    # every checkpoint also draws curves.png: 5 of them, not 15, keep the resumed run short
    args = [f"data.url={codes}", "data.batch_size=8", "model.preset=golden_tiny", "steps=20", "log_every=1",
            "ckpt_every=4", "tensorboard.enabled=false", f"output={tmp_path / 'prior'}", "workers.count=2",
            "ray.num_cpus=2"]
    code, started = _interrupt(tmp_path, ["train-prior", *args], signal.SIGINT, lambda text: " step 7/20" in text,
                               group=True)
    assert code == 130 and len(started) >= 4  # raylet, GCS, agents, Ray Train's controller and workers

    summary = run_prior(load_config(PriorTrainConfig, None, args))  # the same run: it resumes from a checkpoint
    resumed_at = summary["steps"] - summary["steps_trained"]
    assert summary["steps"] == 20 and resumed_at >= 4 and resumed_at % 4 == 0
