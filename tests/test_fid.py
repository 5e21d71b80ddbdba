"""Evaluation metrics, feature extractors, eval configs and the classifier check (no Ray, no network)."""

from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextscale.config import ConfigError, load_config
from nextscale.eval import features
from nextscale.eval.classifier import evaluate_demo_samples, train_classifier
from nextscale.eval.config import INCEPTION_FILE, FidConfig, SampleConfig, SamplingConfig
from nextscale.eval.fid import (
    FeatureStats,
    frechet_distance,
    inception_score,
    load_reference_npz,
    manifold_radii,
    precision_recall,
    write_sample_npz,
)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# Frechet distance


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_fid_of_rotated_gaussians_matches_the_closed_form():
    # same orthonormal eigenbasis: the root of sigma1 sigma2 has eigenvalues sqrt(a_i b_i)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_agrees_with_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(size=(300, 32)) * 1.3 + 0.2
    sx, sy = FeatureStats.of(x), FeatureStats.of(y)
    assert abs(frechet_distance(sx.mu, sx.sigma, sx.mu, sx.sigma)) < 1e-8
    ours = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    theirs = fid_statistics_to_metric({"mu": sx.mu, "sigma": sx.sigma}, {"mu": sy.mu, "sigma": sy.sigma}, False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)


def test_fid_singular_covariances_use_the_adm_fallback_and_mismatched_stats_fail():
    s = np.zeros((4, 4))
    s[0, 0] = 1.0
    assert np.isfinite(frechet_distance(np.zeros(4), s, np.ones(4), s))
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------------------------
# Statistics


def test_streamed_statistics_merge_to_the_one_shot_statistics():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=5.0, size=(1000, 24)).astype(np.float32)
    one_shot = FeatureStats.of(x)
    merged = FeatureStats(24)
    for part in np.array_split(x, [7, 300, 301, 650]):
        merged.merge(FeatureStats.of(part))
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.sigma, one_shot.sigma, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(FeatureStats(3))


def test_chunked_statistics_depend_only_on_the_rows_and_the_sample_npz_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2 * FeatureStats.CHUNK + 5, 6)).astype(np.float32)
    stats = FeatureStats.in_chunks(x)
    assert stats.n == len(x) and stats.digest == FeatureStats.in_chunks(x.copy()).digest
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    assert FeatureStats.in_chunks(x[:-1]).digest != stats.digest
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    write_sample_npz(str(tmp_path / "s.npz"), images, np.arange(3))
    with np.load(tmp_path / "s.npz") as got:
        assert np.array_equal(got["arr_0"], images) and got["labels"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Inception Score, precision / recall


def test_inception_score_of_known_cases():
    K, N = 10, 200
    confident = np.full((N, K), -1e4)
    confident[np.arange(N), np.arange(N) % K] = 0.0  # one-hot p(y|x), uniform p(y) in every split
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(K, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(np.zeros((N, K)))[0] == pytest.approx(1.0)  # p(y|x) = p(y): KL 0
    # two equally likely classes, p(y|x) = (0.9, 0.1) / (0.1, 0.9): IS = exp(log 2 - H(0.9))
    p = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert inception_score(np.log(p), splits=10)[0] == pytest.approx(np.exp(np.log(2) - h), rel=1e-9)


def test_precision_recall_on_separable_and_identical_sets():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(200, 8))
    far = rng.normal(size=(150, 8)) + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)
    # samples from a tight sub-cluster of the reference: all inside the reference manifold, low recall
    sub = ref[np.argsort(np.linalg.norm(ref, axis=1))[:40]]
    precision, recall = precision_recall(ref, sub + 1e-3)
    assert precision == 1.0 and recall < 0.6
    # radius = distance to the 3rd neighbour (self excluded), squared
    line = np.arange(10, dtype=np.float64)[:, None]
    assert manifold_radii(line, k=3)[0] == pytest.approx(9.0)


# ------------------------------------------------------------------------------------------------
# Feature extractors


def test_to_uint8_rounds_like_the_png_path():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.2 / 255, 0.6 / 255]).view(1, 1, 1, -1)
    assert features.to_uint8(x).flatten().tolist() == [0, 128, 255, 255, 0, 0, 1]


def test_test_extractor_is_deterministic_and_checks_its_input():
    imgs = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    a, b = features.build("random-conv-test"), features.build("random-conv-test")
    fa, fb = a(imgs), b(imgs)
    assert fa["pool"].shape == (5, a.dim) and fa["logits"].shape == (5, a.num_logits)
    assert torch.equal(fa["pool"], fb["pool"])
    # per-image features do not depend on the other images of the batch
    torch.testing.assert_close(a(imgs[2:3])["pool"], fa["pool"][2:3])
    with pytest.raises(ValueError, match="uint8"):
        a(imgs.float())
    with pytest.raises(ValueError, match="unknown feature_extractor"):
        features.build("nope")
    out = features.extract(a, imgs.permute(0, 2, 3, 1), batch_size=2)
    torch.testing.assert_close(out["pool"], fa["pool"])


