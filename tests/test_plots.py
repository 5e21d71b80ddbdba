"""Pictures and curves during training: curves.png, prior sample grids, tokenizer reconstruction strips."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prior_codes import write_codes
from strict_json import check_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nextscale.config import load_config
from nextscale.eval import plots
from nextscale.prior.config import PriorTrainConfig
from nextscale.prior.engine import train_prior
from nextscale.runtime import LocalContext
from nextscale.tokenize.config import TokenizerTrainConfig
from nextscale.tokenize.loader import save_tokenizer
from nextscale.tokenize.train import train_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path) -> np.ndarray:
    return _png_bytes(path.read_bytes())


def _png_bytes(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _events(folder: Path) -> EventAccumulator:
    """The run's event files read back with TensorBoard's own reader (every event kept)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _rows(n: int, scale: float = 1.0) -> list[dict]:
    return [{"step": 10 * (i + 1), "loss": scale * 4.0 / (i + 1), "acc_first": 0.1 * i, "acc_last": 0.05 * i,
             "lr": 1e-3, "grad_norm": float("nan") if i == 2 else 1.0 + i} for i in range(n)]


def test_curves_have_the_panel_layout_size_and_follow_the_data():
    w, h = plots.PANEL_SIZE
    image = plots.draw_curves(_rows(6), plots.PRIOR_CURVES)
    assert image.shape == (2 * h, 2 * w, 3) and image.dtype == np.uint8
    assert not (image == plots.draw_curves(_rows(6, scale=2.0), plots.PRIOR_CURVES)).all()
    assert (image == plots.draw_curves(_rows(6), plots.PRIOR_CURVES)).all()
    # panels whose keys never occur are left out: 3 of the tokenizer's 6 here -> 2 lines of 2
    tok = plots.draw_curves([{"step": 1, "psnr_db": 12.0, "loss": 1.0, "lr": 1e-3}], plots.TOKENIZER_CURVES)
    assert tok.shape == (2 * h, 2 * w, 3)
    with pytest.raises(ValueError, match="no values"):
        plots.draw_curves([{"step": 1}], plots.PRIOR_CURVES)


def test_grid_classes_are_spread_and_fixed():
    assert plots.grid_classes(1000) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert plots.grid_classes(3) == [0, 1, 2]


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(root / "tokenizer.pt"))
    return write_codes(str(root / "codes"), str(root / "tokenizer.pt"), num_samples=16, views=1, seed=0)


def _prior_cfg(codes: str, out: Path, *extra: str) -> PriorTrainConfig:
    return load_config(PriorTrainConfig, None, [
        f"data.url={codes}", "data.batch_size=8", "model.preset=golden_tiny", "steps=4", "log_every=1",
        "ckpt_every=2", f"output={out}", "workers.count=0", "optim.lr=1e-2", *extra])


def test_prior_training_writes_sample_grids_and_curves_without_changing_the_run(codes, tmp_path):
    cfg = _prior_cfg(codes, tmp_path / "a", "sample_every=2")
    summary = train_prior(cfg, LocalContext(cfg.output), plots.prior_pictures)
    out = tmp_path / "a"
    assert summary["pictures"] == {"curves": str(out / "curves.png"), "samples": str(out / "samples")}
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    first, last = _png(out / "samples" / "step-00000002.png"), _png(out / "samples" / "step-00000004.png")
    # 8 classes x 4 samples of 64 px with 2-px padding
    assert first.shape == last.shape == (8 * 64 + 9 * 2, 4 * 64 + 5 * 2, 3)
    assert not (first == last).all()  # same seeds, trained weights: the grid moves with the model
    w, h = plots.PANEL_SIZE
    assert _png(out / "curves.png").shape == (2 * h, 2 * w, 3)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (_png(out / "curves.png") == plots.draw_curves(rows, plots.PRIOR_CURVES)).all()

    # sampling between steps touches no training random numbers: the weights equal a run without pictures
    plain = _prior_cfg(codes, tmp_path / "b", "sample_every=0")
    assert train_prior(plain, LocalContext(plain.output), plots.prior_pictures)["pictures"]["samples"] is None
    a = torch.load(out / "prior.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "prior.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "samples").exists()

    # TensorBoard: every logged metric, the sample grids as images, the resolved config as text
    events = _events(out / "tensorboard")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # stored as float32
    assert "train/mfu" not in events.Tags()["scalars"]  # NaN on a CPU: nothing to draw
    grids = events.Images("samples")
    assert [e.step for e in grids] == [2, 4]
    assert (_png_bytes(grids[-1].encoded_image_string) == last).all()
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    output: " + str(out) in config and "    steps: 4" in config
    # strict JSON in every file the stage wrote (the mfu of a CPU run is null, not NaN)
    assert {"train_summary.json", "metrics.jsonl"} <= set(check_tree(out))
    summary_json = json.loads((out / "train_summary.json").read_text())
    assert summary_json["mfu"] is None and summary["mfu"] != summary["mfu"]


