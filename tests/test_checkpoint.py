"""The checkpoint layer: no code runs from a checkpoint location, damaged checkpoints are skipped for the
newest one that verifies, and checkpoints of the previous format still load."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------------
# FSDP: sharded checkpoints (torch.distributed.checkpoint) and resume across the two formats


class _SharedFolder:
    """The part of Ray Train's storage a checkpoint needs, for processes on one machine: the folders the
    ranks report for a step are merged into ``{root}/step-N``, committed once every rank has reported."""

    def __init__(self, root: str, rank: int, world_size: int):
        self.root, self.rank, self.world_size = root, rank, world_size

    def report(self, metrics, checkpoint_dir=None):
        import shutil

        import torch.distributed as dist

        dest = os.path.join(self.root, f"step-{int(metrics['step']):08d}")
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
        dist.barrier()
        if self.rank == 0 and os.path.isdir(dest):
            open(os.path.join(dest, "COMMITTED"), "w").close()
        dist.barrier()

    def checkpoints(self):
        for name in sorted(os.listdir(self.root), reverse=True):
            if os.path.exists(os.path.join(self.root, name, "COMMITTED")):
                yield os.path.join(self.root, name), os.path.join(self.root, name)


def _full_states(state: checkpoint.TrainState) -> dict[str, torch.Tensor]:
    """Every weight and AdamW moment by parameter name, unsharded, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=StateDictOptions(full_state_dict=True))
    out = {k: v.detach().clone() for k, v in model_sd.items()}
    for name, moments in optim_sd["state"].items():
        out.update({f"{name}/{k}": v.detach().clone() for k, v in moments.items()})
    return out


def _ranks(rank: int, world_size: int, root: str, port: int) -> None:
    """Both ranks: DDP trains and checkpoints one file at step 2; FSDP resumes from it, trains and writes
    shards at step 4; DDP resumes from those; a damaged shard falls back to step 2."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from nextscale.prior.families import build_prior
    from nextscale.prior.parallelize import parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    ctx = _SharedFolder(root, rank, world_size)

    def run(strategy: str) -> tuple[checkpoint.TrainState, torch.nn.Module]:
        torch.manual_seed(0)
        model = build_prior("golden_tiny")
        net = parallelize(model, strategy, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        torch.manual_seed(1 + rank)
        return checkpoint.TrainState(model=model, optimizer=optimizer, extra={"history": []}), net

    def train(state: checkpoint.TrainState, net: torch.nn.Module, steps: int) -> None:
        model = state.model
        for _ in range(steps):
            g = torch.Generator().manual_seed(100 * state.step + rank)  # this rank's batch of this step
            label_B = torch.randint(0, model.cfg.num_classes, (2,), generator=g)
            x_BlCv = torch.randn(2, model.L - model.patch_nums[0] ** 2, model.Cv, generator=g)
            target_BL = torch.randint(0, model.cfg.vocab_size, (2, model.L), generator=g)
            logits_BLV = net(label_B, x_BlCv)
            loss = F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten())
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.step += 1
            state.extra["history"].append(float(loss))
        checkpoint.save(ctx, state, {"step": state.step})

    ddp, net = run("ddp")
    train(ddp, net, 2)
    at_2 = _full_states(ddp)

    fsdp, net = run("fsdp")
    assert checkpoint.restore(ctx, fsdp) and fsdp.step == 2 and len(fsdp.extra["history"]) == 2
    restored = _full_states(fsdp)
    assert restored.keys() == at_2.keys() and all(torch.equal(restored[k], at_2[k]) for k in at_2)
    train(fsdp, net, 2)
    at_4 = _full_states(fsdp)

    folder = os.path.join(root, "step-00000004")
    saved = checkpoint.load(folder)
    assert saved["model"] is None and saved["optimizer"] is None and saved["shards"] == "shards"
    shards = sorted(os.listdir(os.path.join(folder, "shards")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    with open(os.path.join(folder, checkpoint.CHECKSUMS_FILE)) as f:
        assert set(json.load(f)["files"]) == {"state.pt", *(f"shards/{name}" for name in shards)}

    back, net = run("ddp")
    assert checkpoint.restore(ctx, back) and back.step == 4
    restored = _full_states(back)
    assert restored.keys() == at_4.keys() and all(torch.equal(restored[k], at_4[k]) for k in at_4)
    train(back, net, 1)  # and it trains on from there

    dist.barrier()
    if rank == 0:
        path = os.path.join(folder, "shards", "__1_0.distcp")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    dist.barrier()
    if rank == 0:
        os.remove(os.path.join(root, "step-00000005", "COMMITTED"))  # the newest is now the damaged step 4
    dist.barrier()
    again, _ = run("fsdp")
    assert checkpoint.restore(ctx, again) and again.step == 2
    dist.destroy_process_group()


def test_fsdp_writes_shards_and_resumes_across_formats_on_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks, args=(2, str(tmp_path), port), nprocs=2, join=True)
