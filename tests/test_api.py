"""The Python API: ``import nextscale`` stays light, docs/api.md's code runs as written, save_pretrained /
from_pretrained round trips bitwise (also through an ``hf://`` location)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import fake_hub
import numpy as np
import pytest
import torch

import nextscale
from nextscale.checkpoint import CheckpointError
from nextscale.pretrained import CONFIG_NAME

REPO = Path(__file__).resolve().parent.parent
SKIP_MARK = "<!-- not run by the tests"
hub = fake_hub.hub


def test_import_is_light_and_the_api_loads_on_first_use():
    code = ("import sys, nextscale; heavy = {'torch', 'ray'} & set(sys.modules); "
            "nextscale.sample; print(sorted(heavy), 'ray' in sys.modules, nextscale.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert out[:2] == ["[]", "False"] and out[2] == nextscale.__version__ != "0+unknown"
    assert set(nextscale.__all__) <= set(dir(nextscale))
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        nextscale.load_everything  # noqa: B018


def _page_blocks() -> list[str]:
    text = (REPO / "docs" / "api.md").read_text()
    blocks = []
    for m in re.finditer(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", text, re.S):
        if not m.group("before").startswith(SKIP_MARK):
            blocks.append(m.group("code"))
    return blocks


def test_the_api_page_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _page_blocks()
    assert len(blocks) == 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), ns)  # noqa: S102 - the documentation's own example
    images, codes, pictures = ns["images"], ns["codes"], ns["pictures"]
    assert [im.size for im in images] == [(32, 32)] * 4 and [im.size for im in pictures] == [(32, 32)] * 4
    assert codes.dtype == torch.int64 and codes.shape == (4, 130) and 0 <= int(codes.min()) <= int(codes.max()) < 512
    # the saved prior is the same model: same weights, same images for the same seed
    mine, theirs = ns["prior"].state_dict(), ns["same_prior"].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in ns["same_images"]]
    assert (tmp_path / "runs/api/my-tokenizer" / CONFIG_NAME).is_file()
    tok = nextscale.load_tokenizer("runs/api/my-tokenizer")
    assert torch.equal(nextscale.encode(tok, images), codes)
    # decode gives the pictures of the codes; a uint8 tensor round-trips through encode like the PIL images
    pixels = nextscale.decode(tok, codes, pil=False)
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.uint8
    assert [np.asarray(p).tobytes() for p in pictures] == [p.permute(1, 2, 0).numpy().tobytes() for p in pixels]


def test_a_pretrained_folder_on_the_hub_loads_and_refuses_the_wrong_kind(hub):
    prior = nextscale.load_prior("debug", seed=3)
    nextscale.save_pretrained(prior, "hf://someone/tiny-var")
    got = nextscale.load_prior("hf://someone/tiny-var", device="cpu")
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in prior.state_dict().items())
    assert got.cfg == prior.cfg
    with pytest.raises(CheckpointError, match="holds a var model, not a tokenizer"):
        nextscale.load_tokenizer("hf://someone/tiny-var")


def test_load_prior_picks_the_preset_of_an_official_file(tmp_path):
    var = nextscale.load_prior("golden_tiny")
    torch.save(var.state_dict(), tmp_path / "var_tiny.pth")
    # golden_tiny's sizes are its own: the preset is found without being named
    assert nextscale.load_prior(str(tmp_path / "var_tiny.pth")).cfg == var.cfg