def test_missing_inception_weights_give_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(features.InceptionWeightsMissing, match=INCEPTION_FILE):
        features.build("inception-v3-compat", str(missing))
    # offline, nothing in the torch hub cache: the download fails -> where to put the file
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(features.InceptionWeightsMissing) as e:
        features.build("inception-v3-compat")
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE) in str(e.value)
    assert "inception_weights=" in str(e.value)


def test_reference_npz_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference_npz(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'mu'"):
        load_reference_npz(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "adm.npz", mu=np.ones(3), sigma=np.eye(3), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    ref = load_reference_npz(str(tmp_path / "adm.npz"))
    assert ref["arr_0"].shape == (2, 4, 4, 3) and ref["mu"].tolist() == [1, 1, 1]


# ------------------------------------------------------------------------------------------------
# Configs


def test_fid_config_defaults_are_the_paper_protocol_and_checks_name_the_key():
    cfg = FidConfig()
    assert (cfg.num_samples, cfg.num_classes, cfg.samples_per_class) == (50_000, 1000, 50)
    assert cfg.sampling == SampleConfig().sampling == SamplingConfig(guidance=1.5, top_k=900, top_p=0.96,
                                                                     more_smooth=False)
    assert cfg.feature_extractor == "inception-v3-compat"
    assert [cfg.label_of(i) for i in (0, 49, 50, 49_999)] == [0, 0, 1, 999]
    with pytest.raises(ConfigError, match="exactly one of reference.npz"):
        load_config(FidConfig, None, ["reference.images=data/demo/val", "reference.npz=ref.npz"])
    assert load_config(FidConfig, None, ["reference.images=data/demo/val"]).reference.npz == ""
    with pytest.raises(ConfigError, match="sampling.top_p=1.5"):
        load_config(FidConfig, None, ["sampling.top_p=1.5"])
    # the keys of before the sampling section still load where they went
    old = load_config(FidConfig, None, ["cfg=2.5", "top_k=7", "more_smooth=true"])
    assert old.sampling == SamplingConfig(guidance=2.5, top_k=7, more_smooth=True)
    assert load_config(SampleConfig, None, ["sampling.cfg=3"]).sampling.guidance == 3.0
    with pytest.raises(ConfigError, match="are both set; keep only 'sampling.guidance'"):
        load_config(FidConfig, None, ["cfg=2.5", "sampling.guidance=1"])
    with pytest.raises(ConfigError, match="save_npz"):
        load_config(FidConfig, None, ["classifier.train_images=a", "classifier.heldout_images=b"])


@pytest.mark.parametrize("name,cls", [("fid_demo.yaml", FidConfig), ("fid_imagenet256.yaml", FidConfig),
                                      ("sample_demo.yaml", SampleConfig)])
def test_shipped_eval_configs_load(name, cls):
    cfg = load_config(cls, name)
    if name == "fid_imagenet256.yaml":
        assert (cfg.num_samples, cfg.sampling) == (50_000, SamplingConfig())
        assert cfg.reference.npz.endswith("/VIRTUAL_imagenet256_labeled.npz")


# ------------------------------------------------------------------------------------------------
# Classifier check


def _folder(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(n):
            img = np.clip(rng.normal(colour, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{j}.png")


def test_classifier_check_scores_samples_and_real_images(tmp_path):
    _folder(tmp_path / "train", 12, 0)
    _folder(tmp_path / "val", 4, 1)
    out = tmp_path / "fid"
    out.mkdir()
    samples = np.zeros((6, 16, 16, 3), np.uint8)
    samples[:3, ..., 0] = 230  # red = class 0
    samples[3:, ..., 2] = 230  # blue = class 1
    labels = np.array([0, 0, 0, 1, 1, 0])  # the last one is labelled wrong
    buf = io.BytesIO()
    np.savez(buf, arr_0=samples, labels=labels)
    (out / "samples.npz").write_bytes(buf.getvalue())
    cfg = load_config(FidConfig, None, [f"output={out}", "save_npz=true", f"classifier.train_images={tmp_path / 'train'}",
                                        f"classifier.heldout_images={tmp_path / 'val'}", "classifier.image_size=8",
                                        "classifier.steps=25", "reference.images=x"])
    result = evaluate_demo_samples(cfg)
    assert result["real_accuracy"] == 1.0 and result["num_real"] == 8 and result["train_images"] == 24
    assert result["sample_accuracy"] == pytest.approx(5 / 6)
    assert result["per_class"] == {"c0": {"samples": 0.75, "real": 1.0}, "c1": {"samples": 1.0, "real": 1.0}}
    assert (out / "classifier.json").exists()


def test_classifier_training_is_seeded():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (32, 16, 16, 3), dtype=np.uint8), rng.integers(0, 2, 32)
    state = torch.random.get_rng_state()
    a = train_classifier(x, y, 2, size=8, steps=2, seed=5)
    b = train_classifier(x, y, 2, size=8, steps=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
