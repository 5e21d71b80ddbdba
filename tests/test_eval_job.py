"""make fid on a local Ray instance: tiny prior, deterministic test extractor; 1 vs 2 actors give identical results."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import strict_json
from eval_models import write_tiny_models
from PIL import Image

from nextscale.config import load_config
from nextscale.eval.config import FidConfig


def _reference_folder(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{j}.png")


def test_reference_items_from_tar_shards(tmp_path):
    from nextscale.pipelines.fid import list_reference_items, load_reference_images

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "ref-000000.tar", "w") as tar:
        for j in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 30, 3), 40 * j, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"s{j}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            info = tarfile.TarInfo(f"s{j}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
        info = tarfile.TarInfo("s3.png")  # damaged: left out with its reason, the others still count
        info.size = len(buf.getvalue()) // 2
        tar.addfile(info, io.BytesIO(buf.getvalue()[: info.size]))
    items = list_reference_items(str(shards))
    assert items == [str(shards / "ref-000000.tar")]
    out = load_reference_images({"item": np.array([0]), "url": np.array(items)}, size=16)
    assert out["image"].shape == (4, 16, 16, 3) and out["key"].tolist() == [0, 1, 2, 3]
    assert out["image"][2].mean() == 80
    assert out["rejected"][:3].tolist() == ["", "", ""]
    assert "ref-000000.tar:s3.png: corrupt or truncated image" in out["rejected"][3]


@pytest.mark.ray
def test_fid_job_is_identical_with_one_or_two_actors(ray_local, tmp_path):
    from nextscale.pipelines.fid import run

    prior, tokenizer = write_tiny_models(tmp_path / "models")
    _reference_folder(tmp_path / "ref")
    (tmp_path / "ref" / "c1" / "9.png").write_bytes((tmp_path / "ref" / "c1" / "0.png").read_bytes()[:60])  # damaged
    common = [f"models.prior_url={prior}", f"models.tokenizer_url={tokenizer}", "num_samples=11",
              "num_classes=10", "samples_per_class=2", "group_size=4", "sampling.guidance=1.5", "sampling.top_k=0", "sampling.top_p=0.0",
              "feature_batch_size=3", "device=cpu", "cpus_per_actor=0.5",
              "save_npz=true"]
    # run one asks for Inception without weights and falls back to the test extractor that run two asks for
    one = run(load_config(FidConfig, None, common + [
        "feature_extractor=inception-v3-compat", f"inception_weights={tmp_path / 'absent.pth'}",
        "feature_fallback=random-conv-test", f"reference.images={tmp_path / 'ref'}", "num_sampler_actors=1", "num_feature_actors=1",
        f"output={tmp_path / 'one'}"]))
    # the second run also reads the first run's reference_stats.npz (the npz reference path)
    two = run(load_config(FidConfig, None, common + [
        "feature_extractor=random-conv-test", f"reference.npz={tmp_path / 'one' / 'reference_stats.npz'}", "num_sampler_actors=2",
        "num_feature_actors=2", f"output={tmp_path / 'two'}"]))

    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert a["arr_0"].shape == (11, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert a["labels"].tolist() == [i // 2 % 10 for i in range(11)]
    assert one["sample_stats_sha"] == two["sample_stats_sha"]
    assert one["feature_extractor"] == "random-conv-test" and "absent.pth" in one["feature_fallback_reason"]
    assert two["feature_fallback_reason"] == ""
    for key in ("fid", "inception_score", "precision", "recall"):
        assert one[key] == two[key], key
    assert np.isfinite(one["fid"]) and one["fid"] > 0 and 1.0 <= one["inception_score"] <= 10.0
    assert 0.0 <= one["precision"] <= 1.0 and 0.0 <= one["recall"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())[:2] == ["000000.png", "000001.png"]
    with Image.open(tmp_path / "one" / "samples" / "000010.png") as im:
        assert np.array_equal(np.asarray(im), a["arr_0"][10])
    saved = strict_json.loads((tmp_path / "two" / "fid.json").read_text())
    assert "fid.json" in strict_json.check_tree(tmp_path / "one")
    assert saved["fid"] == two["fid"] and saved["sampler_actors"] == 2
    ref = np.load(tmp_path / "one" / "reference_stats.npz")
    assert ref["features"].shape == (12, 64) and ref["mu"].shape == (64,)  # 13 files, the damaged one left out
    assert one["reference_rejected"]["count"] == 1 and "c1/9.png: corrupt or truncated" in one["reference_rejected"]["first"][0]
    assert two["reference_rejected"] == {"count": 0, "first": []}


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_fid_job_resumes_to_the_same_numbers(ray_local, tmp_path):
    """A driver killed mid-run leaves whole groups behind; the rerun samples only the others and ends with
    the numbers and images of an uninterrupted run; a third run samples nothing."""
    from nextscale.pipelines.fid import groups_store, run, stored_groups

    prior, tokenizer = write_tiny_models(tmp_path / "models")
    _reference_folder(tmp_path / "ref")
    args = [f"models.prior_url={prior}", f"models.tokenizer_url={tokenizer}", "num_samples=12", "num_classes=4",
            "samples_per_class=3", "group_size=1", "sampling.top_k=0", "sampling.top_p=0.0",
            "feature_extractor=random-conv-test", "device=cpu", "cpus_per_actor=0.5", "num_sampler_actors=1",
            "num_feature_actors=1", "save_npz=true"]
    whole = run(load_config(FidConfig, None, args + [f"reference.images={tmp_path / 'ref'}", f"output={tmp_path / 'whole'}"]))
    assert (whole["groups_resumed"], whole["groups_sampled"]) == (0, 12)

    # the reruns read the reference statistics the whole run wrote (the same numbers as the images give, see the
    # test above), so that they pay for no reference actors and the third run starts no actor at all
    args.append(f"reference.npz={tmp_path / 'whole' / 'reference_stats.npz'}")
    out = tmp_path / "killed"
    cfg = load_config(FidConfig, None, args + [f"output={out}"])
    store = groups_store(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "job.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nextscale.cli", "fid", *args, f"output={out}"], cwd=tmp_path,
                                env=env, start_new_session=True, stdout=log, stderr=log)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not stored_groups(store):
                time.sleep(0.05)
            assert proc.poll() is None, "the job ended before it stored a group:\n" + \
                (tmp_path / "job.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stored = stored_groups(store)
    assert 1 <= len(stored) < 12 and not (out / "fid.json").exists()

    resumed = run(cfg)
    assert (resumed["groups_resumed"], resumed["groups_sampled"]) == (len(stored), 12 - len(stored))
    for key in ("sample_stats_sha", "fid", "inception_score", "precision", "recall"):
        assert resumed[key] == whole[key], key
    with np.load(out / "samples.npz") as a, np.load(tmp_path / "whole" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    again = run(cfg)
    assert (again["groups_resumed"], again["groups_sampled"]) == (12, 0) and again["fid"] == whole["fid"]
    # another sampling protocol (here the seed) never reuses these groups
    assert groups_store(load_config(FidConfig, None, args + [f"output={out}", "seed=1"])) != store
