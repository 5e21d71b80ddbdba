"""The codes contract (nextscale.codes): deterministic tar bytes, sample round trip, a strict manifest,
resume records and index.parquet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nextscale import codes, storage


def _samples(n: int, K: int = 2, L: int = 30, V: int = 4096) -> list:
    rng = np.random.default_rng(0)
    return [(f"n0144/img_{i}", rng.integers(0, V, (K, L), dtype=np.uint16), i % 3) for i in range(n)]


def test_shard_round_trip_and_deterministic_bytes(tmp_path):
    samples = _samples(5)
    data = codes.build_shard(samples)
    # the bytes the format has always had (sha256 of these samples as written by the first release): existing
    # shards stay valid and reruns stay byte-identical
    assert codes.sha256(data) == "232a64176d98d7e0f1b2a6d4fef3bd43b1672a6df62615ad6fd155a99fd8a577"
    path = tmp_path / codes.shard_name(0)
    path.write_bytes(data)
    back = list(codes.iter_shard(str(path)))
    assert [k for k, _, _ in back] == [k for k, _, _ in samples]
    for (_, c0, l0), (_, c1, l1) in zip(samples, back):
        assert c1.dtype == np.uint16 and c1.shape == (2, 30) and (c0 == c1).all() and l0 == l1
    assert codes.shard_name(123) == "codes-000123.tar" and codes.part_name("codes-000123.tar") == "parts/codes-000123.json"


def test_shard_is_a_webdataset_tar(tmp_path):
    import webdataset as wds

    samples = _samples(3)
    path = tmp_path / codes.shard_name(0)
    path.write_bytes(codes.build_shard(samples))
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in got] == [k for k, _, _ in samples]
    assert sorted(got[0]) == ["__key__", "__local_path__", "__url__", "cls", "codes.npy"]
    assert int(got[1]["cls"]) == 1
    assert (codes.decode_codes(got[2]["codes.npy"]) == samples[2][1]).all()
    assert (np.load(__import__("io").BytesIO(got[2]["codes.npy"])) == samples[2][1]).all()  # plain numpy too


def test_bad_shards_and_codes_are_refused(tmp_path):
    (tmp_path / "codes-000007.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(codes.CodesError, match=r"codes-000007.tar is not a valid code shard.*nextscale tokenize"):
        list(codes.iter_shard(str(tmp_path / "codes-000007.tar")))
    with pytest.raises(ValueError, match="duplicate sample key"):
        codes.build_shard(_samples(2)[:1] * 2)
    with pytest.raises(ValueError, match="uint16"):
        codes.encode_codes(np.array([[70000]]))


def test_sanitize_key_keeps_webdataset_keys_unambiguous():
    assert codes.sanitize_key("n01/a.b c") == "n01/a_b_c"  # readers split member names at the first dot
    assert codes.sanitize_key("n02966687/n02966687_carpenter's_kit") == "n02966687/n02966687_carpenter's_kit"


def test_manifest_and_index_round_trip(tmp_path):
    m = codes.write_synthetic_shards(str(tmp_path), num_samples=25, num_tokens=30, vocab_size=64, views=2,
                                     samples_per_shard=10, num_classes=4)
    assert [s.name for s in m.shards] == ["codes-000000.tar", "codes-000001.tar", "codes-000002.tar"]
    assert [s.num_samples for s in m.shards] == [10, 10, 5]
    assert m.num_samples == 25 and m.num_classes == 4
    for s in m.shards:
        assert codes.sha256((tmp_path / s.name).read_bytes()) == s.sha256
    text = storage.read_text(str(tmp_path / codes.MANIFEST))
    assert json.loads(text)["num_classes"] == 4  # derived, written for readers of the JSON
    assert codes.Manifest.read(str(tmp_path)) == m
    assert m.to_json() == text  # stable serialisation: reruns write identical manifests
    rows = [{"key": "a", "label": 1, "source": "s3://b/a.jpg", "shard": "codes-000000.tar", "status": "accepted",
             "reason": ""},
            {"key": "b", "label": -1, "source": "s3://b/b.txt", "shard": "", "status": "rejected",
             "reason": "not an image"}]
    def index_bytes(shards):
        writer = codes.IndexWriter()
        for shard_rows in shards:
            writer.add(shard_rows)
        return writer.getvalue()

    data = index_bytes([rows[:1], [], rows[1:]])
    assert data == index_bytes([rows[:1], [], rows[1:]])
    storage.write_bytes(str(tmp_path / codes.INDEX), data)
    assert codes.read_index(str(tmp_path)).to_pylist() == rows


# a manifest.json as `nextscale tokenize` wrote it before the contract moved to nextscale.codes
V1_MANIFEST = {
    "augmentation": {"crop_ratio": 1.125, "flip": False, "interpolation": "lanczos", "name": "official", "seed": 0},
    "classes": ["cat", "dog"], "dtype": "uint16", "format": "nextscale-codes/1", "image_size": 64,
    "input": {"format": "imagefolder", "url": "/data/in"}, "num_classes": 2, "num_listed": 3, "num_rejected": 1,
    "num_samples": 2, "num_tokens": 30, "patch_nums": [1, 2, 3, 4], "precision": "fp32",
    "rejected": [{"key": "cat/broken", "reason": "not an image, cannot identify image file", "source": "/data/in/x"}],
    "samples_per_shard": 4,
    "shards": [{"name": "codes-000000.tar", "num_rejected": 1, "num_samples": 2, "sha256": "ab" * 32}],
    "tokenizer": {"config": {"z_channels": 8}, "kind": "random_init", "preset": "demo", "seed": 0,
                  "sha256": "cd" * 32, "url": ""},
    "views": 2, "vocab_size": 64,
}


def test_existing_manifest_loads_and_a_damaged_one_is_named(tmp_path):
    storage.write_text(str(tmp_path / codes.MANIFEST), json.dumps(V1_MANIFEST))
    m = codes.Manifest.read(str(tmp_path))
    assert (m.num_samples, m.num_classes, m.shards[0].num_rejected, m.tokenizer["preset"]) == (2, 2, 1, "demo")
    assert json.loads(m.to_json()) == V1_MANIFEST

    where = str(tmp_path / codes.MANIFEST)
    for field in ("num_samples", "vocab_size", "shards"):
        storage.write_text(where, json.dumps({k: v for k, v in V1_MANIFEST.items() if k != field}))
        with pytest.raises(codes.CodesError, match=rf"manifest.json has no '{field}' field.*re-run `nextscale tokenize`"):
            codes.Manifest.read(str(tmp_path))
    storage.write_text(where, json.dumps({**V1_MANIFEST, "num_samples": "2"}))
    with pytest.raises(codes.CodesError, match="field 'num_samples' is '2', not a int"):
        codes.Manifest.read(str(tmp_path))
    storage.write_text(where, json.dumps({**V1_MANIFEST, "shards": [{"name": "codes-000000.tar", "num_samples": 2}]}))
    with pytest.raises(codes.CodesError, match=r"shards\[0\].sha256 is None"):
        codes.Manifest.read(str(tmp_path))
    storage.write_text(where, json.dumps(V1_MANIFEST)[:200])  # truncated
    with pytest.raises(codes.CodesError, match=r"manifest.json is not valid JSON.*truncated.*nextscale tokenize"):
        codes.Manifest.read(str(tmp_path))
    with pytest.raises(codes.CodesError, match=r"no manifest.json under .*nowhere.*nextscale tokenize"):
        codes.Manifest.read(str(tmp_path / "nowhere"))
    # dtype and format have defaults: manifests predating them load
    trimmed = {k: v for k, v in V1_MANIFEST.items() if k not in ("dtype", "format")}
    assert codes.Manifest.from_dict(trimmed).dtype == "uint16"


def test_manifest_check_names_the_mismatch():
    import dataclasses
    import types

    from nextscale.tokenize.vqvae import VQVAE_PRESETS

    cfg = VQVAE_PRESETS["golden_tiny"]
    m = codes.Manifest.from_dict({**V1_MANIFEST, "vocab_size": cfg.vocab_size, "patch_nums": list(cfg.patch_nums),
                                  "image_size": cfg.image_size, "num_tokens": cfg.num_tokens,
                                  "tokenizer": {**V1_MANIFEST["tokenizer"], "config": {"z_channels": cfg.z_channels}}})
    m.check(cfg, tokenizer_sha256="cd" * 32)
    with pytest.raises(codes.ManifestMismatch, match=f"vocab_size={cfg.vocab_size} but the tokenizer has vocab_size=7"):
        m.check(dataclasses.replace(cfg, vocab_size=7))
    with pytest.raises(codes.ManifestMismatch, match="patch_nums"):
        m.check(types.SimpleNamespace(**{**dataclasses.asdict(cfg), "patch_nums": (1, 2, 3, 5),
                                         "num_tokens": cfg.num_tokens}))
    with pytest.raises(codes.ManifestMismatch, match="z_channels"):
        m.check(dataclasses.replace(cfg, z_channels=cfg.z_channels + 1))
    with pytest.raises(codes.ManifestMismatch, match="sha256"):
        m.check(cfg, tokenizer_sha256="ef" * 32)


def test_resume_records(tmp_path):
    out = str(tmp_path)
    samples = _samples(2)
    records = [{"key": k, "source": f"/in/{k}.jpg", "label": lab, "status": "accepted", "reason": ""}
               for k, _, lab in samples] + [{"key": "bad", "source": "/in/bad.jpg", "label": 0,
                                            "status": "rejected", "reason": "not an image"}]
    assert codes.finished_part(out, 3, fingerprint="f", inputs="i") is None  # nothing yet
    part = codes.publish_shard(out, 3, samples, records, fingerprint="f", inputs="i")
    assert (tmp_path / "codes-000003.tar").read_bytes() == codes.build_shard(samples)
    assert part["sha256"] == codes.sha256(codes.build_shard(samples)) and part["num_samples"] == 2
    assert codes.finished_part(out, 3, fingerprint="f", inputs="i") == part
    assert codes.finished_part(out, 3, fingerprint="f", inputs="other") is None  # inputs changed: redo
    with pytest.raises(codes.CodesError, match="codes-000003.tar from a different job"):
        codes.finished_part(out, 3, fingerprint="g", inputs="i")
    (tmp_path / "codes-000003.tar").write_bytes(codes.build_shard(samples[:1]))
    assert codes.finished_part(out, 3, fingerprint="f", inputs="i") is None  # damaged: redo
    assert codes.read_part(out, "codes-000003.tar") == part
    assert codes.shard_info(part) == codes.ShardInfo(name="codes-000003.tar", num_samples=2, sha256=part["sha256"],
                                                     num_rejected=1)
    assert [(r["key"], r["shard"], r["status"]) for r in codes.part_rows(part)] == [
        ("n0144/img_0", "codes-000003.tar", "accepted"), ("n0144/img_1", "codes-000003.tar", "accepted"),
        ("bad", "", "rejected")]
