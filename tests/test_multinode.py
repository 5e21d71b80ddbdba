"""The tokenize job on a two-node Ray cluster (``ray.cluster_utils.Cluster``, custom resources per node):
decode tasks spread over both nodes that advertise ``decode``, the encoder lands on the ``encode`` node,
and removing a node in the middle of the job is survived with outputs equal to an uninterrupted run.

The cluster lives in a subprocess (this file run as a script), so it never meets the session's
``ray_local`` instance. Each task and actor appends its node id to a record folder (test
instrumentation only; the job itself moves data through S3 and the object store).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLASSES, PER_CLASS, PER_SHARD = 2, 6, 2  # 12 images -> 6 shards -> 6 decode tasks
# a decode task on the doomed node stalls this long: far longer than the watcher needs to remove the node
STALL_S = 120.0


def _make_images(root_url: str) -> None:
    import numpy as np
    from PIL import Image

    from nextscale import storage

    for c in range(CLASSES):
        for j in range(PER_CLASS):
            rng = np.random.default_rng((c, j))
            img = Image.fromarray(rng.integers(0, 256, (70 + j, 90, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            storage.write_bytes(storage.join(root_url, f"class{c}/img{j:02d}.jpg"), buf.getvalue())


# ------------------------------------------------------------------------------------------------
# The scenario (runs in the subprocess)


def _record(folder: str, kind: str, **extra) -> None:
    import ray

    node = ray.get_runtime_context().get_node_id()
    Path(folder, f"{kind}-{uuid.uuid4().hex}.json").write_text(json.dumps({"kind": kind, "node": node, **extra}))


def _records(folder: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def _instrument(tj, run: dict) -> None:
    """Wrap the job's decode function and encoder actor so they report where they ran.

    ``run`` ({"folder", "stall_node"}) is captured by value each time Ray pickles the wrappers for a job.
    """
    import ray

    original_read = tj.read_and_views

    def read_and_views(batch, **kw):
        _record(run["folder"], "decode", shard=json.loads(batch["task"][0])["index"])
        if ray.get_runtime_context().get_node_id() == run["stall_node"]:
            time.sleep(STALL_S)  # in flight until that node is removed (it never ends: the node dies first)
        yield from original_read(batch, **kw)

    class Encoder(tj.ShardChunkEncoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _record(run["folder"], "encoder")

        def __call__(self, batch):
            _record(run["folder"], "encode", shard=int(batch["shard"][0]))
            return super().__call__(batch)

    tj.read_and_views = read_and_views
    tj.ShardChunkEncoder = Encoder


def scenario(bucket: str, workdir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    import nextscale.pipelines.tokenize as tj
    from nextscale import storage
    from nextscale.tokenize.job_config import TokenizeConfig

    mb = 1024**2
    # the head is the node that stays (the driver's node cannot be removed); a removed node is declared dead after
    # 5 failed health checks: every 0.5 s instead of Ray's 3 s, each still allowed Ray's 10 s to answer
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"decode": 1, "encode": 1}, "include_dashboard": False,
        "object_store_memory": 80 * mb, "_system_config": {"health_check_period_ms": 500}})
    keeper = cluster.head_node
    doomed = cluster.add_node(num_cpus=2, resources={"decode": 2}, object_store_memory=80 * mb)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        images = f"{bucket}/images"
        _make_images(images)
        run_cfg = {"folder": "", "stall_node": ""}
        _instrument(tj, run_cfg)

        def job(output: str) -> dict:
            cfg = TokenizeConfig(input=images, output=output, tokenizer="golden_tiny", samples_per_shard=PER_SHARD,
                                 batch_size=2, device="cpu", num_encoders=1, encoder_num_cpus=1.0,
                                 decode_resources={"decode": 1}, encoder_resources={"encode": 1})
            return tj.run(cfg)

        # 1. uninterrupted, both nodes up
        run_cfg.update(folder=str(Path(workdir, "ref")), stall_node="")
        Path(run_cfg["folder"]).mkdir()
        ref_summary = job(f"{bucket}/ref")

        # 2. the node holding two thirds of the decode slots disappears after its first decode task began
        run_cfg.update(folder=str(Path(workdir, "kill")), stall_node=doomed.node_id)
        Path(run_cfg["folder"]).mkdir()
        removed_at: dict = {}

        def remove_when_busy() -> None:
            deadline = time.time() + 240
            while time.time() < deadline:
                if any(r["node"] == doomed.node_id for r in _records(run_cfg["folder"]) if r["kind"] == "decode"):
                    removed_at["decode_records"] = len(_records(run_cfg["folder"]))
                    cluster.remove_node(doomed, allow_graceful=False)
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=remove_when_busy, daemon=True)
        watcher.start()
        kill_summary = job(f"{bucket}/kill")
        watcher.join(timeout=60)

        def listing(url: str) -> dict[str, str]:
            from nextscale.codes import sha256

            return {n: sha256(storage.read_bytes(storage.join(url, n)))
                    for n in storage.listdir(url) if n.endswith((".tar", ".parquet"))}

        return {
            "nodes": {"doomed": doomed.node_id, "keeper": keeper.node_id},
            "ref": {"records": _records(str(Path(workdir, "ref"))), "summary": ref_summary,
                    "files": listing(f"{bucket}/ref"), "manifest": json.loads(storage.read_text(f"{bucket}/ref/manifest.json"))},
            "kill": {"records": _records(str(Path(workdir, "kill"))), "summary": kill_summary, "removed_at": removed_at,
                     "files": listing(f"{bucket}/kill"), "manifest": json.loads(storage.read_text(f"{bucket}/kill/manifest.json"))},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# The test (pytest process)


@pytest.mark.slow
def test_tokenize_spreads_over_nodes_and_survives_losing_one(s3_bucket, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, __file__, s3_bucket, str(tmp_path), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=540, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    doomed, keeper = result["nodes"]["doomed"], result["nodes"]["keeper"]
    shards = CLASSES * PER_CLASS // PER_SHARD

    # placement: decoding on both "decode" nodes, the encoder actor only on the "encode" node
    ref = result["ref"]
    decode_nodes = {r["node"] for r in ref["records"] if r["kind"] == "decode"}
    assert decode_nodes == {doomed, keeper}
    assert {r["node"] for r in ref["records"] if r["kind"] in ("encoder", "encode")} == {keeper}
    assert sorted(r["shard"] for r in ref["records"] if r["kind"] == "decode") == list(range(shards))
    assert ref["summary"]["shards"] == shards and ref["summary"]["accepted"] == CLASSES * PER_CLASS

    # losing the node mid-job: retried on the survivor, outputs complete and identical to the uninterrupted run
    kill = result["kill"]
    assert kill["removed_at"], "the node was never removed"
    decodes = [r for r in kill["records"] if r["kind"] == "decode"]
    assert any(r["node"] == doomed for r in decodes)
    assert len(decodes) > shards, "no decode task was retried after the node died"
    assert {r["shard"] for r in decodes} == set(range(shards))
    assert kill["summary"]["shards"] == shards and kill["summary"]["accepted"] == CLASSES * PER_CLASS
    assert len([n for n in kill["files"] if n.startswith("codes-")]) == shards
    assert kill["files"] == ref["files"]  # every shard and index.parquet byte-identical
    assert kill["manifest"] == ref["manifest"]


if __name__ == "__main__":
    bucket_url, work, result_path = sys.argv[1:4]
    Path(result_path).write_text(json.dumps(scenario(bucket_url, work)))
