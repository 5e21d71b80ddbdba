"""``nextscale tokenize``: a Ray Data job turning images into multi-scale VQVAE code shards.

    list inputs (driver, sorted)  ->  shard tasks (one per output shard; finished shards skipped)
      -> read + decode + K views      map_batches, CPU tasks, one per shard, emitting fixed chunks
      -> encode                       map_batches(ShardChunkEncoder), ActorPoolStrategy, GPU when present
      -> driver: assemble each shard in item order, write it atomically + its parts/*.json record
      -> index.parquet, config.yaml, manifest.json (last)

Determinism: items are listed in sorted order and assigned to shards by position; crops derive from
(seed, key, view); the encoder sees fixed chunks of consecutive items (``batch_size // views`` per call),
so batch composition — and with it every float of the encoder — is the same in every run. A rerun skips
shards whose tar and record exist and match; a killed job rerun ends byte-identical to an uninterrupted one.
Workers only touch URLs (object storage or shared disks); the tokenizer travels through the object store.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import time
import zlib
from collections.abc import Iterator

import numpy as np
import ray

from nextscale import codes, storage
from nextscale.config import RayConfig, dump_yaml
from nextscale.images import (
    InputError,
    classes_from_labels,
    decode_image,
    iter_image_folder,
    label_reason,
    list_image_folder,
    load_class_list,
    make_views,
)
from nextscale.pipelines.common import init_ray, use_gpus
from nextscale.progress import Progress
from nextscale.tokenize import inputs
from nextscale.tokenize.job_config import TokenizeConfig
from nextscale.tokenize.loader import load_tokenizer, read_tokenizer

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------
# Listing (driver)


def resolve_format(url: str, fmt: str) -> str:
    """``fmt``, or for "auto": webdataset when ``url`` names tars (or a folder of tars only), else imagefolder."""
    if fmt != "auto":
        return fmt
    first = url.split(",")[0].strip()
    if first.endswith(".parquet") or (any(c in first for c in "*?[{") and ".parquet" in first):
        return "parquet"
    if first.endswith(".tar") or "{" in first or any(c in first for c in "*?["):
        return "webdataset"
    fs, path = storage.filesystem(first)
    if not fs.exists(path):
        raise InputError(f"input {first!r} does not exist; give an ImageFolder root, webdataset tars or parquet files")
    entries = fs.ls(path, detail=True)
    dirs = [e for e in entries if e["type"] == "directory"]
    for suffix, fmt in ((".tar", "webdataset"), (".parquet", "parquet")):
        if not dirs and any(e["name"].endswith(suffix) and e["type"] == "file" for e in entries):
            return fmt
    return "imagefolder"


def list_tars(url: str, suffix: str = ".tar") -> list[str]:
    """Sorted URLs of the ``suffix`` files (tars, parquet) in a comma list of files, brace patterns, globs or
    folders."""
    import braceexpand

    out: list[str] = []
    for entry in (e.strip() for e in url.split(",")):
        if not entry:
            continue
        for part in braceexpand.braceexpand(entry):
            if any(c in part for c in "*?["):
                fs, path = storage.filesystem(part)
                proto = storage.protocol(part)
                out += [p if proto == "file" else f"{proto}://{p}" for p in fs.glob(path)]
            elif part.endswith(suffix):
                out.append(part)
            else:
                out += [storage.join(part, n) for n in storage.listdir(part, suffix)]
    if not out:
        raise InputError(f"no {suffix} files at {url!r}: give them as a folder, glob, {{000..009}} pattern or comma "
                         "list, or set input_format")
    return sorted(set(out))


@dataclasses.dataclass
class ShardTask:
    index: int
    kind: str                  # "files" (ImageFolder items) | "tar" (one webdataset tar) | "parquet" (one file)
    packed_items: bytes = b""  # files: the listed items as zlib-compressed JSON (~20 B per file, the driver holds all)
    items_sha256: str = ""     # files: the items' digest, made as they are packed (not by unpacking them each time)
    url: str = ""              # tar: the input tar
    size: int = 0              # tar: its size in bytes (a re-copied, repaired tar makes its shard be redone)
    num_classes: int = 0       # tar: labels >= it are rejected (0: no class list or num_classes given)

    @classmethod
    def of_files(cls, index: int, items: list[dict]) -> ShardTask:
        text = json.dumps(items, sort_keys=True)  # serialised once: packed and digested
        return cls(index, "files", zlib.compress(text.encode()), _sha256(text))

    @property
    def name(self) -> str:
        return codes.shard_name(self.index)

    @property
    def items(self) -> list[dict]:
        return unpack_items(self.packed_items)

    def digest(self) -> str:
        """Identity of this shard's inputs: a changed listing makes the shard be redone."""
        if self.kind == "files":
            return self.items_sha256
        # another class count can reject other samples
        return _sha256(f"{self.url}\n{self.size}" + (f"\n{self.num_classes}" if self.num_classes else ""))

    def row(self, num_classes: int, columns: list[str]) -> dict:
        """The task as one row of the Ray dataset :func:`read_and_views` reads."""
        return {"task": json.dumps({"index": self.index, "kind": self.kind, "url": self.url, "num_classes": num_classes,
                                    "columns": columns}), "items": self.packed_items}


