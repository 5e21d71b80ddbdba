"""The prior on 2 Ray Train CPU workers (DDP and FSDP over gloo): a killed worker is restarted from the latest
checkpoint and the run ends exactly as an uninterrupted one; rerunning it with its latest checkpoint
damaged resumes from the older one Ray kept. A data error fails the run at once, without restarts.

Six fits on the session's local Ray instance (~30-60 s each on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
import torch
from prior_codes import write_codes

from nextscale.config import load_config
from nextscale.prior.config import PriorTrainConfig
from nextscale.tokenize.loader import save_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

STEPS, CKPT_EVERY, KILL_AT = 8, 3, 3


class KillRank1Once:
    """Mixin for the worker context: rank 1 dies (os._exit) once, after the checkpoint of step KILL_AT is
    committed, so the restart point is deterministic. ``marker`` (a file) makes it happen only once."""

    marker = ""

    def report(self, metrics, checkpoint_dir=None):
        import ray.train

        super().report(metrics, checkpoint_dir)
        if self.rank != 1 or metrics["step"] != KILL_AT or os.path.exists(self.marker):
            return
        deadline = time.time() + 60
        while time.time() < deadline:
            committed = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            if any(c.metrics.get("step") == KILL_AT for c in committed):
                break
            time.sleep(0.1)
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


class CountStarts:
    """Mixin for the worker context: every start of a worker appends its rank to the file ``starts``."""

    starts = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with open(self.starts, "a") as f:
            f.write(f"{self.rank}\n")


@pytest.fixture(scope="module")
def by_value():
    """The worker-context mixins of this module travel to the Ray workers by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["prior_codes"])


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ray-codes")
    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(root / "tokenizer.pt"))
    return write_codes(str(root / "codes"), str(root / "tokenizer.pt"), num_samples=32, views=2, seed=0)


def _cfg(codes: str, out: str, *extra: str) -> PriorTrainConfig:
    return load_config(PriorTrainConfig, None, [
        f"data.url={codes}", "data.batch_size=8", "model.preset=golden_tiny", "model.overrides.drop_path_rate=0.1",
        f"steps={STEPS}", "log_every=1", f"ckpt_every={CKPT_EVERY}", f"output={out}", "workers.count=2",
        "workers.max_failures=2", "optim.lr=1e-3", "optim.warmup_steps=2", "ray.num_cpus=2", *extra])


