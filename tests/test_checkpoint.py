"""The checkpoint layer: no code runs from a checkpoint location, and old checkpoints still load."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from nextscale import checkpoint
from nextscale.runtime import LocalContext


class _Planted:
    """What an attacker pickles: unpickling it calls ``open(marker, "w")``, i.e. runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(output: str, step: int, obj) -> str:
    folder = os.path.join(output, "checkpoints", f"step-{step:08d}")
    os.makedirs(folder)
    torch.save(obj, os.path.join(folder, checkpoint.STATE_FILE))
    with open(os.path.join(folder, "COMMITTED"), "w") as f:
        f.write(str(step))
    return folder


def test_a_planted_pickle_is_refused_and_its_code_does_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    _plant(str(tmp_path / "run"), 4, {"model": {}, "step": 4, "payload": _Planted(marker)})
    restored = LocalContext(str(tmp_path / "run")).restore()
    with pytest.raises(checkpoint.CheckpointError, match=r"refusing to load .*state\.pt.*could run code") as e:
        checkpoint.load(restored)
    assert not os.path.exists(marker)
    assert "weights_only=False" not in str(e.value)


def test_rng_state_round_trips_and_is_plain_tensors(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    checkpoint.save(str(tmp_path), {"rng": [checkpoint.rng_state()]})
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path))["rng"][0])
    again = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoints_with_numpy_rng_states_still_load(tmp_path):
    """Checkpoints written before the RNG states were tensors hold numpy's state tuple (an ndarray)."""
    np.random.seed(5), random.seed(6)
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    folder = _plant(str(tmp_path), 3, {"step": 3, "rng": [legacy]})
    expected = (np.random.random(2), random.random())
    checkpoint.set_rng_state(checkpoint.load(folder)["rng"][0])
    assert np.array_equal(np.random.random(2), expected[0]) and random.random() == expected[1]
