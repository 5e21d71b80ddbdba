"""The rehearsal's checks on what the stages made: the codes against the synthetic generator (every input accounted
for, in one shard, with its image's label) and the code loader over them (plan memory, first batch, an epoch
stopped halfway and resumed exactly)."""

from __future__ import annotations

import hashlib
import time
import tracemalloc

import numpy as np
import pyarrow.compute as pc

from nextscale import codes, storage, synthetic_imagenet
from nextscale.prior.data import CHUNK, CodeLoader, EpochPlan, resume_point, view_index


def check_codes(url: str, want: dict, key_to_index) -> dict:
    """Listed = accepted + rejected as the generator says, every class with its count, every accepted key in exactly
    one shard with its label, and the label the generator gave that image (``key_to_index(key)`` -> its index).
    ``epoch_fingerprint``: what epoch 0 of a loader seeded 0 must yield (:func:`check_loader`), from the same pass.

    The index is held as Arrow columns (about 45 B per row, not Python objects) and each image of the generator as a
    bool; the shards are read one sample at a time: the job writes both in listing order, so the shards' samples, in
    manifest order, must be the index's accepted rows in order."""
    manifest = codes.Manifest.read(url)
    index = codes.read_index(url, columns=["key", "label", "shard", "status"], dictionaries=["shard", "status"])
    ok = pc.equal(index["status"], "accepted").to_numpy(zero_copy_only=False)
    counts = (len(index), int(ok.sum()), int((~ok).sum()))
    per_class = np.bincount(index["label"].to_numpy()[ok], minlength=len(want["accepted_per_class"])).tolist()
    problems = _listed_twice(index, key_to_index) + _count_problems(counts, per_class, manifest, want)
    rows = np.flatnonzero(ok)
    seen, fingerprint, shard_problems = _read_shards(url, manifest, index, rows, synthetic_labels_for(key_to_index))
    problems += shard_problems
    if seen != len(rows):
        problems.append(f"{len(rows) - seen} accepted keys are in no shard")
    return {"ok": not problems, "problems": problems[:5], "listed": counts[0], "accepted": counts[1],
            "rejected": counts[2], "classes_present": int(np.count_nonzero(per_class)),
            "min_per_class": int(min(per_class)), "max_per_class": int(max(per_class)),
            "epoch_fingerprint": [seen, fingerprint]}


def _listed_twice(index, key_to_index) -> list[str]:
    """A problem if an image of the generator has more than one row in index.parquet."""
    listed = {split: np.zeros(n, dtype=bool) for split, n in key_to_index.sizes.items()}
    twice = 0
    for batch in index.select(["key"]).to_batches(max_chunksize=65_536):
        for key in batch.column(0).to_pylist():
            split, i = key_to_index(key)
            twice += bool(listed[split][i])
            listed[split][i] = True
    return [f"{twice} images listed twice in index.parquet"] if twice else []


def _count_problems(counts: tuple[int, int, int], per_class: list[int], manifest: codes.Manifest,
                    want: dict) -> list[str]:
    """Listed / accepted / rejected and accepted per class against the generator's, and the manifest's counts."""
    problems = []
    wanted = (want["listed"], want["accepted"], want["rejected"])
    if counts != wanted:
        problems.append(f"listed/accepted/rejected {counts} != {wanted}")
    if (manifest.num_listed, manifest.num_samples, manifest.num_rejected) != counts:
        problems.append("manifest counts differ from index.parquet")
    if per_class != want["accepted_per_class"]:
        problems.append("accepted images per class differ from the generator's")
    return problems


def _read_shards(url: str, manifest: codes.Manifest, index, rows: np.ndarray, truth) -> tuple[int, int, list[str]]:
    """The shards, one sample at a time, against the index's accepted ``rows`` in order and the generator's labels
    (``truth``): (rows the shards cover, epoch fingerprint, the first wrong sample of each shard)."""
    problems = []
    seen, fingerprint = 0, 0
    for shard in manifest.shards:
        expect = index.take(rows[seen:seen + shard.num_samples]).to_pydict()
        samples = codes.iter_shard(storage.join(url, shard.name), num_samples=shard.num_samples, sha256=shard.sha256,
                                   vocab_size=manifest.vocab_size)
        for j, (key, codes_KL, label) in enumerate(samples):
            view = codes_KL[view_index(0, 0, key, codes_KL.shape[0])]
            fingerprint = (fingerprint + _sample_hash(view, label)) % 2**64
            row = (expect["key"][j], expect["label"][j], expect["shard"][j]) if j < len(expect["key"]) else None
            if row != (key, label, shard.name) or truth(key) != label:
                problems.append(f"sample {key} in {shard.name}: label {label} is not its image's, or index.parquet "
                                f"lists {row} there")
                break
        seen += shard.num_samples
    return seen, fingerprint, problems


