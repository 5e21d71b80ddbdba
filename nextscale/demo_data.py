"""The built-in demo dataset: ten recognisable classes of coloured shapes on textured backgrounds.

Procedural and deterministic (same bytes on every machine with the same Pillow/libjpeg): image j of
class c in split s is drawn from ``numpy.random.default_rng((SEED, split_id, c, j))``. Each class is
one shape in one colour family, so a small classifier can tell whether generated samples look like
their class. Written as an ImageFolder of JPEG files: ``OUT/{train,val}/<class>/<class>_<j>.jpg``.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SEED = 20240402
IMAGE_SIZE = 64
# (folder name, shape, base RGB colour); folder names sort in class-index order
CLASSES = (
    ("c0_red_disc", "disc", (220, 40, 40)),
    ("c1_green_square", "square", (40, 190, 60)),
    ("c2_blue_triangle", "triangle", (40, 80, 230)),
    ("c3_yellow_star", "star", (240, 220, 30)),
    ("c4_magenta_ring", "ring", (220, 40, 200)),
    ("c5_cyan_cross", "cross", (30, 210, 220)),
    ("c6_orange_diamond", "diamond", (250, 140, 20)),
    ("c7_white_bars", "bars", (245, 245, 245)),
    ("c8_purple_hexagon", "hexagon", (130, 50, 200)),
    ("c9_black_crescent", "crescent", (15, 15, 15)),
)
SPLITS = {"train": 300, "val": 50}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted textured background: a colour gradient plus one of stripes / checks / blobs, plus grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(60, 170, 3), rng.uniform(60, 170, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(3)
    freq = rng.uniform(3, 9)
    if kind == 0:
        pattern = np.sin(2 * math.pi * freq * (np.cos(angle + 1) * xx + np.sin(angle + 1) * yy))
    elif kind == 1:
        pattern = np.sign(np.sin(2 * math.pi * freq * xx) * np.sin(2 * math.pi * freq * yy))
    else:
        centres = rng.uniform(0, 1, (4, 2))
        pattern = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 40) for cx, cy in centres) * 2 - 1
    img += pattern[..., None] * rng.uniform(10, 25)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = rot + k * math.pi / (n if inner else n / 2)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill: tuple):
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot + math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.3, 3, rot - math.pi / 2), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.3, 5, rot - math.pi / 2, inner=0.45), fill=fill)
    elif shape == "ring":
        w = max(3, r * 0.4)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(w))
    elif shape == "cross":
        w = r * 0.38
        for a in (rot, rot + math.pi / 2):
            dx, dy, px, py = math.cos(a) * r * 1.2, math.sin(a) * r * 1.2, -math.sin(a) * w, math.cos(a) * w
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                          (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=fill)
    elif shape == "diamond":
        pts = _polygon(cx, cy, r * 1.3, 4, rot)
        pts = [(cx + (x - cx) * 0.6, y) for x, y in pts]
        draw.polygon(pts, fill=fill)
    elif shape == "bars":
        for k in (-1, 0, 1):
            y = cy + k * r * 0.7
            draw.rectangle([cx - r * 1.2, y - r * 0.2, cx + r * 1.2, y + r * 0.2], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.15, 6, rot), fill=fill)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ox, oy = math.cos(rot) * r * 0.55, math.sin(rot) * r * 0.55
        return ("cut", [cx - r * 0.85 + ox, cy - r * 0.85 + oy, cx + r * 0.85 + ox, cy + r * 0.85 + oy])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return None


def render(class_index: int, split_id: int, index: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Image ``index`` of class ``class_index`` in split ``split_id`` (0 train, 1 val)."""
    rng = np.random.default_rng((SEED, split_id, class_index, index))
    _, shape, colour = CLASSES[class_index]
    bg = _background(rng, size)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.32)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in colour)
    cut = _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    if cut is not None:  # the crescent: paste the background back over an offset disc
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse(cut[1], fill=255)
        img.paste(Image.fromarray(bg), (0, 0), mask)
    return img


def make_demo_data(out_dir: str, counts: dict[str, int] | None = None, size: int = IMAGE_SIZE) -> dict:
    """Write the dataset under ``out_dir`` (skipped if its ``dataset.json`` already exists) and return its summary."""
    counts = counts or SPLITS
    summary_path = os.path.join(out_dir, "dataset.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("counts") == counts and summary.get("image_size") == size:
            log.info("demo dataset already at %s", out_dir)
            return summary
    for split_id, (split, n) in enumerate(counts.items()):
        for c, (name, _, _) in enumerate(CLASSES):
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for j in range(n):
                render(c, split_id, j, size).save(os.path.join(folder, f"{name}_{j:04d}.jpg"), quality=95)
    summary = {
        "classes": [name for name, _, _ in CLASSES], "counts": counts, "image_size": size,
        "splits": {split: os.path.join(out_dir, split) for split in counts},
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    log.info("wrote the demo dataset (%s images per class) to %s", counts, out_dir)
    return summary
