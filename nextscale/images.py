"""Images, in one place: ImageFolder listing, robust decoding and the official VAR preprocessing.

Listing (:func:`list_image_folder`) walks ``<root>/<class>/...`` on any ``nextscale.storage`` location,
following symbolic links that resolve, and returns every entry it finds as an item, accepted or rejected
with its reason (hidden files, dangling links, link loops, files outside a class folder, unknown classes,
non-image files), so the counts always add up to what is on disk. A folder that cannot be listed, or a class folder without an image, stops the listing with a
message naming it: its images could be neither accepted nor rejected, and leaving a class out would
shift every later class index. Labels that come with the samples (webdataset ``.cls``) are checked here
too (:func:`label_reason`, :func:`classes_from_labels`), not in the readers of the input formats.

Decoding (:func:`decode_image`) never raises on bad data: it returns ``(None, reason)`` for empty,
non-image, corrupt, truncated and too-small files, and converts what can be converted (greyscale,
palette, CMYK, alpha composited over white, 16-bit and float greyscale rescaled to 8 bits).

Preprocessing is bit-identical to torchvision as the official VAR code uses it (``utils/data.py``):
``Resize(side, interpolation=LANCZOS)`` is :func:`resize_shorter`, ``CenterCrop`` is :func:`center_crop`,
``RandomCrop`` is the crop of :func:`make_views` (offsets drawn from ``(seed, key, view)`` only, so a
rerun makes identical views whatever the worker, batch or order), ``ToTensor`` then ``x * 2 - 1`` is
:func:`to_float`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import posixpath
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from nextscale import storage
from nextscale.codes import sanitize_key, unique_key
from nextscale.errors import UserError

log = logging.getLogger(__name__)

# file extensions decoded as images; other files are listed and rejected without being read
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
MAX_DEPTH = 32  # folder nesting beyond this is a loop the link check cannot see (a bind mount), not a dataset


# why an entry that is not a file, nor a folder to walk, is rejected (kinds of :func:`walk`)
KIND_REASONS = {
    "dangling": "a symbolic link to a file or folder that does not exist (dangling); fix or remove the link",
    "loop": "a symbolic link to a folder that contains it, or to itself (a loop); remove the link",
    "other": "neither a file nor a folder (a socket or a device?); remove it",
}


class InputError(UserError, ValueError):
    """An input location or its layout cannot be used; the message names the location and the fix."""


# ------------------------------------------------------------------------------------------------
# Listing


def walk(root: str) -> tuple[Iterator[tuple[str, str]], list[str]]:
    """``(entries, top-level folders)`` under ``root``: entries ``(relative path, kind)`` come in sorted path order,
    streamed one folder listing at a time, so a walk holds one folder's listing per level, not the tree's.

    kind is "file", "hidden" (a name starting with '.'; a hidden folder is one entry, not entered),
    "dangling" (a symbolic link to nothing), "loop" (a symbolic link to a folder the walk is inside, or to
    itself) or "other" (neither file nor folder: a socket, a device). Symbolic links that resolve are
    followed: a link to a file is a file, a link to a folder is walked (symlink farms of shared datasets).
    Top-level folders are the non-hidden folders directly under ``root``, empty ones included. A folder
    whose listing fails raises :class:`InputError` naming it (as the walk reaches it).
    """
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        what = "is a file, not a folder" if fs.exists(path) else "does not exist"
        raise InputError(f"input {root!r} {what}; give an ImageFolder root (<root>/<class>/<image>)")
    inside = (_real(path),)
    children = _children(fs, root, path, "", inside)
    top = sorted(rel[:-1] for rel, _, kind in children if kind == "directory")  # by name, as torchvision's
    return _entries(fs, root, children, inside), top


def _entries(fs, root: str, children: list[tuple[str, str, str]], inside: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for rel, name, kind in children:
        if kind == "directory":
            folder = (*inside, _real(name))
            yield from _entries(fs, root, _children(fs, root, name, rel[:-1], folder), folder)
        else:
            yield rel, kind if kind in ("file", "hidden", "dangling", "loop") else "other"


def _children(fs, root: str, folder: str, rel: str, inside: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(relative path, full name, kind)`` of the entries of one folder, in the order of the whole walk: sorted by
    relative path with a folder's ending in "/" ("a-1.jpg" < "a/" as "a-1.jpg" < "a/x.jpg")."""
    if len(inside) > MAX_DEPTH:
        raise InputError(f"folders nest deeper than {MAX_DEPTH} levels at {storage.join(root, rel)!r}; "
                         "is a folder mounted inside itself? remove the loop")
    try:
        listed = fs.ls(folder, detail=True)
    except OSError as e:
        where = storage.join(root, rel) if rel else root
        raise InputError(f"cannot list folder {where!r} ({type(e).__name__}: {e}); none of its files could be "
                         "accepted or rejected: fix its permissions, or move it out of the input") from None
    children = []
    for e in listed:
        name = e["name"].rstrip("/")
        if name == folder.rstrip("/"):
            continue  # an object store's marker of the folder itself
        base = name.rsplit("/", 1)[-1]
        child = f"{rel}/{base}" if rel else base
        kind = "hidden" if base.startswith(".") else _link_kind(fs, name, inside) if e.get("islink") else e["type"]
        children.append((child + "/" if kind == "directory" else child, name, kind))
    return sorted(children)


