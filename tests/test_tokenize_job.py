"""The tokenize job: bad inputs, end to end on local Ray (local disk and the moto S3 server), kill + resume
equals an uninterrupted run, and real ImageNet photos."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import strict_json
from PIL import Image

from nextscale import codes, storage
from nextscale.images import InputError, decode_image, list_image_folder, load_class_list, make_views
from nextscale.prior.data import CodeLoader
from nextscale.tokenize.encode import CodeEncoder
from nextscale.tokenize.job_config import TokenizeConfig
from nextscale.tokenize.vqvae import VQVAE_PRESETS

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = "golden_tiny"  # 64 px, L = 30, random weights from the seed


def _photo(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# key (relative path without extension) -> (file name, bytes, expected status, reason fragment)
def _bad_folder(root: Path) -> dict[str, tuple[str, str]]:
    jpg = _encode(_photo(0), "JPEG")
    files = {
        "cat/good": ("cat/good.jpg", jpg, "accepted", ""),
        "cat/grey": ("cat/grey.jpg", _encode(_photo(1).convert("L"), "JPEG"), "accepted", ""),
        "cat/cmyk": ("cat/cmyk.jpg", _encode(_photo(2).convert("CMYK"), "JPEG"), "accepted", ""),
        "cat/rgba": ("cat/rgba.png", _encode(_photo(3).convert("RGBA"), "PNG"), "accepted", ""),
        "cat/deep16": ("cat/deep16.png", _encode(Image.fromarray(
            (np.arange(90 * 70).reshape(70, 90) * 10).astype(np.uint16)), "PNG"), "accepted", ""),
        "cat/palette": ("cat/palette.png", _encode(_photo(4).convert("P"), "PNG", transparency=0), "accepted", ""),
        "dog/good_2": ("dog/good.2.jpg", _encode(_photo(5), "JPEG"), "accepted", ""),
        "dog/corrupt": ("dog/corrupt.jpg", jpg[:600] + bytes(40) + jpg[640:], "rejected", "corrupt"),
        "dog/truncated": ("dog/truncated.jpg", jpg[: len(jpg) // 2], "rejected", "truncated"),
        "dog/empty": ("dog/empty.jpg", b"", "rejected", "empty file"),
        "dog/fake": ("dog/fake.jpg", b"this is text, not a JPEG", "rejected", "not an image"),
        "dog/notes": ("dog/notes.txt", b"a stray note", "rejected", "not an image file"),
        "dog/tiny": ("dog/tiny.png", _encode(_photo(6, (8, 8)), "PNG"), "rejected", "too small"),
        "stray": ("stray.jpg", jpg, "rejected", "not inside a class folder"),
        "bird/unknown": ("bird/unknown.jpg", jpg, "rejected", "not in the class list"),
        "_hidden": (".hidden", b"not an input", "rejected", "hidden"),
    }
    for name, data, _, _ in files.values():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return {k: (status, reason) for k, (_, _, status, reason) in files.items()}


def _as_symlink_farm(root: Path, expected: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The folder of :func:`_bad_folder` with the class folder ``dog`` linked from a shared store and a link to a
    photo elsewhere (inputs like any other), a dangling link and a loop (rejected, saying which)."""
    store = root.parent / "store"
    store.mkdir()
    (root / "dog").rename(store / "dog")
    (root / "dog").symlink_to(store / "dog")
    (store / "photo.jpg").write_bytes(_encode(_photo(7), "JPEG"))
    (root / "cat" / "linked.jpg").symlink_to(store / "photo.jpg")
    (root / "cat" / "gone.jpg").symlink_to(store / "missing.jpg")
    (root / "cat" / "up").symlink_to(root)
    return {**expected, "cat/linked": ("accepted", ""), "cat/gone": ("rejected", "(dangling)"),
            "cat/up": ("rejected", "(a loop)")}


def _batch(task) -> dict[str, np.ndarray]:
    """A shard task as the one-row numpy batch Ray Data hands to ``read_and_views``."""
    return {k: np.array([v], dtype=object) for k, v in task.row(0, []).items()}