def unpack_items(packed: bytes) -> list[dict]:
    return json.loads(zlib.decompress(packed)) if packed else []


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def plan_shards(cfg: TokenizeConfig) -> tuple[list[ShardTask], list[str], str]:
    """(shard tasks in order, class names, input format)."""
    fmt = resolve_format(cfg.input, cfg.input_format)
    class_list = load_class_list(cfg.class_list) if cfg.class_list else None
    if fmt in ("webdataset", "parquet"):
        files = list_tars(cfg.input, ".tar" if fmt == "webdataset" else ".parquet")
        if fmt == "parquet":
            found = inputs.parquet_columns(files[0])
            missing = [c for c in (cfg.image_column, cfg.label_column) if c not in found]
            if missing:
                raise InputError(f"parquet input {files[0]} has no column {missing[0]!r}; its columns are "
                                 f"{', '.join(found)}: set image_column= and label_column=")
        sizes = storage.sizes(files)
        classes = class_list or [str(i) for i in range(cfg.num_classes)]
        kind = "tar" if fmt == "webdataset" else "parquet"
        return [ShardTask(i, kind, url=u, size=n, num_classes=len(classes))
                for i, (u, n) in enumerate(zip(files, sizes))], classes, fmt
    if cfg.num_classes:
        raise InputError(f"num_classes={cfg.num_classes} applies to webdataset input; the classes of the ImageFolder "
                         f"{cfg.input!r} are its folders, or class_list")
    classes, items = iter_image_folder(cfg.input, class_list)
    planned = itertools.islice(items, cfg.max_images or None)
    tasks = [ShardTask.of_files(i, shard) for i, shard in enumerate(_batched(planned, cfg.samples_per_shard))]
    collections.deque(items, maxlen=0)  # the rest of a truncated listing still goes through its checks
    return tasks, classes, fmt


def _batched(items: Iterator, n: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, n)):
        yield batch


# ------------------------------------------------------------------------------------------------
# Workers: read + decode + views (CPU tasks), encode (actor pool)


def _file_samples(items: list[dict], threads: int, window: int) -> Iterator[tuple[dict, bytes | Exception]]:
    """Listed files as (item, bytes or the read error), in order; at most ``window`` reads in flight or
    waiting, so a shard task holds about two chunks of image bytes, not the whole shard."""
    def read(item: dict) -> bytes | Exception:
        if item["reason"]:
            return b""
        try:
            return storage.read_bytes(item["source"])
        except Exception as e:  # noqa: BLE001 - recorded as the item's rejection reason
            return e

    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        futures = collections.deque(pool.submit(read, it) for it in items[:window])
        for i, item in enumerate(items):
            if i + window < len(items):
                futures.append(pool.submit(read, items[i + window]))
            yield item, futures.popleft().result()


def _storage_errors_named(samples: Iterator, url: str) -> Iterator:
    """A storage error while streaming an input file stops the job (a rerun may succeed) with the file's name;
    damage inside a tar does not (:func:`inputs.tar_samples` turns it into rejected items)."""
    try:
        yield from samples
    except OSError as e:
        raise InputError(f"cannot read input file {url}: {type(e).__name__}: {e}; check that it exists and is "
                         "readable, then re-run (finished shards are kept)") from e


def decode_task_memory(chunk: int, views: int, image_size: int) -> int:
    """Bytes reserved per decode task: the worker process with its libraries (378 MiB unique memory measured on the
    demo), room for decoding one large photo and a chunk of compressed bytes, and two chunks of views (one being
    made, one handed to Ray)."""
    return 512 * 2**20 + 2 * chunk * views * image_size * image_size * 3


