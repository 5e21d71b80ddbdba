"""``make rehearse-scale SIZES=0.01,0.1,1 OUT=...``: every stage at fractions of ImageNet's counts, measured.

For each size (a fraction of 1,281,167 training images, 50,000 validation images and 50,000 FID samples over
1,000 classes), on the same generator, stages and checks:

    synthetic ImageNet (nextscale.synthetic_imagenet): parquet (Hub layout), WebDataset tars, an ImageFolder
    tokenize   train parquet -> codes; the same job rerun (resume: every shard verified and skipped);
               the ImageFolder (listing); the validation tars. Integrity: listed = accepted + rejected, every
               class with its count, every key in exactly one shard with the label its pixels show
    loader     CodeLoader over the codes: time and memory to the first batch, plan memory per row, one epoch
               stopped halfway and resumed (batches equal to the uninterrupted ones; the epoch's multiset of
               (view codes, label) equal to the shards')
    train      train-prior, a few hundred steps over the whole code set, killed after its first checkpoint
               and resumed
    fid        50 samples per class at full size (proportionally fewer below), killed partway and resumed;
               exactly the same count per class

Each stage runs as its own process (``python -m nextscale.pipelines.rehearse --stage ...``), so its driver's
peak RSS (VmHWM, :func:`peak_rss_mb`) is its own; Ray's worker processes (children of that process) are sampled from /proc every
0.2 s and grouped by their process title (``ray::ShardChunkEncoder``, ``ray::RayTrainWorker`` ...). Results go
to ``{out}/rehearsal.json`` after every stage; ``slope_*`` entries are log-log slopes between sizes (1 = linear).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pyarrow.compute as pc

from nextscale import codes, storage, synthetic_imagenet
from nextscale.config import load_config, split_config_args
from nextscale.logs import setup_logging
from nextscale.prior.data import CHUNK, CodeLoader, EpochPlan, resume_point, view_index
from nextscale.stages import STAGES

log = logging.getLogger(__name__)

FID_PER_CLASS = 50
S3_SIZE = 0.1  # the size whose storage requests are counted against an S3 server
STAGE_ATTEMPTS = 2  # a stage that fails (a local Ray instance that did not start in time) runs once more: it resumes
TITLE = re.compile(r"^ray::(?:\w+\()*(\w+)")


# ------------------------------------------------------------------------------------------------
# Processes: peak RSS of a stage's driver and of its Ray workers


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, process title, RSS bytes) of every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{name}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (ppid, title, rss)
    return out


class RssSampler:
    """Peak sampled RSS (MB) per Ray worker kind among the descendants of one process."""

    def __init__(self, root: int, every_s: float = 0.2):
        self.root, self.every_s, self.peak_mb = root, every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            table = _proc_table()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(children.get(self.root, []))
            while todo:
                pid = todo.pop()
                todo += children.get(pid, [])
                m = TITLE.match(table[pid][1])
                if m and m.group(1) not in ("IDLE",):
                    kind = m.group(1)
                    self.peak_mb[kind] = max(self.peak_mb.get(kind, 0.0), round(table[pid][2] / 2**20, 1))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.peak_mb.items()))


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's own peak RSS in MB: VmHWM, the high-water mark of its address space. Not getrusage's ru_maxrss:
    Linux carries the spawning process's high-water mark across exec into the child, so every stage started after
    the rehearsal's own checks at size 1 (1.5 GB) reported their 1.5 GB as its driver's peak."""
    with open(f"/proc/{pid}/status") as f:
        return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmHWM:"))


