"""The ``nextscale`` command: one subcommand per stage, each ``nextscale <stage> [CONFIG.yaml] [key.sub=value ...]``.

Stage modules are imported lazily so that ``--help`` is quick and only the stage that runs pulls in Ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap

from nextscale.config import ConfigError, describe, load_config
from nextscale.logs import setup_logging

# subcommand -> (config class, run function, one-line description)
STAGES = {
    "tokenize": ("nextscale.tokenize.job_config:TokenizeConfig", "nextscale.pipelines.tokenize:run",
                 "Ray Data job: images -> multi-scale VQVAE code shards + manifest"),
    "train-tokenizer": ("nextscale.tokenize.config:TokenizerTrainConfig", "nextscale.pipelines.train:run_tokenizer",
                        "Ray Train job: train the multi-scale VQVAE tokenizer"),
    "train-prior": ("nextscale.prior.config:PriorTrainConfig", "nextscale.pipelines.train:run_prior",
                    "Ray Train job: train the VAR prior on code shards"),
    "sample": ("nextscale.eval.config:SampleConfig", "nextscale.eval.pictures:run",
               "sample grids and coarse-to-fine pictures from a trained prior"),
    "fid": ("nextscale.eval.config:FidConfig", "nextscale.pipelines.fid:run",
            "Ray job: sample N images, FID / IS / precision / recall"),
    "demo": ("nextscale.pipelines.demo:DemoConfig", "nextscale.pipelines.demo:run",
             "the whole workflow on the built-in demo dataset, local Ray, CPU"),
    "bench": ("nextscale.pipelines.bench:BenchConfig", "nextscale.pipelines.bench:run",
              "throughput benchmarks with ratios against baselines measured in the same run"),
}


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _stage_help(name: str) -> str:
    config_spec, _, what = STAGES[name]
    rows = describe(_resolve(config_spec))
    width = max(len(k) for k, *_ in rows)
    lines = [f"{key:<{width}}  {doc_} [{tp}, default {json.dumps(default)}]" for key, tp, default, doc_ in rows]
    return f"{what}\n\nconfig keys (override as key.sub=value):\n" + "\n".join("  " + line for line in lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="nextscale",
        description="VAR-style next-scale image generation on Ray: tokenize -> train-prior -> fid.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {k:<16} {v[2]}" for k, v in STAGES.items())
        + "\n  make-demo-data   write the built-in demo dataset to OUT\n\n"
        + "nextscale <stage> --help lists every config key of that stage.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, add_help=False)
        p.add_argument("-h", "--help", action="store_true")
        p.add_argument("args", nargs="*", help="[CONFIG.yaml] key.sub=value ...")
    p = sub.add_parser("make-demo-data", help="write the built-in demo dataset")
    p.add_argument("out", help="output folder (an ImageFolder with train/ and val/ splits)")
    args = parser.parse_args(argv)

    setup_logging()
    if args.command == "make-demo-data":
        from nextscale.demo_data import make_demo_data

        print(json.dumps(make_demo_data(args.out), indent=1))
        return 0
    if args.help:
        print(f"usage: nextscale {args.command} [CONFIG.yaml] [key.sub=value ...]\n")
        print(textwrap.indent(_stage_help(args.command), ""))
        return 0
    config_spec, run_spec, _ = STAGES[args.command]
    path = args.args[0] if args.args and args.args[0].endswith((".yaml", ".yml")) else None
    overrides = args.args[1:] if path else args.args
    try:
        cfg = load_config(_resolve(config_spec), path, overrides)
    except ConfigError as e:
        print(f"nextscale {args.command}: config error: {e}", file=sys.stderr)
        return 2
    summary = _resolve(run_spec)(cfg)
    logging.getLogger("nextscale").info("done")
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
