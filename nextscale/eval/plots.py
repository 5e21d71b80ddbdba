"""Pictures and curves written while training, next to the checkpoints (and to wandb when it is on).

- ``curves.png`` (both loops, at every checkpoint): one panel per quantity over steps, drawn from the
  rows of ``metrics.jsonl``: :data:`PRIOR_CURVES`, :data:`TOKENIZER_CURVES`.
- ``samples/step-XXXXXXXX.png`` (prior, every ``sample_every`` steps): one row per class
  of a fixed spread of classes, seeds fixed per row, so successive grids show the same draws improving.
- ``reconstructions/step-XXXXXXXX.png`` (tokenizer, same schedule): one row per fixed held-out image:
  the original, then the reconstruction from the first 1, 2, ..., S scales (the last is the full one).

Curves are drawn with Pillow alone (no plotting library to install, the same pixels on every machine).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nextscale import storage
from nextscale.eval.config import SamplingConfig

log = logging.getLogger(__name__)

# (panel title, metrics.jsonl keys drawn in it); a panel whose keys never occur is left out
PRIOR_CURVES = (("loss", ("loss",)), ("token accuracy: first / last scale", ("acc_first", "acc_last")),
                ("learning rate", ("lr",)), ("gradient norm (before clipping)", ("grad_norm",)))
TOKENIZER_CURVES = (("PSNR (dB), training batches", ("psnr_db",)), ("codebook usage", ("codebook_usage",)),
                    ("reconstruction and VQ losses", ("l1", "l2", "vq_loss")), ("total loss", ("loss",)),
                    ("GAN losses", ("g_loss", "d_loss")), ("learning rate", ("lr",)))
PANEL_SIZE = (400, 240)  # (width, height) in pixels
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
GRID_CLASSES, GRID_SAMPLES, MIN_TILE = 8, 4, 64  # prior grids: classes x samples, tiles upscaled to >= 64 px
STRIP_IMAGES = 4


# ------------------------------------------------------------------------------------------------
# Curves


def draw_curves(rows: Sequence[dict], panels: Sequence[tuple[str, Sequence[str]]], *, cols: int = 2,
                panel_size: tuple[int, int] = PANEL_SIZE, x_key: str = "step") -> np.ndarray:
    """uint8 (H, W, 3): ``cols`` panels per line, each ``panel_size``; H = ceil(panels / cols) * height,
    W = min(cols, panels) * width, counting only panels with at least one finite value."""
    present = [(title, [k for k in keys if _points(rows, x_key, k)]) for title, keys in panels]
    present = [(title, keys) for title, keys in present if keys]
    if not present:
        raise ValueError(f"no values of {[k for _, keys in panels for k in keys]} in {len(rows)} metric rows")
    pw, ph = panel_size
    n_cols = min(cols, len(present))
    canvas = Image.new("RGB", (n_cols * pw, math.ceil(len(present) / n_cols) * ph), "white")
    for i, (title, keys) in enumerate(present):
        _draw_panel(canvas, (i % n_cols) * pw, (i // n_cols) * ph, pw, ph, title,
                    {k: _points(rows, x_key, k) for k in keys})
    return np.asarray(canvas)


def _points(rows: Sequence[dict], x_key: str, key: str) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        x, y = r.get(x_key), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            out.append((float(x), float(y)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _draw_panel(canvas: Image.Image, x0: int, y0: int, w: int, h: int, title: str,
                lines: dict[str, list[tuple[float, float]]]) -> None:
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    left, right, top, bottom = x0 + 58, x0 + w - 12, y0 + 34, y0 + h - 24  # the plot area
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:  # a flat line sits in the middle
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.text((x0 + 8, y0 + 4), title, fill="black", font=font)
    legend_x = x0 + 8
    for (key, pts), color in zip(lines.items(), COLORS):
        label = f"{key} {_fmt(pts[-1][1])}"  # the latest value beside the name
        draw.text((legend_x, y0 + 18), label, fill=color, font=font)
        legend_x += int(draw.textlength(label, font=font)) + 14
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    for y in (y_lo, y_hi):
        draw.text((x0 + 4, to_px(x_lo, y)[1] - 6), _fmt(y), fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 6), _fmt(x_lo), fill=(90, 90, 90), font=font)
    label = f"step {_fmt(x_hi)}"
    draw.text((right - draw.textlength(label, font=font), bottom + 6), label, fill=(90, 90, 90), font=font)
    for (_, pts), color in zip(lines.items(), COLORS):
        px = [to_px(x, y) for x, y in pts]
        if len(px) == 1:
            draw.ellipse((px[0][0] - 2, px[0][1] - 2, px[0][0] + 2, px[0][1] + 2), fill=color)
        else:
            draw.line(px, fill=color, width=2)


def write_curves(url: str, rows: Sequence[dict], panels: Sequence[tuple[str, Sequence[str]]]) -> str | None:
    """Draw ``rows`` into ``url`` (a PNG); None (and nothing written) while there is nothing to draw."""
    try:
        image = draw_curves(rows, panels)
    except ValueError:
        return None
    storage.write_bytes(url, _png(image))
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
    """Calls ``draw(step) -> uint8 (H, W, 3)`` every ``every`` steps; writes ``{output}/{folder}/step-XXXXXXXX.png``
    and logs it to wandb. ``every`` = 0 turns it off (and is what other ranks than 0 get)."""

    def __init__(self, output: str, folder: str, every: int, draw: Callable[[int], np.ndarray], wandb=None,
                 caption: str = ""):
        self.output, self.folder, self.every = output, folder, every
        self.draw, self.wandb, self.caption = draw, wandb, caption
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
        storage.write_bytes(self.latest, _png(image))
        if self.wandb is not None:
            self.wandb.log_image(self.folder, image, caption=self.caption, step=step)
        seconds = time.perf_counter() - t0
        log.info("step %d: wrote %s (%.1f s)", step, self.latest, seconds)
        return seconds

    @property
    def where(self) -> str:
        return storage.join(self.output, self.folder)


def _png(image: np.ndarray) -> bytes:
    from nextscale.eval.pictures import png_bytes

    return png_bytes(image)


@torch.no_grad()
def prior_sample_grid(var, vqvae, classes: Sequence[int], per_class: int = GRID_SAMPLES, seed: int = 0, *,
                      sampling: SamplingConfig | None = None) -> np.ndarray:
    """uint8 grid: row r = ``per_class`` samples of ``classes[r]`` drawn from a generator seeded by (seed, r),
    so the same row gets the same random numbers at every step (the paper's sampling settings unless
    ``sampling`` says otherwise). ``var`` is left in the mode it came in."""
    from nextscale.eval.generate import sample_batch, seeded_generator
    from nextscale.eval.pictures import tile_grid

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
    from nextscale.eval.features import to_uint8
    from nextscale.eval.pictures import tile_grid

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
    side to at most ``max_side`` (nearest neighbour: the upscaled tiles of a grid stay sharp)."""
    with Image.open(io.BytesIO(storage.read_bytes(src_url))) as im:
        image = im.convert("RGB")
    factor = math.ceil(max(image.size) / max_side)
    if factor > 1:
        image = image.resize((image.width // factor, image.height // factor), Image.NEAREST)
    storage.write_bytes(dest_path, _png(np.asarray(image)))
    return {"path": dest_path, "width": image.width, "height": image.height}
