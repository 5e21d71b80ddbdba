"""What a user sees: a stage run as ``nextscale train-prior`` on 2 Ray Train workers (its own local Ray instance)
prints its progress, its result and nothing else: no Ray chatter, no warning, no line twice.

One subprocess (~30-60 s on 2 cores: Ray's start-up and two workers importing torch).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import pytest
import strict_json
import torch
from prior_codes import write_codes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nextscale.tokenize.loader import save_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

STEPS, LOG_EVERY, CKPT_EVERY = 6, 2, 3
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\((\w+) pid=\d+\)(\x1b\[0m)? ")  # how Ray marks a worker's line
OURS = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) nextscale[.\w]*: ")  # nextscale.logs.FORMAT


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_stage_prints_its_progress_and_result_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(tmp_path / "tokenizer.pt"))
    codes = write_codes(str(tmp_path / "codes"), str(tmp_path / "tokenizer.pt"), num_samples=32, views=1, seed=0)
    out = tmp_path / "prior"  # given relative to the command's folder: Ray Train workers run in folders of their own
    # as a user runs it: Ray's default token authentication (conftest turns it off), its token under this HOME
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "HOME": str(tmp_path),
           "NEXTSCALE_PROGRESS": "lines", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "nextscale.cli", "train-prior", f"data.url={codes}", "data.batch_size=8",
         "model.preset=golden_tiny", f"steps={STEPS}", f"log_every={LOG_EVERY}", f"ckpt_every={CKPT_EVERY}", "sample_every=3",
         "output=prior", "workers.count=2", "ray.num_cpus=2"],
        capture_output=True, text=True, env=env, timeout=560, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    # every line is one of ours (a worker's behind Ray's prefix): Ray's chatter and any warning would show here
    foreign = [line for line in lines if not OURS.match(RAY_PREFIX.sub("", line))]
    assert not foreign, "\n".join(foreign)
    messages = [OURS.sub("", RAY_PREFIX.sub("", line)) for line in lines]
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line]
    repeated = [m for m, n in collections.Counter(messages).items() if n > 1]
    assert not repeated, repeated
    # the progress: a line every LOG_EVERY steps and at each checkpoint, the sample grids; the result
    assert [int(m.split()[1].split("/")[0]) for m in messages if m.startswith("step ") and " loss " in m] == [2, 3, 4, 6]
    assert sum("samples/step-" in m for m in messages) == 2
    assert any(m.startswith(f"train-prior: {STEPS} steps") for m in messages)
    # driver: start, Ray Train launch, result, done; workers: setup (2), progress (4 + 2 grids), end (2)
    assert len(lines) <= 16, "\n".join(lines)
    summary = strict_json.loads(proc.stdout)  # the stage's summary on stdout, strict JSON (mfu is null on a CPU)
    assert summary["steps"] == STEPS and summary["mfu"] is None
    assert {"train_summary.json", "metrics.jsonl"} <= set(strict_json.check_tree(out))
    # rank 0's TensorBoard events land in the output folder, whatever folder the worker runs in
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 4, 6]
