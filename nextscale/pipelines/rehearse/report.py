"""The rehearsal's report: log-log slopes of its figures between sizes, the pictures and the Markdown tables of
docs/scaling.md."""

from __future__ import annotations

import math
import os

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


def write_tables(report: dict, folder: str) -> None:
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(markdown_tables(report))