def _weights(out: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "prior.pt"), weights_only=True)["state_dict"]


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_worker_killed_mid_run_resumes_and_ends_like_an_uninterrupted_run(ray_local, by_value, codes, tmp_path):
    from nextscale.pipelines.train import RayTrainContext, fit, run_prior

    ref = run_prior(_cfg(codes, str(tmp_path / "ref")))
    assert (ref["steps"], ref["steps_trained"], ref["workers"]) == (STEPS, STEPS, 2)

    marker = str(tmp_path / "killed")
    killer = type("Killer", (KillRank1Once, RayTrainContext), {"marker": marker})
    cfg = _cfg(codes, str(tmp_path / "cut"))
    result = fit("prior", cfg, context_cls=killer)
    assert os.path.exists(marker), "rank 1 was never killed"
    assert result.error is None and result.metrics["step"] == STEPS
    summary = json.loads(open(tmp_path / "cut" / "train_summary.json").read())
    # the restarted group resumed from the committed checkpoint of step KILL_AT
    assert (summary["steps"], summary["steps_trained"]) == (STEPS, STEPS - KILL_AT)
    assert _losses(str(tmp_path / "cut")) == _losses(str(tmp_path / "ref"))
    ref_w, cut_w = _weights(str(tmp_path / "ref")), _weights(str(tmp_path / "cut"))
    assert all(torch.equal(ref_w[k], cut_w[k]) for k in ref_w)

    # the latest checkpoint (step 8) is damaged in storage: the same command again finds the run by its name,
    # skips that checkpoint for the older one Ray kept (step 6) and ends equal to the uninterrupted run
    latest = os.path.join(result.checkpoint.path, "state.pt")
    with open(latest, "rb") as f:
        data = f.read()
    with open(latest, "wb") as f:
        f.write(data[: len(data) // 2])
    again = run_prior(cfg)
    assert (again["steps"], again["steps_trained"]) == (STEPS, STEPS - 2 * CKPT_EVERY)
    assert _losses(str(tmp_path / "cut")) == _losses(str(tmp_path / "ref"))
    assert all(torch.equal(ref_w[k], v) for k, v in _weights(str(tmp_path / "cut")).items())


def test_fsdp_worker_killed_mid_run_resumes_bitwise_like_an_uninterrupted_run(ray_local, by_value, codes, tmp_path):
    """Every rank writes its shards of the model and optimizer (torch.distributed.checkpoint) and reports its
    folder; Ray Train merges them into one checkpoint, from which the restarted group resumes."""
    from nextscale.pipelines.train import RayTrainContext, fit

    steps = 2 * KILL_AT  # one checkpoint before the kill, one at the end
    args = ("workers.strategy=fsdp", f"steps={steps}", f"ckpt_every={KILL_AT}")
    ref = fit("prior", _cfg(codes, str(tmp_path / "ref"), *args))
    killer = type("Killer", (KillRank1Once, RayTrainContext), {"marker": str(tmp_path / "killed")})
    cut = fit("prior", _cfg(codes, str(tmp_path / "cut"), *args), context_cls=killer)
    assert os.path.exists(tmp_path / "killed"), "rank 1 was never killed"
    summary = json.loads(open(tmp_path / "cut" / "train_summary.json").read())
    assert (summary["steps"], summary["steps_trained"]) == (steps, steps - KILL_AT)
    assert sorted(os.listdir(os.path.join(cut.checkpoint.path, "shards"))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # both ranks' shards in the one checkpoint
    assert _losses(str(tmp_path / "cut")) == _losses(str(tmp_path / "ref")) and ref.metrics["step"] == steps
    ref_w, cut_w = _weights(str(tmp_path / "ref")), _weights(str(tmp_path / "cut"))
    assert ref_w.keys() == cut_w.keys() and all(torch.equal(ref_w[k], cut_w[k]) for k in ref_w)


def test_a_data_error_fails_the_run_at_once_without_restarts(ray_local, by_value, codes, tmp_path):
    from nextscale.codes import CodesError, Manifest, build_shard, iter_shard, sha256
    from nextscale.pipelines.train import RayTrainContext, fit

    # a shard holding codes outside the vocabulary (its checksum matches: only the vocabulary check can tell)
    damaged = tmp_path / "codes"
    shutil.copytree(codes, damaged)
    manifest = Manifest.read(str(damaged))
    shard = manifest.shards[-1]
    data = build_shard((key, codes_KL + manifest.vocab_size, label)
                       for key, codes_KL, label in iter_shard(str(damaged / shard.name)))
    (damaged / shard.name).write_bytes(data)
    shard.sha256 = sha256(data)
    manifest.write(str(damaged))

    counter = type("Counter", (CountStarts, RayTrainContext), {"starts": str(tmp_path / "starts")})
    with pytest.raises(CodesError, match=f"{shard.name}: sample .* holds code .* outside the vocabulary of 64"):
        fit("prior", _cfg(str(damaged), str(tmp_path / "out"), "workers.max_failures=3"), context_cls=counter)
    assert sorted(open(tmp_path / "starts").read().split()) == ["0", "1"]  # one start of the group, no restart


def test_only_what_a_restart_may_cure_is_retried():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from nextscale.codes import CodesError, ReadFailed
    from nextscale.pipelines.train import restart_may_help

    def failed(*errors) -> WorkerGroupError:  # as Ray Train reports them: what each worker's code raised, or its death
        return WorkerGroupError("x", dict(enumerate(errors)))

    lost = WorkerHealthCheckFailedError("worker died", ActorDiedError())
    peer_lost = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer")
    assert restart_may_help(failed(peer_lost, lost))  # a worker died; its peer's collective broke
    assert restart_may_help(failed(ReadFailed("s3 read timed out"), peer_lost))
    assert restart_may_help(failed(TimeoutError("storage"), ConnectionResetError("reset by peer")))
    assert restart_may_help(failed(torch.distributed.DistBackendError("NCCL timeout")))
    assert not restart_may_help(failed(CodesError("codes-000001.tar: code 70 outside the vocabulary"), peer_lost))
    assert not restart_may_help(failed(peer_lost, TypeError("a bug")))
    assert not restart_may_help(failed(FileNotFoundError("gone"), lost))
