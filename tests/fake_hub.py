"""An in-process stand-in for the Hugging Face Hub's fsspec file system (``hf://``), for offline tests.

The real one is ``huggingface_hub.HfFileSystem``; nextscale only uses the fsspec interface (info, cat, get,
exists, pipe), which this memory file system provides under the ``hf`` protocol.
"""

from __future__ import annotations

import importlib

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from nextscale import storage

# the module (``fsspec.registry`` names the read-only mapping): implementations registered in a test are undone
REGISTRY = importlib.import_module("fsspec.registry")


class FakeHub(MemoryFileSystem):
    """``hf://owner/repo/file`` kept in memory; counts the files downloaded."""

    protocol = "hf"
    store: dict = {}
    pseudo_dirs = [""]
    downloads: list[str] = []

    @classmethod
    def _strip_protocol(cls, path):
        return "/" + str(path).removeprefix("hf://").strip("/")

    def get_file(self, rpath, lpath, **kwargs):
        type(self).downloads.append(rpath)
        return super().get_file(rpath, lpath, **kwargs)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setitem(REGISTRY._registry, "hf", FakeHub)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    FakeHub.store.clear()
    FakeHub.downloads.clear()
    FakeHub.clear_instance_cache()
    fs = fsspec.filesystem("hf")
    yield fs
    FakeHub.store.clear()