def read_and_views(batch: dict[str, np.ndarray], *, image_size: int, views: int, augmentation: str,
                   crop_ratio: float, seed: int, min_side: int, chunk: int, read_threads: int) -> Iterator[dict]:
    """One shard task -> its chunks: records (JSON) and the accepted items' uint8 views (bytes).

    Inputs are streamed: a chunk is yielded as soon as its ``chunk`` items are decoded. Only the last chunk
    knows how many chunks the shard has (``num_chunks``; 0 on the others).
    """
    task = json.loads(batch["task"][0])
    num_classes = task.get("num_classes", 0)
    if task["kind"] == "tar":
        samples = _storage_errors_named(inputs.tar_samples(task["url"]), task["url"])
    elif task["kind"] == "parquet":
        samples = _storage_errors_named(inputs.parquet_samples(task["url"], *task["columns"], batch_rows=chunk),
                                        task["url"])
    else:
        samples = _file_samples(unpack_items(batch["items"][0]), read_threads, window=2 * chunk)

    def make_chunk(c: int, group: list[tuple[dict, bytes | Exception]], last: bool) -> dict:
        records, arrays = [], []
        for item, data in group:
            rec = dict(item)
            if isinstance(data, Exception):
                rec["reason"] = f"unreadable: {type(data).__name__}: {data}"
            elif not rec["reason"]:
                rec["reason"] = label_reason(rec["label"], num_classes)
            if not rec["reason"]:
                img, rec["reason"] = decode_image(data, min_side)
                if img is not None:
                    arrays.append(make_views(img, rec["key"], image_size=image_size, views=views,
                                             augmentation=augmentation, seed=seed, crop_ratio=crop_ratio))
            rec["status"] = "rejected" if rec["reason"] else "accepted"
            records.append(rec)
        stacked = np.stack(arrays) if arrays else np.zeros((0, views, image_size, image_size, 3), np.uint8)
        return {"shard": np.array([task["index"]]), "chunk": np.array([c]),
                "num_chunks": np.array([c + 1 if last else 0]),
                "records": np.array([json.dumps(records)], dtype=object),
                "views": np.array([stacked.tobytes()], dtype=object), "n_ok": np.array([len(arrays)])}

    # one chunk of look-ahead tells the last chunk apart; an input with no samples still makes one (empty) chunk
    group, c = list(itertools.islice(samples, chunk)), 0
    while True:
        following = list(itertools.islice(samples, chunk))
        yield make_chunk(c, group, last=not following)
        if not following:
            return
        group, c = following, c + 1


class ShardChunkEncoder:
    """Ray actor: the tokenizer (from the object store) encodes one chunk per call; codes as bytes."""

    def __init__(self, tokenizer_box: list, *, preset: str, seed: int, precision: str, views: int,
                 image_size: int, num_threads: int, channels_last: bool = False):
        import torch

        from nextscale.tokenize.encode import CodeEncoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, num_threads))
        tokenizer = tokenizer_box[0]
        tokenizer = ray.get(tokenizer) if isinstance(tokenizer, ray.ObjectRef) else tokenizer
        self.encoder = CodeEncoder(tokenizer, preset=preset, seed=seed, precision=precision,
                                   channels_last=channels_last)
        self.views, self.image_size = views, image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.time()
        blobs = []
        for blob, n in zip(batch["views"], batch["n_ok"]):
            s = self.image_size
            v = np.frombuffer(blob, dtype=np.uint8).reshape(int(n), self.views, s, s, 3)
            blobs.append(self.encoder({"views": v})["codes"].tobytes())
        out = {k: v for k, v in batch.items() if k != "views"}
        out["codes"] = np.array(blobs, dtype=object)
        # encoder busy intervals (wall clock): the driver measures how well decoding keeps the encoder fed
        out["t0"], out["t1"] = np.full(len(blobs), t0), np.full(len(blobs), time.time())
        return out


# ------------------------------------------------------------------------------------------------
# Driver: shard assembly, resume, manifest