def synthetic_labels_for(key_to_index):
    """key -> the label the generator gave its image."""
    cache: dict[int, np.ndarray] = {}

    def truth(key: str) -> int:
        split, i = key_to_index(key)
        if split not in cache:
            cache[split] = synthetic_imagenet.labels(split, key_to_index.sizes[split])
        return int(cache[split][i])
    return truth


class KeyIndex:
    """Key -> (split, image index) for the three input layouts of the synthetic dataset."""

    def __init__(self, data: dict):
        self.sizes = data["sizes"]
        self.offsets = {}
        for split, n in self.sizes.items():
            files = data["inputs"][f"{split}_parquet"]["files"]
            lengths = [len(a) for a in np.array_split(np.arange(n), files)]
            self.offsets[split] = np.concatenate([[0], np.cumsum(lengths)]).tolist()

    def __call__(self, key: str) -> tuple[str, int]:
        if key.startswith("n") and "/" in key:  # ImageFolder: n00000123/n00000123_0000042 (train image 42)
            return "train", int(key.rsplit("_", 1)[1])
        if "/" in key:  # parquet: train-00003-of-00294/0000123
            stem, row = key.split("/")
            split, k = stem.split("-")[0], int(stem.split("-")[1])
            return split, self.offsets[split][k] + int(row)
        split, i = key.rsplit("_", 1)  # tars: val_0000042
        return split, int(i)


def _sample_hash(codes_L: np.ndarray, label: int) -> int:
    h = hashlib.blake2b(np.ascontiguousarray(codes_L, dtype=np.uint16).tobytes() + label.to_bytes(4, "little"),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little")


def plan_memory(url: str, seed: int = 0, at_row: int = 0) -> int:
    """Bytes the loader allocates to plan an epoch and find ``at_row`` in it (the manifest already read)."""
    shards = codes.Manifest.read(url).shards
    tracemalloc.start()
    plan = EpochPlan(shards, seed=seed, epoch=0, num_readers=1)
    _, rest = resume_point(plan.counts, CHUNK, at_row)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del plan, rest
    return size


def check_loader(url: str, expected: list[int], batch_size: int = 256) -> dict:
    """First batch (time, memory), plan memory, and epoch 0 (seed 0) stopped at its middle and resumed: the same
    batches as without the stop, and (count, sum of sample hashes) equal to ``expected`` (:func:`check_codes`)."""
    seed = 0
    tracemalloc.start()
    t0 = time.perf_counter()
    loader = CodeLoader(url, batch_size=batch_size, seed=seed)
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    first_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n, total = len(first[0]), _add_hashes(0, first)
    half = loader.num_samples // 2 // batch_size * batch_size
    t_epoch = time.perf_counter()
    while n < half:
        batch = next(it)
        n, total = n + len(batch[0]), _add_hashes(total, batch)
    state = loader.state_dict()
    straight = [next(it) for _ in range(3)]
    rit, again, resume_s = _resumed(CodeLoader(url, batch_size=batch_size, seed=seed), state, batches=3)
    exact = all(a[0].equal(b[0]) and a[1].equal(b[1]) for a, b in zip(straight, again))
    for batch in [*again, *rit]:
        n, total = n + len(batch[0]), _add_hashes(total, batch)
    epoch_s = time.perf_counter() - t_epoch
    plan_bytes = plan_memory(url, seed, half)
    return {"rows": loader.num_samples, "first_batch_s": round(first_s, 3),
            "first_batch_peak_mb": round(first_peak / 2**20, 2), "plan_bytes": plan_bytes,
            "plan_bytes_per_row": round(plan_bytes / loader.num_samples, 4),
            "resume_at_row": half, "resume_s": round(resume_s, 3), "resume_exact": exact,
            "epoch_samples_per_s": round(n / epoch_s, 1),
            "epoch_multiset_ok": [n, total] == list(expected), "epoch_rows_seen": n}


def _add_hashes(total: int, batch) -> int:
    """``total`` plus the hashes of the batch's (codes, label) samples, mod 2**64: the epoch's multiset, order aside."""
    return (total + sum(_sample_hash(c.numpy(), int(y)) for c, y in zip(*batch))) % 2**64


def _resumed(loader: CodeLoader, state: dict, batches: int):
    """(iterator, its first ``batches`` batches, seconds to them) of ``loader`` restored to ``state``."""
    t0 = time.perf_counter()
    loader.load_state_dict(state)
    it = iter(loader)
    again = [next(it) for _ in range(batches)]
    return it, again, time.perf_counter() - t0