def _class_list(path: Path) -> str:
    path.write_text(json.dumps([{"index": 0, "wnid": "cat"}, {"index": 1, "wnid": "dog"}]))
    return str(path)


def test_bad_inputs_are_converted_or_rejected_with_reasons(tmp_path):
    from nextscale.pipelines.tokenize import ShardTask, read_and_views

    expected = _as_symlink_farm(tmp_path / "in", _bad_folder(tmp_path / "in"))
    items, classes = list_image_folder(str(tmp_path / "in"), load_class_list(_class_list(tmp_path / "c.json")))
    assert classes == ["cat", "dog"]
    chunks = list(read_and_views(_batch(ShardTask.of_files(0, items)), image_size=64, views=2,
                                 augmentation="official", crop_ratio=1.125, seed=0, min_side=16, chunk=4,
                                 read_threads=2))
    records = [r for c in chunks for r in json.loads(c["records"][0])]
    assert len(records) == len(expected) == len(items)  # accepted + rejected = listed
    for r in records:
        status, fragment = expected[r["key"]]
        assert r["status"] == status, (r["key"], r["reason"])
        assert fragment in r["reason"], (r["key"], r["reason"])
    n_ok = sum(int(c["n_ok"][0]) for c in chunks)
    assert n_ok == sum(s == "accepted" for s, _ in expected.values()) == 8
    assert {r["key"]: r["label"] for r in records if r["status"] == "accepted"}["dog/good_2"] == 1
    # conversions: greyscale stays grey, 16-bit keeps its range (not clipped white), alpha goes over white
    grey, _ = decode_image((tmp_path / "in/cat/grey.jpg").read_bytes())
    a = np.asarray(grey)
    assert grey.mode == "RGB" and (a[..., 0] == a[..., 1]).all()
    deep, _ = decode_image((tmp_path / "in/cat/deep16.png").read_bytes())
    d = np.asarray(deep)[..., 0]
    assert d.min() == 0 and 240 <= d.max() <= 255 and len(np.unique(d)) > 100
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert np.asarray(decode_image(_encode(rgba, "PNG"))[0]).min() == 255


def test_imagefolder_on_s3_is_listed_and_read(s3_bucket, tmp_path):
    from nextscale.pipelines.tokenize import plan_shards, read_and_views

    expected = _bad_folder(tmp_path / "in")
    for p in (tmp_path / "in").rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            storage.write_bytes(f"{s3_bucket}/train/{p.relative_to(tmp_path / 'in')}", p.read_bytes())
    tasks, classes, fmt = plan_shards(_cfg(f"{s3_bucket}/train", f"{s3_bucket}/codes", samples_per_shard=100))
    assert (fmt, classes, len(tasks)) == ("imagefolder", ["bird", "cat", "dog"], 1)
    assert tasks[0].items[0]["source"] == f"{s3_bucket}/train/bird/unknown.jpg"
    chunks = list(read_and_views(_batch(tasks[0]), image_size=64, views=1,
                                 augmentation="official", crop_ratio=1.125, seed=0, min_side=16, chunk=64,
                                 read_threads=4))
    records = json.loads(chunks[0]["records"][0])
    # without a class list every folder is a class: only the stray root file is refused for its place
    assert {r["key"] for r in records if r["status"] == "accepted"} == \
        {k for k, (s, _) in expected.items() if s == "accepted"} | {"bird/unknown"}


def test_webdataset_samples_without_image_or_valid_label_are_rejected(tmp_path):
    from nextscale.pipelines.tokenize import read_and_views

    jpg = _encode(_photo(0), "JPEG")
    (tmp_path / "in.tar").write_bytes(_wds_tar([("x/a", jpg, 1), ("x/b", jpg, 5), ("x/c", jpg, None), ("x/d.e", jpg, 0)]))
    task = {"index": 3, "kind": "tar", "items": [], "url": str(tmp_path / "in.tar"), "num_classes": 2}
    chunks = list(read_and_views({"task": np.array([json.dumps(task)])}, image_size=64, views=1,
                                 augmentation="center", crop_ratio=1.125, seed=0, min_side=16, chunk=64,
                                 read_threads=1))
    records = json.loads(chunks[0]["records"][0])
    assert [(r["key"], r["status"], r["reason"][:20]) for r in records] == [
        ("x/a", "accepted", ""), ("x/b", "rejected", "label 5 is outside t"),
        ("x/c", "rejected", "missing or non-integ"),
        ("x/d", "rejected", "no image member (jpg")]  # webdataset keys end at the first dot: "e.jpg" is no jpg
    assert records[1]["source"] == f"{tmp_path / 'in.tar'}#x/b" and int(chunks[0]["n_ok"][0]) == 1


