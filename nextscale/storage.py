"""One door to every storage location: local paths, ``file://``, ``s3://``, ``gs://``, and read-only
``hf://`` (the Hugging Face Hub: ``hf://FoundationVision/var/var_d16.pth``, ``hf://datasets/<org>/<name>/…``)
and ``https://``.

URLs are resolved with fsspec. S3-compatible endpoints and credentials come from the standard
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), which :func:`configure` can set from a :class:`StorageConfig` before Ray
starts so that every worker inherits them. Writes are atomic: a local file is written under a
temporary name and renamed; an object is uploaded in one PUT and so only appears once complete.
Whole-file reads of Hub and web files (checkpoints, reference statistics) go through a download cache
on the machine's disk (:func:`local_copy`), so the many workers of one node download a file once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import uuid

import fsspec

from nextscale.config import StorageConfig
from nextscale.errors import UserError

log = logging.getLogger(__name__)

REMOTE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "hf", "http", "https")
# whole-file reads of these come from the download cache (immutable published files: weights, statistics)
CACHED_PROTOCOLS = ("hf", "http", "https")
# the pip extra that brings each protocol's fsspec implementation
EXTRAS = {"hf": "hub", "gs": "gcs", "gcs": "gcs"}
DRIVER_CWD_ENV = "NEXTSCALE_DRIVER_CWD"
CACHE_ENV = "NEXTSCALE_CACHE"


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
        if proto in ("s3", "s3a"):
            fs = _s3_filesystem(proto)
            return fs, fs._strip_protocol(url)
        fs, path = fsspec.core.url_to_fs(url, **_remote_options(proto))
    except ImportError as e:
        extra = EXTRAS.get(proto)
        fix = f"pip install 'nextscale[{extra}]'" if extra else f"install the fsspec implementation of {proto}://"
        raise UserError(f"cannot open {url!r}: {e}; {fix}") from e
    return fs, path


# one S3 filesystem per process and AWS_* environment: a new one builds a botocore client (0.3 s of CPU parsing the
# S3 service model, measured on the 2-core machine), which every read, write and listing used to pay
_S3_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
_S3_LOCK = threading.Lock()


def _s3_filesystem(proto: str) -> fsspec.AbstractFileSystem:
    key = (os.getpid(), proto, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _S3_LOCK:
        if key not in _S3_FILESYSTEMS:
            _S3_FILESYSTEMS[key] = fsspec.filesystem(proto, **_remote_options(proto))
        return _S3_FILESYSTEMS[key]


def _remote_options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        # no listings cache: other processes write the same locations
        opts: dict = {"skip_instance_cache": True, "use_listings_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def check_access(url: str, key: str = "") -> None:
    """One request to the object store of ``url``, failing fast with what to set when it cannot be reached.

    Raises a UserError for missing credentials, an unreachable endpoint or a refused bucket; a location
    that merely does not exist yet is fine (outputs are created on write).
    """
    what = f"{key}={url}" if key else url
    proto = protocol(url)
    opts = _remote_options(proto)
    if proto in ("s3", "s3a"):  # fail in seconds, not after botocore's and s3fs's retries
        opts["config_kwargs"] = {"connect_timeout": 10, "retries": {"max_attempts": 2}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
        fs.exists(path)
    except ImportError as e:
        raise UserError(f"cannot open {what}: {e}; install the matching extra, e.g. pip install 'nextscale[gcs]'") from None
    except Exception as e:  # noqa: BLE001 - botocore / gcsfs error classes are optional dependencies
        name = type(e).__name__
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            raise UserError(
                f"no credentials for {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for "
                "s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, or run where an instance profile / workload "
                "identity gives access") from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError"):
            raise UserError(f"cannot reach the object store {endpoint} for {what}: check AWS_ENDPOINT_URL or the "
                            "stage's storage.endpoint_url (and that the store is up)") from None
        if isinstance(e, PermissionError):
            raise UserError(f"access to {what} is denied ({e}): the credentials in use lack permission for this "
                            "bucket, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are wrong") from None
        raise


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
    if protocol(url) in CACHED_PROTOCOLS:
        with open(local_copy(url), "rb") as f:
            return f.read()
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


def json_text(data, *, indent: int | None = None, sort_keys: bool = False, default=None) -> str:
    """Strict JSON (RFC 8259) of ``data``: a NaN or infinite float becomes null, since ``json.dumps``'s bare
    ``NaN`` / ``Infinity`` are refused by jq, browsers and most languages (an mfu on a CPU is NaN)."""
    return json.dumps(_finite(data), indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)


def write_json(url: str, data, *, indent: int | None = 1, sort_keys: bool = False, default=None) -> None:
    write_text(url, json_text(data, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def _finite(data):
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


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


# ------------------------------------------------------------------------------------------------
# Download cache for Hub and web files


def cache_dir() -> str:
    """``$NEXTSCALE_CACHE``, else ``$XDG_CACHE_HOME/nextscale``, else ``~/.cache/nextscale``."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nextscale")


def hub_location(url: str) -> tuple[str, str, str]:
    """(repo id, file inside the repo, revision) of an ``hf://[datasets/|spaces/]owner/name[@rev]/file`` URL."""
    parts = str(url).removeprefix("hf://").split("/")
    kind = parts.pop(0) + "/" if parts[0] in ("datasets", "spaces", "models") else ""
    repo, _, revision = "/".join(parts[:2]).partition("@")
    return kind + repo, "/".join(parts[2:]), revision or "main"


def _missing(url: str) -> str:
    if protocol(url) != "hf":
        return f"{url} does not exist"
    repo, file, revision = hub_location(url)
    return (f"{url} does not exist: the Hub repo {repo!r} has no file {file!r} at revision {revision!r}, or the "
            "repo does not exist or is private (log in with `hf auth login` or set HF_TOKEN). Official weights: "
            "hf://FoundationVision/var/vae_ch160v4096z32.pth, hf://FoundationVision/var/var_d16.pth … var_d30.pth, "
            "var_d36.pth")


def local_copy(url: str) -> str:
    """A local file holding the bytes of ``url``: a local path as it is; a Hub, web or object-store file
    downloaded into :func:`cache_dir`, once per machine.

    The cached name is keyed by the URL and the file's version on the server (the Hub's content hash, an
    ETag, else its size), so a file replaced upstream is downloaded again. A file lock makes the other
    processes of the machine (Ray workers of one node) wait for the one download instead of repeating it.
    """
    import filelock

    fs, path = filesystem(url)
    if protocol(url) == "file":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        return path
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(_missing(url)) from None
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{url} is a folder; give the URL of a file in it")
    lfs = info.get("lfs") or {}
    version = lfs.get("sha256") or info.get("blob_id") or info.get("ETag") or info.get("etag") or info.get("size")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    key = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:16]
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{key}-{name}")
    with filelock.FileLock(dest + ".lock"):
        if os.path.exists(dest):
            return dest
        log.info("downloading %s (%.1f MB) to %s", url, (info.get("size") or 0) / 1e6, dest)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError:
            raise FileNotFoundError(_missing(url)) from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return dest
