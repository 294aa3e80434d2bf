"""Embeddings table: schema, stable ids, change detection (new / changed / deleted), Delta MERGE and Parquet writes."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lakelens import classic, delta_sql
from lakelens.delta_sql import sql_string
from lakelens.errors import ConfigError, DataError, IdCollisionError
from lakelens.ingest.paths import path_id
from lakelens.spark import session_settings

FORMATS = ("delta", "parquet")
ROOTS_PROPERTY = "lakelens.image_roots"
# The session setting Delta takes a commit's note (its history's userMetadata) from.
COMMIT_NOTE = "spark.databricks.delta.commitInfo.userMetadata"

# A row's regions (embed.regions): each crop's box, (x0, y0, x1, y1) as fractions of the image, and its
# unit vector; null when regions are off or the image failed.
# (Delta refuses NOT NULL inside arrays: the fields are nullable, the job never writes a null there.)
REGIONS_TYPE = T.ArrayType(T.StructType([
    T.StructField("box", T.ArrayType(T.FloatType()), True),
    T.StructField("embedding", T.ArrayType(T.FloatType()), True),
]), containsNull=True)

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
    T.StructField("regions", REGIONS_TYPE, True),
])

# Where an image inside a shard or a table lives (null for a plain file): the shard or data file (`path`,
# with its size and modification time when embedded, which tell a changed container), the image's place in
# it (a tar member's data offset; a Parquet row's index in its data file, or the key column and the row's
# key there, by which a Delta table's row is found), the image column of a table row (`image.bytes` for a
# Hugging Face Image struct), and the container's live rows when embedded (a Delta delete can leave a data
# file's bytes as they were).
CONTAINER_TYPE = T.StructType([
    T.StructField("path", T.StringType(), True),
    T.StructField("size_bytes", T.LongType(), True),
    T.StructField("modified", T.TimestampType(), True),
    T.StructField("offset", T.LongType(), True),
    T.StructField("column", T.StringType(), True),
    T.StructField("key_column", T.StringType(), True),
    T.StructField("key", T.StringType(), True),
    T.StructField("rows", T.LongType(), True),
])
# The columns an image from a shard or a table adds to the UDF's: its source's caption and its container.
SOURCE_FIELDS = [T.StructField("caption", T.StringType(), True), T.StructField("container", CONTAINER_TYPE, True)]
SOURCE_UDF_SCHEMA = T.StructType([*UDF_SCHEMA.fields, *SOURCE_FIELDS])

# The table: the UDF's columns with the id first, the model before the vector, the time last.
_UDF = {f.name: f for f in UDF_SCHEMA.fields}
SCHEMA = T.StructType([
    T.StructField("id", T.LongType(), False),
    *(_UDF[name] for name in ("path", "content_sha256", "size_bytes", "modified", "width", "height")),
    T.StructField("model", T.StringType(), False),
    _UDF["embedding"], _UDF["error"],
    T.StructField("embedded_at", T.TimestampType(), False),
    _UDF["regions"],
])
# What a new table is made with: every row's columns, then the source's caption and the image's container
# (null for plain files).
TABLE_SCHEMA = T.StructType([*SCHEMA.fields, *SOURCE_FIELDS])
COLUMNS = [f.name for f in TABLE_SCHEMA.fields]
# Columns later versions added: a table made before them lacks them until a run needs them.
ADDED_COLUMNS = {"regions": REGIONS_TYPE, "caption": T.StringType(), "container": CONTAINER_TYPE}


def with_columns_of(df: DataFrame, columns=COLUMNS) -> DataFrame:
    """`df` with every one of `columns` of the table's schema, the added ones it lacks as nulls."""
    types = {f.name: f.dataType for f in TABLE_SCHEMA.fields}
    have = set(df.columns)
    return df.select([F.col(c) if c in have else F.lit(None).cast(types[c]).alias(c) for c in columns])