def test_num_classes_is_for_webdataset_input_and_part_of_the_tar_shards_identity(tmp_path):
    from nextscale.config import ConfigError
    from nextscale.pipelines.tokenize import plan_shards

    _write_photos(tmp_path / "in", 3)
    with pytest.raises(InputError, match="num_classes=3 applies to webdataset input"):
        plan_shards(_cfg(str(tmp_path / "in"), str(tmp_path / "out"), num_classes=3))
    with pytest.raises(ConfigError, match="class_list or num_classes, not both"):
        _cfg(str(tmp_path / "in"), str(tmp_path / "out"), num_classes=3, class_list="c.json")
    (tmp_path / "t.tar").write_bytes(_wds_tar([("a", _encode(_photo(0), "JPEG"), 0)]))
    (bare,), classes, _ = plan_shards(_cfg(str(tmp_path / "t.tar"), str(tmp_path / "out")))
    (bounded,), bounded_classes, _ = plan_shards(_cfg(str(tmp_path / "t.tar"), str(tmp_path / "out"), num_classes=3))
    assert (classes, bounded_classes, bounded.num_classes) == ([], ["0", "1", "2"], 3)
    assert bare.digest() != bounded.digest()


def test_views_depend_only_on_seed_key_and_view():
    img = _photo(7, (120, 80))
    kw = dict(image_size=64, views=3, augmentation="official", crop_ratio=1.125)
    v = make_views(img, "cat/a", seed=0, **kw)
    assert v.shape == (3, 64, 64, 3) and v.dtype == np.uint8
    assert (v == make_views(img, "cat/a", seed=0, **kw)).all()
    assert not (v == make_views(img, "cat/b", seed=0, **kw)).all()
    assert not (v[0] == v[1]).all()
    c = make_views(img, "cat/a", seed=0, image_size=64, views=1, augmentation="center")
    assert c.shape == (1, 64, 64, 3)


def _cfg(inp: str, out: str, **kw) -> TokenizeConfig:
    base = dict(input=inp, output=out, tokenizer=TOKENIZER, views=2, samples_per_shard=4, batch_size=4)
    return TokenizeConfig(**{**base, **kw})


