"""hf:// locations: official-format weights load from the Hugging Face Hub through fsspec's ``hf`` protocol, are
downloaded once per machine into the cache, and a missing file names its repo. Offline: an in-process file
system stands in for the Hub (the real one is ``huggingface_hub.HfFileSystem``, the same fsspec interface)."""

from __future__ import annotations

import concurrent.futures
import io

import fake_hub
import pytest
import torch
from fake_hub import REGISTRY, FakeHub

from nextscale import storage
from nextscale.errors import UserError
from nextscale.prior.families import build_prior
from nextscale.prior.loader import load_prior
from nextscale.tokenize.loader import load_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

hub = fake_hub.hub

def _put(fs, url: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    fs.pipe_file(url, buf.getvalue())


def test_official_weights_load_from_hf_urls_and_are_downloaded_once(hub):
    torch.manual_seed(0)
    vae, var = build_vqvae("golden_tiny"), build_prior("golden_tiny")
    _put(hub, "hf://FoundationVision/var/vae_tiny.pth", vae.state_dict())
    _put(hub, "hf://FoundationVision/var/var_tiny.pth", var.state_dict())

    got = load_tokenizer("hf://FoundationVision/var/vae_tiny.pth", preset="golden_tiny")[0].state_dict()
    assert all(torch.equal(v, got[k]) for k, v in vae.state_dict().items())
    prior = load_prior("hf://FoundationVision/var/var_tiny.pth", "golden_tiny")[0].state_dict()
    assert all(torch.equal(v, prior[k]) for k, v in var.state_dict().items())

    # eight concurrent readers (the actors of one node) share one download; later reads hit the cache
    url = "hf://FoundationVision/var/vae_tiny.pth"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(lambda _: storage.read_bytes(url), range(8)))
    assert len(set(blobs)) == 1 and blobs[0] == hub.cat_file(url)
    assert sorted(FakeHub.downloads) == ["/FoundationVision/var/vae_tiny.pth", "/FoundationVision/var/var_tiny.pth"]

    # a file replaced upstream (another size) is downloaded again
    hub.pipe_file(url, blobs[0] + b"\0")
    assert storage.read_bytes(url) == blobs[0] + b"\0" and len(FakeHub.downloads) == 3


def test_a_missing_hub_file_names_the_repo_and_the_file(hub):
    with pytest.raises(FileNotFoundError) as e:
        storage.read_bytes("hf://FoundationVision/var@v1/var_d99.pth")
    assert "repo 'FoundationVision/var' has no file 'var_d99.pth' at revision 'v1'" in str(e.value)
    assert storage.hub_location("hf://datasets/org/imagenet-1k/data/train-00000.parquet") == \
        ("datasets/org/imagenet-1k", "data/train-00000.parquet", "main")


def test_without_huggingface_hub_the_hint_names_the_hub_extra(monkeypatch):
    monkeypatch.delitem(REGISTRY._registry, "hf", raising=False)
    monkeypatch.setitem(REGISTRY.known_implementations, "hf",
                        {"class": "nextscale_absent_module.HfFileSystem", "err": "Install huggingface_hub"})
    with pytest.raises(UserError, match=r"Install huggingface_hub; pip install 'nextscale\[hub\]'"):
        storage.read_bytes("hf://FoundationVision/var/var_d16.pth")
