"""Listing image files with Spark (zero-length files included) and reading exactly the files of a chunk."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakelens.errors import DataError
from lakelens.ingest.paths import from_uri, glob_escape, is_local


def _hadoop_status(spark: SparkSession, path: str):
    jvm = spark._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark._jsc.hadoopConfiguration()).getFileStatus(p)


def list_files(spark: SparkSession, images: str, path_glob: str = "") -> tuple[DataFrame, int]:
    """(path, size_bytes, modified) of every file under a folder (recursive), a glob or a URI,
    materialised, and their count. Spark's binaryFile source reads no contents when `content` is not
    selected, but its scan drops zero-length files, so those are found by diffing the file index and
    listed here too."""
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if path_glob:
        reader = reader.option("pathGlobFilter", path_glob)
    try:
        files = reader.load(images)
    except AnalysisException as e:
        if "PATH_NOT_FOUND" in str(e) or "Path does not exist" in str(e):
            raise DataError(f"embed.images: nothing found at {images}") from None
        raise
    listing = (files.select("path", F.col("length").alias("size_bytes"),
                            F.col("modificationTime").alias("modified")).localCheckpoint())
    indexed = files.inputFiles()
    if len(indexed) > listing.count():  # the same count once the zero-length files are added
        # the file index spells files as URIs (file:///a%20b), the scan as stored paths (file:/a b)
        names = [from_uri(p) for p in indexed]
        missing = (spark.createDataFrame([(n,) for n in names], "path string")
                   .join(listing, "path", "left_anti").collect())
        empty = []
        for row in missing:
            st = _hadoop_status(spark, row["path"])
            ms = int(st.getModificationTime())
            empty.append((row["path"], int(st.getLen()),
                          datetime.fromtimestamp(ms // 1000).replace(microsecond=ms % 1000 * 1000)))
        listing = listing.unionByName(spark.createDataFrame(empty, listing.schema)).localCheckpoint()
    return listing, len(indexed)


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


