"""What a driver checks before any Ray worker starts, so that a user's mistake reads as one clear error.

:func:`check` runs in ``nextscale <stage>`` between loading the config and running the stage:
object storage is reachable with credentials, the stage's inputs exist, its output can be created,
and the codes of train-prior are codes (a manifest that reads, not a folder of images). Each failure
is a :class:`~nextscale.errors.UserError` naming the key, the location and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from nextscale import storage
from nextscale.codes import MANIFEST, Manifest
from nextscale.errors import UserError

# protocols whose locations are checked here (hf:// and https:// weights are fetched by their own loader)
CHECKED_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf field of a config dataclass tree."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def is_location(value: Any) -> bool:
    """A path or URL (not a preset name such as ``golden_tiny``), of a protocol checked here."""
    if not isinstance(value, str) or not value:
        return False
    looks_like_path = "/" in value or "://" in value or os.path.splitext(value)[1] != ""
    return looks_like_path and storage.protocol(value) in CHECKED_PROTOCOLS


def check(stage: str, cfg: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Raise a UserError for the first thing of ``cfg`` that cannot work; ``inputs`` / ``outputs`` are dotted keys."""
    values = dict(leaves(cfg))
    buckets: dict[str, str] = {}
    for key, value in values.items():
        if is_location(value) and storage.is_remote(value):
            buckets.setdefault(value.split("/")[2] if value.count("/") >= 2 else value, f"{key}={value}")
    for where in buckets.values():
        key, _, url = where.partition("=")
        storage.check_access(url, key)
    for key in inputs:
        url = values.get(key)
        # globs, {000..099} patterns and comma lists of tars are expanded (and checked) by the stage itself
        if is_location(url) and not any(c in url for c in "*?[{,") and not storage.exists(url):
            raise UserError(f"{key}={url} does not exist: check the path (relative paths start at "
                            f"{os.getcwd()}) or the URL")
    for key in outputs:
        check_output(key, values[key])
    if stage == "train-prior":
        check_codes("data.url", values["data.url"])


def check_output(key: str, url: str) -> None:
    """A local output folder that can be created (object stores create on write)."""
    if storage.is_remote(url):
        return
    path = storage.filesystem(url)[1]
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {key}={url} ({e.strerror or type(e).__name__}: "
                        f"{e.filename or path}): choose a folder you can write to") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to {key}={url} (permission denied): choose a folder you can write to")


def check_codes(key: str, url: str) -> None:
    """``url`` holds code shards with a readable manifest, not images."""
    if not storage.exists(storage.join(url, MANIFEST)) and _holds_images(url):
        raise UserError(f"{key}={url} holds images, not code shards: tokenize them first "
                        f"(nextscale tokenize input={url} output=CODES) and set {key}=CODES")
    Manifest.read(url)


def _holds_images(url: str, limit: int = 200) -> bool:
    fs, path = storage.filesystem(url)
    if not fs.isdir(path):
        return False
    for n, name in enumerate(fs.find(path, maxdepth=2)):
        if name.lower().endswith(IMAGE_SUFFIXES):
            return True
        if n >= limit:
            break
    return False