def with_source_columns(df: DataFrame) -> DataFrame:
    """Rows of the table (or its change feed) with `caption` (null where the table has none) and `locator`:
    where the query side reads an image inside a shard or a table (JSON of its container, its place there
    and its length), null for a plain file."""
    if "caption" not in df.columns:
        df = df.withColumn("caption", F.lit(None).cast("string"))
    if "container" not in df.columns:
        return df.withColumn("locator", F.lit(None).cast("string"))
    return df.withColumn("locator", F.when(F.col("container").isNull(), F.lit(None).cast("string")).otherwise(
        F.to_json(F.struct(F.col("container.path").alias("path"), F.col("container.offset").alias("offset"),
                           F.col("size_bytes").alias("length"), F.col("container.column").alias("column"),
                           F.col("container.key_column").alias("key_column"), F.col("container.key").alias("key"),
                           F.col("container.size_bytes").alias("container_size"),
                           F.unix_millis("container.modified").alias("container_millis")))))


def path_id_col(col: str = "path"):
    """The same id as `path_id`, computed by Spark (conv to base -10 reads the hex as signed)."""
    return F.conv(F.substring(F.sha2(F.col(col), 256), 1, 16), 16, -10).cast("long")


def root_condition(root: str, col: str = "path") -> str:
    """`under_root` as SQL text, for MERGE and DELETE conditions."""
    return f"startswith({col}, {sql_string(root)}) OR {col} = {sql_string(root[:-1])}"


def under_root(root: str, col: str = "path"):
    """A column: true for the rows of image root `root` (a stored folder ending in '/', as `root_of` makes
    it): paths below it, or the one file it names when a single file was listed. A prefix test on the
    text, not LIKE, so '%', '_' and '\\' in names are themselves; root /a/A never holds /a/AB/x."""
    path = F.col(col)
    return path.startswith(F.lit(root)) | (path == F.lit(root[:-1]))


NEW, CHANGED, DELETED, UNCHANGED = "new", "changed", "deleted", "unchanged"


