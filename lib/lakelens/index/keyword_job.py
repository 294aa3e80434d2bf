"""The Spark side of an index version's keyword part (lakelens index --tags TAGS): each indexed image's tags
and captions from the tags table, streamed to the driver, which writes the BM25 index and the tag files into
the version's staging folder before it is published (so they appear atomically with the vectors).
An incremental version deletes and re-adds only the images whose rows or tags changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakelens.errors import ConfigError, DataError
from lakelens.index.keyword import TagRow, build_keywords
from lakelens.index.update import recreated
from lakelens.ingest.changes import changed_ids
from lakelens.ingest.table import EmbeddingsTable


def tags_state(spark: SparkSession, location: str) -> tuple[int, str | None]:
    """(latest version, Delta id) of the tags table: a table made again at the same place gets a new id."""
    table = EmbeddingsTable(spark, location)  # its Delta look-ups (version, id) hold for any Delta table
    if not table.exists():
        raise DataError(f"index.tags: no tags table (Delta) at {location}; make one with lakelens tag")
    return int(table.version()), table.table_id()


def keywords_stale(live_kw: dict | None, tags: dict) -> str | None:
    """Why the live version's keyword part no longer matches the tags table (`tags`: table, tags_version,
    table_id, vocab), or None when it does."""
    if not live_kw:
        return "a keyword index was asked for (--tags)" if tags["table"] else "the images have their own captions"
    if live_kw.get("table") != tags["table"]:
        return f"another tags table ({live_kw.get('table')} -> {tags['table']})"
    if recreated(live_kw.get("table_id"), tags["table_id"]):
        return f"the tags table {tags['table']} was re-created since the live version"
    if live_kw.get("vocab") != tags["vocab"]:
        return "another vocabulary"
    if live_kw.get("tags_version") != tags["tags_version"]:
        return "the tags changed"
    return None


def load_vocab_file(path: str):
    if not path:
        return None
    from lakelens.tags.vocab import load_vocab, vocab_path  # tags/ owns vocabularies; needed only for one

    if not vocab_path(path).is_file():  # a bare name is a built-in vocabulary
        raise ConfigError(f"index.vocab: no vocabulary file at {path}")
    return load_vocab(path)


def _docs(rows: DataFrame, tags: DataFrame | None) -> Iterator[tuple]:
    """(id, path, tags, captions) per row: the tags table's tags and generated captions, and the source's own
    caption (a shard's or a table's, the rows' `caption` column) after them."""
    own = F.col("caption") if "caption" in rows.columns else F.lit(None).cast("string")
    docs = rows.select("id", "path", own.alias("own"))
    if tags is not None:
        per_id = (tags.groupBy("id").agg(
            F.collect_list(F.when(F.col("source") != "caption", F.struct("tag", "score", "source"))).alias("tags"),
            F.collect_list(F.when(F.col("source") == "caption", F.struct("tag", "score"))).alias("captions")))
        # the join's partitions (spark.sql.shuffle.partitions): the driver holds one of them at a time
        docs = docs.join(per_id, "id", "left")
    for r in docs.toLocalIterator(prefetchPartitions=True):
        tag_rows = [TagRow(t["tag"], t["score"], t["source"]) for t in ((r["tags"] or []) if tags is not None else [])]
        captions = [(c["tag"], c["score"]) for c in ((r["captions"] or []) if tags is not None else [])]
        if r["own"]:
            captions.append((r["own"], None))
        yield int(r["id"]), r["path"], tag_rows, captions


def read_tags_at(spark: SparkSession, location: str, version: int) -> DataFrame:
    return spark.read.format("delta").option("versionAsOf", version).load(location)


def stage_full(spark: SparkSession, staged: Path, rows: DataFrame, location: str, version: int, vocab_path: str,
               log, table_id: str | None = None) -> dict:
    """The keyword part of a full build: every indexed row's document. `table_id`: the tags table's Delta id,
    kept so a re-created tags table is told apart."""
    vocab = load_vocab_file(vocab_path)
    info = build_keywords(staged, _docs(rows, read_tags_at(spark, location, version) if location else None), vocab)
    log(f"lakelens index: keyword index of {info['documents']} images ({info['tag_rows']} tag terms, "
        f"{info['captions']} captions) from " + (f"{location}@{version}" if location else "the images' own captions"))
    return {**info, "table": location, "tags_version": version, "table_id": table_id,
            "vocab": vocab.digest if vocab else None}


def stage_incremental(spark: SparkSession, staged: Path, live_folder: Path, live_kw: dict, table_rows: DataFrame,
                      touched: DataFrame, location: str, version: int, vocab_path: str, log,
                      table_id: str | None = None) -> dict:
    """Re-index only what changed: ids `touched` by the embeddings' change (column id), plus ids whose tags
    changed since the live version's tags version. `table_rows`: the table's rows at the new version (only
    the touched ids' rows are read). A tags table that was re-created or vacuumed, or another vocabulary,
    gets a full keyword build (a re-created one may have a change feed that covers the versions since the
    live one, but says nothing about the table the live version read)."""
    vocab = load_vocab_file(vocab_path)
    digest = vocab.digest if vocab else None
    reason = None
    if live_kw.get("table") != location:
        reason = "another tags table"
    elif recreated(live_kw.get("table_id"), table_id):
        reason = "the tags table was re-created"
    elif live_kw.get("vocab") != digest:
        reason = "another vocabulary"
    elif location and version < live_kw.get("tags_version", -1):
        reason = "the tags table is older than the live version's"
    ids = touched.select("id")
    if reason is None and location and version > live_kw["tags_version"]:
        try:
            ids = ids.unionByName(changed_ids(spark, location, live_kw["tags_version"] + 1, version))
        except LookupError as e:
            reason = f"the tags table's change feed does not cover its versions since the live one: {e}"
    if reason is not None:
        log(f"lakelens index: full keyword build ({reason})")
        return stage_full(spark, staged, table_rows, location, version, vocab_path, log, table_id)
    ids = ids.distinct().localCheckpoint()
    gone = np.asarray(ids.toPandas()["id"].to_numpy(np.int64))  # bounded by the change, not the table
    rows = table_rows.join(ids, "id", "left_semi")
    tags = read_tags_at(spark, location, version).join(ids, "id", "left_semi") if location else None
    info = build_keywords(staged, _docs(rows, tags), vocab, base=live_folder, delete_ids=gone)
    log(f"lakelens index: keyword index updated: {info['deleted']} images re-indexed, {info['added']} live "
        f"({info['documents']} documents)")
    return {**info, "table": location, "tags_version": version, "table_id": table_id, "vocab": digest}
