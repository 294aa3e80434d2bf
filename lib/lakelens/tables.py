"""Embeddings table: schema, stable ids, change detection (new / changed / deleted), Delta MERGE and Parquet writes."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from datetime import datetime
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession, functions as F, types as T

FORMATS = ("delta", "parquet")

# Columns the embedding UDF produces; the job adds id, model and embedded_at.
UDF_SCHEMA = T.StructType([
    T.StructField("path", T.StringType(), False),
    T.StructField("content_sha256", T.StringType(), True),
    T.StructField("size_bytes", T.LongType(), False),
    T.StructField("modified", T.TimestampType(), True),
    T.StructField("width", T.IntegerType(), True),
    T.StructField("height", T.IntegerType(), True),
    T.StructField("embedding", T.ArrayType(T.FloatType(), containsNull=False), True),
    T.StructField("error", T.StringType(), True),
])

SCHEMA = T.StructType([
    T.StructField("id", T.LongType(), False),
    T.StructField("path", T.StringType(), False),
    T.StructField("content_sha256", T.StringType(), True),
    T.StructField("size_bytes", T.LongType(), False),
    T.StructField("modified", T.TimestampType(), True),
    T.StructField("width", T.IntegerType(), True),
    T.StructField("height", T.IntegerType(), True),
    T.StructField("model", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), containsNull=False), True),
    T.StructField("error", T.StringType(), True),
    T.StructField("embedded_at", T.TimestampType(), False),
])
COLUMNS = [f.name for f in SCHEMA.fields]


def read_pairs(spark: SparkSession, path: str, version: int = -1):
    """A Delta table of (path, caption[, label][, split]) pairs, as pandas, at `version` (-1: latest)."""
    reader = spark.read.format("delta")
    if version >= 0:
        reader = reader.option("versionAsOf", version)
    df = reader.load(path)
    keep = [c for c in ("path", "caption", "label", "split") if c in df.columns]
    return df.select(*keep).toPandas()


class IdCollisionError(RuntimeError):
    """Two different paths hash to the same 64-bit id; the run stops before writing either."""


def path_id(path: str) -> int:
    """Stable signed 64-bit id of a path: the first 8 bytes of sha256(path), big-endian."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big", signed=True)


def path_id_col(col: str = "path"):
    """The same id as `path_id`, computed by Spark (conv to base -10 reads the hex as signed)."""
    return F.conv(F.substring(F.sha2(F.col(col), 256), 1, 16), 16, -10).cast("long")


def glob_escape(path: str) -> str:
    """Escape Hadoop glob characters so a listed file path loads as exactly that file."""
    out = []
    for ch in path:
        if ch in "\\*?[]{}":
            out.append("\\")
        out.append(ch)
    return "".join(out)


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
    files = reader.load(images)
    listing = (files.select("path", F.col("length").alias("size_bytes"),
                            F.col("modificationTime").alias("modified")).localCheckpoint())
    indexed = files.inputFiles()
    if len(indexed) > listing.count():  # the same count once the zero-length files are added
        # the file index spells local paths file:///x, the scan file:/x
        names = [p.replace("file:///", "file:/", 1) if p.startswith("file:///") else p for p in indexed]
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
    if all(p.startswith("file:") for p in paths):
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


@dataclass
class Plan:
    to_embed: list  # paths of new and changed files, sorted
    unread: list  # (path, size_bytes, modified, error) of new/changed files that are empty or above max_file_bytes
    deleted: int
    unchanged: int
    new: int
    changed: int


def check_new_ids(paths) -> None:
    """Raise IdCollisionError if two of these paths share an id (a new table: nothing else to compare)."""
    by_id: dict = defaultdict(set)
    for p in paths:
        by_id[path_id(p)].add(p)
    _raise_collisions([(i, ps) for i, ps in by_id.items() if len(ps) > 1])


def _raise_collisions(clashes: list) -> None:
    if clashes:
        detail = "; ".join(f"id {i}: {sorted(ps)}" for i, ps in clashes[:3])
        raise IdCollisionError(f"64-bit path ids collide, nothing was written: {detail}")


