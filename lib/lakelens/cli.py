"""`lakelens embed | index | search | dedup | tag | caption | eval | finetune | serve | jars | demo`: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lakelens import config
from lakelens.errors import ConfigError, LakelensError, QueryError

ENGINE_CHOICES = config.CHOICES["embed.engine"]
# top-level modules of the optional dependencies -> the extra that installs them (pyproject.toml)
EXTRAS = {"dash": "web", "flask": "web", "waitress": "web", "transformers": "hf", "tokenizers": "hf",
          "grpc": "connect", "grpc_status": "connect", "zstandard": "connect"}


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", help="YAML config file (`lakelens config --defaults` prints every key)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set embed.batch_size=16 (repeatable)")
    p.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    p.add_argument("--remote", metavar="sc://HOST:PORT",
                   help="run on a Spark Connect server (as SPARK_REMOTE does; wins over the config's spark.master)")


def add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder (recursive), glob or Hadoop URI of the images")
    p.add_argument("--table", help="path or URI of the embeddings table")
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 or lakelens-tiny, or local-dir:FOLDER")
    p.add_argument("--pretrained", help="open_clip pretrained tag, local checkpoint path, folder (local-dir), or none")
    p.add_argument("--format", choices=("delta", "parquet"), help="table format (default delta)")
    p.add_argument("--batch-size", type=int, help="images per model batch and per Arrow batch")
    p.add_argument("--chunk-size", type=int, help="files per committed chunk")
    p.add_argument("--engine", choices=ENGINE_CHOICES,
                   help="inference engine (default onnx-int8; conf key embed.engine, see lakelens config --defaults)")
    p.add_argument("--regions", action="store_true", default=None,
                   help="also embed crops (a 2x2 grid and the centre) of each image (embed.regions)")
    p.add_argument("--source", choices=("auto", "files", "webdataset", "table"),
                   help="files; the image members of WebDataset .tar shards; or the rows of a Delta table or "
                        "Parquet dataset of image bytes; with their captions (default auto: by what --images holds)")
    p.add_argument("--caption-key", help="webdataset: the member extension holding the caption (default txt)")
    p.add_argument("--image-column", help="table: the column of image bytes (default: found by name and type)")
    p.add_argument("--caption-column", help="table: the caption column (default: caption, txt or text)")
    p.add_argument("--key-column", help="table: the column identifying a row (default: key)")
    p.add_argument("--json", action="store_true", help="print the run's counts as JSON")
    p.add_argument("--drop-root", action="append", default=[], metavar="ROOT",
                   help="delete the table's rows of this image folder (glob, URI) and forget it, before embedding "
                        "--images if given (repeatable); a run otherwise never touches other folders' rows")
    add_common(p)


def embed_conf(args) -> config.Config:
    return config.load(
        args.conf, args.set,
        spark={"master": args.master},
        model={"name": args.model, "pretrained": args.pretrained},
        embed={"images": args.images, "table": args.table, "format": args.format,
               "batch_size": args.batch_size, "chunk_size": args.chunk_size, "engine": args.engine,
               "regions": args.regions, "source": args.source, "caption_key": args.caption_key,
               "image_column": args.image_column, "caption_column": args.caption_column, "key_column": args.key_column},
    )


def cmd_embed(args) -> int:
    from lakelens.ingest.embed_job import EmbedJob

    stats = EmbedJob(conf=embed_conf(args), drop_roots=args.drop_root).launch()
    if args.json:
        print(json.dumps(stats.to_dict()))
    return 0


def cmd_demo(args) -> int:
    from lakelens.demo import run_demo

    run_demo(out=args.out, dataset=args.dataset, n_train=args.train, n_images=args.images, epochs=args.epochs,
             conf_path=args.conf, overrides=args.set, master=args.master, with_captions=not args.no_captions)
    return 0


def cmd_index(args) -> int:
    from lakelens.index.job import IndexJob

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        index={"table": args.table, "index": args.index, "shards": args.shards, "factory": args.factory,
               "memory_budget": args.memory_budget, "version": args.version, "prune": args.prune,
               "format": args.format, "force": True if args.force else None, "full": True if args.full else None,
               "tags": args.tags, "vocab": args.vocab})
    result = IndexJob(conf=conf).launch()
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_refresh(args) -> int:
    from lakelens.refresh import RefreshJob

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        model={"name": args.model, "pretrained": args.pretrained},
        embed={"images": args.images, "table": args.table, "format": args.format},
        index={"index": args.index, "full": True if args.full else None, "prune": args.prune, "tags": args.tags},
        tag={"vocab": args.vocab})
    # progress goes to stderr; stdout carries the one JSON line a scheduler parses
    result = RefreshJob(conf=conf, log=lambda text: print(text, file=sys.stderr, flush=True)).launch()
    print(result.line(), flush=True)
    return 0


def cmd_dedup(args) -> int:
    from lakelens.dedup.job import DedupJob

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        dedup={"table": args.table, "out": args.out, "index": args.index, "threshold": args.threshold,
               "guard": args.guard, "format": args.format, "full": True if args.full else None})
    result = DedupJob(conf=conf, log=lambda text: print(text, file=sys.stderr, flush=True)).launch()
    print(json.dumps(result.to_dict()), flush=True)
    return 0


def cmd_caption(args) -> int:
    from lakelens.tags.caption_job import CaptionJob

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        caption={"table": args.table, "tags": args.tags, "images": args.images, "model": args.model,
                 "pretrained": args.pretrained,
                 "format": args.format, "max_tokens": args.max_tokens, "beams": args.beams,
                 "batch_size": args.batch_size, "full": True if args.full else None})
    result = CaptionJob(conf=conf, log=lambda text: print(text, file=sys.stderr, flush=True)).launch()
    print(json.dumps(result.to_dict()), flush=True)
    return 0


def cmd_tag(args) -> int:
    from lakelens.tags.job import TagJob

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        tag={"table": args.table, "tags": args.tags, "vocab": args.vocab, "format": args.format,
             "threshold": args.threshold, "max_tags": args.max_tags, "templates": args.templates,
             "thresholds": args.thresholds, "target_precision": args.target_precision,
             "min_positives": args.min_positives, "full": True if args.full else None})
    job = TagJob(conf=conf, log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.calibrate:
        report = job.calibrate(args.calibrate, out=args.out)
        print(json.dumps({k: report[k] for k in ("labelled_images", "micro", "macro", "status_counts",
                                                 "thresholds_file")}), flush=True)
        return 0
    if args.out:
        raise ConfigError("--out is for --calibrate (where to write its report)")
    print(json.dumps(job.launch().to_dict()), flush=True)
    return 0


def cmd_eval_tags(args, conf) -> dict:
    """`lakelens eval --labels LABELS (--tags TAGS | --index INDEX --vocab FILE)`: tag metrics."""
    from lakelens.tags import calibrate as cal
    from lakelens.tags.evaluate import evaluate_index_tags, evaluate_tags_table, read_labels
    from lakelens.tags.vocab import load_vocab

    vocab = load_vocab(args.vocab) if args.vocab else None
    if args.tags:
        from lakelens.spark import owned_session

        with owned_session(conf.spark) as spark:
            report = evaluate_tags_table(spark, args.tags, read_labels(args.labels, spark=spark), vocab, args.source)
    elif args.index and vocab is not None:
        t = conf.tag
        report = evaluate_index_tags(args.index, read_labels(args.labels, conf.spark), vocab, t.threshold, t.max_tags,
                                     t.templates, t.thresholds or None)
    else:
        raise ConfigError("eval --labels: give --tags TAGS (a tags table), or --index INDEX with --vocab FILE")
    print(cal.format_table(report), file=sys.stderr)
    return report


def search_batch(args) -> int:
    """`lakelens search --queries FILE --out RESULTS`: every query of a file, as a Spark job."""
    from lakelens.search.batch import check_queries_file, run_batch
    from lakelens.spark import owned_session

    if not (args.queries and args.out):
        raise QueryError("a batch search needs both --queries FILE and --out RESULTS")
    if args.query is not None or args.image:
        raise QueryError("give either a query (text or --image) or --queries FILE, not both")
    conf = config.load(args.conf, args.set, spark={"master": args.master})
    check_queries_file(args.queries)  # before Spark starts: its own look-up prints a Java stack trace first
    with owned_session(conf.spark) as spark:
        print(json.dumps(run_batch(spark, args.index, args.queries, args.out, args.k, args.engine,
                                   fmt=args.out_format)), flush=True)
    return 0


def cmd_search(args) -> int:
    from lakelens.search import Searcher

    if args.queries or args.out:
        return search_batch(args)
    searcher = Searcher.open(args.index, engine=args.engine)
    kw = {"min_score": args.min_score, "path_prefix": args.prefix, "nprobe": args.nprobe,
          "ef_search": args.ef_search, "offset": args.offset}
    if args.image is None and args.query is None and not args.tag:
        raise QueryError("give a query text, --image FILE, or both (or --tag T to browse a tag)")
    weights = None
    if args.weights:
        weights = [w for w in args.weights.split(",")]
    tags = [t for t in args.tag or [] if not t.startswith("-")]
    not_tags = [t[1:] for t in args.tag or [] if t.startswith("-")]
    results = searcher.search(text=args.query, image=args.image, k=args.k, weights=weights, mode=args.mode,
                              tags=tags, not_tags=not_tags, **kw)
    notes = results.attrs.get("notes", [])
    if args.json:
        rows = results.to_dict("records")
        for r in rows:
            r.setdefault("tags", [])
            r.setdefault("caption", None)
        print(json.dumps({"index_version": searcher.version, "model": searcher.manifest["model"]["key"],
                          "mode": args.mode or searcher.default_mode, "notes": notes, "results": rows}))
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if results.empty:
            print("no results")
        for r in results.to_dict("records"):
            extra = f"  [{', '.join(r['tags'])}]" if r.get("tags") else ""
            extra += f"  \"{r['caption']}\"" if r.get("caption") else ""
            extra += f"  region {r['box']}" if r.get("box") else ""
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['path']}{extra}")
    return 0


def cmd_eval(args) -> int:
    from lakelens.train.eval_run import format_by_lang, run_eval

    try:
        ks = tuple(sorted({int(k) for k in args.k.split(",")}))
    except ValueError:
        raise ConfigError(f"-k: expected comma-separated integers, got {args.k!r}") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"-k: values must be >= 1, got {args.k!r}")
    conf = config.load(args.conf, args.set, spark={"master": args.master})
    if not (args.captions or args.labels):
        raise ConfigError("eval: give --captions (retrieval metrics), --labels (tag metrics), or both")
    if args.captions and not args.index:
        raise ConfigError("eval --captions: --index is required")
    metrics = run_eval(args.index, args.captions, ks, None if args.labels else args.out, args.plot,
                       conf.spark) if args.captions else {}
    if args.labels:
        metrics["tags"] = cmd_eval_tags(args, conf)
        if args.out:
            from pathlib import Path

            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    if "by_lang" in metrics:  # the JSON on stdout stays machine-readable; the table is for people
        print(format_by_lang(metrics, ks), file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    from lakelens.models.registry import ModelSpec
    from lakelens.train.eval_run import read_captions
    from lakelens.train.finetune import finetune

    conf = config.load(
        args.conf, args.set, spark={"master": args.master},
        model={"name": args.model, "pretrained": args.pretrained},
        finetune={"pairs": args.pairs, "out": args.out, "epochs": args.epochs, "batch_size": args.batch_size,
                  "lr": args.lr, "val_fraction": args.val_fraction, "max_pairs": args.max_pairs})
    for key in ("pairs", "out"):
        if not getattr(conf.finetune, key):
            raise ConfigError(f"finetune.{key}: required (--{key} or the config file)")
    spec = ModelSpec.from_config(conf.model)
    result = finetune(read_captions(conf.finetune.pairs, conf.spark), spec, conf.finetune, resume=not args.fresh)
    print(f"fine-tuned weights: {result.final_checkpoint}\n"
          f"use them with: --model {spec.name} --pretrained {result.final_checkpoint}")
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_serve(args) -> int:
    from lakelens.web.api import Limits
    from lakelens.web.server import serve

    if args.max_upload_mb <= 0 or args.threads < 1 or args.max_megapixels <= 0:
        raise ConfigError(f"--max-upload-mb and --max-megapixels must be > 0 and --threads >= 1, "
                          f"got {args.max_upload_mb}, {args.max_megapixels}, {args.threads}")
    token = args.token if args.token is not None else os.environ.get("LAKELENS_TOKEN", "")
    clip_indices = []
    for item in args.clip_index:
        name, eq, folder = item.partition("=")
        if not eq or not name or not folder:
            raise ConfigError(f"--clip-index: expected NAME=INDEX_FOLDER, got {item!r}")
        clip_indices.append((name, folder))
    s3 = None
    if args.conf or args.set:  # S3 settings for thumbnails of s3a:// images
        from lakelens.ingest.storage import S3Settings

        s3 = S3Settings.from_config(config.load(args.conf, args.set))
    serve(args.index, args.host, args.port, args.threads,
          Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                 max_pixels=int(args.max_megapixels * 1_000_000), token=token,
                 allowed_hosts=tuple(h.lower() for h in args.allowed_host), clip_name=args.clip_name or "",
                 clip_fetch_hosts=tuple(h.lower() for h in args.clip_fetch_host),
                 clip_cors_origins=tuple(args.clip_cors_origin), clip_base64=args.clip_base64,
                 clip_image_size=args.clip_image_size, clip_indices=tuple(clip_indices)), s3=s3)
    return 0


def cmd_jars(args) -> int:
    from lakelens.spark import submit_jars_arg

    print(" ".join(submit_jars_arg(args.jars_dir or "", s3=args.s3)))
    return 0


def cmd_config(args) -> int:
    if args.defaults:
        print(config.defaults_text(), end="")
    else:  # the settings a command given the same --conf and --set would run with
        import yaml

        print(yaml.safe_dump(config.to_dict(config.load(args.conf, args.set)), sort_keys=False), end="")
    return 0


def cmd_jvm_options(args) -> int:
    from lakelens import jvm

    if args.build:
        jvm.build()
    print(jvm.java_options())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lakelens", description="Natural-language image search over a data lake.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed new and changed images into the embeddings table (Spark)")
    add_embed_args(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("index", help="build sharded FAISS indexes from the embeddings table and publish them")
    p.add_argument("--table", help="the embeddings table")
    p.add_argument("--index", help="the index folder (CURRENT + vNNNN/ versions)")
    p.add_argument("--shards", type=int, help="number of shards (default: one per 250k rows)")
    p.add_argument("--factory", help="auto (default) or a FAISS index_factory string, e.g. IVF1024,Flat")
    p.add_argument("--memory-budget", help="RAM the index may use at query time, e.g. 4G")
    p.add_argument("--version", type=int, help="Delta version of the table (default: latest)")
    p.add_argument("--format", choices=("delta", "parquet"), help="table format (default delta)")
    p.add_argument("--prune", type=int, help="keep only the K newest versions afterwards")
    p.add_argument("--force", action="store_true", help="build even if the table has not changed")
    p.add_argument("--full", action="store_true", help="rebuild and retrain instead of an incremental version")
    p.add_argument("--tags", help="the tags table (lakelens tag / caption): each version gets a BM25 keyword index "
                                  "of the images' tags, captions and path words")
    p.add_argument("--vocab", help="the vocabulary file whose synonyms and parents are indexed with each tag")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(func=cmd_index)
    p = sub.add_parser("refresh", help="embed new and changed images, then update the index: one command for "
                                       "cron and Airflow, one JSON line at the end")
    p.add_argument("--images", help="folder (recursive), glob or Hadoop URI of the images")
    p.add_argument("--table", help="path or URI of the embeddings table")
    p.add_argument("--index", help="the index folder")
    p.add_argument("--model", help="open_clip architecture (default: the config's)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, local checkpoint path, or none")
    p.add_argument("--format", choices=("delta", "parquet"), help="table format (default delta)")
    p.add_argument("--full", action="store_true", help="rebuild the index instead of an incremental version")
    p.add_argument("--prune", type=int, help="keep only the K newest index versions afterwards")
    p.add_argument("--vocab", help="tag new and changed images with this vocabulary (lakelens tag) before indexing")
    p.add_argument("--tags", help="the tags table the tags go to and the index's keyword side reads")
    add_common(p)
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("search", help="query an index by text or by image")
    p.add_argument("query", nargs="?", help='query text: words, "quoted phrases", tag:dog, -tag:cat, path:2024/; '
                                            '"beach + sunset - people" adds and subtracts terms (vector side)')
    p.add_argument("--mode", choices=("vector", "keyword", "hybrid"),
                   help="vector, keyword (BM25 over tags, captions, paths) or hybrid (both, fused by reciprocal "
                        "rank); default vector")
    p.add_argument("--tag", action="append", metavar="T",
                   help="only images with tag T (repeat for more; --tag=-T excludes T)")
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--offset", type=int, default=0, help="skip this many results first (the next page)")
    p.add_argument("--image", help="search by this image file (with a query text too: both, combined)")
    p.add_argument("--weights", help="text and image weights when both are given, e.g. 0.7,0.3 (default equal)")
    p.add_argument("--min-score", type=float, help="drop results scoring below this")
    p.add_argument("--prefix", help="only results whose path starts with this")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (overrides the manifest's)")
    p.add_argument("--ef-search", type=int, help="HNSW search depth (overrides the manifest's)")
    p.add_argument("--engine", choices=ENGINE_CHOICES,
                   help="engine embedding the query (default onnx-int8: image queries in int8, text in fp32)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--queries", help="batch: a file of queries (text, one a line; or CSV/Parquet with a "
                                     "'query' column), searched as a Spark job")
    p.add_argument("--out", help="batch: where to write (query_id, query, rank, id, path, score, error) rows")
    p.add_argument("--out-format", choices=["delta", "parquet"], default="delta", help="batch: table format")
    add_common(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("dedup", help="groups of exact and near copies in the embeddings table (Spark), as a Delta "
                                     "table; with --index also the map the query driver collapses results with")
    p.add_argument("--table", help="the embeddings table")
    p.add_argument("--out", help="the duplicates table to write: group, id, path, similarity, representative")
    p.add_argument("--index", help="search each image over this index's live version (scales; default: an exact "
                                   "blockwise self-join of the table)")
    p.add_argument("--threshold", type=float, help="cosine similarity of near copies (default 0.99)")
    p.add_argument("--guard", type=float, help="every member at least this similar to its group's representative "
                                               "(default 0.96)")
    p.add_argument("--format", choices=("delta", "parquet"), help="the table's format (default delta)")
    p.add_argument("--full", action="store_true", help="search every image again, not only new and changed ones")
    add_common(p)
    p.set_defaults(func=cmd_dedup)
    p = sub.add_parser("tag", help="zero-shot tags of the embeddings table's stored vectors against a vocabulary, "
                                   "into the tags table (Spark); or --calibrate per-tag thresholds on labelled images")
    p.add_argument("--table", help="the embeddings table")
    p.add_argument("--vocab", help="vocabulary CSV: tag[, prompts][, synonyms][, parent], or a built-in one by name: "
                                   "photo (COCO, 197 tags), shapes, fashion-mnist")
    p.add_argument("--tags", help="the tags table to write (Delta): id, path, tag, score, source, model, vocab")
    p.add_argument("--format", choices=("delta", "parquet"), help="the embeddings table's format (default delta)")
    p.add_argument("--threshold", type=float, help="global cosine threshold where no calibrated one applies (default 0.25)")
    p.add_argument("--max-tags", type=int, help="tags kept per image, best first (default 10; 0: no cap)")
    p.add_argument("--templates", choices=("simple", "openai"), help="prompt templates (default simple)")
    p.add_argument("--thresholds", help="calibrated thresholds file (default VOCAB.thresholds.json beside the vocabulary)")
    p.add_argument("--full", action="store_true", help="score every image again, not only new and changed ones")
    p.add_argument("--calibrate", metavar="LABELS",
                   help="instead of tagging: per-tag thresholds from a labels table (path, tags; CSV tags split by |)")
    p.add_argument("--target-precision", type=float, help="calibration: precision each tag's threshold reaches (0.9)")
    p.add_argument("--min-positives", type=int, help="calibration: fewer labelled images keep the global threshold (5)")
    p.add_argument("--out", help="calibration: where to write the report JSON (default VOCAB.calibration.json)")
    add_common(p)
    p.set_defaults(func=cmd_tag)
    p = sub.add_parser("caption", help="a generated caption per embedded image (a CoCa model, Spark), into the tags "
                                       "table with source caption; re-runs caption only new and changed images")
    p.add_argument("--table", help="the embeddings table")
    p.add_argument("--tags", help="the tags table to write (Delta): id, path, tag = the caption, score, source, model")
    p.add_argument("--images", help="only the table's images under this folder or URI prefix (default: all of them)")
    p.add_argument("--model", help="the caption model: a CoCa architecture, e.g. lakelens-tiny-coca or coca_ViT-B-32 "
                                   "(default: the config's model)")
    p.add_argument("--pretrained", help="its weights: open_clip tag, checkpoint path (e.g. a fine-tune's final.pt), or none")
    p.add_argument("--format", choices=("delta", "parquet"), help="the embeddings table's format (default delta)")
    p.add_argument("--max-tokens", type=int, help="longest caption in tokens, start and end included (default 20)")
    p.add_argument("--beams", type=int, help="1: greedy decoding (default); more: beam search")
    p.add_argument("--batch-size", type=int, help="images per model batch (default 16)")
    p.add_argument("--full", action="store_true", help="caption every image again, not only new and changed ones")
    add_common(p)
    p.set_defaults(func=cmd_caption)
    p = sub.add_parser("eval", help="Recall@K, top-K accuracy and precision@K of an index on captioned images; "
                                    "per-tag precision, recall and F1 of tags on labelled images")
    p.add_argument("--index", help="the index folder")
    p.add_argument("--captions",
                   help="Delta, CSV or Parquet with path, caption[, label][, lang]; lang adds metrics per language")
    p.add_argument("--labels", help="tag metrics: Delta, CSV or Parquet with path, tags (CSV: tags split by |)")
    p.add_argument("--tags", help="tag metrics of this tags table's rows (else zero-shot tags from --index and --vocab)")
    p.add_argument("--vocab", help="tag metrics: the vocabulary (synonyms and parents of label words)")
    p.add_argument("--source", default="zero-shot", help="tag metrics: the tags table's source to evaluate")
    p.add_argument("-k", default="1,5,10", help="comma-separated K values (default 1,5,10)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--plot", help="write a PNG plot of recall against K here")
    add_common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("finetune", help="fine-tune the model on image-caption pairs (contrastive CLIP loss; a CoCa "
                                        "model also learns to write captions, CoCaLoss)")
    p.add_argument("--pairs", help="Delta table, Parquet or CSV with path, caption[, label][, split][, lang]")
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 or lakelens-tiny, or local-dir:FOLDER")
    p.add_argument("--pretrained", help="starting weights: open_clip tag, checkpoint path, folder (local-dir), or none")
    p.add_argument("--out", help="output folder: checkpoints/, final.pt, history.json, training.png")
    p.add_argument("--epochs", type=int, help="epochs to train (default 5)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 64)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 5e-4)")
    p.add_argument("--val-fraction", type=float, help="pairs held out for evaluation (default 0.1)")
    p.add_argument("--max-pairs", type=int, help="train on a seeded sample of this many pairs")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from OUT/checkpoints")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("jars", help="print the spark-submit arguments that bring the Delta jars (--jars ...)")
    p.add_argument("--jars-dir", help="folder of the Delta jars (default: $LAKELENS_JARS_DIR, else a checkout's "
                                      "build/jars, else --packages coordinates)")
    p.add_argument("--s3", action="store_true", help="also the s3a file system (hadoop-aws and the AWS SDK)")
    p.set_defaults(func=cmd_jars)
    p = sub.add_parser("config", help="print the settings that --conf and --set give (YAML); --defaults: every key "
                                      "with its default and what it does")
    p.add_argument("--defaults", action="store_true", help="print the documented defaults (package data default.yaml)")
    p.add_argument("--conf", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("jvm-options", help="print the JVM options that map lakelens' class archive (faster Spark "
                                           "start; for --driver-java-options of spark-submit); empty when none is built")
    p.add_argument("--build", action="store_true", help="build the archive first if it is missing (about 40 s)")
    p.set_defaults(func=cmd_jvm_options)
    p = sub.add_parser("serve", help="the search web page and JSON API over an index (reloads new versions)")
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    p.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest query image upload (default 10)")
    p.add_argument("--max-megapixels", type=float, default=16.0,
                   help="query images and thumbnails larger than this are refused (default 16)")
    p.add_argument("--token", help="require this access token on every request (default: $LAKELENS_TOKEN; "
                   "none: open to whoever reaches the address)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to answer for (repeatable; default on loopback: localhost, 127.0.0.1)")
    p.add_argument("--conf", help="YAML config: S3 settings (spark.extra fs.s3a.*) for thumbnails of s3a:// images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    # clip-retrieval's API (/knn-service, /indices-list, /metadata): docs/clip-retrieval.md
    p.add_argument("--clip-name", help="the index's name for clip-retrieval clients (indice_name; default: the "
                                       "index folder's name)")
    p.add_argument("--clip-index", action="append", default=[], metavar="NAME=DIR",
                   help="another index served to clip-retrieval clients only, as indice_name NAME (repeatable)")
    p.add_argument("--clip-fetch-host", action="append", default=[], metavar="HOST",
                   help="a host /knn-service may fetch an image_url from (repeatable; default: none)")
    p.add_argument("--clip-cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin that may read /knn-service's answers, e.g. https://front.example.org "
                        "(repeatable; '*': any; default: pages served from this machine)")
    p.add_argument("--clip-base64", action="store_true",
                   help="/knn-service answers carry each image in base64 (image), as clip_back does for local files")
    p.add_argument("--clip-image-size", choices=("thumb", "large"), default="thumb",
                   help="the image url (and base64) of a /knn-service result: thumbnail (default) or large view")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="offline end to end: captioned images, embed, index, eval, fine-tune, again; "
                                    "tags, captions and a keyword index")
    p.add_argument("--dataset", default="shapes", choices=("shapes", "shapes-pt", "fashion-mnist"),
                   help="generated captioned shapes (default), the same with English and Portuguese captions and "
                        "a tokenizer trained on them (shapes-pt), or Fashion-MNIST from Debian's package")
    p.add_argument("--out", default="build/demo", help="working folder (default build/demo)")
    p.add_argument("--train", type=int, help="training pairs (default 3000 shapes, 12000 Fashion-MNIST)")
    p.add_argument("--images", type=int, help="held-out images to index and evaluate (default 1000 / 2000)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 5 shapes, 4 Fashion-MNIST)")
    p.add_argument("--no-captions", action="store_true",
                   help="skip the caption model (a small CoCa fine-tuned on the training captions, a few minutes)")
    add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


# Flags naming a table, folder or file that some command reads outside the config (search, eval, serve,
# demo, tag --calibrate): made absolute here as config.load makes its path keys.
PATH_FLAGS = ("table", "tags", "index", "images", "out", "queries", "captions", "labels", "pairs", "vocab",
              "thresholds", "plot", "calibrate")


def use_remote(args) -> None:
    """--remote is pyspark's SPARK_REMOTE for this command: the session is a Spark Connect one, whatever master
    the config file names (a master and a remote on one command line, or --master with SPARK_REMOTE set, are
    refused)."""
    remote = getattr(args, "remote", None)
    if not remote:
        if getattr(args, "master", None) and os.environ.get("SPARK_REMOTE"):  # pyspark refuses both as well
            raise ConfigError("--master and SPARK_REMOTE: a session is either classic (master) or Spark Connect "
                              "(remote); unset SPARK_REMOTE or leave out --master")
        return
    if getattr(args, "master", None):
        raise ConfigError("--master and --remote: a session is either classic (master) or Spark Connect (remote)")
    os.environ["SPARK_REMOTE"] = remote


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not (name == "vocab" and config.bare_name(value)):  # demo's --images: a count
            setattr(args, name, config.absolute_path(value))  # --vocab photo: a built-in vocabulary's name
    try:
        use_remote(args)
        return args.func(args)
    except LakelensError as e:  # expected failures: one line, no traceback; anything else is a bug
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"lakelens {args.command}: error: {reason}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional part that a plain install leaves out (pyproject's extras)
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"lakelens {args.command}: error: needs {e.name}, which a plain install leaves out: "
              f"pip install 'lakelens[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
