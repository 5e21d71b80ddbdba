"""Input formats of the tokenize job, read as streams: every source yields ``(item, image bytes)`` one sample
at a time, so a task holds one chunk of samples in memory, never a whole multi-GB input file.

An item is ``{key, source, label, reason}``; a non-empty ``reason`` rejects it (the bytes are then empty).
Sources are read in a fixed order, so a rerun yields the same items with the same keys.

WebDataset tars: a sample is a run of consecutive members sharing a key (``<key>.jpg``, ``<key>.cls``),
as webdataset itself reads them. A damaged tar keeps the samples before the damage; what follows it is one
rejected item (``input_error``) naming the tar, the byte offset and the reason: a tar truncated inside a
member, a garbled header, and a tar cut exactly at a member boundary (no end-of-archive marker, which every
tar writer emits) are all told apart from a complete tar.

Parquet files (ImageNet-1k as distributed on the Hugging Face Hub: an ``image`` column of ``{bytes, path}``
structs or raw bytes, and an integer ``label`` column) are read one record batch at a time; item keys are
``<file stem>/<row>``.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator

from nextscale import storage
from nextscale.codes import sanitize_key, unique_key

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# what a damaged or truncated tar (or its gzip layer) raises while it is read as a stream; network and
# permission errors are OSErrors and stay errors (a rerun may succeed, so they must not become rejections)
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error)


def _wds_item(url: str, key: str, members: dict[str, bytes], seen: dict[str, int]) -> tuple[dict, bytes]:
    """One webdataset sample -> (item, image bytes); a missing image or label makes it rejected (whether the
    label is in range is the listing's call: ``nextscale.images.label_reason``)."""
    ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    reason, label = "", -1
    try:
        label = int(members.get("cls", b"").decode().strip())
    except ValueError:
        reason = "missing or non-integer 'cls' label"
    if ext is None:
        reason = f"no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}) in the sample"
    item = {"key": unique_key(sanitize_key(key), seen), "source": f"{url}#{key}", "label": label, "reason": reason}
    return item, members[ext] if ext else b""


def tar_samples(url: str) -> Iterator[tuple[dict, bytes]]:
    """The samples of a webdataset image tar, read as a stream (plain, or gzip/bz2/xz compressed).

    A damaged tar (truncated, garbled) yields the samples before the damage, then one rejected item with
    ``input_error=True`` whose reason names the tar and what happened; a sample whose member was cut is
    rejected as incomplete. Errors reaching the storage itself (missing file, network, permissions) propagate.
    """
    seen: dict[str, int] = {}
    key, members = None, {}
    damage, cut_member = "", False
    with storage.open_read(url) as f:
        tar = None
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                if not stem or stem.startswith("."):
                    continue
                k = f"{d}/{stem}" if d else stem
                if k != key:
                    if key is not None:
                        yield _wds_item(url, key, members, seen)
                    key, members = k, {}
                try:
                    data = tar.extractfile(m)
                    members[ext.lower()] = data.read() if data else b""
                except TAR_DAMAGE as e:
                    cut_member = True
                    damage = (f"is cut short inside member {m.name!r} (its data spans bytes {m.offset_data}.."
                              f"{m.offset_data + m.size}; {type(e).__name__}: {e})")
                    break
            # tarfile stops quietly when the data ends at a header boundary; a complete tar goes on with an
            # all-zero end-of-archive block, which tarfile reads (512 bytes) before it stops
            if not damage and tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
                damage = (f"ends at byte {tar.offset} without the end-of-archive marker: it was cut short, so "
                          "samples after that point are lost")
        except TAR_DAMAGE as e:
            where = f" at byte {tar.offset}" if tar is not None else ""
            damage = f"is damaged{where} ({type(e).__name__}: {e})"
        finally:
            if tar is not None:
                tar.close()
    if key is not None:
        item, data = _wds_item(url, key, members, seen)
        if cut_member:
            item["reason"], data = f"incomplete: the input tar {damage}", b""
        yield item, data
    if damage:
        stem = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
        item = {"key": unique_key(sanitize_key(f"{stem}/unreadable-rest"), seen), "source": url, "label": -1,
                "reason": f"input tar {url} {damage}; its readable samples were kept. Re-copy the tar and re-run "
                          "`nextscale tokenize` to encode the rest",
                "input_error": True}
        yield item, b""


def parquet_columns(url: str) -> list[str]:
    """The column names of a parquet file (its footer only)."""
    import pyarrow.parquet as pq

    with storage.open_read(url) as f:
        return list(pq.read_schema(f).names)


def _image_bytes(value) -> bytes | None:
    """Raw bytes, or the ``bytes`` of an ``{bytes, path}`` struct (Hugging Face's Image feature)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else None


def parquet_samples(url: str, image_column: str = "image", label_column: str = "label",
                    batch_rows: int = 64) -> Iterator[tuple[dict, bytes]]:
    """The rows of a parquet file of images as samples, ``batch_rows`` rows in memory at a time."""
    import pyarrow.parquet as pq

    stem = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
    with storage.open_read(url) as f:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[image_column, label_column]):
            for value, label in zip(batch.column(image_column).to_pylist(), batch.column(label_column).to_pylist()):
                data = _image_bytes(value)
                reason = "" if data else f"no image bytes in column {image_column!r}"
                if not reason and not isinstance(label, int):
                    reason = f"missing or non-integer label in column {label_column!r}"
                item = {"key": f"{sanitize_key(stem)}/{row:07d}", "source": f"{url}#row={row}",
                        "label": label if isinstance(label, int) else -1, "reason": reason}
                yield item, bytes(data) if data and not reason else b""
                row += 1
