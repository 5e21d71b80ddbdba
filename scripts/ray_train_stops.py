"""How Ray Train stages stop and fail, measured through the ``nextscale`` command on a local Ray instance.

    python scripts/ray_train_stops.py [--repeat N] [--json OUT]

- Ctrl-C: ``train-prior`` and ``train-tokenizer`` on 2 CPU Ray Train workers (tiny models); once training has
  logged a step, SIGINT goes to the command's process group (as a terminal sends it). Reported: seconds from
  the signal to the command's exit, its exit status, and the processes it had started that were still alive
  20 s after it exited.
- A data error: ``train-prior`` (2 workers, ``workers.max_failures=3``) on codes one of whose shards holds a
  code outside the vocabulary. Reported: how many times the worker group started before the error was
  shown (1 = no restart), the exit status, seconds to exit, and whether stderr holds a traceback.

Timings depend on the machine's load: compare figures of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nextscale import codes  # noqa: E402
from nextscale.demo_data import make_demo_data  # noqa: E402
from nextscale.pipelines.watchdog import descendants, processes, wait_gone  # noqa: E402
from nextscale.tokenize.loader import load_tokenizer, save_tokenizer  # noqa: E402
from nextscale.tokenize.vqvae import build_vqvae  # noqa: E402

WORKERS = ["workers.count=2", "ray.num_cpus=2", "wandb.mode=disabled"]
STARTED = "VAR golden_tiny:"  # rank 0 logs it once per start of the worker group, when the model is built


def prepare(root: Path) -> dict[str, str]:
    """A tiny tokenizer, codes made with it (and a copy with a code outside the vocabulary), tiny images."""
    import torch

    torch.manual_seed(0)
    tok = str(root / "tokenizer.pt")
    save_tokenizer(build_vqvae("golden_tiny"), tok)
    vqvae, ident = load_tokenizer(tok)
    vq = vqvae.cfg
    paths = {"tokenizer": tok, "codes": str(root / "codes"), "damaged": str(root / "damaged"), "images": str(root / "img")}
    for name in ("codes", "damaged"):
        codes.write_synthetic_shards(paths[name], num_samples=64, num_tokens=vq.num_tokens, vocab_size=vq.vocab_size,
                                     views=1, samples_per_shard=16, patch_nums=vq.patch_nums,
                                     image_size=vq.image_size, tokenizer=ident)
    manifest = codes.Manifest.read(paths["damaged"])
    shard = manifest.shards[-1]
    samples = [(k, np.minimum(c.astype(np.int64) + vq.vocab_size, 65535).astype(np.uint16), y)
               for k, c, y in codes.iter_shard(os.path.join(paths["damaged"], shard.name))]
    data = codes.build_shard(samples)
    Path(paths["damaged"], shard.name).write_bytes(data)
    shard.sha256 = codes.sha256(data)  # the checksum matches: only the vocabulary check can tell
    manifest.write(paths["damaged"])
    make_demo_data(paths["images"], counts={"train": 4, "val": 2})
    return paths


def command(stage: str, paths: dict[str, str], out: Path, *extra: str) -> list[str]:
    if stage == "train-prior":
        args = [f"data.url={paths['codes']}", "data.batch_size=8", "model.preset=golden_tiny", "log_every=1",
                "ckpt_every=5"]
    else:
        args = [f"data.url={paths['images']}/train", f"data.val_url={paths['images']}/val", "data.batch_size=4",
                "data.loader_processes=0", "model.preset=golden_tiny", "log_every=1", "ckpt_every=5",
                "sample_every=0"]
    return [sys.executable, "-m", "nextscale.cli", stage, *args, f"output={out}", *WORKERS, *extra]


def ctrl_c(stage: str, paths: dict[str, str], root: Path) -> dict:
    """Seconds from SIGINT (to the process group) to exit, the exit status, processes left behind."""
    out = root / f"ctrl-c-{stage}-{time.monotonic_ns()}"
    log_path = out.with_suffix(".log")
    with open(log_path, "wb") as log:
        steps = "steps=100000" if stage == "train-prior" else "optim.steps=100000"
        proc = subprocess.Popen(command(stage, paths, out, steps), cwd=REPO,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and " step 2" not in log_path.read_text():
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"{stage} ended before training:\n{log_path.read_text()[-3000:]}")
        procs = processes()
        started = descendants({proc.pid: procs[proc.pid][1]}, procs)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"stage": stage, "seconds_to_exit": round(seconds, 2), "exit_status": code,
            "processes_started": len(started), "left_running_after_20s": len(wait_gone(started, 20)),
            "log": str(log_path)}


def data_error(paths: dict[str, str], root: Path) -> dict:
    """Worker-group starts before a code outside the vocabulary is reported, exit status, seconds, traceback."""
    out = root / f"data-error-{time.monotonic_ns()}"
    t0 = time.monotonic()
    proc = subprocess.run(command("train-prior", {**paths, "codes": paths["damaged"]}, out, "steps=40",
                                  "workers.max_failures=3"), cwd=REPO, capture_output=True, text=True, timeout=1200)
    seconds = time.monotonic() - t0
    out.with_suffix(".log").write_text(proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nextscale train-prior: error: ")]
    return {"worker_group_starts": proc.stderr.count(STARTED), "exit_status": proc.returncode,
            "seconds": round(seconds, 1), "traceback": "Traceback" in proc.stderr,
            "message": errors[0] if errors else proc.stderr.strip().splitlines()[-1:], "log": str(out.with_suffix(".log"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="Ctrl-C measurements per stage")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    root = Path(tempfile.mkdtemp(prefix="nextscale-stops-"))
    paths = prepare(root)
    results = {"ctrl_c": [ctrl_c(stage, paths, root) for stage in ("train-prior", "train-tokenizer")
                          for _ in range(args.repeat)],
               "data_error": data_error(paths, root)}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
