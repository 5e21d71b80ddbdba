"""``nextscale fid``: sample N images on Ray, extract features, FID / IS / precision / recall vs a reference.

    ray.data.from_items(group ids)                     group g = indices [g*G, (g+1)*G), G = group_size
      -> map_batches(Sampler, actors)                 one row per group: index (G,), label (G,), image (G,H,W,3)
      -> map_batches(Extractor, actors)               + pool (G,D) float32, logits (G,K) float32
      -> driver: groups taken in index order         -> float64 sums (memory: one chunk, not N) -> {output}/fid.json

Sample i has class (i // samples_per_class) % num_classes, and its group's generator is seeded by
(seed, i // group_size) (see ``nextscale.eval.generate``). Rows stay whole groups through both stages,
so the sampler and the extractor always see the same batches, and the images, the features and the
float64 statistics (summed in index order) are identical whatever the number of actors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterable, Iterator

import numpy as np
import ray
import torch
from PIL import Image

from nextscale import storage
from nextscale.codes import MAX_LISTED_REJECTIONS
from nextscale.config import dump_yaml, to_dict
from nextscale.devices import pick_device
from nextscale.errors import NotFound
from nextscale.eval import features as feature_lib
from nextscale.eval.config import FidConfig
from nextscale.eval.fid import (
    FeatureStats,
    SplitScores,
    frechet_distance,
    load_reference_npz,
    precision_recall,
    write_sample_npz,
)
from nextscale.eval.generate import group_indices, load_models, sample_batch, seeded_generator
from nextscale.images import InputError, center_view, is_image_name, open_image, walk
from nextscale.logs import WandbRun
from nextscale.pipelines.common import init_ray, use_gpus
from nextscale.progress import Progress
from nextscale.tokenize.loader import load_tokenizer

log = logging.getLogger(__name__)

class Sampler:
    """Ray actor: loads the prior and tokenizer once, samples whole groups; optionally writes PNGs."""

    def __init__(self, cfg: FidConfig, device: str):
        self.cfg = cfg
        self.device = pick_device(device)
        self.var, self.vqvae = load_models(cfg.models, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, G, S = self.cfg, self.cfg.group_size, self.vqvae.cfg.image_size
        out = {"group": batch["id"].astype(np.int64), "index": np.full((len(batch["id"]), G), -1, dtype=np.int64),
               "label": np.zeros((len(batch["id"]), G), dtype=np.int64),
               "image": np.zeros((len(batch["id"]), G, S, S, 3), dtype=np.uint8)}
        for row, g in enumerate(batch["id"].tolist()):
            idx = group_indices(g, G, cfg.num_samples)
            labels = [cfg.label_of(i) for i in idx]
            _, img = sample_batch(self.var, self.vqvae, labels, seeded_generator(self.device, cfg.seed, g), cfg.sampling)
            images = img.permute(0, 2, 3, 1).cpu().numpy()
            n = len(idx)
            out["index"][row, :n], out["label"][row, :n], out["image"][row, :n] = list(idx), labels, images
            if cfg.save_pngs or cfg.save_npz:
                for i, image in zip(idx, images):
                    buf = io.BytesIO()
                    Image.fromarray(image).save(buf, format="PNG")
                    storage.write_bytes(storage.join(cfg.output, "samples", f"{i:06d}.png"), buf.getvalue())
        return out


class Extractor:
    """Ray actor: features of each row's images, in chunks fixed by the row (so independent of the actor count)."""

    def __init__(self, name: str, weights_path: str, device: str, batch_size: int, keep_images: bool, store: str = ""):
        self.device = pick_device(device)
        self.extractor = feature_lib.build(name, weights_path, self.device)
        self.batch_size, self.keep_images, self.store = batch_size, keep_images, store

    def _features(self, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # Ray hands batches over read-only (zero copy), torch wants a writable array: a copy only then
        images_NHWC = np.require(images_NHWC, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        f = feature_lib.extract(self.extractor, torch.from_numpy(images_NHWC), self.batch_size)
        return f["pool"].numpy(), None if f["logits"] is None else f["logits"].numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of groups (image (R, G, H, W, 3)): features per group; rows of single images: per batch."""
        if batch["image"].ndim == 4:
            pool, logits = self._features(batch["image"])
        else:
            parts = [self._features(images) for images in batch["image"]]
            pool, logits = np.stack([p for p, _ in parts]), None if parts[0][1] is None else np.stack([q for _, q in parts])
        out = {k: v for k, v in batch.items() if k != "image" or self.keep_images}
        out["pool"] = pool
        if logits is not None:
            out["logits"] = logits
        if self.store and "group" in out:  # what a rerun needs to skip the group: written whole, in one write
            for r, g in enumerate(out["group"].tolist()):
                buf = io.BytesIO()
                np.savez(buf, **{k: v[r] for k, v in out.items() if k != "group"})
                storage.write_bytes(group_url(self.store, g), buf.getvalue())
        return out


# ------------------------------------------------------------------------------------------------
# Resume: the features of every finished group are stored under {output}/groups-<protocol key>/


def groups_store(cfg: FidConfig) -> str:
    """Where the groups of this sampling protocol go: a new key for anything that changes a group's numbers."""
    what = {"models": to_dict(cfg.models), "prior": _identity(cfg.models.prior_url),
            "tokenizer": _identity(cfg.models.tokenizer_url), "sampling": to_dict(cfg.sampling), "seed": cfg.seed,
            "group_size": cfg.group_size, "num_samples": cfg.num_samples, "num_classes": cfg.num_classes,
            "samples_per_class": cfg.samples_per_class, "extractor": cfg.feature_extractor,
            "inception_weights": cfg.inception_weights, "images": cfg.save_npz}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return storage.join(cfg.output, f"groups-{key}")


def _identity(url: str) -> list:
    """Size and modification stamp of a weights file, so that retrained weights at the same URL start afresh."""
    try:
        fs, path = storage.filesystem(url)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - hf:// / https:// or a missing file: the URL alone then
        return [url]
    return [url, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]


def group_url(store: str, group: int) -> str:
    return storage.join(store, f"group-{group:06d}.npz")


def stored_groups(store: str) -> list[int]:
    names = storage.listdir(store, ".npz")
    return sorted(int(n[len("group-"):-len(".npz")]) for n in names if n.startswith("group-"))


def load_group(store: str, group: int) -> dict[str, np.ndarray]:
    """A stored group as a one-row batch, like the ones the extractor hands back."""
    with np.load(io.BytesIO(storage.read_bytes(group_url(store, group)))) as f:
        return {k: f[k][None] for k in f.files}


# ------------------------------------------------------------------------------------------------
# Reference images (folder or tar shards)


def list_reference_items(url: str) -> list[str]:
    """Image files (recursively, sorted) under ``url``, or tar shards (a .tar URL or a folder of them)."""
    if url.endswith(".tar"):
        return [url]
    if not storage.exists(url):
        raise NotFound(f"reference.images={url!r} does not exist: give an image folder or tar shards")
    entries = list(walk(url)[0])
    tars = [rel for rel, kind in entries if kind == "file" and rel.endswith(".tar")]
    chosen = tars or [rel for rel, kind in entries if kind == "file" and is_image_name(rel)]
    if not chosen:
        raise InputError(f"no images or .tar shards under reference.images={url!r}")
    if len(chosen) < len(entries):
        unused = sorted(set(rel for rel, _ in entries) - set(chosen))
        log.warning("fid: %d entries under %s are not %s and are not used: %s%s", len(unused), url,
                    "tars" if tars else "images", ", ".join(unused[:5]), " …" if len(unused) > 5 else "")
    return [storage.join(url, rel) for rel in chosen]


def _decode_reference(url: str, data: bytes, size: int) -> tuple[np.ndarray, str]:
    """(the centre view, "") or (zeros, why the image cannot be used): one damaged file does not end the job."""
    try:
        return np.asarray(center_view(open_image(url, data), size)), ""
    except InputError as e:
        return np.zeros((size, size, 3), np.uint8), str(e)


def load_reference_images(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray task: decode, resize and centre-crop the images of each item (a file, or every image member of a tar).
    An image that cannot be decoded comes back as a row with its reason in ``rejected`` ("" for the others)."""
    keys, images, rejected = [], [], []
    for item, url in zip(batch["item"].tolist(), batch["url"].tolist()):
        if url.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and is_image_name(m.name)),
                                 key=lambda m: m.name)
                decoded = [_decode_reference(f"{url}:{m.name}", tar.extractfile(m).read(), size) for m in members]
                keys += [item * 10_000_000 + j for j in range(len(members))]
        else:
            decoded = [_decode_reference(url, storage.read_bytes(url), size)]
            keys.append(item * 10_000_000)
        images += [image for image, _ in decoded]
        rejected += [why for _, why in decoded]
    return {"key": np.array(keys, dtype=np.int64),
            "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "rejected": np.array(rejected, dtype=object)}


# ------------------------------------------------------------------------------------------------
# The job


class GroupOrder:
    """One-group batches in group order: a stored group is read when its turn comes, a streamed one waits only
    until then; ``peak`` is how many waited at most (bounded by the pipeline's reordering, not by N)."""

    def __init__(self, streamed: Iterable, store: str, stored: set[int], num_groups: int):
        self.streamed, self.store, self.stored, self.num_groups = streamed, store, stored, num_groups
        self.peak = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        waiting: dict[int, dict[str, np.ndarray]] = {}
        source = iter(self.streamed)
        for g in range(self.num_groups):
            if g in self.stored:
                yield load_group(self.store, g)
                continue
            while g not in waiting:
                batch = next(source)
                for r, group in enumerate(batch["group"].tolist()):
                    waiting[group] = {k: v[r:r + 1] for k, v in batch.items()}
                self.peak = max(self.peak, len(waiting))
            yield waiting.pop(g)


class SampleTally:
    """What the driver keeps of N samples taken in index order: the float64 feature sums in
    :meth:`FeatureStats.in_chunks`' chunks (the same bits as over the whole array), the Inception Score's split
    sums, the count of each label, and only when asked (precision/recall, samples.npz) the features or images.
    Its memory is one chunk of features, not N."""

    def __init__(self, n: int, num_classes: int, keep_features: bool, keep_images: bool):
        self.n, self.seen = n, 0
        self.stats: FeatureStats | None = None
        self.chunk: list[np.ndarray] = []
        self.scores = SplitScores(n)
        self.label_counts = np.zeros(num_classes, dtype=np.int64)
        keep = (["pool"] if keep_features else []) + (["image", "label"] if keep_images else [])
        self.kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
        self.progress = Progress(n, "fid: sample + features", unit="img", bar=False)  # Ray Data shows its bars

    def add(self, batch: dict[str, np.ndarray]) -> None:
        valid = batch["index"] >= 0
        idx = batch["index"][valid]
        if not np.array_equal(idx, np.arange(self.seen, self.seen + len(idx))):
            raise RuntimeError(f"samples arrived out of order: expected index {self.seen}, got {idx[:3].tolist()}")
        self.seen += len(idx)
        pool = batch["pool"][valid]
        if self.stats is None:
            self.stats = FeatureStats(pool.shape[1])
        self.chunk.append(pool)
        have = sum(len(c) for c in self.chunk)
        while have >= FeatureStats.CHUNK or (have and self.seen == self.n):
            rows = np.concatenate(self.chunk)
            self.stats.merge(FeatureStats.of(rows[:FeatureStats.CHUNK]))
            self.chunk = [rows[FeatureStats.CHUNK:]]
            have = len(self.chunk[0])
        if "logits" in batch:
            self.scores.update(batch["logits"][valid])
        self.label_counts += np.bincount(batch["label"][valid], minlength=len(self.label_counts))
        for key, parts in self.kept.items():
            parts.append(batch[key][valid])
        self.progress.update(len(idx))

    def result(self, key: str) -> np.ndarray:
        return np.concatenate(self.kept[key])

    def close(self) -> None:
        self.progress.close()
        if self.seen != self.n:
            raise RuntimeError(f"{self.n - self.seen} samples never came back from the workers (first: {self.seen})")


def _extract_dataset(ds, cfg: FidConfig, use_gpu: bool, keep_images: bool, batch_size: int = 1, store: str = ""):
    return ds.map_batches(
        Extractor, fn_constructor_kwargs={"name": cfg.feature_extractor, "weights_path": cfg.inception_weights,
                                          "device": "cuda" if use_gpu else "cpu", "batch_size": cfg.feature_batch_size,
                                          "keep_images": keep_images, "store": store},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.num_feature_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0)


def reference_statistics(cfg: FidConfig, image_size: int, use_gpu: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """({"mu", "sigma", "features" (pool, for precision/recall; may be absent)} of the configured reference,
    why each reference image that could not be decoded was left out)."""
    ref = cfg.reference
    if ref.npz:
        data = load_reference_npz(ref.npz)
        out = {"mu": data["mu"], "sigma": data["sigma"]}
        if "features" in data:
            out["features"] = data["features"]
        elif "arr_0" in data and cfg.precision_recall:
            images = data["arr_0"][: ref.max_images or None]
            ds = ray.data.from_items([{"key": k, "image": image} for k, image in enumerate(images)])
            out["features"], _ = _gather_reference(_extract_dataset(ds, cfg, use_gpu, False, cfg.feature_batch_size))
        return out, []
    items = list_reference_items(ref.images)
    ds = ray.data.from_items([{"item": i, "url": u} for i, u in enumerate(items)])
    ds = ds.map_batches(load_reference_images, fn_kwargs={"size": image_size}, batch_size=16, batch_format="numpy")
    features, rejected = _gather_reference(_extract_dataset(ds, cfg, use_gpu, False, cfg.feature_batch_size))
    if rejected:
        log.warning("fid: %d reference image(s) could not be used and are left out (listed in fid.json), first: %s",
                    len(rejected), rejected[0])
    if ref.max_images:
        features = features[: ref.max_images]
    if len(features) < 2:
        raise InputError(f"reference.images={ref.images!r} gave {len(features)} images; statistics need at least 2")
    stats = FeatureStats.in_chunks(features)
    return {"mu": stats.mu, "sigma": stats.sigma, "features": features}, rejected


def _gather_reference(ds) -> tuple[np.ndarray, list[str]]:
    """The features of the usable rows in key order, and the reasons of the rejected ones in key order."""
    keys, pools, rejected = [], [], []
    progress = Progress(None, "fid: reference features", unit="img", bar=False)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keys.append(batch["key"])
        pools.append(batch["pool"])
        rejected.append(batch["rejected"] if "rejected" in batch else np.full(len(batch["key"]), "", dtype=object))
        progress.update(len(batch["key"]))
    progress.close()
    key, pool, why = np.concatenate(keys), np.concatenate(pools), np.concatenate(rejected)
    order = np.argsort(key, kind="stable")
    usable = why[order] == ""
    return pool[order][usable], why[order][~usable].tolist()


def run(cfg: FidConfig) -> dict:
    """Sample, extract, compare; writes {output}/fid.json (+ reference_stats.npz, samples) and returns the summary."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    init_ray(cfg.ray)
    storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
    cfg, fallback_reason = _extractor_or_fallback(cfg)
    tok_cfg = load_tokenizer(cfg.models.tokenizer_url, preset=cfg.models.tokenizer_preset, device="meta")[0].cfg
    use_gpu = use_gpus(cfg.device, "device")
    num_samplers = cfg.num_sampler_actors or (int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1)
    device = "cuda" if use_gpu else "cpu"
    log.info("fid: %d samples in %d groups of %d on %d sampler actor(s) (%s), extractor %s", cfg.num_samples,
             cfg.num_groups, cfg.group_size, num_samplers, device, cfg.feature_extractor)

    t_ref = time.perf_counter()
    ref, ref_rejected = reference_statistics(cfg, tok_cfg.image_size, use_gpu)
    ref_seconds = time.perf_counter() - t_ref
    if not cfg.reference.npz or "features" in ref:
        buf = io.BytesIO()
        np.savez(buf, **ref, extractor=np.array(cfg.feature_extractor))
        storage.write_bytes(storage.join(cfg.output, "reference_stats.npz"), buf.getvalue())

    t_sample = time.perf_counter()
    tally, in_order, done, todo = _sample_and_extract(cfg, device, num_samplers, ref)
    sample_seconds = time.perf_counter() - t_sample
    sampled = sum(len(group_indices(g, cfg.group_size, cfg.num_samples)) for g in todo)

    result = _metrics(cfg, tally, ref)
    counts = tally.label_counts[tally.label_counts > 0]
    result.update({
        "num_samples": cfg.num_samples, "num_classes": cfg.num_classes, "samples_per_class": cfg.samples_per_class,
        **{f"sampling.{k}": v for k, v in to_dict(cfg.sampling).items()}, "seed": cfg.seed,
        "group_size": cfg.group_size, "feature_extractor": cfg.feature_extractor,
        "feature_fallback_reason": fallback_reason,
        "reference": cfg.reference.npz or cfg.reference.images, "prior": cfg.models.prior_url,
        "device": device, "sampler_actors": num_samplers,
        "groups_resumed": len(done), "groups_sampled": len(todo), "reorder_peak_groups": in_order.peak,
        "labels": {"classes": len(counts), "min_per_class": int(counts.min()), "max_per_class": int(counts.max())},
        "sampling_seconds": round(sample_seconds, 2), "images_per_second": round(sampled / sample_seconds, 2),
        "reference_seconds": round(ref_seconds, 2),
        "reference_rejected": {"count": len(ref_rejected), "first": ref_rejected[:MAX_LISTED_REJECTIONS]},
        "output": storage.join(cfg.output, "fid.json"),
        "sample_stats_sha": tally.stats.digest,
    })
    if cfg.save_npz:
        write_sample_npz(storage.join(cfg.output, "samples.npz"), tally.result("image"), tally.result("label"))
        result["npz"] = storage.join(cfg.output, "samples.npz")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _report(cfg, result)
    return result


def _extractor_or_fallback(cfg: FidConfig) -> tuple[FidConfig, str]:
    """``cfg`` with the feature extractor that builds here (``feature_fallback`` when the Inception weights are
    missing, and why): fails fast on the driver (missing weights, unknown extractor) before any actor starts."""
    try:
        feature_lib.build(cfg.feature_extractor, cfg.inception_weights)
        return cfg, ""
    except feature_lib.InceptionWeightsMissing as e:
        if not cfg.feature_fallback:
            raise
        log.warning("fid: %s; using feature_extractor=%s instead (its FID is not an Inception FID)", e,
                    cfg.feature_fallback)
        cfg = dataclasses.replace(cfg, feature_extractor=cfg.feature_fallback)
        feature_lib.build(cfg.feature_extractor, cfg.inception_weights)
        return cfg, str(e)


def _sample_and_extract(cfg: FidConfig, device: str, num_samplers: int,
                        ref: dict[str, np.ndarray]) -> tuple[SampleTally, GroupOrder, set[int], list[int]]:
    """Sample and extract the groups whose features are not stored yet, and tally every group in order; returns
    (tally, the in-order reader, groups resumed, groups sampled)."""
    # a rerun (or the resubmission after a lost node) samples only the groups whose features are not stored
    store = groups_store(cfg)
    done = set(stored_groups(store))
    todo = sorted(set(range(cfg.num_groups)) - done)
    log.info("fid: %d of %d groups already stored under %s; sampling %d", len(done), cfg.num_groups, store, len(todo))
    streamed: Iterable = ()
    if todo:
        # group ids as in-memory blocks: no read tasks competing with the actors for CPUs (on a 2-core laptop the
        # two actor pools may hold every CPU, and a pending read task would starve the pipeline)
        ds = ray.data.from_items([{"id": g} for g in todo], override_num_blocks=min(len(todo), 256))
        ds = ds.map_batches(Sampler, fn_constructor_kwargs={"cfg": cfg, "device": device}, batch_size=1,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_samplers),
                            num_cpus=cfg.cpus_per_actor, num_gpus=1 if device == "cuda" else 0)
        ds = _extract_dataset(ds, cfg, device == "cuda", keep_images=cfg.save_npz, store=store)
        streamed = ds.iter_batches(batch_size=None, batch_format="numpy")
    tally = SampleTally(cfg.num_samples, cfg.num_classes, keep_features=cfg.precision_recall and "features" in ref,
                        keep_images=cfg.save_npz)
    in_order = GroupOrder(streamed, store, done, cfg.num_groups)
    for batch in in_order:
        tally.add(batch)
    tally.close()
    return tally, in_order, done, todo


def _metrics(cfg: FidConfig, tally: SampleTally, ref: dict[str, np.ndarray]) -> dict:
    """FID, and IS / precision / recall where configured, of the tallied samples against the reference."""
    stats = tally.stats
    result: dict = {"fid": frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"])}
    if cfg.inception_score and tally.scores.seen:
        result["inception_score"], result["inception_score_std"] = tally.scores.score()
    if "pool" in tally.kept:
        result["precision"], result["recall"] = precision_recall(ref["features"], tally.result("pool"), k=3)
    return result


def _report(cfg: FidConfig, result: dict) -> None:
    """Write fid.json, log the numbers to wandb and one summary line."""
    storage.write_json(result["output"], result)
    wandb = WandbRun(cfg.wandb, run_id=f"fid-{cfg.output.rstrip('/').rsplit('/', 1)[-1]}", config=cfg)
    wandb.log({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    wandb.finish()
    log.info(
        "fid: FID %.3f%s%s for %d samples of %s vs %s (extractor %s); sampled at %.1f img/s on %d %s actor(s); "
        "%.0f s in all; results in %s",
        result["fid"], f", IS {result['inception_score']:.2f}" if "inception_score" in result else "",
        f", precision {result['precision']:.3f} recall {result['recall']:.3f}" if "precision" in result else "",
        cfg.num_samples, cfg.models.prior_url, result["reference"], cfg.feature_extractor, result["images_per_second"],
        result["sampler_actors"], result["device"], result["seconds"], result["output"])
