"""Image bytes -> RGB picture -> K augmented views, with a reason string for everything rejected.

Decoding never raises on bad data: :func:`decode_image` returns ``(None, reason)`` for empty, non-image,
corrupt, truncated and too-small files, and converts what can be converted (greyscale, palette, CMYK,
alpha composited over white, 16-bit and float greyscale rescaled to 8 bits). Views follow the official
VAR augmentation (torchvision ``Resize(round(1.125 * size), LANCZOS)`` + ``RandomCrop(size)``, no flip)
or a centre crop; crop offsets come from ``(seed, key, view)`` only, so a rerun makes identical views
whatever the worker, batch or order.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# file extensions decoded as images; other files are listed and rejected without being read
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def decode_image(data: bytes, min_side: int = 16) -> tuple[Image.Image | None, str]:
    """``(RGB image, "")`` or ``(None, reason)``; ``min_side`` rejects images too small to upsample sensibly."""
    if not data:
        return None, "empty file"
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error here, not a grey bottom half
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        return None, "not an image, or its header is corrupt (no known image format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"too large to decode safely ({e})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"corrupt or truncated image ({type(e).__name__}: {e})"
    w, h = img.size
    if min(w, h) < min_side:
        return None, f"too small: {w}x{h} px, shorter side below min_image_side={min_side}"
    try:
        return to_rgb(img), ""
    except (OSError, ValueError) as e:
        return None, f"cannot convert image mode {img.mode!r} to RGB ({e})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha over white, 16-bit/float greyscale rescaled, CMYK/palette/L converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # PIL's convert("L") clips 16-bit values at 255 (a white image); rescale the full range instead
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F":
            top = 1.0 if peak <= 1 else 255.0
        else:  # 32-bit "I": 16-bit PNGs decode to it on some Pillow versions
            top = 65535.0 if peak > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def key_seed(key: str) -> int:
    """A stable 64-bit integer of a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Lanczos resize so the shorter side is ``side``; the longer one truncated like torchvision's Resize(int)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if size == (w, h) else img.resize(size, Image.LANCZOS)


def make_views(img: Image.Image, key: str, *, image_size: int, views: int, augmentation: str,
               seed: int, crop_ratio: float = 1.125) -> np.ndarray:
    """K views of an RGB image as uint8 (K, S, S, 3); crop offsets drawn from ``(seed, key, view)`` only."""
    if augmentation == "center":
        base = resize_shorter(img, image_size)
        w, h = base.size
        left, top = int(round((w - image_size) / 2.0)), int(round((h - image_size) / 2.0))
        crop = np.asarray(base.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
        return np.repeat(crop[None], views, axis=0)
    if augmentation != "official":
        raise ValueError(f"augmentation={augmentation!r} is unknown; use 'official' or 'center'")
    base = resize_shorter(img, round(crop_ratio * image_size))
    arr = np.asarray(base, dtype=np.uint8)
    h, w = arr.shape[:2]
    out = np.empty((views, image_size, image_size, 3), dtype=np.uint8)
    ks = key_seed(key)
    for v in range(views):
        rng = np.random.default_rng((seed, ks, v))
        top, left = int(rng.integers(0, h - image_size + 1)), int(rng.integers(0, w - image_size + 1))
        out[v] = arr[top:top + image_size, left:left + image_size]
    return out


def to_float(views_NHWC: np.ndarray) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S) in [-1, 1] (the official normalize_01_into_pm1)."""
    x = np.moveaxis(views_NHWC, -1, -3).astype(np.float32) / np.float32(255.0)  # ToTensor()
    return x * np.float32(2.0) - np.float32(1.0)
