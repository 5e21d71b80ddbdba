"""The code-shard contract: deterministic tar bytes, sample round trip, manifest JSON and index.parquet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nextscale import storage
from nextscale.tokenize import shards as sh


def _samples(n: int, K: int = 2, L: int = 30, V: int = 4096) -> list:
    rng = np.random.default_rng(0)
    return [(f"n0144/img_{i}", rng.integers(0, V, (K, L), dtype=np.uint16), i % 3) for i in range(n)]


def test_shard_round_trip_and_deterministic_bytes():
    samples = _samples(5)
    data = sh.build_shard(samples)
    assert data == sh.build_shard(samples)  # same samples, same bytes: reruns are byte-identical
    back = sh.read_shard(data)
    assert [k for k, _, _ in back] == [k for k, _, _ in samples]
    for (_, c0, l0), (_, c1, l1) in zip(samples, back):
        assert c1.dtype == np.uint16 and c1.shape == (2, 30) and (c0 == c1).all() and l0 == l1
    assert sh.shard_name(123) == "codes-000123.tar"


def test_shard_is_a_webdataset_tar(tmp_path):
    import webdataset as wds

    samples = _samples(3)
    path = tmp_path / sh.shard_name(0)
    path.write_bytes(sh.build_shard(samples))
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in got] == [k for k, _, _ in samples]
    assert sorted(got[0]) == ["__key__", "__local_path__", "__url__", "cls", "codes.npy"]
    assert int(got[1]["cls"]) == 1
    assert (sh.decode_codes(got[2]["codes.npy"]) == samples[2][1]).all()


def test_bad_shards_and_codes_are_refused():
    with pytest.raises(sh.ShardError, match="not a valid code shard"):
        sh.read_shard(b"garbage" * 100, "codes-000007.tar")
    with pytest.raises(ValueError, match="duplicate sample key"):
        sh.build_shard(_samples(2)[:1] * 2)
    with pytest.raises(ValueError, match="uint16"):
        sh.encode_codes(np.array([[70000]]))


def test_sanitize_key_keeps_webdataset_keys_unambiguous():
    assert sh.sanitize_key("n01/a.b c") == "n01/a_b_c"  # readers split member names at the first dot
    assert sh.sanitize_key("n02966687/n02966687_carpenter's_kit") == "n02966687/n02966687_carpenter's_kit"


def test_manifest_and_index_round_trip(tmp_path):
    m = sh.write_synthetic_shards(str(tmp_path), num_samples=25, num_tokens=30, vocab_size=64, views=2,
                                  samples_per_shard=10, num_classes=4)
    assert [s["name"] for s in m["shards"]] == ["codes-000000.tar", "codes-000001.tar", "codes-000002.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [10, 10, 5]
    assert m["num_samples"] == 25 and m["num_classes"] == 4
    for s in m["shards"]:
        assert sh.sha256((tmp_path / s["name"]).read_bytes()) == s["sha256"]
    text = storage.read_text(str(tmp_path / sh.MANIFEST))
    manifest = sh.Manifest.from_dict(json.loads(text))
    assert manifest.to_json() == text  # stable serialisation: reruns write identical manifests
    rows = [{"key": "a", "label": 1, "source": "s3://b/a.jpg", "shard": "codes-000000.tar", "status": "accepted",
             "reason": ""},
            {"key": "b", "label": -1, "source": "s3://b/b.txt", "shard": "", "status": "rejected",
             "reason": "not an image"}]
    data = sh.index_bytes(rows)
    assert data == sh.index_bytes(rows)
    storage.write_bytes(str(tmp_path / sh.INDEX), data)
    assert sh.read_index(str(tmp_path)).to_pylist() == rows