def job_fingerprint(cfg: TokenizeConfig, tok_identity: dict, image_size: int) -> str:
    """Everything that changes the codes; shards of another fingerprint in the output are an error."""
    d = {"tokenizer_sha256": tok_identity["sha256"], "image_size": image_size, "views": cfg.views,
         "augmentation": cfg.augmentation, "crop_ratio": cfg.crop_ratio, "seed": cfg.seed,
         "precision": cfg.precision, "min_image_side": cfg.min_image_side, "batch_size": cfg.batch_size,
         **({"channels_last": True} if cfg.channels_last else {}),  # absent when off: older outputs keep their print
         "samples_per_shard": cfg.samples_per_shard, "format": codes.FORMAT}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def assemble_samples(shard: int, chunks: dict[int, tuple[list[dict], bytes]], views: int,
                     num_tokens: int) -> tuple[list[tuple[str, np.ndarray, int]], list[dict]]:
    """A shard's (samples, records) in item order from its encoded chunks."""
    records, samples = [], []
    for c in sorted(chunks):
        recs, codes_blob = chunks[c]
        codes_NKL = np.frombuffer(codes_blob, dtype=np.uint16).reshape(-1, views, num_tokens)
        ok = [r for r in recs if r["status"] == "accepted"]
        if len(ok) != len(codes_NKL):
            raise RuntimeError(f"chunk {c} of shard {shard}: {len(ok)} accepted items but {len(codes_NKL)} codes")
        samples += [(r["key"], codes_NKL[i], r["label"]) for i, r in enumerate(ok)]
        records += recs
    return samples, records