def _real(path: str) -> str:
    """The path with every symbolic link resolved (a no-op on object stores, which have none)."""
    return os.path.realpath(path) if os.path.isabs(path) else path


def _link_kind(fs, name: str, inside: tuple[str, ...]) -> str:
    """What the symbolic link ``name`` resolves to: "file", "directory", "other", "dangling", or "loop" when it is
    a folder the walk is already inside (``inside``: the resolved folders from the root down)."""
    try:
        kind = fs.info(name)["type"]  # follows the link (fsspec's ls reports every link as type "other")
    except FileNotFoundError:
        return "dangling"
    except OSError:  # ELOOP: a link that resolves to itself
        return "loop"
    if kind == "directory":
        target = _real(name)
        if any(f == target or f.startswith(target.rstrip("/") + "/") for f in inside):
            return "loop"
    return kind


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def iter_image_folder(root: str, class_list: list[str] | None = None) -> tuple[list[str], Iterator[dict]]:
    """``(class names in index order, items)``: every entry under ``root`` as an item ``{key, source, label,
    reason}`` (reason "" = usable), streamed in sorted path order; the classes are ``class_list``, or the sorted
    class folders (empty ones included).

    Keys are the paths without extension, made webdataset-safe and unique. The checks that need the whole
    listing (no files at all, a class folder without an image) raise :class:`InputError` once the items are
    exhausted. A listing holds one folder's entries at a time: 1.28 M files need no more memory than 1,000.
    """
    entries, folders = walk(root)
    classes = list(class_list) if class_list is not None else folders
    return classes, _items(root, entries, folders, classes, classes_are_folders=class_list is None)