def test_tensorboard_can_be_turned_off(codes, tmp_path):
    cfg = _prior_cfg(codes, tmp_path, "steps=2", "sample_every=0", "tensorboard.enabled=false")
    train_prior(cfg, LocalContext(cfg.output))
    assert (tmp_path / "prior.pt").exists() and not (tmp_path / "tensorboard").exists()


def test_tokenizer_training_writes_reconstruction_strips_and_curves(tmp_path):
    from nextscale.demo_data import make_demo_data

    make_demo_data(str(tmp_path / "data"), counts={"train": 1, "val": 1})
    cfg = load_config(TokenizerTrainConfig, None, [
        f"data.url={tmp_path}/data/train", f"data.val_url={tmp_path}/data/val", "data.batch_size=4",
        "data.loader_processes=0", "model.overrides.image_size=16", "model.overrides.patch_nums=1,2,4",
        "model.overrides.vocab_size=32", "model.overrides.z_channels=8", "model.overrides.using_sa=false",
        "optim.steps=4", "optim.warmup=1", "optim.lr=3e-3", "ema_decay=0", "log_every=1", "ckpt_every=2",
        "sample_every=2", f"output={tmp_path / 'run'}"])
    summary = train_tokenizer(cfg, LocalContext(cfg.output), plots.tokenizer_pictures)
    out = tmp_path / "run"
    assert summary["pictures"]["reconstructions"] == str(out / "reconstructions")
    first, last = (_png(out / "reconstructions" / f"step-0000000{s}.png") for s in (2, 4))
    # 4 held-out images; columns: the original + 3 scales; 16-px tiles shown at 64 px
    assert first.shape == last.shape == (4 * 64 + 5 * 2, 4 * 64 + 5 * 2, 3)
    assert (first[:, : 64 + 2] == last[:, : 64 + 2]).all()  # the originals do not change
    assert not (first[:, 64 + 2:] == last[:, 64 + 2:]).all()  # the reconstructions do
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("psnr_db" in r for r in rows)
    w, h = plots.PANEL_SIZE
    assert _png(out / "curves.png").shape == (3 * h, 2 * w, 3)  # PSNR, usage, losses, total, lr
    events = _events(out / "tensorboard")
    assert [e.step for e in events.Scalars("train/psnr_db")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images("reconstructions")] == [2, 4]
    assert (_png_bytes(events.Images("reconstructions")[0].encoded_image_string) == first).all()
    assert {"metrics.jsonl", "tokenizer_eval.json"} <= set(check_tree(out))


def test_the_demo_writes_the_readme_pictures_and_the_readme_shows_them(tmp_path):
    from nextscale.eval.pictures import png_bytes
    from nextscale.pipelines.demo import DOCS_PICTURES, docs_pictures

    rng = np.random.default_rng(0)
    sizes = {"grid": (1034, 1290), "coarse_to_fine": (400, 600), "curves": (480, 800)}
    for name, (h, w) in sizes.items():
        (tmp_path / f"{name}.png").write_bytes(png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    results = {"stages": {"sample": {"pictures": {n: {"url": str(tmp_path / f"{n}.png")} for n in ("grid", "coarse_to_fine")}},
                          "train-prior": {"pictures": {"curves": str(tmp_path / "curves.png")}}}}
    written = docs_pictures(results, str(tmp_path / "docs"))
    # shrunk by the smallest whole factor that fits 640 px: 3 and 1; the curves as drawn
    assert {n: (w["height"], w["width"]) for n, w in written.items()} == {
        "demo_grid.png": (344, 430), "demo_coarse_to_fine.png": (400, 600), "demo_prior_curves.png": (480, 800)}
    assert (_png(tmp_path / "docs" / "demo_coarse_to_fine.png") == _png(tmp_path / "coarse_to_fine.png")).all()
    assert _png(tmp_path / "docs" / "demo_grid.png").shape == (344, 430, 3)
    # without the prior stage (e.g. stages=[sample]) its picture is simply not rewritten
    assert set(docs_pictures({"stages": {"sample": results["stages"]["sample"]}}, str(tmp_path / "d2"))) == {
        "demo_grid.png", "demo_coarse_to_fine.png"}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = set(re.findall(r"docs/images/([\w.-]+\.png)", readme))
    assert shown == set(DOCS_PICTURES)  # the README shows exactly what `make demo` writes
