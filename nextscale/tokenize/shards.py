"""The code-shard contract: webdataset tars of uint16 codes, ``manifest.json`` and ``index.parquet``.

Layout under an output URL (see DESIGN.md)::

    codes-000000.tar …      one sample per accepted image: <key>.cls (ASCII int), <key>.codes.npy (uint16 (K, L))
    parts/codes-000000.json every listed item of that shard (accepted or rejected + reason) and the tar's sha256
    index.parquet           one row per listed image: key, label, source URL, shard, status, reason
    manifest.json           written last: tokenizer identity, scales, views, shard checksums, classes, rejections
    config.yaml             the resolved job config

Shard bytes are a pure function of their samples (fixed member order, mtime, uid/gid, mode), so a rerun of
the same job writes byte-identical shards; each shard is published in one atomic write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from nextscale import storage

FORMAT = "nextscale-codes/1"
SHARD_PATTERN = "codes-{:06d}.tar"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
PARTS = "parts"
CODES_EXT, CLS_EXT = "codes.npy", "cls"


class ShardError(ValueError):
    """A shard or manifest is missing, damaged or inconsistent; the message names the file and the fix."""


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


# ------------------------------------------------------------------------------------------------
# Samples and shards


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


def read_shard(data: bytes, name: str = "shard") -> list[tuple[str, np.ndarray, int]]:
    """``(key, codes, label)`` of every sample of shard bytes, in order (a ShardError if malformed)."""
    out: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)
                stem, _, ext = base[-1].partition(".")
                key = f"{base[0]}/{stem}" if len(base) == 2 else stem
                f = tar.extractfile(member)
                out.setdefault(key, {})[ext] = f.read() if f else b""
        return [(key, decode_codes(m[CODES_EXT]), int(m[CLS_EXT])) for key, m in out.items()]
    except (tarfile.TarError, KeyError, ValueError, EOFError) as e:
        raise ShardError(f"{name} is not a valid code shard ({type(e).__name__}: {e}); delete it and re-run "
                         "`nextscale tokenize` to rewrite it") from e


# ------------------------------------------------------------------------------------------------
# Manifest and index


@dataclasses.dataclass(kw_only=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    num_rejected: int = 0


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """What ``manifest.json`` holds; ``train-prior`` checks it against its tokenizer (``check_manifest``)."""

    tokenizer: dict[str, Any]          # url, kind (file | random_init), preset, sha256, config (VQVAEConfig dict)
    patch_nums: list[int]
    vocab_size: int
    num_tokens: int
    image_size: int
    views: int
    augmentation: dict[str, Any]       # name, crop_ratio, seed
    precision: str
    samples_per_shard: int
    shards: list[ShardInfo]
    classes: list[str]
    num_listed: int
    num_samples: int
    num_rejected: int
    rejected: list[dict[str, str]]     # key, url, reason
    input: dict[str, str]              # url, format
    format: str = FORMAT
    dtype: str = "uint16"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**kw)


INDEX_COLUMNS = ("key", "label", "source", "shard", "status", "reason")


def index_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """``index.parquet`` bytes: one row per listed item (key, label, source, shard, status, reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("label", pa.int32()), ("source", pa.string()),
                        ("shard", pa.string()), ("status", pa.string()), ("reason", pa.string())])
    table = pa.table({c: [r[c] for r in rows] for c in INDEX_COLUMNS}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_index(url: str):
    """``index.parquet`` under ``url`` as a pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(url, INDEX))))


def write_synthetic_shards(url: str, *, num_samples: int, num_tokens: int, vocab_size: int, views: int = 1,
                           samples_per_shard: int = 1000, num_classes: int = 10, seed: int = 0,
                           patch_nums: Sequence[int] = (), image_size: int = 0) -> dict:
    """Random codes in the shard/manifest layout (benchmarks and loader tests); returns the manifest dict."""
    rng = np.random.default_rng(seed)
    shards = []
    for si, start in enumerate(range(0, num_samples, samples_per_shard)):
        n = min(samples_per_shard, num_samples - start)
        codes = rng.integers(0, vocab_size, (n, views, num_tokens), dtype=np.uint16)
        samples = [(f"s{start + i:08d}", codes[i], (start + i) % num_classes) for i in range(n)]
        data = build_shard(samples)
        storage.write_bytes(storage.join(url, shard_name(si)), data)
        shards.append(ShardInfo(name=shard_name(si), num_samples=n, sha256=sha256(data)))
    manifest = Manifest(
        tokenizer={"url": "", "kind": "synthetic", "preset": "", "sha256": "", "config": {}},
        patch_nums=list(patch_nums), vocab_size=vocab_size, num_tokens=num_tokens, image_size=image_size,
        views=views, augmentation={"name": "synthetic"}, precision="fp32", samples_per_shard=samples_per_shard,
        shards=shards, classes=[f"class{c}" for c in range(num_classes)], num_listed=num_samples,
        num_samples=num_samples, num_rejected=0, rejected=[], input={"url": "", "format": "synthetic"},
    )
    storage.write_text(storage.join(url, MANIFEST), manifest.to_json())
    return json.loads(manifest.to_json())
