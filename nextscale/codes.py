"""The contract between ``nextscale tokenize`` and ``nextscale train-prior``: code shards and their manifest.

Layout under a codes URL (``docs/codes-format.md`` describes every field)::

    codes-000000.tar …      one sample per accepted image: <key>.cls (ASCII int), <key>.codes.npy (uint16 (K, L))
    parts/codes-000000.json resume record of that shard: every listed item (accepted or rejected + reason),
                            the tar's sha256, the job fingerprint and the digest of the shard's inputs
    index.parquet           one row per listed image: key, label, source, shard, status, reason
    manifest.json           written last: tokenizer identity, scales, views, shard checksums, classes, the count of
                            rejections and the first ones (its size grows with the shards, not the samples)
    config.yaml             the resolved job config

Shard bytes are a pure function of their samples (fixed member order, mtime, uid/gid, mode), so a rerun of
the same job writes byte-identical shards; each shard is published in one atomic write, its record after it.
This module is the only one that knows these names and bytes: the tokenize job writes through it, the code
loader reads through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from nextscale import storage
from nextscale.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "nextscale-codes/1"
SHARD_PATTERN = "codes-{:06d}.tar"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
PARTS = "parts"
CODES_EXT, CLS_EXT = "codes.npy", "cls"
READ_ATTEMPTS = 5       # tries per shard read before the reader fails
READ_BACKOFF_S = 1.0    # wait before the 2nd try; doubles after each (1 + 2 + 4 + 8 s in all)
RETOKENIZE = "re-run `nextscale tokenize` with this output (it resumes, rewrites what is damaged and writes the " \
             "manifest last)"


class CodesError(UserError, ValueError):
    """Codes are missing, damaged or do not fit; the message names the file and the fix."""


class ReadFailed(OSError):
    """Storage failed while a shard was read (connection dropped, 5xx, timeout): a retry may succeed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # webdataset appends its stream objects to ``args`` on the way up


class ManifestMismatch(CodesError):
    """Codes were made by another tokenizer than the one training uses; the message names the field and fix."""


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def part_name(shard: str) -> str:
    return f"{PARTS}/{shard.removesuffix('.tar')}.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sanitize_key(key: str) -> str:
    """A webdataset-safe key: readers split member names at the first dot of the base name."""
    out = "".join("_" if c in ".\\" or c.isspace() or not c.isprintable() else c for c in key.strip("/"))
    return out or "_"


def unique_key(key: str, seen: dict[str, int]) -> str:
    """``key``, or ``key_1``, ``key_2``… when an earlier item of the same source already took it."""
    if key not in seen:
        seen[key] = 0
        return key
    seen[key] += 1
    return unique_key(f"{key}_{seen[key]}", seen)


# ------------------------------------------------------------------------------------------------
# Sample bytes and shards


def encode_codes(codes_KL: np.ndarray) -> bytes:
    if codes_KL.ndim != 2:
        raise ValueError(f"codes must be (K, L), got shape {codes_KL.shape}")
    if codes_KL.size and (codes_KL.min() < 0 or codes_KL.max() > np.iinfo(np.uint16).max):
        raise ValueError("codes do not fit uint16 (vocabulary larger than 65536?)")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(codes_KL, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple[int, ...]]] = {}