@dataclass
class Plan:
    """What a run must do. `todo` (checkpointed on the executors) holds every listed or stored file that
    is not unchanged: path, size_bytes, modified, status, and an error for files that are not read."""

    todo: DataFrame
    to_embed: int
    unread: int
    deleted: int
    unchanged: int
    new: int
    changed: int
    paths: list[str] | None = None  # the paths to embed, sorted, when the plan was made on the driver

    def unread_rows(self) -> DataFrame:
        """(path, size_bytes, modified, error) of new and changed files not to be read: empty, too large, or
        named in bytes that are not UTF-8."""
        return (self.todo.where(F.col("status").isin(NEW, CHANGED) & F.col("error").isNotNull())
                .select("path", "size_bytes", "modified", "error"))

    def chunks(self, sizes: int | ChunkSizes) -> Iterator[list[str]]:
        """The paths to embed, sorted, in chunks of `sizes.take(files left)` (asked again before each
        chunk, so the sizes can follow the run). They stream to the driver one partition at a time
        (toLocalIterator), each partition about one first chunk (range partitioning), so the driver never
        holds more than a partition and a chunk of them, whatever the table's size. A plan made on the
        driver has them at hand."""
        sizes = sizes if isinstance(sizes, ChunkSizes) else ChunkSizes(sizes)
        if self.paths is not None:
            paths = iter(self.paths)
        else:
            rows = (self.todo.where(F.col("status").isin(NEW, CHANGED) & F.col("error").isNull()).select("path")
                    .repartitionByRange(max(1, -(-self.to_embed // sizes.first)), "path")
                    .sortWithinPartitions("path"))
            paths = (row["path"] for row in rows.toLocalIterator())
        left = self.to_embed
        while chunk := list(islice(paths, sizes.take(left) if left > 0 else sizes.first)):
            yield chunk
            left -= len(chunk)


# Chunks sized by time grow to at most this many times embed.chunk_size.
MAX_CHUNK_GROWTH = 10
# A listing held on the driver of at most this many files has its ids checked and its plan made in one
# query whose rows (at most SMALL_PLAN_ROWS) come to the driver (EmbeddingsTable.plan_small).
SMALL_LISTING = 1000
SMALL_PLAN_ROWS = 4 * SMALL_LISTING


@dataclass
class ChunkSizes:
    """Files per committed chunk. The first chunk has `first` files. With `seconds` > 0, each later chunk
    has as many files as the previous chunk's embedding rate fills in `seconds` (at least `first`, at
    most MAX_CHUNK_GROWTH x `first`), so a Delta commit's fixed cost (about 1.4 s a MERGE on 2 cores) stays
    a small share of a fast node's chunk, and a slow node still commits every `seconds` or so; a last
    chunk under half a chunk joins the one before it. With `seconds` = 0 every chunk has `first` files."""

    first: int
    seconds: float = 0.0
    size: int = field(init=False)  # files in the next chunk, before the tail rule

    def __post_init__(self):
        self.size = self.first

    def observe(self, files: int, seconds: float) -> None:
        """A chunk of `files` took `seconds` to embed: size the next one."""
        if self.seconds > 0 and files > 0 and seconds > 0:
            wanted = round(files / seconds * self.seconds)
            self.size = int(min(max(wanted, self.first), MAX_CHUNK_GROWTH * self.first))

    def take(self, left: int) -> int:
        """Files in the next chunk when `left` files are still to embed."""
        if self.seconds > 0 and left - self.size < self.size // 2:
            return left
        return min(self.size, left)


def _raise_collisions(clashes: list) -> None:
    if clashes:
        detail = "; ".join(f"id {i}: {sorted(ps)}" for i, ps in clashes[:3])
        raise IdCollisionError(f"64-bit path ids collide, nothing was written: {detail}")


def with_retries(action, retries: int, what: str, log=None):
    """Run a Delta commit; after a concurrent writer's conflicting commit, run it again (it re-reads the
    table), up to `retries` times, waiting a little longer each time."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as e:  # a concurrent writer committed first (Delta's optimistic concurrency)
            if not delta_sql.is_conflict(e):
                raise
            if attempt == retries:
                raise DataError(f"{what}: another writer kept changing the table ({type(e).__name__}); "
                                f"gave up after {retries} retries") from None
            if log:
                log(f"  {what}: concurrent commit ({type(e).__name__}); retrying")
            time.sleep(min(5.0, 0.2 * 2 ** attempt) * (1 + random.random()))
    return None


class EmbeddingsTable:
    """One embeddings table at `location`, Delta (default) or Parquet."""

    def __init__(self, spark: SparkSession, location: str, fmt: str = "delta"):
        if fmt not in FORMATS:
            raise ConfigError(f"embed.format: must be one of {FORMATS}, got {fmt!r}")
        self.spark, self.location, self.format = spark, location, fmt

    # --- reading -------------------------------------------------------------------------------
    def exists(self) -> bool:
        if self.format == "delta":
            return delta_sql.is_delta(self.spark, self.location)
        if classic.is_classic(self.spark):
            return classic.HadoopFiles(self.spark, self.location).exists()
        try:  # Spark Connect: a Parquet folder exists when Spark can read its schema
            self.spark.read.parquet(self.location).schema
            return True
        except AnalysisException:
            return False

    def read(self, version: int | None = None) -> DataFrame:
        reader = self.spark.read.format(self.format)
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.location)

    def _snapshot(self) -> tuple[int, str, dict] | None:
        """(version, table id, properties) of the latest Delta version; None for a missing table."""
        return delta_sql.snapshot(self.spark, self.location)

    def version(self) -> int | None:
        """The latest Delta version, or None for Parquet / a missing table."""
        if self.format != "delta":
            return None
        snap = self._snapshot()  # None for a missing table: one look, not two (each is a query under Connect)
        return None if snap is None else snap[0]

    def create_if_missing(self, image_roots: list[str] = ()) -> bool:
        """A new Delta table (Change Data Feed on), its first image roots recorded in the same commit. True
        when this call made it (False: it was there already, or another writer made it at the same time)."""
        if self.format != "delta" or self.exists():
            return False
        try:
            delta_sql.create(self.spark, self.location, TABLE_SCHEMA, {
                "delta.enableChangeDataFeed": "true", ROOTS_PROPERTY: json.dumps(sorted(set(image_roots)))})
        except AnalysisException:
            if self.exists():  # another writer made it since: its roots may lack ours
                return False
            raise
        return True

    # --- change detection ----------------------------------------------------------------------
    def plan(self, listing: DataFrame, listed: int, model_key: str, max_file_bytes: int,
             regions: bool = False, local: pd.DataFrame | None = None, *, root: str) -> Plan:
        """Classify the `listed` files of `listing` (the files of image root `root`) against the table's
        rows of that root: new, changed (size, mtime or model differ; or `regions` are wanted and an
        embedded row has none), unchanged; its rows of files no longer listed are deleted, and rows of
        other roots are not looked at. The classification stays on the executors; only the counts per status come back.
        A listing held on the driver too (`local`, sorted by path) for a table not made yet is planned there:
        every file is new. A listing's own `error` (a name Spark cannot hold) makes an unread file."""
        exists = self.exists()
        if local is not None and not exists:
            return self._plan_new(local, max_file_bytes)
        listed_error = (F.col("error") if "error" in listing.columns else F.lit(None).cast("string")).alias("listed")
        if not exists:
            todo = listing.select("path", "size_bytes", "modified", F.lit(NEW).alias("status"), listed_error)
        else:
            stored = self.read()
            lacks = (F.col("regions").isNull() & F.col("error").isNull() if "regions" in stored.columns
                     else F.col("error").isNull()) if regions else F.lit(False)
            existing = stored.where(under_root(root)).select("path", F.col("size_bytes").alias("old_size"),
                                     F.col("modified").alias("old_modified"), F.col("model").alias("old_model"),
                                     lacks.alias("lacks_regions"))
            status = (F.when(F.col("size_bytes").isNull(), DELETED)
                      .when(F.col("old_size").isNull(), NEW)
                      .when((F.col("size_bytes") != F.col("old_size"))
                            | ~F.col("modified").eqNullSafe(F.col("old_modified"))
                            | (F.col("old_model") != F.lit(model_key)) | F.col("lacks_regions"), CHANGED)
                      .otherwise(UNCHANGED))
            todo = (listing.join(existing, "path", "full_outer")
                    .select("path", "size_bytes", "modified", status.alias("status"), listed_error)
                    .where(F.col("status") != UNCHANGED))
        error = (F.when(F.col("status") == DELETED, None)
                 .when(F.col("listed").isNotNull(), F.col("listed"))
                 .when(F.col("size_bytes") == 0, "empty file")
                 .when(F.col("size_bytes") > max_file_bytes, "too large"))
        todo = todo.withColumn("error", error).drop("listed").localCheckpoint()
        counts = {(r["status"], r["unread"]): r["count"] for r in
                  todo.groupBy("status", F.col("error").isNotNull().alias("unread")).count().collect()}
        by_status = Counter()
        for (st, _), n in counts.items():
            by_status[st] += n
        unread = counts.get((NEW, True), 0) + counts.get((CHANGED, True), 0)
        return Plan(todo=todo, to_embed=by_status[NEW] + by_status[CHANGED] - unread, unread=unread,
                    deleted=by_status[DELETED], unchanged=listed - by_status[NEW] - by_status[CHANGED],
                    new=by_status[NEW], changed=by_status[CHANGED])

    def plan_small(self, local: pd.DataFrame, model_key: str, max_file_bytes: int, regions: bool = False, *,
                   root: str) -> Plan | None:
        """`check_ids` and `plan` of a listing held on the driver (`local`, sorted by path) of at most
        SMALL_LISTING files, in one Spark query: the table's rows of image root `root` and its rows of a
        listed id come to the driver (at most SMALL_PLAN_ROWS of them), which checks the ids and classifies
        the files as `plan` does. None (nothing checked, nothing planned) for a larger listing, a table not
        made yet, or more rows than that (a folder that lost many files): `check_ids` and `plan` then."""
        if len(local) > SMALL_LISTING or not self.exists():
            return None
        ids = [path_id(p) for p in local["path"]]
        by_id = dict(zip(ids, local["path"]))
        if len(by_id) < len(ids):  # two listed paths of one id: check_ids names them
            return None
        stored = self.read()
        lacks = ((F.col("regions").isNull() & F.col("error").isNull() if "regions" in stored.columns
                  else F.col("error").isNull()) if regions else F.lit(False))
        rows = (stored.where(under_root(root) | F.col("id").isin(ids))
                .select("id", "path", "size_bytes", F.unix_micros("modified").alias("micros"), "model",
                        lacks.alias("lacks"), under_root(root).alias("in_root"))
                .limit(SMALL_PLAN_ROWS + 1).collect())
        if len(rows) > SMALL_PLAN_ROWS:
            return None
        # a kept row with a listed id is a clash unless it is that id's listed file: a path not listed, or a
        # listed path whose id is not the row's (rows check_ids' join finds too)
        clash = [(r["id"], [by_id[r["id"]], r["path"]]) for r in rows
                 if r["id"] in by_id and (r["path"] != by_id[r["id"]] or path_id(r["path"]) != r["id"])]
        _raise_collisions(clash[:3])
        kept: dict[str, list] = {}
        for r in rows:
            if r["in_root"]:
                kept.setdefault(r["path"], []).append(r)
        # microseconds as Arrow casts the listing's nanoseconds for Spark (towards zero)
        micros = [None if pd.isna(t) else int(np.sign(t.value)) * (abs(t.value) // 1000) for t in local["modified"]]
        listed_error = local["error"] if "error" in local.columns else pd.Series(None, index=local.index)
        todo, counts = [], Counter()

        def add(path, size, when, status, listed):
            counts[status] += 1
            if status == UNCHANGED:
                return
            error = (None if status == DELETED else listed if listed is not None else "empty file" if size == 0
                     else "too large" if size > max_file_bytes else None)
            todo.append((path, size, when, status, error))

        for path, size, when, listed in zip(local["path"], local["size_bytes"].tolist(), micros, listed_error):
            listed = None if pd.isna(listed) else listed
            for old in kept.pop(path, [None]):  # a full outer join: one row per kept row of the path
                if old is None or old["size_bytes"] is None:
                    status = NEW
                elif (size != old["size_bytes"] or when != old["micros"] or old["model"] != model_key
                      or old["lacks"]):
                    status = CHANGED
                else:
                    status = UNCHANGED
                add(path, size, when, status, listed)
        for path, olds in kept.items():  # kept rows of the root whose file is not listed
            for _ in olds:
                add(path, None, None, DELETED, None)
        df = (self.spark.createDataFrame(todo, "path string, size_bytes long, micros long, status string, "
                                               "error string")
              .select("path", "size_bytes", F.timestamp_micros("micros").alias("modified"), "status", "error"))
        unread = sum(1 for t in todo if t[3] in (NEW, CHANGED) and t[4] is not None)
        return Plan(todo=df, to_embed=counts[NEW] + counts[CHANGED] - unread, unread=unread,
                    deleted=counts[DELETED], unchanged=len(local) - counts[NEW] - counts[CHANGED],
                    new=counts[NEW], changed=counts[CHANGED],
                    paths=[t[0] for t in todo if t[3] in (NEW, CHANGED) and t[4] is None])

    def _plan_new(self, local: pd.DataFrame, max_file_bytes: int) -> Plan:
        sizes = local["size_bytes"]
        error = np.where(sizes == 0, "empty file", np.where(sizes > max_file_bytes, "too large", None))
        if "error" in local.columns:  # known from the listing: it comes first
            error = np.where(local["error"].notna(), local["error"], error)
        todo = local[["path", "size_bytes", "modified"]].assign(
            status=NEW, error=pd.Series(error, index=local.index, dtype=object))
        df = self.spark.createDataFrame(todo, "path string, size_bytes long, modified timestamp, status string, "
                                              "error string")
        unread = int(todo["error"].notna().sum())
        return Plan(todo=df, to_embed=len(todo) - unread, unread=unread, deleted=0, unchanged=0, new=len(todo),
                    changed=0, paths=todo.loc[todo["error"].isna(), "path"].tolist())

    def check_ids(self, listing: DataFrame, local: pd.DataFrame | None = None) -> None:
        """Raise IdCollisionError if two listed paths, or a listed path and a kept row, share an id; at
        most three clashes come back. Listed paths against each other: on the driver for a listing held
        there (`local`), else on the executors. Against the kept rows: a join on id, so the table is read
        once and never grouped (its own ids were checked when they were written). Rows that carry their
        `id` already (a chunk about to be written) are checked by it, not by computing it again. A small
        listing held on the driver is checked by `plan_small` instead, together with its plan."""
        if local is not None:
            ids = pd.DataFrame({"id": [path_id(p) for p in local["path"]], "path": local["path"]})
            dup = ids[ids["id"].duplicated(keep=False)].groupby("id")["path"].agg(sorted)
            _raise_collisions(list(dup.items())[:3])
        listed = (listing.select("path", "id") if "id" in listing.columns
                  else listing.select("path").withColumn("id", path_id_col()))
        if local is None:
            clash = (listed.groupBy("id").agg(F.countDistinct("path").alias("n"), F.collect_set("path").alias("paths"))
                     .where("n > 1").limit(3).collect())
            _raise_collisions([(r["id"], r["paths"]) for r in clash])
        if not self.exists():
            return
        kept = self.read().select("id", F.col("path").alias("kept"))
        clash = listed.join(kept, "id").where(F.col("path") != F.col("kept")).limit(3).collect()
        _raise_collisions([(r["id"], [r["path"], r["kept"]]) for r in clash])

    # --- writing -------------------------------------------------------------------------------
    def add_columns(self, names) -> None:
        """A table made before some of ADDED_COLUMNS gets those of `names` it lacks (nullable), in one
        metadata-only commit."""
        if self.format != "delta" or not self.exists():
            return
        have = set(self.read().columns)
        missing = [n for n in names if n not in have]
        if missing:
            spec = ", ".join(f"{n} {ADDED_COLUMNS[n].simpleString()}" for n in missing)
            self.spark.sql(f"ALTER TABLE {delta_sql.table_ref(self.location)} ADD COLUMNS ({spec})")

    def add_regions_column(self) -> None:
        """Tables made before regions existed get the (nullable) column."""
        self.add_columns(["regions"])

    def upsert(self, rows: DataFrame, note: str = "", new_only: bool = False, containers=()) -> None:
        """Insert or replace rows by path in one Delta commit. A table without a `regions` column (made
        before regions existed, and regions are off) keeps its columns. `new_only`: the rows' paths were not
        in the table when the run planned, so the MERGE only inserts (Delta then reads the table's paths
        alone, no full join); a path another writer added since keeps that writer's row. `containers`:
        shards or data files read again whole: their rows that `rows` do not hold go in the same commit."""
        have = set(self.read().columns)
        clauses = ("" if new_only else "WHEN MATCHED THEN UPDATE SET * ") + "WHEN NOT MATCHED THEN INSERT *"
        if containers:
            listed = ", ".join(sql_string(c) for c in sorted(containers))
            clauses += f" WHEN NOT MATCHED BY SOURCE AND t.container.path IN ({listed}) THEN DELETE"
        with self._commit_note(note):
            delta_sql.merge(self.spark, self.location, with_columns_of(rows, [c for c in COLUMNS if c in have]),
                            "t.path = s.path", clauses)

    def delete_missing(self, listing: DataFrame, root: str, note: str = "") -> None:
        """Delete the rows of image root `root` whose path is not in `listing`, in one Delta commit (MERGE
        ... NOT MATCHED BY SOURCE AND the row is under the root); other roots' rows stay."""
        with self._commit_note(note):
            delta_sql.merge(self.spark, self.location, listing.select("path").hint("merge"), "t.path = s.path",
                            f"WHEN NOT MATCHED BY SOURCE AND ({root_condition(root, 't.path')}) THEN DELETE")

    def delete_missing_containers(self, containers: DataFrame, root: str, note: str = "") -> None:
        """Delete the rows of image root `root` whose container is not among `containers` (column path):
        images of shards or data files gone, and plain files' rows of that root, in one Delta commit."""
        with self._commit_note(note):
            delta_sql.merge(self.spark, self.location, containers.select("path").distinct().hint("merge"),
                            "t.container.path = s.path",
                            f"WHEN NOT MATCHED BY SOURCE AND ({root_condition(root, 't.path')}) THEN DELETE")

    def drop_root(self, root: str, note: str = "") -> int:
        """Delete every row of image root `root` and forget the root (Delta: one commit each, the rows
        first, so a run stopped between them can drop it again); the rows deleted. DataError when the
        table has neither the root nor rows under it (a typo, or dropped already)."""
        if not self.exists():
            raise DataError(f"--drop-root {root}: there is no table at {self.location}")
        roots = self.image_roots()
        rows = self.read().where(under_root(root)).count()
        if not rows and root not in roots:
            known = f"its image roots are {', '.join(roots)}" if roots else "it has no rows there"
            raise DataError(f"--drop-root {root}: not an image root of {self.location} ({known})")
        if self.format == "parquet":
            if rows:
                current = self.read()
                self._swap_parquet(current.where(~under_root(root)))
            return rows
        if rows:
            with self._commit_note(note):
                self.spark.sql(f"DELETE FROM {delta_sql.table_ref(self.location)} WHERE {root_condition(root)}")
        if root in roots:
            self._set_roots([r for r in roots if r != root])
        return rows

    def table_id(self) -> str | None:
        """Delta's id of the table: a table re-created at the same location gets a new one."""
        if self.format != "delta":
            return None
        snap = self._snapshot()
        return None if snap is None else snap[1]

    def image_roots(self) -> list[str]:
        """The folders the embed job has listed into this table (Delta table property)."""
        if self.format != "delta":
            return []
        snap = self._snapshot()
        props = snap[2] if snap is not None else {}
        try:
            return list(json.loads(props.get(ROOTS_PROPERTY, "[]")))
        except ValueError:
            return []

    def add_image_root(self, root: str) -> None:
        """Remember a listed folder (thumbnails are served only from under these); a commit only when new."""
        roots = self.image_roots()
        if self.format != "delta" or root in roots:
            return
        self._set_roots([*roots, root])

    def _set_roots(self, roots: list[str]) -> None:
        value = sql_string(json.dumps(sorted(set(roots))))
        self.spark.sql(f"ALTER TABLE {delta_sql.table_ref(self.location)} SET TBLPROPERTIES "
                       f"('{ROOTS_PROPERTY}' = {value})")

    def _commit_note(self, note: str):
        """The block's Delta commits carry `note` as their userMetadata; the session's own comes back after."""
        return session_settings(self.spark, {COMMIT_NOTE: note or "lakelens"})

    def write_parquet_snapshot(self, listing: DataFrame, new_rows: DataFrame | None, root: str) -> None:
        """Parquet has no MERGE: write kept + new rows to a sibling folder, then swap it in by rename. Kept:
        the listed files' rows of image root `root` and every row of other roots."""
        keep = None
        if self.exists():
            current = with_columns_of(self.read())  # a snapshot written before later columns has them null
            replaced = new_rows.select("path") if new_rows is not None else None
            listed = listing.select("path", F.lit(True).alias("listed"))
            keep = (current.join(listed, "path", "left").where(F.col("listed").isNotNull() | ~under_root(root))
                    .select(COLUMNS))
            if replaced is not None:
                keep = keep.join(replaced, "path", "left_anti")
        parts = [df for df in (keep, with_columns_of(new_rows) if new_rows is not None else None) if df is not None]
        if not parts:
            return
        self._swap_parquet(parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1]))

    def _swap_parquet(self, out: DataFrame) -> None:
        """Write `out` to a sibling folder, then swap it in for the table by rename (classic: Hadoop's
        FileSystem on the driver). Spark Connect has no file system calls: the rows are materialised on the
        executors first and then written over the table, so a reader in between may see a partial folder."""
        if not classic.is_classic(self.spark):
            out.localCheckpoint(eager=True).write.mode("overwrite").parquet(self.location)
            return
        files = classic.HadoopFiles(self.spark, self.location)
        tmp = files.sibling(f"{self.location.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}")
        out.write.mode("error").parquet(tmp.toString())
        old = files.sibling(f"{self.location.rstrip('/')}.old-{uuid.uuid4().hex[:8]}")
        if files.exists() and not files.rename(files.path, old):
            raise OSError(f"could not move {self.location} aside to {old.toString()}")
        if not files.rename(tmp, files.path):
            raise OSError(f"could not move {tmp.toString()} into place at {self.location}")
        if files.exists(old):
            files.delete(old)
