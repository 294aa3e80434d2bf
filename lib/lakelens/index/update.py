"""The Spark side of re-indexing by change: read the change feed, decide what the next version is, and
build an incremental version (delta shards on the executors, tombstones, links to the live files)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lakelens.index.build import META_COLUMNS, write_shard
from lakelens.index.incremental import (
    TRAINED,
    Decision,
    delta_file,
    delta_meta_file,
    index_kind,
    link_version,
    stored_rows,
    write_tombstones,
)
from lakelens.index.shards import TOMBSTONES, open_version, read_tombstones, search_shards
from lakelens.index.versions import publish, staging_dir

ROWS_PER_AUTO_SHARD = 250_000
DRIFT_QUERIES = 200


def read_changes(spark, location: str, start: int, end: int) -> tuple[DataFrame, DataFrame]:
    """From the change feed between Delta versions start..end: the distinct ids it touched (inserted,
    updated or deleted), and each touched id's row as of `end` when it is live and embedded (its latest
    insert or update post-image). Both come from the feed alone, never from a scan of the whole table,
    and both are checkpointed. LookupError when the feed does not cover the range (vacuumed, turned off,
    or the table re-created)."""
    try:
        feed = (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", start)
                .option("endingVersion", end).load(location))
        touched = feed.select("id").distinct().localCheckpoint()
    except AnalysisException as e:
        raise LookupError(str(e).strip().splitlines()[0][:300]) from None
    # within one commit an update shows its pre-image and post-image: the post-image is the newer
    latest = Window.partitionBy("id").orderBy(F.col("_commit_version").desc(),
                                             (F.col("_change_type") == "update_preimage").asc())
    rows = (feed.withColumn("_n", F.row_number().over(latest)).where("_n = 1")
            .where(F.col("_change_type").isin("insert", "update_postimage") & F.col("error").isNull()
                   & F.col("embedding").isNotNull())
            .select(*META_COLUMNS, "embedding", "model").localCheckpoint())
    return touched, rows


def decide(conf, live: dict, source: dict, model_key: str, choice, settings: dict, rows: int,
           touched: Callable[[], int]) -> Decision:
    """What the next version must be, and why. `touched()` counts the rows the change feed shows
    (raising LookupError when it cannot); it runs only when nothing earlier calls for a full build."""
    old = live["source"]
    if conf.full:
        return Decision("full", "a full build was asked for (--full)")
    if conf.force:
        return Decision("full", "index.force: rebuild although nothing requires it")
    if not live.get("trained"):
        return Decision("full", "the live version predates incremental builds (no trained structures kept)")
    if source["format"] != "delta" or old.get("format") != "delta":
        return Decision("full", "a Parquet table has no change feed")
    if old.get("table") != source["table"]:
        return Decision("full", f"another table ({old.get('table')} -> {source['table']})")
    if old.get("table_id") and old.get("table_id") != source.get("table_id"):
        return Decision("full", "the table was re-created since the live version")
    if live["model"]["key"] != model_key:
        return Decision("full", f"the model changed ({live['model']['key']} -> {model_key})")
    if live.get("settings") != settings:
        return Decision("full", f"index settings changed ({live.get('settings')} -> {settings})")
    if source["version"] < old["version"]:
        return Decision("full", f"table version {source['version']} is older than the live version's "
                                f"{old['version']}")
    if conf.factory == "auto" and index_kind(choice.factory) != index_kind(live["factory"]):
        return Decision("full", f"auto now chooses {choice.factory} for {rows} rows instead of "
                                f"{live['factory']} ({choice.reason})")
    try:
        n = touched()
    except LookupError as e:
        return Decision("full", f"the change feed does not cover table versions {old['version'] + 1}.."
                                f"{source['version']}: {e}")
    deltas = len(live.get("deltas", [])) + 1
    if deltas > conf.max_deltas:
        return Decision("compaction", f"{deltas} delta shard generations > index.max_deltas {conf.max_deltas}")
    dead = (live.get("tombstones") or {}).get("count", 0) + n
    held = stored_rows(live) + n
    if held and dead / held > conf.max_deleted_fraction:
        return Decision("compaction", f"tombstones would be {dead / held:.1%} of the vectors held "
                                      f"> index.max_deleted_fraction {conf.max_deleted_fraction:.0%}")
    return Decision("incremental", f"{n} rows changed between table versions {old['version']} and "
                                   f"{source['version']}")


def build_deltas_fn(trained_bc, staged: str, rerank: bool, generation: int):
    """applyInPandas function: the new and changed rows of one delta shard -> its files, on the executor."""

    def build(pdf):
        shard = int(pdf["shard"].iloc[0])
        vectors = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
        count = write_shard(trained_bc.value, shard, pdf["id"].to_numpy(np.int64), vectors, pdf[META_COLUMNS],
                            staged, rerank, generation)
        return pd.DataFrame({"shard": [shard], "count": [count]})

    return build


def drift_recall(folder: Path, manifest: dict, queries: np.ndarray, k: int = 10) -> float | None:
    """IVF only: recall@k of the version at its nprobe against visiting every list (exact for IVF-Flat),
    on the new vectors as queries: centroids trained on old data send new data to too few lists when the
    distribution has moved. None for index kinds without lists."""
    nprobe = manifest.get("search_params", {}).get("nprobe")
    if not nprobe or not len(queries):
        return None
    nlist = int(manifest["factory"].split(",")[0][3:])
    shards, rerank, excluded, keep = open_version(folder, manifest, mmap=True)
    factor = int(manifest.get("rerank") or 0)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = search_shards(shards, rerank, q, k, nprobe, None, factor, None, None, excluded)
    _, exact = search_shards(shards, rerank, q, k, nlist, None, factor, None, None, excluded)
    del keep
    return float(np.mean([len(set(f) & set(e)) / max(1, len(set(e) - {-1})) for f, e in zip(found, exact)]))


def build_incremental(spark, index_dir: str, live_name: str, live: dict, changed: DataFrame, touched: DataFrame,
                      rows: int, source: dict, decision: Decision, min_recall: float,
                      log: Callable[[str], None]) -> tuple[str | None, str]:
    """Stage and publish an incremental version over `live`. Returns (version, "") or, when the drift
    probe fails, (None, the reason for a full rebuild) with nothing published."""
    generation = int(live.get("generation", 0)) + 1
    staged = staging_dir(index_dir)
    try:
        link_version(Path(index_dir) / live_name, staged)
        trained = (staged / TRAINED).read_bytes()
        n = changed.count()
        shards = max(1, math.ceil(n / ROWS_PER_AUTO_SHARD)) if n else 0
        deltas = []
        if n:
            bc = spark.sparkContext.broadcast(trained)
            try:
                built = (changed.select(F.pmod("id", F.lit(shards)).cast("int").alias("shard"), *META_COLUMNS,
                                        "embedding")
                         .groupBy("shard")
                         .applyInPandas(build_deltas_fn(bc, str(staged), bool(live.get("rerank")), generation),
                                        "shard int, count long").collect())
            finally:
                bc.unpersist()
            deltas = [{"file": delta_file(generation, r["shard"]), "meta": delta_meta_file(generation, r["shard"]),
                       "count": int(r["count"]), "factory": live["factory"], "generation": generation}
                      for r in sorted(built, key=lambda r: r["shard"])]
        # the change's ids come to the driver: bounded by the change, not by the table
        ids = touched.toPandas()["id"].to_numpy(np.int64)
        tombs = write_tombstones(staged, read_tombstones(Path(index_dir) / live_name, live), ids, generation)
        manifest = {**live, "rows": int(rows), "source": source, "build": "incremental",
                    "build_reason": decision.reason, "generation": generation,
                    "deltas": [*live.get("deltas", []), *deltas],
                    "tombstones": {"file": TOMBSTONES, "count": int(tombs)}}
        if n:
            probe = (changed.limit(DRIFT_QUERIES).select("embedding").toPandas()["embedding"])
            recall = drift_recall(staged, manifest, np.stack(probe.to_numpy()) if len(probe) else np.zeros((0, 1)))
            if recall is not None:
                manifest["drift_recall"] = round(recall, 4)
                log(f"lakelens index: drift probe recall@10 {recall:.3f} (target {min_recall})")
                if recall < min_recall:
                    shutil.rmtree(staged, ignore_errors=True)
                    return None, (f"drift: recall@10 of the new rows at nprobe "
                                  f"{manifest['search_params']['nprobe']} is {recall:.3f} < index.min_recall "
                                  f"{min_recall}")
        return publish(index_dir, staged, manifest), ""
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
