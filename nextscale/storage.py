"""One door to every storage location: local paths, ``file://``, ``s3://``, ``gs://``.

URLs are resolved with fsspec. S3-compatible endpoints and credentials come from the standard
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), which :func:`configure` can set from a :class:`StorageConfig` before Ray
starts so that every worker inherits them. Writes are atomic: a local file is written under a
temporary name and renamed; an object is uploaded in one PUT and so only appears once complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator

import fsspec

from nextscale.config import StorageConfig

REMOTE_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
DRIVER_CWD_ENV = "NEXTSCALE_DRIVER_CWD"


def configure(cfg: StorageConfig) -> None:
    """Export the config's endpoint/region to the environment (inherited by Ray workers started later)."""
    if cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    if cfg.region:
        os.environ["AWS_DEFAULT_REGION"] = cfg.region


def protocol(url: str) -> str:
    """``"file"`` for local paths, else the URL scheme (``"s3"``, ``"gs"``…)."""
    scheme, sep, _ = str(url).partition("://")
    return scheme if sep else "file"


def is_remote(url: str) -> bool:
    return protocol(url) in REMOTE_PROTOCOLS


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    url = str(url)
    proto = protocol(url)
    if proto == "file":
        fs = fsspec.filesystem("file")
        # Ray workers run in their own folder: a local job exports its driver's cwd so relative paths agree
        base = os.environ.get(DRIVER_CWD_ENV) or os.getcwd()
        return fs, os.path.normpath(os.path.join(base, url.removeprefix("file://")))
    try:
        fs, path = fsspec.core.url_to_fs(url, **_remote_options(proto))
    except ImportError as e:
        raise RuntimeError(f"cannot open {url!r}: {e}; install the matching extra, e.g. pip install 'nextscale[gcs]'") from e
    return fs, path


def _remote_options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        opts: dict = {"skip_instance_cache": True}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def sizes(urls: list[str]) -> list[int]:
    """Sizes in bytes of ``urls`` (object stores: concurrent HEAD requests per filesystem)."""
    groups: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        groups.setdefault(protocol(url), []).append(i)
    out = [0] * len(urls)
    for idx in groups.values():
        fs = filesystem(urls[idx[0]])[0]
        for i, n in zip(idx, fs.sizes([filesystem(urls[i])[1] for i in idx])):
            out[i] = int(n)
    return out


def listdir(url: str, suffix: str = "") -> list[str]:
    """Sorted base names of the entries directly under ``url`` (empty if it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix))


def makedirs(url: str) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    fs, path = filesystem(url)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


def open_read(url: str, block_size: int = 8 * 2**20):
    """A binary file object for reading ``url`` as a stream (object stores: ``block_size`` read-ahead)."""
    fs, path = filesystem(url)
    try:
        if is_remote(url):
            return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content or the complete new one, never a part."""
    fs, path = filesystem(url)
    if is_remote(url):
        fs.pipe_file(path, data)  # one PUT (or a multipart upload that completes at once)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[io.BytesIO]:
    """``with atomic_writer(url) as f: f.write(...)`` — published only if the block completes."""
    buf = io.BytesIO()
    yield buf
    write_bytes(url, buf.getvalue())


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def pyarrow_filesystem(url: str):
    """A ``pyarrow.fs.FileSystem`` and path for Ray Data / Ray Train (same settings as :func:`filesystem`)."""
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), filesystem(url)[1]
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
