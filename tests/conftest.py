"""Shared fixtures: a real moto S3 server on 127.0.0.1, one local Ray instance per session, ../shared/data."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# as nextscale.pipelines.common.init_ray sets for a local instance: no preemption watcher actor (one more process
# importing Ray Train at every worker-group start) polling for cloud drains a local instance never has
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray workers import the repository's package from the working tree, like the driver does
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server mode) on a free loopback port; the AWS_* variables point at it.

    Set before Ray starts so that Ray workers inherit the endpoint and credentials.
    Yields the endpoint URL. Create buckets with ``s3_bucket``.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh empty bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray instance for the whole session (2 cores: starting one is expensive)."""
    import ray

    ray.init(
        address="local", num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=300 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real ImageNet photos, MNIST); skipped where the repository stands alone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: these tests need the shared real-image data (CI has it)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores a second thread makes tiny steps ~50x slower under contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_network_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


sys.path.insert(0, str(Path(__file__).parent))
