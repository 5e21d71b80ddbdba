"""The checkpoint layer: no code runs from a checkpoint location, damaged checkpoints are skipped for the
newest one that verifies, and checkpoints of the previous format still load."""

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


def _state(seed: int = 0) -> checkpoint.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return checkpoint.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                 extra={"history": []})


def _train_step(state: checkpoint.TrainState) -> None:
    state.model(torch.randn(4, 3)).square().mean().backward()
    state.optimizer.step()
    state.step += 1
    state.extra["history"].append({"step": state.step})


def _commit(output: str, step: int, payload: dict) -> str:
    """A checkpoint folder written as the layer writes it (checksums included) and committed."""
    folder = os.path.join(output, "checkpoints", f"step-{step:08d}")
    checkpoint.write(folder, payload)
    with open(os.path.join(folder, "COMMITTED"), "w") as f:
        f.write(str(step))
    return folder


def test_a_planted_pickle_is_refused_and_its_code_does_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    # checksums do not stop an attacker who can write the folder: the loader itself must refuse
    _commit(str(tmp_path / "run"), 4, {"model": {}, "step": 4, "rng": [], "payload": _Planted(marker)})
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint .*verifies.*step-00000004.*refusing to load .*could "
                                                         r"run code") as e:
        checkpoint.restore(LocalContext(str(tmp_path / "run")), _state())
    assert not os.path.exists(marker)
    assert "weights_only=False" not in str(e.value)


def test_restore_skips_damaged_checkpoints_for_the_newest_that_verifies(tmp_path, caplog):
    ctx, state = LocalContext(str(tmp_path)), _state()
    saved = []
    for _ in range(2):
        _train_step(state)
        checkpoint.save(ctx, state, {"step": state.step})
        saved.append({k: v.clone() for k, v in state.model.state_dict().items()})
    # step 2: one byte changed, same size (bit rot); only its checksum can tell
    path = tmp_path / "checkpoints" / "step-00000002" / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    fresh = _state(seed=1)
    assert checkpoint.restore(LocalContext(str(tmp_path)), fresh)
    assert fresh.step == 1 and fresh.extra["history"] == [{"step": 1}]
    assert all(torch.equal(v, saved[0][k]) for k, v in fresh.model.state_dict().items())
    assert "skipping checkpoint" in caplog.text and "does not match its sha256" in caplog.text

    # none verifies: the error names every checkpoint and why
    older = tmp_path / "checkpoints" / "step-00000001" / "state.pt"
    older.write_bytes(older.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000002 \(.*sha256.*\); .*step-00000001 \(.*"
                                                         r"truncated"):
        checkpoint.restore(LocalContext(str(tmp_path)), _state())
    assert not checkpoint.restore(LocalContext(str(tmp_path / "fresh")), _state())  # no checkpoint: a fresh start


def test_rng_state_round_trips_and_is_plain_tensors(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    checkpoint.write(str(tmp_path), {"rng": [checkpoint.rng_state()]})
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path))["rng"][0])
    again = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """Format 1: state.pt alone, numpy's RNG state tuple (an ndarray), the tokenizer's "opt" key and bare
    generator state."""
    np.random.seed(5), random.seed(6)
    old = _state()
    _train_step(old)
    gen = torch.Generator().manual_seed(9)
    payload = {"model": old.model.state_dict(), "opt": old.optimizer.state_dict(), "ema": None,
               "restart_gen": gen.get_state(), "step": 1, "config": {},
               "rng": [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}]}
    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    torch.save(payload, folder / "state.pt")
    (folder / "COMMITTED").write_text("1")
    expected = (np.random.random(2), random.random(), torch.rand(2, generator=gen))

    new = _state(seed=1)
    restart_gen = torch.Generator()
    new.components["restart_gen"] = checkpoint.GeneratorState(restart_gen)
    assert checkpoint.restore(LocalContext(str(tmp_path)), new) and new.step == 1
    assert all(torch.equal(v, old.model.state_dict()[k]) for k, v in new.model.state_dict().items())
    assert str(new.optimizer.state_dict()["state"]) == str(old.optimizer.state_dict()["state"])
    assert np.array_equal(np.random.random(2), expected[0]) and random.random() == expected[1]
    assert torch.equal(torch.rand(2, generator=restart_gen), expected[2])
