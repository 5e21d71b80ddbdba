"""Pictures and curves written while training, next to the checkpoints (and to wandb when it is on).

- ``curves.png`` (both loops, at every checkpoint): one panel per quantity over steps, drawn from the
  rows of ``metrics.jsonl``: :data:`PRIOR_CURVES`, :data:`TOKENIZER_CURVES`.
- ``samples/step-XXXXXXXX.png`` (prior, every ``sample_every`` steps): one row per class
  of a fixed spread of classes, seeds fixed per row, so successive grids show the same draws improving.
- ``reconstructions/step-XXXXXXXX.png`` (tokenizer, same schedule): one row per fixed held-out image:
  the original, then the reconstruction from the first 1, 2, ..., S scales (the last is the full one).

Curves are drawn with matplotlib (its Agg canvas, no display needed); the sample grids and strips are images
put together with numpy and Pillow.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from nextscale import checkpoint, storage
from nextscale.eval.config import SamplingConfig
from nextscale.eval.features import to_uint8
from nextscale.eval.generate import sample_batch, seeded_generator
from nextscale.eval.pictures import png_bytes, tile_grid
from nextscale.tokenize.data import ImageFolderDataset

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of curves.png: the metrics.jsonl keys drawn in it (left out when none occurs)."""

    title: str
    keys: tuple[str, ...]
    noisy: bool = True  # per-batch measurements: the raw line faint, a smoothed line over it
    loss: bool = False  # a loss: log y axis when it spans a decade or more


PRIOR_CURVES = (Panel("loss (cross-entropy per token)", ("loss",), loss=True),
                Panel("token accuracy: first / last scale", ("acc_first", "acc_last")),
                Panel("learning rate", ("lr",), noisy=False),
                Panel("gradient norm (before clipping)", ("grad_norm",), loss=True))
TOKENIZER_CURVES = (Panel("PSNR (dB), training batches", ("psnr_db",)),
                    Panel("codebook usage", ("codebook_usage",), noisy=False),
                    Panel("reconstruction and VQ losses", ("l1", "l2", "vq_loss"), loss=True),
                    Panel("total loss", ("loss",), loss=True),
                    Panel("GAN losses", ("g_loss", "d_loss"), loss=True),
                    Panel("learning rate", ("lr",), noisy=False))
PANEL_SIZE, DPI, FONT_SIZE = (560, 360), 100, 11  # a curve panel's (width, height) in pixels: text reads in the README
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
# a smoothed line over the raw one from MIN_SMOOTHED points on, averaging 1/SMOOTH_POINTS of them around each
MIN_SMOOTHED, SMOOTH_POINTS = 10, 20
GRID_CLASSES, GRID_SAMPLES, MIN_TILE = 8, 4, 64  # prior grids: classes x samples, tiles upscaled to >= 64 px
STRIP_IMAGES = 4


# ------------------------------------------------------------------------------------------------
# Curves


