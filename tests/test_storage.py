"""The storage layer against local folders and a real S3 server (moto, server mode, loopback)."""

from __future__ import annotations

import os
import threading

import pytest

from nextscale import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_exists_remove(root):
    assert not storage.exists(storage.join(root, "a.bin"))
    assert storage.listdir(root) == []
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "sub", "b.json"), '{"x": 1}')
    storage.write_bytes(storage.join(root, "c.tar"), b"tar")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "sub", "b.json")) == '{"x": 1}'
    assert storage.listdir(root) == ["a.bin", "c.tar", "sub"]
    assert storage.listdir(root, suffix=".tar") == ["c.tar"]
    storage.remove(storage.join(root, "sub"), recursive=True)
    assert storage.listdir(root) == ["a.bin", "c.tar"]
    with pytest.raises(FileNotFoundError, match="b.json does not exist"):
        storage.read_bytes(storage.join(root, "sub", "b.json"))


def test_overwrite_is_atomic_for_concurrent_readers(tmp_path):
    """A reader never sees a partial file: each read is either the old or the new content, whole."""
    url = str(tmp_path / "x.bin")
    old, new = b"a" * 2_000_000, b"b" * 2_000_000
    storage.write_bytes(url, old)
    seen = set()

    def reader():
        for _ in range(200):
            data = storage.read_bytes(url)
            seen.add((len(data), len(set(data))))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20):
        storage.write_bytes(url, new)
        storage.write_bytes(url, old)
    t.join()
    assert seen == {(2_000_000, 1)}
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_pyarrow_filesystem_sees_the_same_objects(s3_bucket):
    storage.write_bytes(storage.join(s3_bucket, "p", "z.bin"), b"zz")
    fs, path = storage.pyarrow_filesystem(storage.join(s3_bucket, "p"))
    with fs.open_input_stream(path + "/z.bin") as f:
        assert f.read() == b"zz"


def test_protocols():
    assert storage.protocol("/a/b") == "file" and storage.protocol("file:///a") == "file"
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k") and not storage.is_remote("rel/p")
    assert storage.join("s3://b/", "x/", "/y") == "s3://b/x/y"


def test_relative_local_paths_resolve_against_the_exported_driver_cwd(tmp_path, monkeypatch):
    """Ray workers run in their own folder; a local job exports the driver's cwd for relative paths."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("hi")
    monkeypatch.setenv(storage.DRIVER_CWD_ENV, str(tmp_path))
    assert storage.read_text("data/x.txt") == "hi"
    assert storage.filesystem("file://data/x.txt")[1] == str(tmp_path / "data" / "x.txt")
