"""Input formats of the tokenize job: streamed webdataset tars, damaged tars keeping their readable samples."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import fake_hub
import numpy as np
import pytest
from PIL import Image

from nextscale.tokenize.inputs import tar_samples

hub = fake_hub.hub


def _jpg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(samples: list[tuple[str, bytes, int]]) -> tuple[bytes, list[int]]:
    """Tar bytes and the byte offset where each sample's members end."""
    buf, ends = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, img, label in samples:
            for name, data in ((f"{key}.jpg", img), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            ends.append(tar.offset)
    return buf.getvalue(), ends


SAMPLES = [(f"s{i}", _jpg(i), i % 3) for i in range(4)]


def _read(path) -> list[tuple[dict, bytes]]:
    return list(tar_samples(str(path)))


def test_a_complete_tar_yields_every_sample_with_its_bytes(tmp_path):
    data, _ = _tar(SAMPLES)
    (tmp_path / "ok.tar").write_bytes(data)
    got = _read(tmp_path / "ok.tar")
    assert [(it["key"], it["label"], it["reason"], b) for it, b in got] == [(k, c, "", j) for k, j, c in SAMPLES]
    assert got[0][0]["source"] == f"{tmp_path / 'ok.tar'}#s0"


def test_a_tar_cut_inside_a_member_keeps_the_samples_before_it(tmp_path):
    data, ends = _tar(SAMPLES)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: ends[1] + 512 + 300])  # s2.jpg's header and 300 bytes of its data
    got = _read(path)
    assert [(it["key"], b) for it, b in got[:2]] == [("s0", SAMPLES[0][1]), ("s1", SAMPLES[1][1])]
    assert all(not it["reason"] for it, _ in got[:2])
    (cut, cut_bytes), (rest, _) = got[2:]
    assert cut["key"] == "s2" and cut_bytes == b"" and cut["reason"].startswith("incomplete: the input tar is cut "
                                                                                 "short inside member 's2.jpg'")
    assert rest["key"] == "cut/unreadable-rest" and rest["input_error"] and rest["source"] == str(path)
    assert f"input tar {path} is cut short inside member 's2.jpg'" in rest["reason"]
    assert "Re-copy the tar" in rest["reason"] and len(got) == 4


@pytest.mark.parametrize("where", ["boundary", "header"])
def test_a_tar_cut_between_members_is_told_from_a_complete_one(tmp_path, where):
    data, ends = _tar(SAMPLES)
    cut = ends[1] if where == "boundary" else ends[1] + 100  # after s1 / inside s2.jpg's header
    (tmp_path / "short.tar").write_bytes(data[:cut])
    got = _read(tmp_path / "short.tar")
    assert [it["key"] for it, _ in got] == ["s0", "s1", "short/unreadable-rest"]
    assert [b for _, b in got[:2]] == [SAMPLES[0][1], SAMPLES[1][1]]
    reason = got[2][0]["reason"]
    assert f"ends at byte {ends[1]} without the end-of-archive marker" in reason and got[2][0]["input_error"]


@pytest.mark.parametrize("content", [b"", b"not a tar at all " * 64])
def test_an_empty_or_garbage_tar_is_one_rejected_item(tmp_path, content):
    (tmp_path / "bad.tar").write_bytes(content)
    (item, data), = _read(tmp_path / "bad.tar")
    assert item["input_error"] and data == b"" and item["label"] == -1
    assert item["reason"].startswith(f"input tar {tmp_path / 'bad.tar'} is damaged (ReadError")