def draw_curves(rows: Sequence[dict], panels: Sequence[Panel], *, cols: int = 2,
                panel_size: tuple[int, int] = PANEL_SIZE, x_key: str = "step") -> np.ndarray:
    """uint8 (H, W, 3) drawn with matplotlib: ``cols`` panels per line, each ``panel_size`` pixels; H = ceil(panels /
    cols) * height, W = min(cols, panels) * width, counting only panels with at least one finite value.

    Each panel has its axes, ticks, a grid and a legend (with the latest value); a noisy series is drawn raw and
    faint with its smoothed line over it; a loss's y axis is logarithmic where it spans a decade or more.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [dataclasses.replace(p, keys=tuple(k for k in p.keys if _points(rows, x_key, k))) for p in panels]
    present = [p for p in present if p.keys]
    if not present:
        raise ValueError(f"no values of {[k for p in panels for k in p.keys]} in {len(rows)} metric rows")
    n_cols = min(cols, len(present))
    n_rows = math.ceil(len(present) / n_cols)
    with rc_context({"font.size": FONT_SIZE}):
        fig = Figure(figsize=(n_cols * panel_size[0] / DPI, n_rows * panel_size[1] / DPI), dpi=DPI,
                     layout="constrained")
        canvas = FigureCanvasAgg(fig)
        for i, panel in enumerate(present):
            _draw_panel(fig.add_subplot(n_rows, n_cols, i + 1), panel, {k: _points(rows, x_key, k) for k in panel.keys},
                        x_key)
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _points(rows: Sequence[dict], x_key: str, key: str) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        x, y = r.get(x_key), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            out.append((float(x), float(y)))
    return out


def smooth(values: Sequence[float], half_window: int) -> np.ndarray:
    """Centred moving average over ``2 * half_window + 1`` points (fewer at the ends): no lag behind the data."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo, hi = np.maximum(i - half_window, 0), np.minimum(i + half_window + 1, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def _draw_panel(ax, panel: Panel, lines: dict[str, list[tuple[float, float]]], x_key: str) -> None:
    ys = [y for pts in lines.values() for _, y in pts]
    for (key, pts), color in zip(lines.items(), COLORS):
        x, y = np.array(pts).T
        label = f"{key} (last {y[-1]:.4g})"
        if panel.noisy and len(pts) >= MIN_SMOOTHED:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            ax.plot(x, smooth(y, max(1, len(pts) // SMOOTH_POINTS)), color=color, linewidth=2, label=label)
        else:
            ax.plot(x, y, color=color, linewidth=2, marker="o" if len(pts) == 1 else None, label=label)
    if panel.loss and min(ys) > 0 and max(ys) >= 10 * min(ys):
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4))  # a learning rate as 2.0 x 1e-3
    ax.set_title(panel.title)
    ax.set_xlabel(x_key)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="best", fontsize="small")


def write_curves(url: str, rows: Sequence[dict], panels: Sequence[Panel]) -> str | None:
    """Draw ``rows`` into ``url`` (a PNG); None (and nothing written) while there is nothing to draw."""
    try:
        image = draw_curves(rows, panels)
    except ValueError:
        return None
    storage.write_bytes(url, png_bytes(image))
    return url


# ------------------------------------------------------------------------------------------------
# Pictures during training