def decode_codes(data: bytes) -> np.ndarray:
    """``np.save`` bytes -> array. Every sample of a dataset shares one header, so it is parsed once and
    cached (np.load's literal_eval of the header costs more than the copy; the loader decodes ~10^4/s)."""
    if data[:6] == b"\x93NUMPY":
        n = 2 if data[6] == 1 else 4
        end = 8 + n + int.from_bytes(data[8:8 + n], "little")
        hit = _NPY_HEADERS.get(data[:end])
        if hit is None:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype.hasobject or not arr.flags.c_contiguous:
                return arr
            hit = _NPY_HEADERS.setdefault(data[:end], (end, arr.dtype, arr.shape))
        offset, dtype, shape = hit
        return np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape))).reshape(shape).copy()
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_members(key: str, codes_KL: np.ndarray, label: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in their fixed order."""
    return [(f"{key}.{CLS_EXT}", str(int(label)).encode()), (f"{key}.{CODES_EXT}", encode_codes(codes_KL))]


def build_shard(samples: Iterable[tuple[str, np.ndarray, int]]) -> bytes:
    """Tar bytes of ``(key, codes (K, L), label)`` samples in the given order; deterministic."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for key, codes, label in samples:
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} in one shard")
            seen.add(key)
            for name, data in sample_members(key, codes, label):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _HashingStream:
    """A shard's byte stream on its way to the tar reader: hashed as it passes (no second read)."""

    def __init__(self, stream: Any, hashed: bool):
        self.stream, self.hash = stream, hashlib.sha256() if hashed else None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n)
        except PermissionError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the storage client raises mid-stream is worth a retry
            raise ReadFailed(f"{type(e).__name__}: {e}") from e
        if self.hash is not None:
            self.hash.update(data)
        return data

    def hexdigest(self) -> str:
        """sha256 of the whole stream: what the tar reader left unread (end-of-archive padding) is read first."""
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def iter_shard(url: str, *, num_samples: int | None = None, sha256: str | None = None,
               vocab_size: int | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, codes uint16 (K, L), label) of one shard, in stored order, streamed with webdataset's tar reader.

    The stream is opened through :mod:`nextscale.storage` (local paths relative to the driver's cwd,
    ``s3://``, ``gs://``). Given the manifest's ``num_samples``, ``sha256`` and ``vocab_size``, the shard is
    verified as it streams: codes out of range fail at their sample, a wrong count or checksum once the
    stream has ended (after the last sample). Every failure is a :class:`CodesError` naming the shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    n = 0
    try:
        try:
            raw = storage.open_read(url)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # noqa: BLE001 - see _HashingStream.read
            raise ReadFailed(f"{type(e).__name__}: {e}") from e
        with raw:
            stream = _HashingStream(raw, hashed=sha256 is not None)
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                key, codes_KL = sample["__key__"], decode_codes(sample[CODES_EXT])
                if vocab_size is not None and codes_KL.size and int(codes_KL.max()) >= vocab_size:
                    raise CodesError(f"{url}: sample {key!r} holds code {int(codes_KL.max())}, outside the "
                                     f"vocabulary of {vocab_size} (damaged or from another tokenizer); {RETOKENIZE}")
                n += 1
                yield key, codes_KL, int(sample[CLS_EXT])
            got = stream.hexdigest() if sha256 is not None else None
    except FileNotFoundError:
        raise CodesError(f"shard {url} is missing; {RETOKENIZE}") from None
    except CodesError:
        raise
    except (tarfile.TarError, KeyError, ValueError, EOFError) as e:
        # webdataset appends its stream objects to the arguments; the first one is the message
        raise CodesError(f"{url} is not a valid code shard ({type(e).__name__}: {e.args[0] if e.args else e}); "
                         f"{RETOKENIZE}") from e
    if num_samples is not None and n != num_samples:
        raise CodesError(f"{url} holds {n} samples but the manifest says {num_samples}: the shard was replaced or "
                         f"damaged; {RETOKENIZE}")
    if got != sha256:
        raise CodesError(f"{url} does not match its sha256 in the manifest ({got[:12]}… instead of {sha256[:12]}…): "
                         f"the shard changed after it was written; {RETOKENIZE}")


def read_shard(url: str, *, num_samples: int | None = None, sha256: str | None = None, vocab_size: int | None = None,
               attempts: int = READ_ATTEMPTS, backoff_s: float = READ_BACKOFF_S) -> list[tuple[str, np.ndarray, int]]:
    """Every sample of one shard, verified like :func:`iter_shard` before any is returned, so that a
    damaged shard never hands out a sample (one shard of codes is a few MB).

    A storage error while reading (:class:`ReadFailed`) is retried ``attempts`` times in all, waiting
    ``backoff_s``, then twice as long each time. Shards are immutable and nothing of a failed read was handed
    out, so a retry reads the same samples again and the caller sees exactly what an undisturbed read gives.
    """
    for attempt in range(1, attempts + 1):
        try:
            return list(iter_shard(url, num_samples=num_samples, sha256=sha256, vocab_size=vocab_size))
        except ReadFailed as e:
            if attempt == attempts:
                raise ReadFailed(f"reading {url} failed {attempts} times in a row, last: {e.reason}; check that the "
                                 "storage is reachable, then rerun (training resumes from its latest checkpoint)") from e
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("reading %s failed (%s); retrying in %.2f s (attempt %d of %d)", url, e.reason, delay,
                        attempt + 1, attempts)
            time.sleep(delay)
    raise ValueError(f"attempts={attempts} must be >= 1")


# ------------------------------------------------------------------------------------------------
# manifest.json


@dataclasses.dataclass(kw_only=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    num_rejected: int = 0


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """What ``manifest.json`` holds (``docs/codes-format.md``). Fields without a default are required."""

    tokenizer: dict[str, Any]          # url, kind (file | random_init | synthetic), preset, sha256, config, [seed]
    patch_nums: list[int]
    vocab_size: int
    num_tokens: int
    image_size: int
    views: int
    augmentation: dict[str, Any]       # name, crop_ratio, seed, interpolation, flip
    precision: str
    samples_per_shard: int
    shards: list[ShardInfo]
    classes: list[str]
    num_listed: int
    num_samples: int
    num_rejected: int
    rejected: list[dict[str, str]]     # key, source, reason of the first MAX_LISTED_REJECTIONS (all in index.parquet)
    input: dict[str, str]              # url, format
    format: str = FORMAT
    dtype: str = "uint16"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        return storage.json_text(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        """Strict: every required field present with its type (unknown keys, e.g. ``num_classes``, are ignored)."""
        if not isinstance(d, dict):
            raise CodesError(f"{where} is not a JSON object; {RETOKENIZE}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is dataclasses.MISSING:
                    raise CodesError(f"{where} has no {f.name!r} field (written by an older or another tool?); "
                                     f"{RETOKENIZE}")
                continue
            _check_type(d[f.name], hints[f.name], f"{where}: field {f.name!r}")
        shards = []
        for i, s in enumerate(d["shards"]):
            for key, want in (("name", str), ("num_samples", int), ("sha256", str)):
                _check_type(s.get(key) if isinstance(s, dict) else None, want, f"{where}: shards[{i}].{key}")
            shards.append(ShardInfo(**{k: v for k, v in s.items() if k in ShardInfo.__dataclass_fields__}))
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**kw, "shards": shards})

    @classmethod
    def read(cls, url: str) -> Manifest:
        """``{url}/manifest.json``; a :class:`CodesError` naming the file when it is absent, truncated or incomplete."""
        where = storage.join(url, MANIFEST)
        try:
            text = storage.read_text(where)
        except FileNotFoundError:
            raise CodesError(f"no {MANIFEST} under {url!r}: the codes are incomplete or the URL is wrong; "
                             f"{RETOKENIZE}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CodesError(f"{where} is not valid JSON ({e}; truncated?); {RETOKENIZE}") from None
        return cls.from_dict(d, where)

    def write(self, url: str) -> None:
        """Publish ``{url}/manifest.json`` (atomically; written last, it marks the codes complete)."""
        storage.write_text(storage.join(url, MANIFEST), self.to_json())

    def check(self, vqvae_cfg: Any, tokenizer_sha256: str | None = None) -> None:
        """Raise :class:`ManifestMismatch` unless the codes fit ``vqvae_cfg`` (and the tokenizer file, if given)."""
        where = self.input.get("url") or "these codes"
        expected = {"vocab_size": vqvae_cfg.vocab_size, "patch_nums": list(vqvae_cfg.patch_nums),
                    "image_size": vqvae_cfg.image_size, "num_tokens": vqvae_cfg.num_tokens}
        for key, want in expected.items():
            if getattr(self, key) != want:
                raise ManifestMismatch(
                    f"the codes of {where} were made with {key}={getattr(self, key)} but the tokenizer has "
                    f"{key}={want}: train with the tokenizer recorded in the manifest (data.tokenizer_url empty) or "
                    "re-run `nextscale tokenize` with this tokenizer into a new output")
        recorded = self.tokenizer.get("config") or {}
        if recorded.get("z_channels") not in (None, vqvae_cfg.z_channels):
            raise ManifestMismatch(f"the codes of {where} come from a tokenizer with z_channels="
                                   f"{recorded['z_channels']}, this one has {vqvae_cfg.z_channels}; use the tokenizer "
                                   "recorded in the manifest")
        sha = self.tokenizer.get("sha256")
        if tokenizer_sha256 and sha and sha != tokenizer_sha256:
            raise ManifestMismatch(f"the codes of {where} were made by tokenizer sha256 {sha[:12]}…, not by this one "
                                   f"({tokenizer_sha256[:12]}…): same shapes, different codebook; use the recorded "
                                   "tokenizer or re-tokenize")
        if self.dtype != "uint16":
            raise ManifestMismatch(f"codes dtype {self.dtype!r} is not uint16; {RETOKENIZE}")


def _check_type(value: Any, hint: Any, what: str) -> None:
    want = typing.get_origin(hint) or hint
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise CodesError(f"{what} is {value!r}, not a {want.__name__}; {RETOKENIZE}")


# ------------------------------------------------------------------------------------------------
# Resume records (parts/*.json): one per published shard, written right after it


def publish_shard(url: str, index: int, samples: Sequence[tuple[str, np.ndarray, int]], records: list[dict], *,
                  fingerprint: str, inputs: str) -> dict:
    """Write shard ``index`` of ``(key, codes, label)`` samples under ``url``, then its resume record.

    ``records`` lists every input item of the shard (key, source, label, status, reason); ``fingerprint``
    identifies the job settings that shape the codes, ``inputs`` the shard's inputs.
    """
    name = shard_name(index)
    data = build_shard(samples)
    storage.write_bytes(storage.join(url, name), data)
    part = {"shard": name, "fingerprint": fingerprint, "inputs": inputs, "sha256": sha256(data),
            "num_samples": len(samples), "records": records}
    storage.write_json(storage.join(url, part_name(name)), part, indent=None, sort_keys=True)
    return part


def finished_part(url: str, index: int, *, fingerprint: str, inputs: str) -> dict | None:
    """The record of shard ``index`` when it is finished and verifies, or None if it must be (re)made.

    A record of another job (another ``fingerprint``) is a :class:`CodesError`: outputs are never mixed.
    """
    name = shard_name(index)
    part_url = storage.join(url, part_name(name))
    if not storage.exists(part_url):
        return None
    part = json.loads(storage.read_text(part_url))
    if part.get("fingerprint") != fingerprint:
        raise CodesError(
            f"{url} already holds {name} from a different job (tokenizer, views, augmentation, seed, precision or "
            "batch size differ); write to a new output or delete the old one")
    if part.get("inputs") != inputs:
        log.info("%s: its inputs changed since it was written; redoing it", name)
        return None
    try:
        data = storage.read_bytes(storage.join(url, name))
    except FileNotFoundError:
        return None
    if sha256(data) != part["sha256"]:
        log.warning("%s does not match its recorded checksum; redoing it", name)
        return None
    return part


def read_part(url: str, shard: str) -> dict:
    """The resume record of ``shard`` (its every listed item) under ``url``."""
    return json.loads(storage.read_text(storage.join(url, part_name(shard))))


def shard_info(part: dict) -> ShardInfo:
    return ShardInfo(name=part["shard"], num_samples=part["num_samples"], sha256=part["sha256"],
                     num_rejected=len(part["records"]) - part["num_samples"])


def part_rows(part: dict) -> list[dict]:
    """The ``index.parquet`` rows of one shard's record, in listing order."""
    return [{"key": r["key"], "label": int(r["label"]), "source": r["source"],
             "shard": part["shard"] if r["status"] == "accepted" else "", "status": r["status"],
             "reason": r["reason"]} for r in part["records"]]


def discard_incomplete(url: str) -> None:
    """Before making shards: drop the manifest of an earlier run (the output is incomplete until the new one
    is written) and temporary files a killed local write left behind."""
    storage.remove(storage.join(url, MANIFEST))
    if not storage.is_remote(url):
        for folder in (url, storage.join(url, PARTS)):
            for name in storage.listdir(folder):
                if ".tmp-" in name:
                    storage.remove(storage.join(folder, name))


# ------------------------------------------------------------------------------------------------
# index.parquet


INDEX_COLUMNS = ("key", "label", "source", "shard", "status", "reason")
MAX_LISTED_REJECTIONS = 100  # manifest.json names the first rejections; index.parquet holds all of them


class IndexWriter:
    """``index.parquet`` bytes written one shard's rows at a time (a row group each): the job never holds the
    rows of every input, only the compressed file (a few bytes per row)."""

    def __init__(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema([("key", pa.string()), ("label", pa.int32()), ("source", pa.string()),
                                 ("shard", pa.string()), ("status", pa.string()), ("reason", pa.string())])
        self.buf = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buf, self.schema, compression="zstd")

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self.writer.write_table(pa.table({c: [r[c] for r in rows] for c in INDEX_COLUMNS}, schema=self.schema))

    def getvalue(self) -> bytes:
        self.writer.close()
        return self.buf.getvalue()


def read_index(url: str, columns: Sequence[str] | None = None, dictionaries: Sequence[str] = ()):
    """``index.parquet`` under ``url`` as a pyarrow Table (only ``columns``, when given; ``dictionaries``
    dictionary-encoded: a few bytes per row for columns of few values, as ``shard`` and ``status``)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(url, INDEX))), columns=columns,
                         read_dictionary=dictionaries or None)


# ------------------------------------------------------------------------------------------------
# Synthetic codes (benchmarks and tests)


def write_synthetic_shards(url: str, *, num_samples: int, num_tokens: int, vocab_size: int, views: int = 1,
                           samples_per_shard: int = 1000, num_classes: int = 10, seed: int = 0,
                           patch_nums: Sequence[int] = (), image_size: int = 0,
                           tokenizer: dict[str, Any] | None = None) -> Manifest:
    """Random codes in the shard/manifest layout; returns the manifest written.

    ``tokenizer`` is the identity to record (as ``nextscale tokenize`` records it); default: a synthetic one.
    """
    rng = np.random.default_rng(seed)
    shards = []
    for si, start in enumerate(range(0, num_samples, samples_per_shard)):
        n = min(samples_per_shard, num_samples - start)
        codes = rng.integers(0, vocab_size, (n, views, num_tokens), dtype=np.uint16)
        data = build_shard([(f"s{start + i:08d}", codes[i], (start + i) % num_classes) for i in range(n)])
        storage.write_bytes(storage.join(url, shard_name(si)), data)
        shards.append(ShardInfo(name=shard_name(si), num_samples=n, sha256=sha256(data)))
    manifest = Manifest(
        tokenizer=tokenizer or {"url": "", "kind": "synthetic", "preset": "", "sha256": "", "config": {}},
        patch_nums=list(patch_nums), vocab_size=vocab_size, num_tokens=num_tokens, image_size=image_size,
        views=views, augmentation={"name": "synthetic"}, precision="fp32", samples_per_shard=samples_per_shard,
        shards=shards, classes=[f"class{c}" for c in range(num_classes)], num_listed=num_samples,
        num_samples=num_samples, num_rejected=0, rejected=[], input={"url": "", "format": "synthetic"},
    )
    manifest.write(url)
    return manifest
