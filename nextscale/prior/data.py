"""The code loader: (codes (B, L) int64, labels (B,) int64) batches streamed from code shards.

Shards (``codes-*.tar`` written by ``nextscale tokenize``, local or ``s3://``/``gs://``) are read with
webdataset, one whole shard at a time, and checked against the manifest (sample count, sha256, codes <
vocab_size) before any of its samples is used (``nextscale.codes.read_shard``). Every epoch is an exact
pass: the shard order is permuted by ``(seed, epoch)``, then split over the R = world_size x
max(1, num_workers) readers — whole shards round-robin when there are at least R shards, else every reader
streams all shards and keeps the samples whose epoch position is its own modulo R (no reader is ever
empty-handed, so nothing hangs). Each reader shuffles through a seeded buffer and picks
one of the K views per sample from ``(seed, epoch, key)``. The rank interleaves its readers' fixed-size chunks
in a fixed round-robin order, so the batch sequence is a pure function of (manifest, seed, epoch, rank,
world_size, num_workers, batch_size) and :meth:`CodeLoader.state_dict` / ``load_state_dict`` resume it exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nextscale import storage
from nextscale.codes import READ_ATTEMPTS, READ_BACKOFF_S, Manifest, ShardInfo, read_shard
from nextscale.config import ConfigError

log = logging.getLogger(__name__)

CHUNK = 64  # samples per reader->rank hand-over; also the granularity of the round-robin interleave


def view_index(seed: int, epoch: int, key: str, views: int) -> int:
    if views == 1:
        return 0
    h = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % views


# ------------------------------------------------------------------------------------------------
# The epoch plan (pure: every rank and worker computes the same one)


class EpochPlan:
    """Which samples each of the R readers streams in one epoch, and how many."""

    def __init__(self, shards: list[ShardInfo], *, seed: int, epoch: int, num_readers: int):
        shards = [s for s in shards if s.num_samples > 0]
        perm = np.random.default_rng((seed, epoch)).permutation(len(shards)) if shards else []
        self.order = [shards[i] for i in perm]
        self.R = num_readers
        self.total = sum(s.num_samples for s in self.order)
        self.by_shard = len(self.order) >= num_readers
        if self.by_shard:
            self.counts = [sum(s.num_samples for s in self.order[r::num_readers]) for r in range(num_readers)]
        else:
            self.counts = [self.total // num_readers + (r < self.total % num_readers) for r in range(num_readers)]

    def refs(self, reader: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """This reader's stream from its ``start``-th sample as (shard position in ``order``, index in that shard);
        no shard is read, and the shards before ``start`` are passed by their counts."""
        if self.by_shard:
            for si in range(reader, len(self.order), self.R):
                n = self.order[si].num_samples
                yield from ((si, j) for j in range(start, n))
                start = max(0, start - n)
            return
        g, base = start * self.R + reader, 0  # the reader streams the global positions = reader (mod R)
        for si, s in enumerate(self.order):
            end = base + s.num_samples
            while g < end:
                yield si, g - base
                g += self.R
            base = end

    def ref_at(self, reader: int, positions: np.ndarray) -> list[tuple[int, int]]:
        """(shard position in ``order``, index in that shard) of the reader's stream ``positions``."""
        if self.by_shard:
            shards = np.arange(reader, len(self.order), self.R)
            g = np.asarray(positions)
        else:
            shards, g = np.arange(len(self.order)), np.asarray(positions) * self.R + reader
        sizes = np.array([self.order[i].num_samples for i in shards])
        ends = np.cumsum(sizes)
        k = np.searchsorted(ends, g, side="right")
        return list(zip(shards[k].tolist(), (g - ends[k] + sizes[k]).tolist()))

    def samples(self, read: Callable[[ShardInfo], list], reader: int,
                start: int = 0) -> Iterator[tuple[str, np.ndarray, int]]:
        """This reader's samples in stream order (before shuffling) from its ``start``-th on; ``read(shard)`` gives a
        shard's samples, and only shards holding samples from ``start`` on are read."""
        for si, group in itertools.groupby(self.refs(reader, start), key=lambda r: r[0]):
            data = read(self.order[si])
            for _, j in group:
                yield data[j]