class EmbeddingsTable:
    """One embeddings table at `location`, Delta (default) or Parquet."""

    def __init__(self, spark: SparkSession, location: str, fmt: str = "delta"):
        if fmt not in FORMATS:
            raise ValueError(f"table format must be one of {FORMATS}, got {fmt!r}")
        self.spark, self.location, self.format = spark, location, fmt

    # --- reading -------------------------------------------------------------------------------
    def _hadoop_path(self):
        jvm = self.spark._jvm
        path = jvm.org.apache.hadoop.fs.Path(self.location)
        return path, path.getFileSystem(self.spark._jsc.hadoopConfiguration())

    def exists(self) -> bool:
        if self.format == "delta":
            from delta.tables import DeltaTable

            return DeltaTable.isDeltaTable(self.spark, self.location)
        path, fs = self._hadoop_path()
        return fs.exists(path)

    def read(self, version: int | None = None) -> DataFrame:
        reader = self.spark.read.format(self.format)
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.location)

    def version(self) -> int | None:
        """The latest Delta version, or None for Parquet / a missing table."""
        if self.format != "delta" or not self.exists():
            return None
        from delta.tables import DeltaTable

        return DeltaTable.forPath(self.spark, self.location).history(1).collect()[0]["version"]

    def create_if_missing(self) -> None:
        if self.format != "delta" or self.exists():
            return
        from delta.tables import DeltaTable

        (DeltaTable.createIfNotExists(self.spark).location(self.location).addColumns(SCHEMA)
         .property("delta.enableChangeDataFeed", "true").execute())

    # --- change detection ----------------------------------------------------------------------
    def plan(self, listing: DataFrame, listed: int, model_key: str, max_file_bytes: int) -> Plan:
        """Classify the `listed` files of `listing` against the table: new, changed (size, mtime or model
        differ), unchanged; rows of files no longer listed are deleted. One Spark job: every row that is
        not unchanged comes back to the driver (the paths to embed are needed there anyway)."""
        if not self.exists():
            todo = [(r["path"], r["size_bytes"], r["modified"], "new") for r in listing.collect()]
        else:
            existing = self.read().select("path", F.col("size_bytes").alias("old_size"),
                                          F.col("modified").alias("old_modified"), F.col("model").alias("old_model"))
            status = (F.when(F.col("size_bytes").isNull(), "deleted")
                      .when(F.col("old_size").isNull(), "new")
                      .when((F.col("size_bytes") != F.col("old_size"))
                            | ~F.col("modified").eqNullSafe(F.col("old_modified"))
                            | (F.col("old_model") != F.lit(model_key)), "changed")
                      .otherwise("unchanged"))
            todo = [tuple(r) for r in listing.join(existing, "path", "full_outer")
                    .select("path", "size_bytes", "modified", status.alias("status"))
                    .where(F.col("status") != "unchanged").collect()]
        counts = Counter(status for *_, status in todo)
        to_embed, unread = [], []
        for path, size, modified, status in todo:
            if status in ("new", "changed"):
                if 0 < size <= max_file_bytes:
                    to_embed.append(path)
                else:
                    unread.append((path, size, modified, "empty file" if size == 0 else "too large"))
        return Plan(to_embed=sorted(to_embed), unread=unread, deleted=counts["deleted"],
                    unchanged=listed - counts["new"] - counts["changed"], new=counts["new"],
                    changed=counts["changed"])

    def check_ids(self, listing: DataFrame) -> None:
        """Raise IdCollisionError if two listed paths, or a listed path and a kept row, share an id (an
        existing table; for a new one, check_new_ids on the driver)."""
        ids = (listing.select("path").withColumn("id", path_id_col())
               .unionByName(self.read().select("path", "id")).distinct())
        clash = (ids.groupBy("id").agg(F.countDistinct("path").alias("n"), F.collect_set("path").alias("paths"))
                 .where("n > 1").limit(3).collect())
        _raise_collisions([(r["id"], r["paths"]) for r in clash])

    # --- writing -------------------------------------------------------------------------------
    def upsert(self, rows: DataFrame, note: str = "") -> None:
        """Insert or replace rows by path in one Delta commit."""
        from delta.tables import DeltaTable

        self._set_commit_note(note)
        (DeltaTable.forPath(self.spark, self.location).alias("t")
         .merge(rows.select(COLUMNS).alias("s"), "t.path = s.path")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())

    def delete_missing(self, listing: DataFrame, note: str = "") -> None:
        """Delete rows whose path is not in `listing`, in one Delta commit (MERGE ... NOT MATCHED BY SOURCE)."""
        from delta.tables import DeltaTable

        self._set_commit_note(note)
        (DeltaTable.forPath(self.spark, self.location).alias("t")
         .merge(listing.select("path").alias("s"), "t.path = s.path")
         .whenNotMatchedBySourceDelete().execute())

    def _set_commit_note(self, note: str) -> None:
        self.spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", note or "lakelens")

    def write_parquet_snapshot(self, listing: DataFrame, new_rows: DataFrame | None) -> None:
        """Parquet has no MERGE: write kept + new rows to a sibling folder, then swap it in by rename."""
        keep = None
        if self.exists():
            current = self.read().select(COLUMNS)
            replaced = new_rows.select("path") if new_rows is not None else None
            keep = current.join(listing.select("path"), "path", "left_semi")
            if replaced is not None:
                keep = keep.join(replaced, "path", "left_anti")
        parts = [df for df in (keep, new_rows.select(COLUMNS) if new_rows is not None else None) if df is not None]
        if not parts:
            return
        out = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
        jvm = self.spark._jvm
        path, fs = self._hadoop_path()
        tmp = jvm.org.apache.hadoop.fs.Path(f"{self.location.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}")
        out.write.mode("error").parquet(tmp.toString())
        old = jvm.org.apache.hadoop.fs.Path(f"{self.location.rstrip('/')}.old-{uuid.uuid4().hex[:8]}")
        if fs.exists(path) and not fs.rename(path, old):
            raise OSError(f"could not move {self.location} aside to {old.toString()}")
        if not fs.rename(tmp, path):
            raise OSError(f"could not move {tmp.toString()} into place at {self.location}")
        if fs.exists(old):
            fs.delete(old, True)
