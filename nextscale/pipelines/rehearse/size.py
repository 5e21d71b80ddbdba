"""Every stage of the rehearsal at one size (a fraction of ImageNet's counts), on the synthetic dataset: tokenize (three
input formats and a rerun), the S3 requests at one size, the code loader, train-prior and fid (each killed partway
and resumed)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from nextscale import storage, synthetic_imagenet
from nextscale.pipelines.rehearse.checks import KeyIndex, check_codes, check_loader
from nextscale.pipelines.rehearse.measure import CountingS3, codes_written, folder_bytes, run_stage
from nextscale.prior.data import CodeLoader

log = logging.getLogger(__name__)

FID_PER_CLASS = 50
S3_SIZE = 0.1  # the size whose storage requests are counted against an S3 server


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


def _groups(url: str) -> int:
    return sum(len([n for n in names if n.startswith("group-")]) for _, _, names in os.walk(url))