def chunk_sequence(counts: list[int], chunk: int) -> Iterator[tuple[int, int, int]]:
    """The rank's fixed interleave: (worker, chunk index, size) round-robin over its workers' chunks, generated as
    it is consumed (a list would hold a tuple per chunk: 12.8 M rows are 200 k chunks)."""
    n_chunks = [-(-c // chunk) for c in counts]
    return ((w, t, min(chunk, counts[w] - t * chunk))
            for t in range(max(n_chunks, default=0)) for w in range(len(counts)) if t < n_chunks[w])


def resume_point(counts: list[int], chunk: int, consumed: int) -> tuple[list[int], Iterator[tuple[int, int, int]]]:
    """Per-worker samples to skip and the remaining (worker, chunk, size) sequence after ``consumed`` samples."""
    seq = chunk_sequence(counts, chunk)
    skip = [0] * len(counts)
    cum = 0
    for w, t, size in seq:
        if cum + size > consumed:
            offset = consumed - cum
            skip[w] += offset
            # workers whose chunk at this round came earlier in the sequence have used it up
            return skip, itertools.chain([(w, t, size - offset)], seq)
        skip[w] += size
        cum += size
    return skip, iter(())


# ------------------------------------------------------------------------------------------------
# Readers (one per DataLoader worker)


class _Readers(IterableDataset):
    """Yields (worker, chunk index, codes uint16 (n, L), labels int64 (n,)) of this worker's reader."""

    def __init__(self, loader: CodeLoader, skip: list[int]):
        self.root, self.plan, self.skip = loader.url, loader.plan, skip
        self.seed, self.epoch, self.views = loader.seed, loader.epoch, loader.views
        self.buffer, self.rank, self.W = loader.shuffle_buffer, loader.rank, loader.readers_per_rank
        self.verify, self.vocab_size = loader.verify, loader.manifest.vocab_size
        self.attempts, self.backoff_s = loader.read_attempts, loader.read_backoff_s

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        reader = self.rank * self.W + w
        pos, codes, labels = self.skip[w], [], []
        for key, codes_KL, label in self._stream(reader, pos):
            codes.append(codes_KL[view_index(self.seed, self.epoch, key, codes_KL.shape[0])])
            labels.append(label)
            pos += 1
            if pos % CHUNK == 0:
                yield w, (pos - 1) // CHUNK, np.stack(codes), np.asarray(labels, dtype=np.int64)
                codes, labels = [], []
        if codes:
            yield w, (pos - 1) // CHUNK, np.stack(codes), np.asarray(labels, dtype=np.int64)

    def _read(self, shard: ShardInfo) -> list[tuple[str, np.ndarray, int]]:
        return read_shard(storage.join(self.root, shard.name), num_samples=shard.num_samples,
                          sha256=shard.sha256 if self.verify else None,
                          vocab_size=self.vocab_size if self.verify else None, attempts=self.attempts,
                          backoff_s=self.backoff_s)

    def _stream(self, reader: int, skip: int) -> Iterator[tuple[str, np.ndarray, int]]:
        """The reader's shuffled samples after its first ``skip``.

        A resume does not read what it skips: the shuffle is replayed on stream positions (the manifest's counts
        suffice; the buffer's draws once it is full are one vectorised ``rng.integers`` call, the same numbers
        as one call per sample), then the shards the buffer still holds samples of are read, and the stream goes
        on from the first sample not yet drawn. Time and memory to the first batch barely change with the row.
        """
        rng = np.random.default_rng((self.seed, self.epoch, reader, 1))
        if self.buffer <= 1:
            yield from self.plan.samples(self._read, reader, start=skip)
            return
        if not skip:
            yield from self._shuffled(self.plan.samples(self._read, reader), rng, [])
            return
        n = self.plan.counts[reader]
        full = min(self.buffer, n)  # the buffer fills with the first samples, then each new one swaps one out
        drawn = min(skip, n - full)
        slots = np.arange(full)  # stream position each buffer slot holds
        if drawn:
            last = np.full(full, -1)
            np.maximum.at(last, rng.integers(full, size=drawn), np.arange(drawn))
            slots = np.where(last >= 0, full + last, slots)
        if drawn < skip:  # the resume point is in the final flush: the buffer's permutation, partly used
            yield from self._fetch(self.plan.ref_at(reader, slots[rng.permutation(full)[skip - drawn:]]))
            return
        buf = self._fetch(self.plan.ref_at(reader, slots))
        yield from self._shuffled(self.plan.samples(self._read, reader, start=full + drawn), rng, buf)

    def _fetch(self, refs: list[tuple[int, int]]) -> list[tuple[str, np.ndarray, int]]:
        """The samples of (shard, index) references, each shard read once."""
        out: list = [None] * len(refs)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, (si, j) in enumerate(refs):
            by_shard.setdefault(si, []).append((k, j))
        for si, wanted in by_shard.items():
            data = self._read(self.plan.order[si])
            for k, j in wanted:
                out[k] = data[j]
        return out

    def _shuffled(self, samples: Iterator, rng: np.random.Generator, buf: list) -> Iterator:
        """A seeded shuffle buffer of ``self.buffer`` samples over ``samples``, starting from ``buf``."""
        for s in samples:
            if len(buf) < self.buffer:
                buf.append(s)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], s = s, buf[i]
            yield s
        for i in rng.permutation(len(buf)):
            yield buf[i]


def _as_is(x: Any) -> Any:
    return x  # keep the readers' numpy chunks as they are (the default would convert them to tensors)


class CodeLoader:
    """Iterable of ``(codes_BL int64, label_B int64)``: every sample exactly once per epoch over all ranks.

    ``num_workers`` DataLoader processes read in parallel (0 = in this process). ``drop_last`` drops this rank's
    final partial batch; ``equal_batches`` gives every rank the same number of full batches (the smallest
    rank's; a few samples are then skipped) so DDP ranks stay in step. ``state_dict`` / ``load_state_dict``
    resume mid-epoch exactly (same rank layout, workers and batch size). ``verify`` checks every shard against
    the manifest (sha256 while it streams, codes < vocab_size) before its samples are used; a shard that
    fails is a :class:`nextscale.codes.CodesError` naming it. A storage error while a shard is read is retried
    ``read_attempts`` times in all with exponential backoff from ``read_backoff_s``; the batches stay exactly
    those of an undisturbed run.
    """

    def __init__(self, url: str, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 2048, epoch: int = 0, drop_last: bool = False,
                 equal_batches: bool = False, verify: bool = True, read_attempts: int = READ_ATTEMPTS,
                 read_backoff_s: float = READ_BACKOFF_S):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.url, self.batch_size, self.rank, self.world_size = url, batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.drop_last, self.equal_batches, self.verify = drop_last, equal_batches, verify
        self.read_attempts, self.read_backoff_s = read_attempts, read_backoff_s
        self.manifest = Manifest.read(url)
        self.views = self.manifest.views
        self.readers_per_rank = max(1, num_workers)
        self._plan_epoch(epoch)

    def _plan_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning: its plan and this rank's share of it."""
        self.epoch, W = epoch, self.readers_per_rank
        self.plan = EpochPlan(self.manifest.shards, seed=self.seed, epoch=epoch, num_readers=self.world_size * W)
        self.counts = self.plan.counts[self.rank * W:(self.rank + 1) * W]
        self.num_samples = sum(self.counts)
        self._consumed = 0

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.equal_batches:
            W = self.readers_per_rank
            return min(sum(self.plan.counts[r * W:(r + 1) * W]) for r in range(self.world_size)) // self.batch_size
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples": self._consumed, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def load_state_dict(self, d: dict) -> None:
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size"):
            if d.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"loader state has {key}={d[key]} but this loader has {getattr(self, key)}; resume "
                                 "with the same data settings and number of workers")
        if d["epoch"] != self.epoch:
            self._plan_epoch(d["epoch"])
        self._consumed = int(d["samples"])

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's chunks from ``self._consumed`` on, in the fixed interleave order."""
        skip, seq = resume_point(self.counts, CHUNK, self._consumed)
        first = next(seq, None)
        if first is None:
            return
        seq = itertools.chain([first], seq)
        readers = _Readers(self, skip)
        if self.num_workers == 0:
            source: Iterator = iter(readers)
        else:
            source = iter(DataLoader(readers, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is))
        held: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for w, t, size in seq:
            while (w, t) not in held:
                ww, tt, codes, labels = next(source)
                held[(int(ww), int(tt))] = (np.asarray(codes), np.asarray(labels))
            codes, labels = held.pop((w, t))
            if len(codes) != size:
                raise RuntimeError(f"reader {w} chunk {t}: {len(codes)} samples, expected {size}")
            yield codes, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        limit = len(self) * self.batch_size if (self.equal_batches or self.drop_last) else self.num_samples
        codes_buf: list[np.ndarray] = []
        labels_buf: list[np.ndarray] = []
        have = 0
        for codes, labels in self._chunks():
            codes_buf.append(codes)
            labels_buf.append(labels)
            have += len(codes)
            while have >= self.batch_size and self._consumed + self.batch_size <= limit:
                yield self._emit(codes_buf, labels_buf, self.batch_size)
                have -= self.batch_size
            if self._consumed >= limit:
                return
        if have and self._consumed + have <= limit:
            yield self._emit(codes_buf, labels_buf, have)

    def _emit(self, codes_buf: list, labels_buf: list, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, labels = np.concatenate(codes_buf), np.concatenate(labels_buf)
        codes_buf[:] = [codes[n:]]
        labels_buf[:] = [labels[n:]]
        self._consumed += n
        return torch.from_numpy(codes[:n].astype(np.int64)), torch.from_numpy(labels[:n].copy())
