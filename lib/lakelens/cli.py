"""`lakelens embed | jars | demo`: the command line over the jobs and the library."""

from __future__ import annotations

import argparse
import json
import sys

from . import config
from .config import ConfigError
from .models import ModelLoadError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", help="YAML config file (conf/default.yaml documents every key)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set embed.batch_size=16 (repeatable)")
    p.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")


def add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder (recursive), glob or Hadoop URI of the images")
    p.add_argument("--table", help="path or URI of the embeddings table")
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 or lakelens-tiny")
    p.add_argument("--pretrained", help="open_clip pretrained tag, local checkpoint path, or none")
    p.add_argument("--format", choices=("delta", "parquet"), help="table format (default delta)")
    p.add_argument("--batch-size", type=int, help="images per model batch and per Arrow batch")
    p.add_argument("--chunk-size", type=int, help="files per committed chunk")
    p.add_argument("--json", action="store_true", help="print the run's counts as JSON")
    add_common(p)


def embed_conf(args) -> config.Config:
    return config.load(
        args.conf, args.set,
        spark={"master": args.master},
        model={"name": args.model, "pretrained": args.pretrained},
        embed={"images": args.images, "table": args.table, "format": args.format,
               "batch_size": args.batch_size, "chunk_size": args.chunk_size},
    )


def cmd_embed(args) -> int:
    from .embed_job import EmbedJob

    stats = EmbedJob(conf=embed_conf(args)).launch()
    if args.json:
        print(json.dumps(stats.to_dict()))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, n_images=args.images, conf_path=args.conf, overrides=args.set, master=args.master)
    return 0


def cmd_jars(args) -> int:
    from .spark import submit_jars_arg

    print(" ".join(submit_jars_arg(args.jars_dir or "")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lakelens", description="Natural-language image search over a data lake.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed new and changed images into the embeddings table (Spark)")
    add_embed_args(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("jars", help="print the spark-submit arguments that bring the Delta jars (--jars ...)")
    p.add_argument("--jars-dir", help="folder of the Delta jars (default: build/jars)")
    p.set_defaults(func=cmd_jars)
    p = sub.add_parser("demo", help="generate a captioned image set and run the pipeline on it, offline")
    p.add_argument("--out", default="build/demo", help="working folder (default build/demo)")
    p.add_argument("--images", type=int, default=600, help="how many images to generate")
    add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .spark import SparkSetupError

    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, FileNotFoundError, SparkSetupError) as e:
        print(f"lakelens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