def grid_classes(num_classes: int, n: int = GRID_CLASSES) -> list[int]:
    """``n`` classes spread evenly over [0, num_classes) (all of them when there are fewer)."""
    n = min(n, num_classes)
    return [i * num_classes // n for i in range(n)]


def step_picture_url(output: str, folder: str, step: int) -> str:
    return storage.join(output, folder, f"step-{step:08d}.png")


class TrainingPictures:
    """The :class:`~nextscale.runtime.Pictures` of a training run: calls ``draw(step) -> uint8 (H, W, 3)`` every
    ``every`` steps, writes ``{output}/{folder}/step-XXXXXXXX.png`` and logs it to ``trackers`` (wandb,
    TensorBoard); draws the metric rows into ``{output}/curves.png`` as ``panels``. ``every`` = 0 draws no
    pictures (what other ranks than 0 get)."""

    def __init__(self, output: str, folder: str, every: int, draw: Callable[[int], np.ndarray], trackers=None,
                 caption: str = "", panels: Sequence[Panel] = ()):
        self.output, self.folder, self.every = output, folder, every
        self.draw, self.trackers, self.caption, self.panels = draw, trackers, caption, panels
        self.latest: str | None = None

    def __call__(self, step: int) -> float:
        """Draw if ``step`` is due; returns the seconds spent (so that throughput can leave them out)."""
        if not self.every or step % self.every:
            return 0.0
        t0 = time.perf_counter()
        # building a model on first use draws initial weights: the training run's random numbers stay untouched
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            image = self.draw(step)
        self.latest = step_picture_url(self.output, self.folder, step)
        storage.write_bytes(self.latest, png_bytes(image))
        if self.trackers is not None:
            self.trackers.log_image(self.folder, image, caption=self.caption, step=step)
        seconds = time.perf_counter() - t0
        log.info("step %d: wrote %s (%.1f s)", step, self.latest, seconds)
        return seconds

    def curves(self, history: Sequence[dict]) -> None:
        write_curves(storage.join(self.output, "curves.png"), history, self.panels)

    def where(self) -> dict[str, str | None]:
        return {"curves": storage.join(self.output, "curves.png"),
                self.folder: storage.join(self.output, self.folder) if self.every else None}


def prior_pictures(trainer) -> TrainingPictures:
    """The pictures of a prior run (a ``nextscale.prior.engine.PriorTrainer``): curves and sample grids of fixed
    classes and seeds, drawn on rank 0 alone (not possible on a sharded model, whose forward needs every rank)."""
    cfg, model = trainer.cfg, trainer.model
    every = cfg.sample_every if trainer.ctx.rank == 0 and not checkpoint.is_sharded(model) else 0
    classes = grid_classes(trainer.var_cfg.num_classes)
    return TrainingPictures(cfg.output, "samples", every,
                            lambda _: prior_sample_grid(model, trainer.decoder, classes, seed=cfg.seed),
                            trainer.trackers, caption="fixed classes and seeds", panels=PRIOR_CURVES)


def tokenizer_pictures(trainer) -> TrainingPictures:
    """The pictures of a tokenizer run (a ``nextscale.tokenize.train.TokenizerTrainer``): curves and reconstruction
    strips of the same few held-out images (training images when there are none), center-cropped, on rank 0."""
    cfg = trainer.cfg
    every = cfg.sample_every if trainer.ctx.rank == 0 else 0
    items = trainer.val_items or trainer.train_items
    strip_items = items[:: max(1, len(items) // STRIP_IMAGES)][:STRIP_IMAGES]
    strip_img = torch.stack(list(ImageFolderDataset(strip_items, trainer.vq_cfg.image_size, train=False))).to(
        trainer.device) if every else None
    return TrainingPictures(cfg.output, "reconstructions", every,
                            lambda _: reconstruction_strip(trainer.exported, strip_img), trainer.trackers,
                            caption="original, then decoded from the first 1, 2, ... scales", panels=TOKENIZER_CURVES)


@torch.no_grad()
def prior_sample_grid(var, vqvae, classes: Sequence[int], per_class: int = GRID_SAMPLES, seed: int = 0, *,
                      sampling: SamplingConfig | None = None) -> np.ndarray:
    """uint8 grid: row r = ``per_class`` samples of ``classes[r]`` drawn from a generator seeded by (seed, r),
    so the same row gets the same random numbers at every step (the paper's sampling settings unless
    ``sampling`` says otherwise). ``var`` is left in the mode it came in."""
    device = var.pos_start.device
    was_training = var.training
    var.eval()
    try:
        rows = []
        for r, c in enumerate(classes):
            _, img = sample_batch(var, vqvae, [c] * per_class, seeded_generator(device, seed, 2, r),
                                  sampling or SamplingConfig())
            rows.append(list(img))
    finally:
        var.train(was_training)
    return tile_grid(rows, upscale=max(1, MIN_TILE // vqvae.cfg.image_size))


@torch.no_grad()
def reconstruction_strip(vqvae, img_B3HW: torch.Tensor) -> np.ndarray:
    """uint8 picture: one row per image in [-1, 1]: the original, then the decoding of the first 1..S scales
    (the last column is the full reconstruction). ``vqvae`` is left in the mode it came in."""
    was_training = vqvae.training
    vqvae.eval()
    try:
        codes_BL = vqvae.encode(img_B3HW)
        columns = [img_B3HW] + vqvae.decode_scales(codes_BL)
    finally:
        vqvae.train(was_training)
    columns = [to_uint8(c.float().add(1).mul(0.5)) for c in columns]
    rows = [[col[b] for col in columns] for b in range(img_B3HW.shape[0])]
    return tile_grid(rows, upscale=max(1, MIN_TILE // vqvae.cfg.image_size))


# ------------------------------------------------------------------------------------------------
# README pictures (written by the demo)


def docs_copy(src_url: str, dest_path: str, max_side: int = 640) -> dict:
    """Copy the PNG at ``src_url`` to ``dest_path``, shrunk by the smallest whole factor that brings its longer
    side to at most ``max_side`` (nearest neighbour: the upscaled tiles of a grid stay sharp); 0 = as it is."""
    with Image.open(io.BytesIO(storage.read_bytes(src_url))) as im:
        image = im.convert("RGB")
    factor = math.ceil(max(image.size) / max_side) if max_side else 1
    if factor > 1:
        image = image.resize((image.width // factor, image.height // factor), Image.NEAREST)
    storage.write_bytes(dest_path, png_bytes(np.asarray(image)))
    return {"path": dest_path, "width": image.width, "height": image.height}
