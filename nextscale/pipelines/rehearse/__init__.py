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

Each stage runs as its own process (``python -m nextscale.pipelines.rehearse --stage ...``), measured by ``measure``
(its driver's peak RSS, its Ray workers' sampled from /proc); ``checks`` checks what it made; ``size`` runs every
stage at one size. Results go to ``{out}/rehearsal.json`` after every stage; ``report`` adds the log-log slopes
between sizes (``slope_*``, 1 = linear), the pictures and the tables of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import time

from nextscale.logs import setup_logging
from nextscale.pipelines.rehearse.measure import stage_main
from nextscale.pipelines.rehearse.report import draw_pictures, slopes, write_tables
from nextscale.pipelines.rehearse.size import rehearse_size

log = logging.getLogger(__name__)


def rehearse(sizes: list[float], out: str) -> dict:
    """Every size in turn; an earlier run's sizes and stages in ``{out}/rehearsal.json`` are kept, not redone."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "rehearsal.json")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()}, "sizes": sizes, "runs": _earlier_runs(path, sizes), "growth": []}
    save = functools.partial(_save, report, path)
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
    write_tables(report, out)
    log.info("rehearsal of sizes %s finished in %.1f min: %s", sizes, report["seconds"] / 60, path)
    return report


def _earlier_runs(path: str, sizes: list[float]) -> list[dict]:
    """What an earlier run of this command measured of ``sizes``: the rehearsal goes on from there."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f)["runs"] if r["size"] in sizes]


def _save(report: dict, path: str) -> None:
    report["runs"].sort(key=lambda r: r["size"])
    report["growth"] = slopes([r for r in report["runs"] if "fid" in r])
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--stage"]:
        return stage_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m nextscale.pipelines.rehearse", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.01,0.1,1", help="fractions of ImageNet's counts, comma-separated")
    p.add_argument("--out", required=True, help="folder for the data, outputs and rehearsal.json (outside the repo)")
    p.add_argument("--redraw", action="store_true", help="only redraw the pictures and tables of {out}/rehearsal.json")
    args = p.parse_args(argv)
    setup_logging()
    if args.redraw:
        redraw(args.out)
    else:
        rehearse([float(s) for s in args.sizes.split(",")], args.out)
    return 0


def redraw(out: str) -> None:
    """The pictures and tables again from ``{out}/rehearsal.json``."""
    with open(os.path.join(out, "rehearsal.json")) as f:
        report = json.load(f)
    report["growth"] = slopes([r for r in report["runs"] if "fid" in r])
    draw_pictures(report, out)
    write_tables(report, out)
