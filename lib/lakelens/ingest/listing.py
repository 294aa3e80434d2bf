"""Listing image files with Spark (zero-length files included) and reading exactly the files of a chunk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakelens.errors import DataError
from lakelens.ingest.paths import from_uri, glob_escape, is_local, is_remote, root_of, to_local


def hidden(root: str):
    """A column: true for paths with a part below `root` (a stored folder path ending in '/') that starts
    with '_' or '.', files and folders alike. Spark's file index skips most of those already, but keeps
    '_' names holding '=' (partition folders) and '_metadata*' / '_common_metadata*' (Parquet summaries,
    which its scan then drops again); lakelens skips them all, one rule. A path not spelled under `root`
    is judged by its file name."""
    path = F.col("path")
    below = F.when(path.startswith(root), F.expr(f"substring(path, {len(root) + 1})")).otherwise(
        F.regexp_extract(path, r"[^/]*$", 0))
    return F.concat(F.lit("/"), below).rlike(r"/[_.]")


def _stat_files(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas over (path) rows of files Spark's scan left out (zero-length ones): (path, size_bytes,
    modified) stat'ed here, on the executor. A local file gone meanwhile is dropped. Object storage
    cannot be stat'ed from a Python worker: such a file is zero-length (the only files the scan leaves
    out) and gets no modification time (for an empty file only its size tells a change)."""
    for pdf in batches:
        paths, sizes, times = [], [], []
        for path in pdf["path"]:
            if is_remote(path):
                paths.append(path)
                sizes.append(0)
                times.append(None)
                continue
            try:
                st = os.stat(to_local(path))
            except (OSError, DataError):
                continue
            paths.append(path)
            sizes.append(st.st_size)
            times.append(st.st_mtime_ns // 1_000_000)  # milliseconds, as Hadoop's file status has them
        yield pd.DataFrame({"path": pd.Series(paths, dtype=object), "size_bytes": pd.Series(sizes, dtype="int64"),
                            "modified": pd.to_datetime(pd.Series(times, dtype="float64"), unit="ms", utc=True)})


def _uris_to_paths(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for pdf in batches:
        yield pd.DataFrame({"path": pd.Series([from_uri(u) for u in pdf["uri"]], dtype=object)})


def list_files(spark: SparkSession, images: str, path_glob: str = "") -> tuple[DataFrame, int]:
    """(path, size_bytes, modified) of every file under a folder (recursive), a glob or a URI,
    materialised on the executors, and their count; names starting with '_' or '.' below the folder are
    skipped (`hidden`). Spark's binaryFile source reads no contents when `content` is not selected, but
    its scan drops zero-length files: those are the files of Spark's file index that the scan lacks,
    found and stat'ed on the executors, so no per-file data is collected to the driver."""
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if path_glob:
        reader = reader.option("pathGlobFilter", path_glob)
    try:
        files = reader.load(images)
    except AnalysisException as e:
        if "PATH_NOT_FOUND" in str(e) or "Path does not exist" in str(e):
            raise DataError(f"embed.images: nothing found at {images}") from None
        raise
    skip = hidden(root_of(images))
    scanned = (files.select("path", F.col("length").alias("size_bytes"), F.col("modificationTime").alias("modified"),
                            skip.alias("hidden")).localCheckpoint())
    counts = {r["hidden"]: r["count"] for r in scanned.groupBy("hidden").count().collect()}
    listing = scanned.where(~F.col("hidden")).drop("hidden")
    count = counts.get(False, 0)
    indexed = files._jdf.inputFiles()  # a JVM array: its length is one call
    if len(indexed) > count + counts.get(True, 0):
        # The file index's URIs (file:///a%20b) stay in the JVM: a Dataset made there and converted to
        # stored paths (file:/a b) by Python workers never passes through the Python driver. The join
        # is a sort-merge join: a broadcast join would collect the listing on the driver, and Spark
        # judges it small when the files are (its estimate is their bytes, not their number).
        jvm = spark._jvm
        seq = jvm.scala.collection.immutable.ArraySeq.unsafeWrapArray(indexed)
        uris = DataFrame(spark._jsparkSession.createDataset(seq, jvm.org.apache.spark.sql.Encoders.STRING()).toDF(),
                         spark).withColumnRenamed("value", "uri")
        missing = (uris.mapInPandas(_uris_to_paths, "path string").where(~skip)
                   .join(listing.hint("merge"), "path", "left_anti"))
        listing = listing.unionByName(missing.mapInPandas(_stat_files, listing.schema)).localCheckpoint()
        count = listing.count()
    return listing, count


def read_files(spark: SparkSession, paths: list[str]) -> DataFrame:
    """binaryFile rows (path, modificationTime, length, content) for exactly these file paths.
    Spark stats explicit paths with one task each beyond a threshold; local files are stat'ed on the
    driver instead (microseconds each), remote ones by at most 2 x default parallelism tasks."""
    key = "spark.sql.sources.parallelPartitionDiscovery"
    if all(is_local(p) for p in paths):
        spark.conf.set(f"{key}.threshold", str(len(paths) + 1))
    else:
        spark.conf.set(f"{key}.parallelism", str(2 * spark.sparkContext.defaultParallelism))
    return spark.read.format("binaryFile").load([glob_escape(p) for p in paths])


@contextmanager
def file_splits(spark: SparkSession, files: int, partitions: int):
    """Inside this block a scan of `files` files packs them into `partitions` splits of ceil(files /
    partitions) files each (the last holds the rest), so files reach every core without a shuffle of
    their contents. Spark packs a split until (file sizes + open cost per file) would pass
    maxPartitionBytes; an open cost of 1 TiB makes that a count of files (an image costs about the same
    to embed whatever its size in bytes). The scan is planned when an action runs, so the action
    belongs inside too; the session's settings come back after."""
    per_split = -(-max(1, files) // max(1, partitions))
    settings = {"spark.sql.files.openCostInBytes": str(1 << 40),
                "spark.sql.files.maxPartitionBytes": str(per_split << 40),
                "spark.sql.files.minPartitionNum": "1"}  # so that maxPartitionBytes alone sets the split size
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