def run(cfg: TokenizeConfig) -> dict:
    """Run (or resume) the tokenize job; returns a JSON-able summary."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    tasks, classes, fmt = plan_shards(cfg)
    # read once: the same bytes go to the encoder actors; the driver builds the architecture only (meta device)
    tok_source = read_tokenizer(cfg.tokenizer)
    vq, tok = load_tokenizer(tok_source, preset=cfg.tokenizer_preset, seed=cfg.seed, name=cfg.tokenizer,
                             device="meta")
    vq = vq.cfg
    if cfg.image_size not in (0, vq.image_size):
        raise InputError(f"image_size={cfg.image_size} but the tokenizer encodes {vq.image_size}-px images; "
                         "set image_size=0 or use a matching tokenizer")
    size, views, L = vq.image_size, cfg.views, vq.num_tokens
    fingerprint = job_fingerprint(cfg, tok, size)
    storage.makedirs(cfg.output)

    # finished shards are verified here and remembered by index only: records are read again, one shard at a time,
    # when index.parquet is written, so the driver never holds the records of every input
    done = {t.index for t in tasks
            if codes.finished_part(cfg.output, t.index, fingerprint=fingerprint, inputs=t.digest()) is not None}
    todo = [t for t in tasks if t.index not in done]
    if todo:
        codes.discard_incomplete(cfg.output)
    log.info("tokenize: %d shards planned from %s (%s), %d already done, %d to make -> %s",
             len(tasks), cfg.input, fmt, len(done), len(todo), cfg.output)

    t_job = time.perf_counter()
    made_images, timing = 0, {"encode_span_s": 0.0, "encode_busy_s": 0.0}
    if todo:
        made_images, timing = _run_ray(cfg, todo, tok_source, fingerprint, size, L, len(classes))
    span = timing["encode_span_s"]
    # images/s from the encoder's first batch to its last: start-up excluded, starvation by decoding included
    steady = made_images / span if made_images and span > 0 else 0.0
    job_s = time.perf_counter() - t_job

    manifest, index, damaged = _collect(cfg, tasks, classes, fmt, tok, vq)
    storage.write_bytes(storage.join(cfg.output, codes.INDEX), index)
    storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
    manifest.write(cfg.output)  # last: the dataset is complete

    for d in damaged:
        log.warning("damaged input: %s", d["reason"])
    total_s = time.perf_counter() - t0
    rate = made_images / job_s if made_images and job_s > 0 else 0.0
    summary = {"output": cfg.output, "manifest": storage.join(cfg.output, codes.MANIFEST), "shards": len(tasks),
               "shards_made": len(todo), "shards_skipped": len(tasks) - len(todo), "listed": manifest.num_listed,
               "accepted": manifest.num_samples, "rejected": manifest.num_rejected, "classes": manifest.num_classes,
               "views": views, "num_tokens": L, "images_processed": made_images, "img_per_s": round(rate, 2),
               "steady_img_per_s": round(steady, 2),
               "encoder_busy_fraction": round(timing["encode_busy_s"] / span, 3) if span > 0 else 0.0,
               "damaged_inputs": damaged, "job_seconds": round(job_s, 2), "seconds": round(total_s, 2), "tokenizer_sha256": tok["sha256"]}
    log.info(
        "tokenize finished in %.1f s: %d images listed from %s, %d encoded into %d shards (%d made now, %d already "
        "there) and %d rejected (reasons in the manifest and index.parquet)%s; %d views x %d tokens each, %.1f "
        "img/s for the images processed in this run; codes, index.parquet and manifest.json in %s",
        total_s, manifest.num_listed, cfg.input, manifest.num_samples, len(tasks), len(todo),
        len(tasks) - len(todo), manifest.num_rejected,
        f"; {len(damaged)} input file(s) were damaged, their readable samples kept and the rest listed as rejected"
        if damaged else "", views, L, rate, cfg.output)
    return summary


def _run_ray(cfg: TokenizeConfig, todo: list[ShardTask], tok_source: str | bytes, fingerprint: str, size: int,
             L: int, num_classes: int) -> tuple[int, dict[str, float]]:
    """Make the ``todo`` shards; returns (images processed, encoder timing)."""
    init_ray(cfg.ray)
    gpu = use_gpus(cfg.device, "device")
    n_enc = cfg.num_encoders or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1)
    # the tokenizer goes through the object store: workers need no access to the driver's files
    tok_payload = ray.put(tok_source) if isinstance(tok_source, bytes) else tok_source
    chunk = max(1, cfg.batch_size // cfg.views)
    rows = [t.row(num_classes, [cfg.image_column, cfg.label_column]) for t in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        # declaring the memory also keeps Ray Data from fusing decoding into the encoder actors, which would
        # serialise every decode behind the encoder
        read_and_views, batch_size=1, batch_format="numpy", num_cpus=1,
        memory=decode_task_memory(chunk, cfg.views, size),
        resources=dict(cfg.decode_resources),
        fn_kwargs=dict(image_size=size, views=cfg.views, augmentation=cfg.augmentation, crop_ratio=cfg.crop_ratio,
                       seed=cfg.seed, min_side=cfg.min_image_side, chunk=chunk, read_threads=cfg.read_threads))
    ds = ds.map_batches(
        ShardChunkEncoder, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_enc), num_gpus=1 if gpu else 0, num_cpus=cfg.encoder_num_cpus,
        resources=dict(cfg.encoder_resources),
        fn_constructor_kwargs=dict(tokenizer_box=[tok_payload], preset=cfg.tokenizer_preset, seed=cfg.seed,
                                   precision=cfg.precision, views=cfg.views, image_size=size,
                                   num_threads=int(cfg.encoder_num_cpus), channels_last=cfg.channels_last))
    digests = {t.index: t.digest() for t in todo}
    pending: dict[int, dict[int, tuple[list[dict], bytes]]] = {}
    expected: dict[int, int] = {}  # shard -> number of chunks, known once its last chunk arrived
    images, t_first, t_last, busy = 0, float("inf"), 0.0, 0.0
    progress = Progress(len(todo), "tokenize", unit="shard", bar=False)  # Ray Data shows its bars
    for row in ds.iter_rows():
        t_first, t_last = min(t_first, float(row["t0"])), max(t_last, float(row["t1"]))
        busy += float(row["t1"]) - float(row["t0"])
        s, c, nc = int(row["shard"]), int(row["chunk"]), int(row["num_chunks"])
        pending.setdefault(s, {})[c] = (json.loads(row["records"]), bytes(row["codes"]))
        if nc:
            expected[s] = nc
        if len(pending[s]) == expected.get(s):
            samples, records = assemble_samples(s, pending.pop(s), cfg.views, L)
            part = codes.publish_shard(cfg.output, s, samples, records, fingerprint=fingerprint, inputs=digests[s])
            images += len(part["records"])
            log.info("wrote %s: %d samples, %d rejected", part["shard"], part["num_samples"],
                     len(part["records"]) - part["num_samples"])
            progress.update()
    progress.close()
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their chunks; re-run to finish them")
    return images, {"encode_span_s": max(0.0, t_last - t_first), "encode_busy_s": busy}


def _collect(cfg: TokenizeConfig, tasks: list[ShardTask], classes: list[str], fmt: str, tok: dict,
             vq) -> tuple[codes.Manifest, bytes, list[dict]]:
    """(manifest, index.parquet bytes, damaged input files) from the shards' records, read one at a time."""
    index = codes.IndexWriter()
    infos, rejected, damaged = [], [], []
    first_of_label: dict[int, dict] = {}  # what classes_from_labels needs: one accepted row per label
    listed = num_rejected = 0
    for t in tasks:
        part = codes.read_part(cfg.output, t.name)
        rows = codes.part_rows(part)
        index.add(rows)
        infos.append(codes.shard_info(part))
        listed += len(rows)
        for row, record in zip(rows, part["records"]):
            if row["status"] == "accepted":
                first_of_label.setdefault(row["label"], row)
                continue
            num_rejected += 1
            if len(rejected) < codes.MAX_LISTED_REJECTIONS:
                rejected.append({"key": row["key"], "source": row["source"], "reason": row["reason"]})
            if record.get("input_error"):
                damaged.append({"source": row["source"], "reason": row["reason"]})
    if fmt in ("webdataset", "parquet") and not classes:
        classes = classes_from_labels(list(first_of_label.values()))
    manifest = codes.Manifest(
        tokenizer=tok, patch_nums=list(vq.patch_nums), vocab_size=vq.vocab_size, num_tokens=vq.num_tokens,
        image_size=vq.image_size, views=cfg.views,
        augmentation={"name": cfg.augmentation, "crop_ratio": cfg.crop_ratio, "seed": cfg.seed,
                      "interpolation": "lanczos", "flip": False},
        precision=cfg.precision, samples_per_shard=cfg.samples_per_shard, shards=infos, classes=list(classes),
        num_listed=listed, num_samples=sum(i.num_samples for i in infos), num_rejected=num_rejected,
        rejected=rejected, input={"url": cfg.input, "format": fmt},
    )
    return manifest, index.getvalue(), damaged


