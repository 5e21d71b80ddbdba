"""Transient object-store errors while training: the code loader retries a shard read with backoff and ends
with exactly the batches (and train-prior with exactly the losses and weights) of an undisturbed run.

The store is the real moto S3 server behind tests/faulty_proxy.py, which answers 503, drops connections or
cuts responses short for a bounded number of shard GETs. botocore's own retries are switched off
(AWS_MAX_ATTEMPTS=1) so that the faults reach nextscale's reader instead of being absorbed below it. The
undisturbed reference reads the same files from local disk (every S3 call costs ~1 s on the shared CI cores).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from faulty_proxy import FaultyProxy
from prior_codes import write_codes

from nextscale import storage
from nextscale.codes import ReadFailed, read_shard, write_synthetic_shards
from nextscale.prior.data import CodeLoader


def _on_shard(name: str):
    return lambda method, path: method == "GET" and name in path


def _batches(loader: CodeLoader) -> list:
    return [(c.tolist(), lab.tolist()) for c, lab in loader]


def _upload(folder, url: str, endpoint: str) -> str:
    """The files of a local codes folder to ``url`` (s3://bucket/prefix) with one client."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    for path in folder.iterdir():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return url


def test_loader_rides_out_a_flaky_object_store(s3_server, s3_bucket, tmp_path, monkeypatch, caplog):
    write_synthetic_shards(str(tmp_path), num_samples=90, num_tokens=30, vocab_size=64, views=2, samples_per_shard=30)
    url = _upload(tmp_path, f"{s3_bucket}/codes", s3_server)
    kw = dict(batch_size=8, seed=1, shuffle_buffer=16, read_backoff_s=0.05)
    reference = _batches(CodeLoader(str(tmp_path), **kw))

    # 503s reach the reader at once; dropped and cut responses are retried by s3fs first, 5 times
    faults = ["503", "drop", "cut", "503"] + ["cut"] * 5
    with FaultyProxy(s3_server, faults, _on_shard("codes-000001.tar")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        with caplog.at_level(logging.WARNING, logger="nextscale.codes"):
            disturbed = _batches(CodeLoader(url, **kw))
        assert not proxy.faults and len(proxy.served) == 9  # every fault was injected
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) >= 2 and all("codes-000001.tar" in m for m in retries), retries
    assert disturbed == reference

    # an outage longer than the retries: one error naming the shard, after `attempts` tries
    with FaultyProxy(s3_server, ["503"] * 3, _on_shard("codes-000002.tar")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(ReadFailed, match=r"reading .*codes-000002.tar failed 3 times in a row.*storage is "
                                             r"reachable"):
            read_shard(f"{url}/codes-000002.tar", attempts=3, backoff_s=0.01)


def test_train_prior_on_a_flaky_object_store_equals_an_undisturbed_run(s3_server, s3_bucket, tmp_path, monkeypatch):
    from nextscale.config import load_config
    from nextscale.prior.config import PriorTrainConfig
    from nextscale.prior.engine import train_prior
    from nextscale.runtime import LocalContext
    from nextscale.tokenize.loader import save_tokenizer
    from nextscale.tokenize.vqvae import build_vqvae

    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(tmp_path / "tokenizer.pt"))
    local = write_codes(str(tmp_path / "codes"), str(tmp_path / "tokenizer.pt"), num_samples=16, views=1, seed=0,
                        samples_per_shard=8)
    remote = _upload(tmp_path / "codes", f"{s3_bucket}/codes", s3_server)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def train(url: str, out: str) -> tuple[list[float], dict]:
        cfg = load_config(PriorTrainConfig, None, [
            f"data.url={url}", "data.batch_size=4", "data.loader_processes=0", "model.preset=golden_tiny", "steps=4",
            "log_every=1", "ckpt_every=100", f"output={out}", "workers.count=0"])
        train_prior(cfg, LocalContext(cfg.output))
        losses = [json.loads(line)["loss"] for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
        return losses, torch.load(f"{out}/prior.pt", weights_only=True)["state_dict"]

    try:
        ref_losses, ref_weights = train(local, str(tmp_path / "ref"))
        # 4 steps of 4 samples: one epoch over both shards; the faults hit the one read of shard 1 (the 503 reaches
        # the loader, which waits 1 s; s3fs retries the cut and the dropped response itself)
        with FaultyProxy(s3_server, ["503", "cut", "drop"], _on_shard("codes-000001.tar")) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
            losses, weights = train(remote, str(tmp_path / "flaky"))
            assert not proxy.faults
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 4 and losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