def test_job_end_to_end_local(ray_local, tmp_path):
    from nextscale.pipelines.tokenize import run

    expected = _as_symlink_farm(tmp_path / "in", _bad_folder(tmp_path / "in"))
    out = str(tmp_path / "codes")
    cfg = _cfg(str(tmp_path / "in"), out, class_list=_class_list(tmp_path / "c.json"))
    summary = run(cfg)
    n_ok = sum(s == "accepted" for s, _ in expected.values())
    assert (summary["listed"], summary["accepted"], summary["rejected"]) == (len(expected), n_ok, len(expected) - n_ok)
    assert summary["shards"] == summary["shards_made"] == -(-len(expected) // 4)

    manifest = codes.Manifest.read(out)
    vq = VQVAE_PRESETS[TOKENIZER]
    manifest.check(vq, tokenizer_sha256=manifest.tokenizer["sha256"])
    assert manifest.classes == ["cat", "dog"] and manifest.views == 2
    assert manifest.num_listed == manifest.num_samples + manifest.num_rejected == len(expected)
    assert {r["key"] for r in manifest.rejected} == {k for k, (s, _) in expected.items() if s == "rejected"}
    index = codes.read_index(out).to_pylist()
    assert sorted(r["key"] for r in index) == sorted(expected)
    assert all(r["status"] == expected[r["key"]][0] for r in index)

    # shards: checksums, contents, and codes equal to the tokenizer applied to the same views
    encoder = CodeEncoder(TOKENIZER)
    keys = []
    for info in manifest.shards:
        assert codes.sha256(storage.read_bytes(storage.join(out, info.name))) == info.sha256
        for key, codes_KL, label in codes.iter_shard(storage.join(out, info.name)):
            keys.append(key)
            assert codes_KL.shape == (2, vq.num_tokens) and label == (0 if key.startswith("cat/") else 1)
            src = next(r["source"] for r in index if r["key"] == key)
            img, _ = decode_image(Path(src).read_bytes())
            views = make_views(img, key, image_size=64, views=2, augmentation="official", seed=0)
            direct = encoder({"views": views[None]})["codes"][0]
            assert (direct == codes_KL).mean() > 0.95  # batch composition may flip a rare near-tie on CPU
    assert len(keys) == n_ok
    assert "manifest.json" in strict_json.check_tree(out)

    # rerun: nothing to do, same bytes
    before = {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}
    again = run(cfg)
    assert again["shards_made"] == 0 and again["shards_skipped"] == summary["shards"]
    assert {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()} == before

    loader = CodeLoader(out, batch_size=3, num_workers=0)
    assert sum(len(c) for c, _ in loader) == n_ok


def _wds_tar(samples: list[tuple[str, bytes, int | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, jpg, label in samples:
            members = [(f"{key}.jpg", jpg)] + ([(f"{key}.cls", str(label).encode())] if label is not None else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_job_webdataset_input_on_s3(ray_local, s3_bucket):
    from nextscale.pipelines.tokenize import run

    good = [_encode(_photo(i), "JPEG") for i in range(5)]
    storage.write_bytes(f"{s3_bucket}/imgs/train-000000.tar",
                        _wds_tar([("a0", good[0], 3), ("a1", good[1], 1), ("a2", b"broken", 2)]))
    storage.write_bytes(f"{s3_bucket}/imgs/train-000001.tar",
                        _wds_tar([("b0", good[2], 0), ("b1", good[3], None), ("b2", good[4], 2)]))
    # a damaged tar (cut inside its third sample's image) keeps its readable samples; the job goes on
    damaged = _wds_tar([("c0", good[0], 1), ("c1", good[1], 2), ("c2", good[2], 0)])
    with tarfile.open(fileobj=io.BytesIO(damaged)) as t:
        cut = t.getmember("c2.jpg").offset_data + 100
    storage.write_bytes(f"{s3_bucket}/imgs/train-000002.tar", damaged[:cut])
    out = f"{s3_bucket}/codes"
    summary = run(_cfg(f"{s3_bucket}/imgs", out, views=1, batch_size=2))
    assert (summary["listed"], summary["accepted"], summary["rejected"]) == (10, 6, 4)
    manifest = codes.Manifest.read(out)
    assert manifest.input["format"] == "webdataset"
    assert [s.num_samples for s in manifest.shards] == [2, 2, 2]
    assert {r["key"]: r["reason"][:14] for r in manifest.rejected} == {
        "a2": "not an image, ", "b1": "missing or non", "c2": "incomplete: th",
        "train-000002/unreadable-rest": "input tar s3:/"}
    damaged_url = f"{s3_bucket}/imgs/train-000002.tar"
    assert [d["source"] for d in summary["damaged_inputs"]] == [damaged_url]
    assert "is cut short inside member 'c2.jpg'" in summary["damaged_inputs"][0]["reason"]
    assert manifest.classes == ["0", "1", "2", "3"]
    assert storage.listdir(out, ".tar") == ["codes-000000.tar", "codes-000001.tar", "codes-000002.tar"]
    labels = sorted(int(x) for _, l in CodeLoader(out, batch_size=3, num_workers=2) for x in l)
    assert labels == [0, 1, 1, 2, 2, 3]

    # one stray label without a class list stops the job naming the sample, instead of claiming 1,000,000 classes
    storage.write_bytes(f"{s3_bucket}/stray/train-000000.tar", _wds_tar([("s0", good[0], 0), ("s1", good[1], 999999)]))
    stray_out = f"{s3_bucket}/stray-codes"
    with pytest.raises(InputError, match=r"labels reach 999999 \(sample s3://.*/stray/train-000000.tar#s1\) but only 2 "
                                         r"of the 1000000 classes"):
        run(_cfg(f"{s3_bucket}/stray", stray_out, views=1, batch_size=2))
    # num_classes bounds the labels: the shard is redone, the stray sample rejected with its reason
    summary = run(_cfg(f"{s3_bucket}/stray", stray_out, views=1, batch_size=2, num_classes=2))
    manifest = codes.Manifest.read(stray_out)
    assert (summary["shards_made"], summary["accepted"], manifest.classes) == (1, 1, ["0", "1"])
    (rejected,) = manifest.rejected
    assert rejected["key"] == "s1" and rejected["reason"].startswith("label 999999 is outside the 2 classes (0..1)")


def _write_photos(root: Path, n: int) -> None:
    for i in range(n):
        p = root / f"c{i % 3}" / f"img{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_encode(_photo(100 + i), "JPEG"))


def _outputs(out: Path) -> dict[str, bytes]:
    names = [n for n in os.listdir(out) if n.endswith(".tar") or n in (codes.MANIFEST, codes.INDEX)]
    names += [f"{codes.PARTS}/{n}" for n in os.listdir(out / codes.PARTS)]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def test_killed_job_resumes_to_the_same_bytes(ray_local, tmp_path):
    from nextscale.pipelines.tokenize import run

    _write_photos(tmp_path / "in", 24)
    args = dict(views=2, samples_per_shard=2, batch_size=2)
    run(_cfg(str(tmp_path / "in"), str(tmp_path / "a"), **args))
    reference = _outputs(tmp_path / "a")
    assert sum(n.endswith(".tar") for n in reference) == 12

    # the same job as a separate driver process on the same cluster, killed once its first shard lands
    out_b = tmp_path / "b"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "nextscale.cli", "tokenize", f"input={tmp_path / 'in'}", f"output={out_b}",
           f"tokenizer={TOKENIZER}"] + [f"{k}={v}" for k, v in args.items()]
    log = open(tmp_path / "job.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if out_b.is_dir() and any(n.endswith(".tar") for n in os.listdir(out_b)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it wrote a shard:\n" + \
            (tmp_path / "job.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    partial = sorted(n for n in os.listdir(out_b) if n.endswith(".tar"))
    assert 1 <= len(partial) and not (out_b / codes.MANIFEST).exists()
    # also a crash between a shard and its record, and a leftover temporary file
    (out_b / codes.part_name(partial[-1])).unlink(missing_ok=True)
    (out_b / "codes-000011.tar.tmp-deadbeef").write_bytes(b"partial")

    summary = run(_cfg(str(tmp_path / "in"), str(out_b), **args))
    assert summary["shards_made"] >= 1 and summary["shards_made"] + summary["shards_skipped"] == 12
    assert _outputs(out_b) == reference
    assert not [n for n in os.listdir(out_b) if ".tmp-" in n]

    # the same output with another job's settings is refused, not mixed
    with pytest.raises(codes.CodesError, match="from a different job"):
        run(_cfg(str(tmp_path / "in"), str(out_b), **{**args, "seed": 1}))


def test_real_imagenet_photos(ray_local, shared_data, tmp_path):
    from nextscale.pipelines.tokenize import run

    root = shared_data / "imagenet-sample"
    classes = json.loads((shared_data / "imagenet_classes.json").read_text())
    wnid_index = {c["wnid"]: c["index"] for c in classes}
    out = str(tmp_path / "codes")
    summary = run(_cfg(str(root), out, class_list=str(shared_data / "imagenet_classes.json"), max_images=6,
                       views=1, augmentation="center", samples_per_shard=3))
    assert summary["listed"] == summary["accepted"] == 6
    assert codes.Manifest.read(out).num_classes == 1000
    index = codes.read_index(out).to_pylist()
    for row in index:
        assert row["label"] == wnid_index[row["key"].split("/")[0]]
    loader = CodeLoader(out, batch_size=6)
    codes_BL, labels = next(iter(loader))
    assert codes_BL.shape == (6, VQVAE_PRESETS[TOKENIZER].num_tokens)
    assert sorted(labels.tolist()) == sorted(r["label"] for r in index)