def test_tars_are_streamed_not_read_whole(tmp_path):
    big = [(f"k{i}", bytes([i]) * (1 << 20), 0) for i in range(24)]  # 24 MiB tar
    (tmp_path / "big.tar").write_bytes(_tar(big)[0])
    tracemalloc.start()
    try:
        n = sum(len(b) for _, b in tar_samples(str(tmp_path / "big.tar")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 24 << 20 and peak < 4 << 20  # about one sample at a time


def test_read_and_views_streams_chunks_and_marks_the_last(tmp_path):
    from nextscale.pipelines.tokenize import read_and_views

    data, ends = _tar(SAMPLES)
    (tmp_path / "cut.tar").write_bytes(data[: ends[2] + 700])
    task = {"index": 5, "kind": "tar", "items": [], "url": str(tmp_path / "cut.tar"), "num_classes": 3}
    chunks = list(read_and_views({"task": np.array([json.dumps(task)])}, image_size=32, views=1,
                                 augmentation="center", crop_ratio=1.125, seed=0, min_side=16, chunk=2,
                                 read_threads=1))
    assert [int(c["num_chunks"][0]) for c in chunks] == [0, 0, 3]
    records = [r for c in chunks for r in json.loads(c["records"][0])]
    assert [(r["key"], r["status"]) for r in records] == [
        ("s0", "accepted"), ("s1", "accepted"), ("s2", "accepted"), ("s3", "rejected"),
        ("cut/unreadable-rest", "rejected")]
    assert [int(c["n_ok"][0]) for c in chunks] == [2, 1, 0]


def _parquet(path, rows: list[tuple[bytes | None, int | None]], row_group_size: int = 2) -> None:
    """The layout of ImageNet-1k on the Hugging Face Hub: image = {bytes, path} struct, label = int64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, (b, _) in enumerate(rows)],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "label": pa.array([lb for _, lb in rows], pa.int64())}), path,
                   row_group_size=row_group_size)


def test_parquet_rows_stream_as_samples_and_a_missing_column_names_the_columns(tmp_path):
    from nextscale.pipelines.tokenize import InputError, plan_shards, read_and_views
    from nextscale.tokenize.inputs import parquet_samples
    from nextscale.tokenize.job_config import TokenizeConfig

    rows = [(_jpg(i), i % 3) for i in range(4)] + [(None, 1)]
    (tmp_path / "data").mkdir()
    _parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rows)
    _parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rows[:1])
    got = list(parquet_samples(str(tmp_path / "data" / "train-00000-of-00002.parquet"), batch_rows=2))
    assert [(it["key"], it["label"], b) for it, b in got[:4]] == \
        [(f"train-00000-of-00002/{i:07d}", i % 3, rows[i][0]) for i in range(4)]
    assert got[4][0]["reason"] == "no image bytes in column 'image'"

    cfg = TokenizeConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"), tokenizer="golden_tiny")
    tasks, _, fmt = plan_shards(cfg)
    assert fmt == "parquet" and [(t.kind, t.url.rsplit("/", 1)[-1]) for t in tasks] == [
        ("parquet", "train-00000-of-00002.parquet"), ("parquet", "train-00001-of-00002.parquet")]
    task = {"index": 0, "kind": "parquet", "items": [], "url": tasks[0].url, "num_classes": 3,
            "columns": ["image", "label"]}
    chunks = list(read_and_views({"task": np.array([json.dumps(task)])}, image_size=32, views=1,
                                 augmentation="center", crop_ratio=1.125, seed=0, min_side=16, chunk=2,
                                 read_threads=1))
    records = [r for c in chunks for r in json.loads(c["records"][0])]
    assert [r["status"] for r in records] == ["accepted"] * 4 + ["rejected"]
    assert sum(int(c["n_ok"][0]) for c in chunks) == 4 and int(chunks[-1]["num_chunks"][0]) == 3
    with pytest.raises(InputError, match=r"has no column 'jpg'; its columns are image, label: set image_column="):
        plan_shards(TokenizeConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                                   tokenizer="golden_tiny", image_column="jpg"))


def test_parquet_on_the_hub_is_listed_and_streamed(hub, tmp_path):
    from nextscale.pipelines.tokenize import plan_shards
    from nextscale.tokenize.inputs import parquet_samples
    from nextscale.tokenize.job_config import TokenizeConfig

    _parquet(tmp_path / "x.parquet", [(_jpg(7), 5)])
    hub.pipe_file("hf://datasets/org/imagenet-1k/data/train-00000.parquet", (tmp_path / "x.parquet").read_bytes())
    cfg = TokenizeConfig(input="hf://datasets/org/imagenet-1k/data", output=str(tmp_path / "out"),
                         tokenizer="golden_tiny")
    tasks, _, fmt = plan_shards(cfg)
    assert fmt == "parquet" and [t.url for t in tasks] == ["hf://datasets/org/imagenet-1k/data/train-00000.parquet"]
    (item, data), = parquet_samples(tasks[0].url)
    assert (item["key"], item["label"], data) == ("train-00000/0000000", 5, _jpg(7))