# ------------------------------------------------------------------------------------------------
# Benchmark: the whole job vs the tokenizer's encode-only rate (same tokenizer, same process, same run)


def _encode_only(tokenizer_preset: str, batch_size: int, num_threads: int, seconds: float) -> float:
    """Views/s of the bare tokenizer on random views, in a Ray worker set up like the job's encoder actor."""
    import torch

    from nextscale.tokenize.encode import CodeEncoder

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, num_threads))
    enc = CodeEncoder(tokenizer_preset, seed=0)
    s = enc.image_size
    x = np.random.default_rng(0).integers(0, 256, (batch_size, 1, s, s, 3), dtype=np.uint8)
    enc({"views": x})  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n < 2 * batch_size:
        enc({"views": x})
        n += batch_size
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def measure_throughput(data: str, out: str, *, tokenizer_preset: str = "demo", batch_size: int = 64,
                       ray_cfg: RayConfig | None = None, views: int = 1, encoder_num_cpus: float = 1.0,
                       num_shards: int = 8, encode_seconds: float = 5.0) -> dict:
    """Images/s of the tokenize job on ImageFolder ``data`` beside encode-only images/s of the same tokenizer.

    Encode-only runs in a Ray worker with the encoder actor's resources (CPUs/threads, GPU), on random views
    of the tokenizer's size, right before the job. The job splits the images into ``num_shards`` shards so
    that decoding runs beside encoding. ``job_img_per_s`` is wall-clock over the whole job (start-up included);
    ``steady_img_per_s`` spans the encoder's first to last batch (start-up excluded, any wait for decoded
    images included).
    """
    n_images = len(list_image_folder(data)[0])
    cfg = TokenizeConfig(input=data, output=out, tokenizer=tokenizer_preset, views=views, batch_size=batch_size,
                         samples_per_shard=max(1, -(-n_images // num_shards)), encoder_num_cpus=encoder_num_cpus,
                         ray=ray_cfg or RayConfig())
    init_ray(cfg.ray)
    gpu = use_gpus(cfg.device, "device")
    probe = ray.remote(num_cpus=encoder_num_cpus, num_gpus=1 if gpu else 0)(_encode_only)
    views_per_s = ray.get(probe.remote(tokenizer_preset, batch_size, int(encoder_num_cpus), encode_seconds))
    summary = run(cfg)
    return {"encode_img_per_s": views_per_s / views,
            "job_img_per_s": summary["images_processed"] / summary["job_seconds"],
            "steady_img_per_s": summary["steady_img_per_s"],
            "encoder_busy_fraction": summary["encoder_busy_fraction"], "images": summary["images_processed"],
            "views": views, "tokenizer": tokenizer_preset, "job_seconds": summary["job_seconds"],
            "encoder_threads": max(1, int(encoder_num_cpus)), "gpu": gpu}