def list_image_folder(root: str, class_list: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(every item, class names) of :func:`iter_image_folder`, as a list."""
    classes, items = iter_image_folder(root, class_list)
    return list(items), classes


def _items(root: str, entries: Iterator[tuple[str, str]], folders: list[str], classes: list[str], *,
           classes_are_folders: bool) -> Iterator[dict]:
    index = {c: i for i, c in enumerate(classes)}
    _, path = storage.filesystem(root)
    local = not storage.is_remote(root)
    keys, listed, images_per_folder = _FolderKeys(folders), 0, dict.fromkeys(folders, 0)
    for rel, kind in entries:
        folder = rel.split("/")[0] if "/" in rel else ""
        label, reason = index.get(folder, -1), ""
        if kind == "hidden":
            reason = "hidden (its name starts with '.'): not read as an input; rename it to include it"
        elif kind in KIND_REASONS:
            reason = KIND_REASONS[kind]
        elif not folder:
            reason = "not inside a class folder (ImageFolder layout is <root>/<class>/<image>)"
        elif label < 0:
            reason = f"class folder {folder!r} is not in the class list; rename the folder or add the class"
        elif not is_image_name(rel):
            reason = f"not an image file (extension {posixpath.splitext(rel)[1] or 'none'!r})"
        else:
            images_per_folder[folder] += 1
        source = os.path.join(path, rel) if local else storage.join(root, rel)
        key = keys.unique(folder, sanitize_key(rel if kind == "hidden" else posixpath.splitext(rel)[0]))
        listed += 1
        yield {"key": key, "source": source, "label": label, "reason": reason}
    if not listed:
        raise InputError(f"no files under {root!r}: expected an ImageFolder (<root>/<class>/<image>.jpg)")
    empty = [f for f, n in images_per_folder.items() if n == 0 and f in index]
    if empty and classes_are_folders:
        raise InputError(
            f"class folder(s) {', '.join(repr(f) for f in empty[:5])}{' …' if len(empty) > 5 else ''} under {root!r} "
            "hold no image file: leaving them out would shift every later class index (torchvision's ImageFolder "
            "refuses them too); add images, remove the folder(s), or fix the class indices with class_list")
    missing = [c for c in classes if not images_per_folder.get(c)]
    if missing:
        log.warning("%d of %d classes have no image under %s (first: %s); they keep their class index",
                    len(missing), len(classes), root, ", ".join(missing[:5]))


class _FolderKeys:
    """Unique keys for a listing streamed in sorted order, remembering only the keys that can still collide.

    A key is its sanitized path, so two keys can only be equal when their top-level folders sanitize to the same
    name (``a b`` and ``a_b``), or when both are directly under the root: the keys taken in a group of folders
    are dropped once the walk has left the group's last folder.
    """

    def __init__(self, folders: list[str]):
        self.folders_left = collections.Counter(sanitize_key(f) for f in folders)
        self.taken: dict[str, dict[str, int]] = {}
        self.folder = self.group = ""  # the root's files are a group of their own

    def unique(self, folder: str, key: str) -> str:
        if folder != self.folder:
            if self.folder:
                self.folders_left[self.group] -= 1
                if not self.folders_left[self.group]:
                    self.taken.pop(self.group, None)
            self.folder, self.group = folder, sanitize_key(folder) if folder else ""
        return unique_key(key, self.taken.setdefault(self.group, {}))


def accepted_images(items: list[dict], root: str) -> list[tuple[str, int]]:
    """(source, label) of the usable items; the others are logged with their reasons."""
    bad = [it for it in items if it["reason"]]
    for it in bad[:10]:
        log.warning("%s: skipped: %s", it["source"], it["reason"])
    if len(bad) > 10:
        log.warning("... and %d more files under %s skipped", len(bad) - 10, root)
    return [(it["source"], it["label"]) for it in items if not it["reason"]]


def label_reason(label: int, num_classes: int) -> str:
    """Why a sample's label cannot be used, or "": negative, or not below ``num_classes`` (0: no bound given)."""
    if label < 0:
        return f"negative label {label}"
    if num_classes and label >= num_classes:
        return f"label {label} is outside the {num_classes} classes (0..{num_classes - 1}) of class_list / num_classes"
    return ""


def classes_from_labels(records: list[dict]) -> list[str]:
    """Class names "0".."N-1" for samples labelled without a class list, N = the largest accepted label + 1.

    When a class below N has no accepted sample this is an InputError naming the highest label: one stray
    label (999999 in one sample) would otherwise make the dataset claim a million classes.
    """
    accepted = [r for r in records if r["status"] == "accepted"]
    labels = {r["label"] for r in accepted}
    top = max(labels, default=-1)
    if len(labels) < top + 1:
        stray = max(accepted, key=lambda r: r["label"])
        raise InputError(
            f"labels reach {top} (sample {stray['source']}) but only {len(labels)} of the {top + 1} classes "
            f"0..{top} have a sample: a stray label would make the dataset claim {top + 1} classes. Fix that "
            "label, or set num_classes (samples labelled >= it are rejected) or class_list, then re-run")
    return [str(i) for i in range(top + 1)]


def load_class_list(url: str) -> list[str]:
    """Class names in index order from a JSON list of names or of ``{index, wnid}`` objects."""
    try:
        data = json.loads(storage.read_text(url))
    except FileNotFoundError:
        raise InputError(f"class_list {url!r} does not exist; fix the path or leave it empty") from None
    except json.JSONDecodeError as e:
        raise InputError(f"class_list {url!r} is not JSON ({e})") from None
    if isinstance(data, dict):  # {"0": ["n01440764", "tench"], ...} (Keras imagenet_class_index.json)
        data = [data[k] for k in sorted(data, key=int)]
    names = []
    for i, entry in enumerate(data if isinstance(data, list) else []):
        if isinstance(entry, dict) and "index" in entry and entry["index"] != i:
            raise InputError(f"class_list {url!r}: entry {i} has index {entry['index']}; entries must be in index order")
        if isinstance(entry, dict):
            name = entry.get("wnid") or entry.get("name")
        else:
            name = entry[0] if isinstance(entry, list) and entry else entry
        if not isinstance(name, str) or not name:
            raise InputError(f"class_list {url!r}: entry {i} ({entry!r}) names no class")
        names.append(name)
    if not names:
        raise InputError(f"class_list {url!r} must be a non-empty JSON list of class names or {{index, wnid}} objects")
    if len(set(names)) != len(names):
        raise InputError(f"class_list {url!r} names a class twice")
    return names


# ------------------------------------------------------------------------------------------------
# Decoding


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


def open_image(source: str, data: bytes | None = None, min_side: int = 1) -> Image.Image:
    """The RGB image at ``source`` (or of ``data`` read from it) for a caller that cannot go on without it:
    a ValueError naming the file and the reason otherwise."""
    img, reason = decode_image(storage.read_bytes(source) if data is None else data, min_side)
    if img is None:
        raise InputError(f"cannot use image {source}: {reason}; remove or replace the file")
    return img


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


# ------------------------------------------------------------------------------------------------
# Preprocessing (torchvision's Resize / CenterCrop / RandomCrop / ToTensor as the official code uses them)


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Lanczos resize so the shorter side is ``side``; the longer one truncated like torchvision's Resize(int)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if size == (w, h) else img.resize(size, Image.LANCZOS)


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """The centred ``side`` square, offsets rounded like torchvision's CenterCrop (``img`` at least that big)."""
    w, h = img.size
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def center_view(img: Image.Image, side: int) -> Image.Image:
    """Shorter side resized to ``side``, centre crop: evaluation images, FID references, edit inputs."""
    return center_crop(resize_shorter(img, side), side)


def key_seed(key: str) -> int:
    """A stable 64-bit integer of a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def make_views(img: Image.Image, key: str, *, image_size: int, views: int, augmentation: str,
               seed: int, crop_ratio: float = 1.125) -> np.ndarray:
    """K views of an RGB image as uint8 (K, S, S, 3); crop offsets drawn from ``(seed, key, view)`` only.

    "official": shorter side resized to ``round(crop_ratio * S)``, random S crop; "center": :func:`center_view`.
    """
    if augmentation == "center":
        crop = np.asarray(center_view(img, image_size), dtype=np.uint8)
        return np.repeat(crop[None], views, axis=0)
    if augmentation != "official":
        raise ValueError(f"augmentation={augmentation!r} is unknown; use 'official' or 'center'")
    arr = np.asarray(resize_shorter(img, round(crop_ratio * image_size)), dtype=np.uint8)
    h, w = arr.shape[:2]
    out = np.empty((views, image_size, image_size, 3), dtype=np.uint8)
    ks = key_seed(key)
    for v in range(views):
        rng = np.random.default_rng((seed, ks, v))
        top, left = int(rng.integers(0, h - image_size + 1)), int(rng.integers(0, w - image_size + 1))
        out[v] = arr[top:top + image_size, left:left + image_size]
    return out


def to_float(views_NHWC: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1] (ToTensor, then the official normalize_01_into_pm1).

    C-contiguous like ToTensor's output: the convolutions see the layout the official code feeds them (an
    NHWC-strided input picks other CPU kernels, whose rounding can flip a near-tie code).
    """
    x = np.ascontiguousarray(np.moveaxis(np.asarray(views_NHWC), -1, -3), dtype=np.float32) / np.float32(255.0)
    return x * np.float32(2.0) - np.float32(1.0)
