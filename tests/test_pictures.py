"""make sample: grid / coarse-to-fine / edit pictures of the exact size, index-addressed seeds, zero-shot editing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from eval_models import write_tiny_models
from PIL import Image

from nextscale.config import load_config
from nextscale.eval.config import ModelsConfig, SampleConfig, SamplingConfig
from nextscale.eval.edit import box_mask, edit_image, load_image
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import load_models, load_prior, seeded_generator
from nextscale.eval.pictures import coarse_to_fine, sample_grid
from nextscale.pipelines.sample import run

PLAIN = SamplingConfig(guidance=1.5, top_k=0, top_p=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    prior, tokenizer = write_tiny_models(tmp_path_factory.mktemp("models"))
    var, vqvae = load_models(ModelsConfig(prior_url=prior, tokenizer_url=tokenizer))
    return prior, tokenizer, var, vqvae


def test_pictures_have_the_exact_expected_size(tiny, tmp_path):
    prior, tokenizer, _, _ = tiny
    Image.fromarray(np.full((48, 40, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    cfg = load_config(SampleConfig, None, [
        f"models.prior_url={prior}", f"models.tokenizer_url={tokenizer}", "classes=[3,1,4]",
        "samples_per_class=2", "coarse_to_fine=2", "upscale=2", "padding=1", f"output={tmp_path / 'out'}",
        f"edit.image={tmp_path / 'photo.png'}", "edit.samples=2", "device=cpu"])
    summary = run(cfg)
    tile = 32 * 2
    expected = {"grid": (3 * tile + 4, 2 * tile + 3), "coarse_to_fine": (2 * tile + 3, 6 * tile + 7),
                "edit": (3 * tile + 4, 3 * tile + 4)}
    for name, (h, w) in expected.items():
        with Image.open(tmp_path / "out" / f"{name}.png") as im:
            assert (im.height, im.width, im.mode) == (h, w, "RGB"), name
        assert (summary["pictures"][name]["height"], summary["pictures"][name]["width"]) == (h, w)
    assert (tmp_path / "out" / "config.yaml").exists() and (tmp_path / "out" / "summary.json").exists()


def test_seeds_are_index_addressed_and_coarse_to_fine_ends_at_the_full_image(tiny):
    _, _, var, vqvae = tiny
    cfg = SampleConfig(classes=(1, 2), samples_per_class=2, coarse_to_fine=1,
                       sampling=SamplingConfig(guidance=1.5, top_k=0, top_p=0.0))
    a = sample_grid(var, vqvae, cfg, torch.device("cpu"))
    b = sample_grid(var, vqvae, dataclasses.replace(cfg, classes=(2,), samples_per_class=1), torch.device("cpu"))
    assert torch.equal(a[1][0], b[0][0])  # class 2, sample 0: the same whatever else is in the grid
    assert not torch.equal(a[1][0], a[1][1])
    rows = coarse_to_fine(var, vqvae, cfg, torch.device("cpu"))
    assert len(rows[0]) == len(vqvae.cfg.patch_nums)
    from nextscale.eval.generate import sample_batch

    codes, img = sample_batch(var, vqvae, [1], seeded_generator("cpu", cfg.seed, 1, 0), cfg.sampling)
    assert torch.equal(rows[0][-1], img[0])
    assert torch.equal(rows[0][0], to_uint8(vqvae.decode(codes[:, :1]).add(1).mul(0.5))[0])


def test_editing_forces_the_known_tokens(tiny, tmp_path):
    _, _, var, vqvae = tiny
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    image = load_image(str(tmp_path / "x.png"), 32)
    keep_all = torch.ones(32, 32, dtype=torch.bool)
    out = edit_image(var, vqvae, image, keep_all, 0, seeded_generator("cpu", 0), PLAIN)
    assert torch.equal(out, to_uint8(vqvae.decode(vqvae.encode(image)).add(1).mul(0.5)))
    hole = box_mask(32, (0.25, 0.25, 0.75, 0.75))
    assert hole.sum() == 16 * 16 and hole[8, 8] and not hole[7, 8]
    a = edit_image(var, vqvae, image, ~hole, 0, seeded_generator("cpu", 1), PLAIN)
    b = edit_image(var, vqvae, image, ~hole, 0, seeded_generator("cpu", 2), PLAIN)
    assert not torch.equal(a, b)


def test_checkpoint_errors_are_clear(tiny, tmp_path):
    prior, _, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="train-prior"):
        load_prior(str(tmp_path / "absent.pt"))
    from nextscale.tokenize.loader import save_tokenizer
    from nextscale.tokenize.vqvae import build_vqvae

    save_tokenizer(build_vqvae("golden_tiny"), str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="does not fit the tokenizer"):
        load_models(ModelsConfig(prior_url=prior, tokenizer_url=str(tmp_path / "other.pt")))