def _descendants(root: int) -> list[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kill_tree(root: int) -> None:
    """SIGKILL a stage's process and everything it started (its local Ray instance), then wait until all are gone."""
    pids = [root, *_descendants(root)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids[1:]):
        time.sleep(0.2)


def run_stage(name: str, config: str, overrides: list[str], *, log_path: str, kill_when=None,
              env: dict[str, str] | None = None) -> dict:
    """Run stage ``name`` (config + overrides) in a child process: its summary, wall time, peak RSS of the driver and
    of each Ray worker kind, and the object store's spill.

    ``kill_when()`` (polled every 0.5 s) True kills the child and its Ray instance with SIGKILL, as a lost node
    or an operator's kill -9 would: the result then says ``killed`` and has no summary. A failed child is run
    again up to :data:`STAGE_ATTEMPTS` times in all (``attempts`` in the result).
    """
    for attempt in range(1, STAGE_ATTEMPTS + 1):
        result = _run_child(name, config, overrides, log_path=log_path, kill_when=kill_when, env=env)
        if result is not None:
            return {**result, "attempts": attempt}
        log.warning("stage %s failed (attempt %d of %d); its log is %s", name, attempt, STAGE_ATTEMPTS, log_path)
    raise RuntimeError(f"stage {name} failed {STAGE_ATTEMPTS} times; its log is {log_path}")


def _run_child(name: str, config: str, overrides: list[str], *, log_path: str, kill_when,
               env: dict[str, str] | None) -> dict | None:
    """One child process of :func:`run_stage`; None when it failed."""
    cmd = [sys.executable, "-m", "nextscale.pipelines.rehearse", "--stage", name, config, *overrides]
    t0 = time.perf_counter()
    chunks: list[bytes] = []
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, env={**os.environ, **(env or {})})
        sampler = RssSampler(proc.pid)
        reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
        reader.start()
        killed = False
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                _kill_tree(proc.pid)
                killed = True
                break
            time.sleep(0.5)
        proc.wait()
        reader.join()
    seconds = time.perf_counter() - t0
    workers = sampler.stop()
    if killed:
        return {"killed": True, "seconds": round(seconds, 2), "peak_rss_mb": workers}
    if proc.returncode != 0:
        return None
    result = json.loads(b"".join(chunks).decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = {"driver": result.pop("driver_peak_rss_mb"), **workers}
    result["seconds"] = round(seconds, 2)
    return result


def stage_main(argv: list[str]) -> int:
    """The child: run one stage in this process; print its summary, peak RSS and object-store spill as JSON."""
    setup_logging()
    name, rest = argv[0], argv[1:]
    path, overrides = split_config_args(rest)
    cfg = load_config(STAGES[name].config, path, overrides)
    summary = STAGES[name].run(cfg)
    summary = {"summary": summary, "spilled_mb": _spilled_mb(),
               "driver_peak_rss_mb": peak_rss_mb()}
    print(json.dumps(summary, default=str), flush=True)
    return 0


def _spilled_mb() -> float:
    """MB the object store spilled to disk in this Ray instance (0 when nothing was)."""
    import ray
    from ray._private.internal_api import memory_summary

    if not ray.is_initialized():
        return 0.0
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", summary)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------------------------------
# What a stage wrote


def folder_bytes(path: str, pattern: str = "") -> dict[str, int]:
    """{"files", "bytes"} of the files under ``path`` whose relative path matches ``pattern`` (regex)."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if not pattern or re.search(pattern, rel):
                files += 1
                size += os.path.getsize(os.path.join(dirpath, n))
    return {"files": files, "bytes": size}


def codes_written(url: str) -> dict:
    return {"shards": folder_bytes(url, r"^codes-\d+\.tar$"), "resume_records": folder_bytes(url, r"^parts/"),
            "manifest_bytes": os.path.getsize(os.path.join(url, codes.MANIFEST)),
            "index_bytes": os.path.getsize(os.path.join(url, codes.INDEX))}


# ------------------------------------------------------------------------------------------------
# Integrity


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
    labels = index["label"].to_numpy()
    problems = []
    listed = {split: np.zeros(n, dtype=bool) for split, n in key_to_index.sizes.items()}
    twice = 0
    for batch in index.select(["key"]).to_batches(max_chunksize=65_536):
        for key in batch.column(0).to_pylist():
            split, i = key_to_index(key)
            twice += bool(listed[split][i])
            listed[split][i] = True
    if twice:
        problems.append(f"{twice} images listed twice in index.parquet")
    counts = (len(index), int(ok.sum()), int((~ok).sum()))
    if counts != (want["listed"], want["accepted"], want["rejected"]):
        problems.append(f"listed/accepted/rejected {counts} != {(want['listed'], want['accepted'], want['rejected'])}")
    if (manifest.num_listed, manifest.num_samples, manifest.num_rejected) != counts:
        problems.append("manifest counts differ from index.parquet")
    per_class = np.bincount(labels[ok], minlength=len(want["accepted_per_class"])).tolist()
    if per_class != want["accepted_per_class"]:
        problems.append("accepted images per class differ from the generator's")
    rows = np.flatnonzero(ok)
    truth = synthetic_labels_for(key_to_index)
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
    if seen != len(rows):
        problems.append(f"{len(rows) - seen} accepted keys are in no shard")
    return {"ok": not problems, "problems": problems[:5], "listed": counts[0], "accepted": counts[1],
            "rejected": counts[2], "classes_present": int(np.count_nonzero(per_class)),
            "min_per_class": int(min(per_class)), "max_per_class": int(max(per_class)),
            "epoch_fingerprint": [seen, fingerprint]}


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
    n, total = len(first[0]), sum(_sample_hash(c.numpy(), int(y)) for c, y in zip(*first)) % 2**64
    half = loader.num_samples // 2 // batch_size * batch_size
    t_epoch = time.perf_counter()
    while n < half:
        c, y = next(it)
        n += len(c)
        total = (total + sum(_sample_hash(a.numpy(), int(b)) for a, b in zip(c, y))) % 2**64
    state = loader.state_dict()
    straight = [next(it) for _ in range(3)]
    resumed = CodeLoader(url, batch_size=batch_size, seed=seed)
    t1 = time.perf_counter()
    resumed.load_state_dict(state)
    rit = iter(resumed)
    again = [next(rit) for _ in range(3)]
    resume_s = time.perf_counter() - t1
    exact = all(a[0].equal(b[0]) and a[1].equal(b[1]) for a, b in zip(straight, again))
    for c, y in [*again, *rit]:
        n += len(c)
        total = (total + sum(_sample_hash(a.numpy(), int(b)) for a, b in zip(c, y))) % 2**64
    epoch_s = time.perf_counter() - t_epoch
    plan_bytes = plan_memory(url, seed, half)
    return {"rows": loader.num_samples, "first_batch_s": round(first_s, 3),
            "first_batch_peak_mb": round(first_peak / 2**20, 2), "plan_bytes": plan_bytes,
            "plan_bytes_per_row": round(plan_bytes / loader.num_samples, 4),
            "resume_at_row": half, "resume_s": round(resume_s, 3), "resume_exact": exact,
            "epoch_samples_per_s": round(n / epoch_s, 1),
            "epoch_multiset_ok": [n, total] == list(expected), "epoch_rows_seen": n}


# ------------------------------------------------------------------------------------------------
# Storage requests against an S3 server


class CountingS3:
    """A moto S3 server on 127.0.0.1 (the tests' object store) that counts the requests it answers, by method."""

    def __enter__(self) -> CountingS3:
        from moto.server import ThreadedMotoServer

        self.counts: collections.Counter = collections.Counter()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        app = self.server._server.app

        def counted(environ, start_response):
            self.counts[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self.server._server.app = counted
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "rehearsal",
                    "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def take(self) -> dict[str, int]:
        """The requests since the last call, by method, and their total."""
        out = dict(sorted(self.counts.items()))
        self.counts.clear()
        return {**out, "total": sum(out.values())}


def rehearse_s3(data: dict, root: str, logs: str) -> dict:
    """Requests per stage when inputs and outputs are on S3: the validation tars tokenized from S3 to S3, then
    one epoch of the code loader reading the codes from S3."""
    import boto3


    source = data["inputs"]["val_wds"]
    with CountingS3() as s3:
        old = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        try:
            boto3.client("s3", endpoint_url=s3.env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="rehearsal")
            for name in sorted(os.listdir(source["url"])):
                storage.write_bytes(f"s3://rehearsal/val/{name}", open(os.path.join(source["url"], name), "rb").read())
            s3.take()
            r = run_stage("tokenize", "tokenize_rehearsal", ["input=s3://rehearsal/val", "output=s3://rehearsal/codes",
                                                              "augmentation=center", "num_classes=1000"],
                          log_path=os.path.join(logs, "tokenize-s3.log"), env=s3.env)
            out = {"tokenize": {"items": r["summary"]["listed"], "input_files": source["files"],
                                "shards": r["summary"]["shards"], "seconds": r["seconds"], "requests": s3.take()}}
            t0 = time.perf_counter()
            n = sum(len(c) for c, _ in CodeLoader("s3://rehearsal/codes", batch_size=256))
            out["loader_epoch"] = {"rows": n, "seconds": round(time.perf_counter() - t0, 2), "requests": s3.take()}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# One size


def _checkpoints(url: str) -> int:
    """Checkpoints Ray Train has committed under ``url`` (listed in its snapshot; a folder alone is not one yet)."""
    count = 0
    for dirpath, _, names in os.walk(url):
        if "checkpoint_manager_snapshot.json" in names:
            try:
                with open(os.path.join(dirpath, "checkpoint_manager_snapshot.json")) as f:
                    count += len(json.load(f).get("checkpoint_results", []))
            except ValueError:  # being written
                pass
    return count


def _groups(url: str) -> int:
    return sum(len([n for n in names if n.startswith("group-")]) for _, _, names in os.walk(url))


def rehearse_size(fraction: float, out: str, result: dict, save) -> None:
    """Every stage at ``fraction`` of ImageNet's counts under ``{out}/size-{fraction}``; fills ``result``
    (``save()`` after each stage, so a stopped run keeps what it measured)."""
    root = os.path.join(out, f"size-{fraction:g}")
    logs = os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    t0 = time.perf_counter()
    data_dir = os.path.join(root, "data")
    data = synthetic_imagenet.make_synthetic_imagenet(data_dir, fraction)
    result.setdefault("generate", {"seconds": round(time.perf_counter() - t0, 2),
                                   **folder_bytes(data_dir, r"\.(parquet|tar|png)$")})
    result["counts"] = {**data["sizes"], "imagefolder": data["inputs"]["train_imagefolder"]["listed"]}
    save()
    rehearse_tokenize(data, root, logs, result.setdefault("tokenize", {}), save)
    if fraction == S3_SIZE and "s3" not in result:
        try:
            result["s3"] = rehearse_s3(data, root, logs)
        except Exception as e:  # noqa: BLE001 - the other stages' figures are still worth having
            log.exception("the S3 part failed")
            result["s3"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    codes_url = os.path.join(root, "codes", "train_parquet")
    if "loader" not in result:
        result["loader"] = check_loader(codes_url, result["tokenize"]["train_parquet"]["integrity"]["epoch_fingerprint"])
        save()
    prior = os.path.join(root, "prior")
    if "train" not in result:
        result["train"] = {**rehearse_train(codes_url, prior, logs), "rows": result["loader"]["rows"]}
        save()
    result["fid"] = rehearse_fid(fraction, f"{prior}/prior.pt", data["inputs"]["val_wds"]["url"], root, logs)
    save()


def rehearse_tokenize(data: dict, root: str, logs: str, tokenize: dict, save) -> None:
    """The three input formats tokenized (and the training parquet a second time: every shard verified and
    skipped), each checked for integrity; fills ``tokenize``."""
    keys = KeyIndex(data)
    jobs = (("train_parquet", "train_parquet"), ("train_imagefolder", "train_imagefolder"), ("val_wds", "val_wds"))
    for job, source in jobs:
        if job in tokenize:  # measured by an earlier, stopped run of the rehearsal
            continue
        inp = data["inputs"][source]
        url = os.path.join(root, "codes", job)
        shutil.rmtree(url, ignore_errors=True)
        extra = ["augmentation=center"] if job == "val_wds" else []
        extra += ["num_classes=1000"] if source.endswith("wds") else []
        r = run_stage("tokenize", "tokenize_rehearsal", [f"input={inp['url']}", f"output={url}", *extra],
                      log_path=os.path.join(logs, f"tokenize-{job}.log"))
        s = r.pop("summary")
        # img_per_s: the job from Ray's start to its last shard; steady: the encoder's first to last batch
        r.update(items=s["listed"], shards=s["shards"], img_per_s=s["img_per_s"],
                 steady_img_per_s=s["steady_img_per_s"],
                 img_per_s_per_core=round(s["listed"] / r["seconds"] / os.cpu_count(), 1),
                 written=codes_written(url), integrity=check_codes(url, inp, keys))
        tokenize[job] = r
        save()
        if job == "train_parquet":
            again = run_stage("tokenize", "tokenize_rehearsal", [f"input={inp['url']}", f"output={url}"],
                              log_path=os.path.join(logs, "tokenize-rerun.log"))
            again.pop("summary")
            tokenize["train_parquet_rerun"] = again
            save()


def rehearse_train(codes_url: str, prior: str, logs: str) -> dict:
    """train-prior over every code, killed after its first checkpoint and run again to the end (the resume)."""
    shutil.rmtree(prior, ignore_errors=True)
    over = [f"data.url={codes_url}", f"output={prior}"]
    killed = run_stage("train-prior", "prior_rehearsal", over, log_path=os.path.join(logs, "train.log"),
                       kill_when=lambda: _checkpoints(prior) >= 1)
    r = run_stage("train-prior", "prior_rehearsal", over, log_path=os.path.join(logs, "train.log"))
    s = r.pop("summary")
    r.update(killed_after_s=killed["seconds"], killed_peak_rss_mb=killed["peak_rss_mb"], steps=s["steps"],
             steps_after_resume=s["steps_trained"], img_per_s=s["img_per_s"], final_loss=s["final_loss"],
             # start-up and restore: the rerun's wall time less its steps at the measured rate
             resume_overhead_s=round(r["seconds"] - s["steps_trained"] * 64 / s["img_per_s"], 2),
             checkpoints=folder_bytes(prior, r"checkpoint_"))
    return r


def rehearse_fid(fraction: float, prior_url: str, reference: str, root: str, logs: str) -> dict:
    """The fid job (``FID_PER_CLASS x fraction`` samples in each of the 1,000 classes), killed a third of the way
    and run again to the end, with its per-class sample counts checked."""
    per_class = max(1, round(FID_PER_CLASS * fraction))
    n_fid = per_class * synthetic_imagenet.NUM_CLASSES
    fid_out = os.path.join(root, "fid")
    shutil.rmtree(fid_out, ignore_errors=True)
    over = [f"models.prior_url={prior_url}", f"num_samples={n_fid}", f"samples_per_class={per_class}",
            f"reference.images={reference}", f"output={fid_out}"]
    groups = -(-n_fid // 50)
    killed = run_stage("fid", "fid_rehearsal", over, log_path=os.path.join(logs, "fid.log"),
                       kill_when=lambda: _groups(fid_out) >= groups // 3)
    r = run_stage("fid", "fid_rehearsal", over, log_path=os.path.join(logs, "fid.log"))
    s = r.pop("summary")
    r.update(samples=n_fid, per_class=per_class, killed_after_s=killed["seconds"],
             killed_peak_rss_mb=killed["peak_rss_mb"], groups_resumed=s["groups_resumed"],
             groups_sampled=s["groups_sampled"], img_per_s=s["images_per_second"], fid=s["fid"],
             labels=s["labels"], reorder_peak_groups=s["reorder_peak_groups"],
             labels_per_class_ok=s["labels"] == {"classes": synthetic_imagenet.NUM_CLASSES,
                                                 "min_per_class": per_class, "max_per_class": per_class},
             written=folder_bytes(fid_out))
    return r


# ------------------------------------------------------------------------------------------------
# Growth


FIGURES = {  # name -> path in a size's result, and the count it scales with
    "tokenize_seconds": (("tokenize", "train_parquet", "seconds"), ("counts", "train")),
    "tokenize_steady_img_per_s": (("tokenize", "train_parquet", "steady_img_per_s"), ("counts", "train")),
    "tokenize_driver_rss_mb": (("tokenize", "train_parquet", "peak_rss_mb", "driver"), ("counts", "train")),
    "tokenize_encoder_rss_mb": (("tokenize", "train_parquet", "peak_rss_mb", "ShardChunkEncoder"), ("counts", "train")),
    "tokenize_decoder_rss_mb": (("tokenize", "train_parquet", "peak_rss_mb", "read_and_views"), ("counts", "train")),
    "manifest_bytes": (("tokenize", "train_parquet", "written", "manifest_bytes"), ("counts", "train")),
    "index_bytes": (("tokenize", "train_parquet", "written", "index_bytes"), ("counts", "train")),
    "shard_bytes": (("tokenize", "train_parquet", "written", "shards", "bytes"), ("counts", "train")),
    "resume_record_bytes": (("tokenize", "train_parquet", "written", "resume_records", "bytes"), ("counts", "train")),
    "tokenize_rerun_seconds": (("tokenize", "train_parquet_rerun", "seconds"), ("counts", "train")),
    "imagefolder_seconds": (("tokenize", "train_imagefolder", "seconds"), ("counts", "imagefolder")),
    "imagefolder_driver_rss_mb": (("tokenize", "train_imagefolder", "peak_rss_mb", "driver"), ("counts", "imagefolder")),
    "val_wds_seconds": (("tokenize", "val_wds", "seconds"), ("counts", "val")),
    "loader_first_batch_s": (("loader", "first_batch_s"), ("counts", "train")),
    "loader_plan_bytes": (("loader", "plan_bytes"), ("counts", "train")),
    "loader_resume_s": (("loader", "resume_s"), ("counts", "train")),
    "train_seconds": (("train", "seconds"), ("counts", "train")),
    "train_driver_rss_mb": (("train", "peak_rss_mb", "driver"), ("counts", "train")),
    "train_worker_rss_mb": (("train", "peak_rss_mb", "RayTrainWorker"), ("counts", "train")),
    "fid_seconds": (("fid", "seconds"), ("fid", "samples")),
    "fid_driver_rss_mb": (("fid", "peak_rss_mb", "driver"), ("fid", "samples")),
    "fid_sampler_rss_mb": (("fid", "peak_rss_mb", "Sampler"), ("fid", "samples")),
}


def _get(d: dict, path: tuple):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def slopes(runs: list[dict]) -> list[dict]:
    """log-log slope of every figure between consecutive sizes: d log(figure) / d log(count)."""
    out = []
    for a, b in zip(runs, runs[1:]):
        entry = {"from_size": a["size"], "to_size": b["size"]}
        for name, (path, count) in FIGURES.items():
            ya, yb, na, nb = _get(a, path), _get(b, path), _get(a, count), _get(b, count)
            if ya and yb and na and nb and na != nb:
                entry[f"slope_{name}"] = round(math.log(yb / ya) / math.log(nb / na), 3)
        out.append(entry)
    return out


PICTURES = {  # file -> (title, y label, {legend: figure name in FIGURES})
    "scaling_time.png": ("wall time against N (2 CPU cores)", "seconds", {
        "tokenize train (parquet)": "tokenize_seconds", "tokenize rerun (verify + skip)": "tokenize_rerun_seconds",
        "tokenize ImageFolder": "imagefolder_seconds", "tokenize val (tars)": "val_wds_seconds",
        "train-prior rerun (resumed)": "train_seconds", "fid rerun (resumed)": "fid_seconds"}),
    "scaling_memory.png": ("peak RSS against N", "MB", {
        "tokenize driver": "tokenize_driver_rss_mb", "ImageFolder driver": "imagefolder_driver_rss_mb",
        "decode task": "tokenize_decoder_rss_mb", "encoder actor": "tokenize_encoder_rss_mb",
        "train driver": "train_driver_rss_mb", "train worker": "train_worker_rss_mb",
        "fid driver": "fid_driver_rss_mb", "fid sampler": "fid_sampler_rss_mb"}),
    "scaling_bytes.png": ("bytes written against N", "bytes", {
        "code shards": "shard_bytes", "resume records": "resume_record_bytes", "index.parquet": "index_bytes",
        "manifest.json": "manifest_bytes", "loader plan (memory)": "loader_plan_bytes"}),
}


def draw_pictures(report: dict, folder: str) -> list[str]:
    """Log-log pictures of the figures against each one's item count, a dotted slope-1 line through each first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "fid" in r]
    written = []
    for name, (title, unit, lines) in PICTURES.items():
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
        for (legend, figure), color in zip(lines.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2):
            path, count = FIGURES[figure]
            points = [(_get(r, count), _get(r, path)) for r in runs]
            points = [(n, y) for n, y in points if n and y]
            if not points:
                continue
            n, y = zip(*points)
            ax.plot(n, y, "o-", color=color, label=legend)
            ax.plot([n[0], n[-1]], [y[0], y[0] * n[-1] / n[0]], ":", color=color, linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="items (images, or samples for fid)", ylabel=unit, title=title)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(os.path.join(folder, name))
        fig.savefig(written[-1])
        plt.close(fig)
    return written


TABLE = (  # row label -> (path in a size's result, format)
    ("train / ImageFolder / val images", None, None),
    ("tokenize train parquet: s", ("tokenize", "train_parquet", "seconds"), "{:.0f}"),
    ("  images/s per core", ("tokenize", "train_parquet", "img_per_s_per_core"), "{:.0f}"),
    ("  driver / decode task / encoder peak RSS, MB", None, "rss"),
    ("  object store spilled, MB", ("tokenize", "train_parquet", "spilled_mb"), "{:.0f}"),
    ("  shards: files / MB", None, "shards"),
    ("  manifest.json / index.parquet / resume records, KB", None, "meta"),
    ("  rerun (verify and skip every shard): s", ("tokenize", "train_parquet_rerun", "seconds"), "{:.0f}"),
    ("tokenize ImageFolder: s / driver MB", None, "folder"),
    ("tokenize val tars: s", ("tokenize", "val_wds", "seconds"), "{:.0f}"),
    ("integrity (listed = accepted + rejected, classes, keys, labels)", None, "integrity"),
    ("loader first batch: s / peak MB", None, "first"),
    ("loader plan: bytes", ("loader", "plan_bytes"), "{:,}"),
    ("loader resume at mid-epoch: s (exact)", None, "resume"),
    ("loader epoch: samples/s (multiset exact)", None, "epoch"),
    ("train-prior, killed at its first checkpoint: s", ("train", "killed_after_s"), "{:.0f}"),
    ("  rerun, resumed to step 300: s", ("train", "seconds"), "{:.0f}"),
    ("  img/s, worker / driver peak RSS MB", None, "train"),
    ("  restart overhead after the kill: s", ("train", "resume_overhead_s"), "{:.0f}"),
    ("fid samples (per class), rerun after the kill: s", None, "fid"),
    ("  img/s, sampler / driver peak RSS MB", None, "fidrate"),
)


def _cell(run: dict, path, fmt) -> str:
    g = lambda *p: _get(run, p)  # noqa: E731
    rss = lambda stage, kind: g(*stage, "peak_rss_mb", kind)  # noqa: E731
    special = {
        "rss": lambda: "{} / {} / {}".format(rss(("tokenize", "train_parquet"), "driver"),
                                             rss(("tokenize", "train_parquet"), "read_and_views"),
                                             rss(("tokenize", "train_parquet"), "ShardChunkEncoder")),
        "shards": lambda: "{} / {:.0f}".format(g("tokenize", "train_parquet", "written", "shards", "files"),
                                               g("tokenize", "train_parquet", "written", "shards", "bytes") / 2**20),
        "meta": lambda: "{:.1f} / {:.0f} / {:.0f}".format(
            g("tokenize", "train_parquet", "written", "manifest_bytes") / 1024,
            g("tokenize", "train_parquet", "written", "index_bytes") / 1024,
            g("tokenize", "train_parquet", "written", "resume_records", "bytes") / 1024),
        "folder": lambda: "{:.0f} / {}".format(g("tokenize", "train_imagefolder", "seconds"),
                                               rss(("tokenize", "train_imagefolder"), "driver")),
        "integrity": lambda: "ok" if all(g("tokenize", j, "integrity", "ok") for j in
                                         ("train_parquet", "train_imagefolder", "val_wds")) else "FAILED",
        "first": lambda: "{:.1f} / {:.1f}".format(g("loader", "first_batch_s"), g("loader", "first_batch_peak_mb")),
        "resume": lambda: "{:.1f} ({})".format(g("loader", "resume_s"), "yes" if g("loader", "resume_exact") else "NO"),
        "epoch": lambda: "{:.0f} ({})".format(g("loader", "epoch_samples_per_s"),
                                              "yes" if g("loader", "epoch_multiset_ok") else "NO"),
        "train": lambda: "{:.0f}, {} / {}".format(g("train", "img_per_s"), rss(("train",), "RayTrainWorker"),
                                                  rss(("train",), "driver")),
        "fid": lambda: "{:,} ({}), {:.0f}{}".format(g("fid", "samples"), g("fid", "per_class"), g("fid", "seconds"),
                                                   "" if g("fid", "labels_per_class_ok") else " COUNTS WRONG"),
        "fidrate": lambda: "{:.0f}, {} / {}".format(g("fid", "img_per_s"), rss(("fid",), "Sampler"),
                                                    rss(("fid",), "driver")),
    }
    try:
        if fmt in special:
            return special[fmt]()
        if path is None:
            c = run["counts"]
            return f"{c['train']:,} / {c['imagefolder']:,} / {c['val']:,}"
        return fmt.format(g(*path))
    except (TypeError, ValueError, KeyError):
        return "–"


def markdown_tables(report: dict) -> str:
    """The figures of every size and the slopes between sizes, as Markdown tables (docs/scaling.md)."""
    runs = [r for r in report["runs"] if "fid" in r]
    head = "| | " + " | ".join(f"{r['size']:g}" for r in runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    rows = "".join(f"| {label} | " + " | ".join(_cell(r, path, fmt) for r in runs) + " |\n"
                   for label, path, fmt in TABLE)
    growth = report.get("growth", [])
    names = [k for k in (growth[0] if growth else {}) if k.startswith("slope_")]
    slope_head = "| slope | " + " | ".join(f"{g['from_size']:g} → {g['to_size']:g}" for g in growth) + \
        " |\n|---|" + "---|" * len(growth) + "\n"
    slope_rows = "".join(f"| `{n}` | " + " | ".join(str(g.get(n, "–")) for g in growth) + " |\n" for n in names)
    return head + rows + "\n" + slope_head + slope_rows


def rehearse(sizes: list[float], out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "rehearsal.json")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()}, "sizes": sizes, "runs": [], "growth": []}

    def save() -> None:
        report["runs"].sort(key=lambda r: r["size"])
        report["growth"] = slopes([r for r in report["runs"] if "fid" in r])
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)

    if os.path.exists(path):  # what an earlier run of this command measured is kept: it goes on from there
        with open(path) as f:
            report["runs"] = [r for r in json.load(f)["runs"] if r["size"] in sizes]
    earlier = {r["size"]: r for r in report["runs"]}
    t0 = time.perf_counter()
    for fraction in sizes:
        if "seconds" in earlier.get(fraction, {}):
            log.info("size %g already measured in %s; kept", fraction, path)
            continue
        run = earlier.get(fraction) or {"size": fraction}
        if fraction in earlier:
            run["resumed"] = True  # its "seconds" are this run's only: the stages measured before are kept
            log.info("size %g goes on after the stages measured before: %s", fraction, ", ".join(k for k in run if k != "size"))
        else:
            report["runs"].append(run)
        t = time.perf_counter()
        rehearse_size(fraction, out, run, save)
        run["seconds"] = round(time.perf_counter() - t, 1)
        run["load_average_after"] = os.getloadavg()
        save()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["pictures"] = draw_pictures(report, out)
    save()
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(markdown_tables(report))
    log.info("rehearsal of sizes %s finished in %.1f min: %s", sizes, report["seconds"] / 60, path)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--stage"]:
        return stage_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.01,0.1,1", help="fractions of ImageNet's counts, comma-separated")
    p.add_argument("--out", required=True, help="folder for the data, outputs and rehearsal.json (outside the repo)")
    p.add_argument("--redraw", action="store_true", help="only redraw the pictures and tables of {out}/rehearsal.json")
    args = p.parse_args(argv)
    setup_logging()
    if args.redraw:
        with open(os.path.join(args.out, "rehearsal.json")) as f:
            report = json.load(f)
        report["growth"] = slopes([r for r in report["runs"] if "fid" in r])
        draw_pictures(report, args.out)
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write(markdown_tables(report))
        return 0
    rehearse([float(s) for s in args.sizes.split(",")], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
