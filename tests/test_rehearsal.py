"""The scale rehearsal in small (docs/scaling.md): 10,240 synthetic ImageNet images in 1,000 classes through tokenize,
the code loader and fid, asserting what does not depend on timing: every input accounted for with its label,
outputs and plans that grow with the shards and not the samples, and exact resumption."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nextscale import codes, synthetic_imagenet
from nextscale.config import load_config
from nextscale.pipelines.rehearse.checks import KeyIndex, check_codes, check_loader, plan_memory

# past image 10,006, the planted truncated one (synthetic_imagenet.BAD_EVERY); every one of the 1,000 classes has images
IMAGES = 10_240


def test_synthetic_images_show_their_class_and_labels_follow_imagenet_counts():
    for label in (0, 7, 123, 999):
        for variant in range(synthetic_imagenet.VARIANTS):
            image = Image.open(io.BytesIO(synthetic_imagenet.class_image(label, variant)))
            assert synthetic_imagenet.class_of_pixels(image) == label
    y = synthetic_imagenet.labels("train", 12_812)
    assert np.array_equal(y, synthetic_imagenet.labels("train", 12_812))  # seeded
    assert np.bincount(y).tolist() == [13] * 812 + [12] * 188
    assert synthetic_imagenet.expected(y)["rejected"] == 1  # image 10,006 is planted truncated


def test_the_loader_plan_does_not_grow_with_the_rows(tmp_path):
    """Planning an epoch and finding a row in it allocate per shard, not per row (12.8 M rows at ImageNet's size)."""
    sizes = {}
    for rows in (1_000, 16_000):
        url = str(tmp_path / str(rows))
        codes.write_synthetic_shards(url, num_samples=rows, num_tokens=4, vocab_size=16, samples_per_shard=rows // 8)
        sizes[rows] = plan_memory(url, at_row=rows // 2)
    assert sizes[16_000] <= sizes[1_000] * 1.1 + 256, sizes


@pytest.mark.ray
@pytest.mark.slow
def test_10k_images_through_tokenize_loader_and_fid(ray_local, tmp_path, one_thread):
    from nextscale.eval.config import FidConfig
    from nextscale.pipelines import fid, tokenize
    from nextscale.prior.engine import save_prior
    from nextscale.prior.families import build_prior
    from nextscale.tokenize.job_config import TokenizeConfig

    data = synthetic_imagenet.make_synthetic_imagenet(
        str(tmp_path / "data"), IMAGES / synthetic_imagenet.COUNTS["train"], formats=("parquet",))
    source = data["inputs"]["train_parquet"]
    out = str(tmp_path / "codes")
    cfg = load_config(TokenizeConfig, "tokenize_rehearsal", [f"input={source['url']}", f"output={out}", "views=2"])
    summary = tokenize.run(cfg)

    # every input accounted for, every class with its count, every key in one shard with its image's label
    integrity = check_codes(out, source, KeyIndex(data))
    assert integrity["ok"], integrity["problems"]
    assert (summary["listed"], summary["rejected"], integrity["classes_present"]) == (IMAGES, 1, 1000)

    # manifest.json grows with the shards and classes, never with the samples
    text = (tmp_path / "codes" / codes.MANIFEST).read_text()
    m = json.loads(text)
    per_shard = len(json.dumps(m["shards"])) / len(m["shards"])
    rest = len(text) - len(json.dumps(m["shards"])) - len(json.dumps(m["classes"]))
    assert per_shard < 200 and rest < 4096 and len(m["rejected"]) <= codes.MAX_LISTED_REJECTIONS

    # a rerun verifies and skips every shard and writes the same index and manifest
    index = (tmp_path / "codes" / codes.INDEX).read_bytes()
    again = tokenize.run(cfg)
    assert again["shards_skipped"] == again["shards"] == len(m["shards"])
    assert (tmp_path / "codes" / codes.INDEX).read_bytes() == index
    assert (tmp_path / "codes" / codes.MANIFEST).read_text() == text

    # one epoch stopped halfway and resumed: the same batches, every sample's view exactly once
    loader = check_loader(out, integrity["epoch_fingerprint"], batch_size=256)
    assert loader["resume_exact"] and loader["epoch_multiset_ok"], loader
    assert loader["epoch_rows_seen"] == IMAGES - 1

    # fid: one sample per class of 1,000, counted at the driver
    prior = str(tmp_path / "prior.pt")
    var = build_prior("rehearsal")
    save_prior(var, prior)
    reference = tmp_path / "reference"
    reference.mkdir()
    for label in range(4):
        (reference / f"{label}.png").write_bytes(synthetic_imagenet.class_image(label, 0))
    result = fid.run(load_config(FidConfig, "fid_rehearsal", [
        f"models.prior_url={prior}", "num_samples=1000", "samples_per_class=1", f"reference.images={reference}",
        "cpus_per_actor=0.5", f"output={tmp_path / 'fid'}"]))
    assert result["labels"] == {"classes": 1000, "min_per_class": 1, "max_per_class": 1}
    assert result["groups_sampled"] == 20 and np.isfinite(result["fid"])
