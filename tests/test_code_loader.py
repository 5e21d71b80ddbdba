"""CodeLoader: exactly-once epochs over ranks x workers, view choice, exact mid-epoch resume, manifest checks."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from nextscale import storage
from nextscale.codes import CodesError, Manifest, ShardInfo, build_shard, sha256, shard_name
from nextscale.prior.data import CodeLoader

K, L, V = 3, 6, 4096


def _write(root, sizes: list[int], code: int = 0) -> int:
    """Shards whose codes spell out the sample id: codes[v] = (id, v, code, ...); returns the sample count."""
    shards, i = [], 0
    for si, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            codes = np.full((K, L), code, np.uint16)
            codes[:, 0], codes[:, 1] = i, np.arange(K)
            samples.append((f"k{i:05d}", codes, i % 7))
            i += 1
        data = build_shard(samples)
        storage.write_bytes(storage.join(str(root), shard_name(si)), data)
        shards.append(ShardInfo(name=shard_name(si), num_samples=n, sha256=sha256(data)))
    m = Manifest(tokenizer={"sha256": "abc", "config": {"z_channels": 8}}, patch_nums=[1, 2], vocab_size=V,
                 num_tokens=L, image_size=64, views=K, augmentation={}, precision="fp32", samples_per_shard=0,
                 shards=shards, classes=[str(c) for c in range(7)], num_listed=i, num_samples=i, num_rejected=0,
                 rejected=[], input={"url": "x", "format": "imagefolder"})
    m.write(str(root))
    return i


def _ids(loader) -> list[int]:
    out = []
    for codes, labels in loader:
        assert codes.dtype.is_floating_point is False and codes.shape[1] == L and codes.dtype.itemsize == 8
        assert ((codes[:, 0] % 7) == labels).all()
        out += codes[:, 0].tolist()
    return out


@pytest.mark.parametrize("sizes", [[37, 50, 13, 64, 25, 40], [90, 41]], ids=["shards>=readers", "shards<readers"])
def test_every_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, sizes):
    n = _write(tmp_path, sizes)
    seen = collections.Counter()
    for rank in range(2):
        loader = CodeLoader(str(tmp_path), batch_size=16, rank=rank, world_size=2, num_workers=2, seed=3,
                            shuffle_buffer=32)
        ids = _ids(loader)
        assert len(ids) == loader.num_samples and -(-len(ids) // 16) == len(loader)
        seen.update(ids)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}


def test_order_and_views_are_deterministic_and_change_per_epoch(tmp_path):
    _write(tmp_path, [30, 30, 30])

    def run(epoch, workers=0):
        loader = CodeLoader(str(tmp_path), batch_size=8, num_workers=workers, seed=5, shuffle_buffer=16, epoch=epoch)
        batches = list(loader)
        return [c[:, 0].tolist() for c, _ in batches], [c[:, 1].tolist() for c, _ in batches]

    ids0, views0 = run(0)
    assert (ids0, views0) == run(0)
    ids1, views1 = run(1)
    assert ids1 != ids0 and sorted(sum(ids1, [])) == sorted(sum(ids0, [])) == list(range(90))
    flat0, flat1 = dict(zip(sum(ids0, []), sum(views0, []))), dict(zip(sum(ids1, []), sum(views1, [])))
    assert set(flat0.values()) == set(range(K))  # every view gets drawn
    assert flat0 != flat1  # a new view choice every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, workers):
    _write(tmp_path, [70, 45, 90, 12])
    kw = dict(batch_size=24, num_workers=workers, seed=1, shuffle_buffer=40, epoch=2)
    full = [(c.tolist(), l.tolist()) for c, l in CodeLoader(str(tmp_path), **kw)]
    loader = CodeLoader(str(tmp_path), **kw)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = CodeLoader(str(tmp_path), **{**kw, "epoch": 0})
    resumed.load_state_dict(state)
    rest = [(c.tolist(), l.tolist()) for c, l in resumed]
    assert [(c.tolist(), l.tolist()) for c, l in head] + rest == full


@pytest.mark.parametrize("at", [0, 24 * 9, 24 * 20, 24 * 25], ids=["start", "middle", "late", "in-final-flush"])
@pytest.mark.parametrize("buffer", [1, 40, 200])
def test_resume_reads_only_the_shards_it_still_needs(tmp_path, monkeypatch, at, buffer):
    """Skipped samples are not read again: a resume replays the shuffle on references and reads the shards the
    buffer and the rest of the epoch hold, so its first batch costs the same at any row (ImageNet: 1.28 M)."""
    import nextscale.prior.data as data

    n = _write(tmp_path, [24] * 26)
    kw = dict(batch_size=24, seed=3, shuffle_buffer=buffer, epoch=1)
    full = [(c.tolist(), l.tolist()) for c, l in CodeLoader(str(tmp_path), **kw)]
    reads = []
    monkeypatch.setattr(data, "read_shard", lambda url, **k: reads.append(url) or data.__dict__["_real_read"](url, **k))
    monkeypatch.setitem(data.__dict__, "_real_read", __import__("nextscale.codes").codes.read_shard)
    resumed = CodeLoader(str(tmp_path), **kw)
    resumed.load_state_dict({**resumed.state_dict(), "samples": at})
    rest = [(c.tolist(), l.tolist()) for c, l in resumed]
    assert rest == full[at // 24:] and sum(len(c) for c, _ in full) == n
    # exactly the shards holding samples still to come are read (ids spell shard * 24 + index); only the one the
    # resume point falls in may be read twice
    needed = {shard_name(i // 24) for codes, _ in rest for i in np.asarray(codes)[:, 0].tolist()}
    assert {url.rsplit("/", 1)[1] for url in reads} == needed and len(reads) <= len(needed) + 1


def test_equal_batches_keep_ranks_in_step(tmp_path):
    _write(tmp_path, [50, 10, 31])
    lens = []
    for rank in range(2):
        loader = CodeLoader(str(tmp_path), batch_size=8, rank=rank, world_size=2, equal_batches=True)
        batches = list(loader)
        assert all(len(c) == 8 for c, _ in batches) and len(batches) == len(loader)
        lens.append(len(batches))
    assert lens[0] == lens[1] > 0
    dropped = CodeLoader(str(tmp_path), batch_size=8, drop_last=True)
    assert [len(c) for c, _ in dropped] == [8] * (91 // 8)


def test_damaged_shard_is_reported(tmp_path):
    _write(tmp_path, [20, 20])
    storage.write_bytes(str(tmp_path / shard_name(1)), build_shard([("x", np.zeros((K, L), np.uint16), 0)]))
    with pytest.raises(CodesError, match="codes-000001.tar holds 1 samples but the manifest says 20"):
        list(CodeLoader(str(tmp_path), batch_size=8))


@pytest.mark.parametrize("workers", [0, 2])
def test_changed_codes_are_caught_by_the_shard_checksum(tmp_path, workers):
    _write(tmp_path, [20, 20, 20])
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    last = data.rindex(b"\x93NUMPY")  # the last sample's codes: same size, still valid codes
    for view in range(K):
        data[last + 128 + 2 * (view * L + 3)] ^= 1  # after the 128-byte npy header: token 3 of each view, 0 -> 1
    path.write_bytes(bytes(data))
    unverified = [c for c, _ in CodeLoader(str(tmp_path), batch_size=8, verify=False)]
    assert sum(int((c[:, 3] == 1).sum()) for c in unverified) == 1  # without the check the change trains silently
    with pytest.raises(CodesError, match=r"codes-000001.tar does not match its sha256 in the manifest.*"
                                         r"re-run `nextscale tokenize`"):
        list(CodeLoader(str(tmp_path), batch_size=8, num_workers=workers))


def test_codes_outside_the_vocabulary_are_a_clear_error(tmp_path):
    _write(tmp_path, [10, 10], code=V)  # the checksums match the bytes: only the range is off
    with pytest.raises(CodesError, match=rf"codes-00000\d.tar: sample 'k000\d\d' holds code {V}, outside the "
                                         rf"vocabulary of {V}.*nextscale tokenize"):
        list(CodeLoader(str(tmp_path), batch_size=8))
