"""Listing image files (a local folder on the driver, anything else with Spark; zero-length files included) and
reading exactly the files of a chunk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from tqdm.auto import tqdm

from lakelens import classic
from lakelens.errors import DataError
from lakelens.ingest.globs import name_filter
from lakelens.ingest.paths import (
    GLOB_CHARS,
    NAME_NOT_UTF8,
    escape_undecodable,
    from_uri,
    glob_escape,
    is_local,
    is_remote,
    root_of,
    to_local,
    to_stored,
)
from lakelens.spark import parallelism, session_settings


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


def hadoop_millis(st: os.stat_result) -> int:
    """A file's modification time in whole milliseconds, as Hadoop's file status (and so Spark) has it."""
    return st.st_mtime_ns // 1_000_000


def millis_to_times(millis: list, index=None) -> pd.Series:
    """Milliseconds (None: unknown) -> the UTC timestamps of a `modified` / `modificationTime` column."""
    return pd.to_datetime(pd.Series(millis, dtype="float64", index=index), unit="ms", utc=True)


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
            times.append(hadoop_millis(st))
        yield pd.DataFrame({"path": pd.Series(paths, dtype=object), "size_bytes": pd.Series(sizes, dtype="int64"),
                            "modified": millis_to_times(times)})


def _uris_to_paths(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for pdf in batches:
        yield pd.DataFrame({"path": pd.Series([from_uri(u) for u in pdf["uri"]], dtype=object)})


class Listing(NamedTuple):
    """The files to consider: `df` (path, size_bytes, modified), their `count`, and for a local folder
    listed on the driver the same rows as pandas (`local`, sorted by path), else None. A local listing
    has a fourth column, `error`: why a file cannot be read, known from its name (NAME_NOT_UTF8), else null."""

    df: DataFrame
    count: int
    local: pd.DataFrame | None = None


LISTING_SCHEMA = "path string, size_bytes long, modified timestamp"
LOCAL_LISTING_SCHEMA = LISTING_SCHEMA + ", error string"


def list_files(spark: SparkSession, images: str, path_glob: str = "") -> Listing:
    """Every file under a folder (recursive), a glob or a URI; names starting with '_' or '.' below the
    folder are skipped (`hidden`). A local folder is walked on the driver (`walk_local`: a stat per
    file, no Spark job); anything else is listed by Spark (`list_with_spark`). Under Spark Connect the
    client may sit on another machine than the cluster, so a local folder is walked by one executor task
    instead (`walk_on_executor`), never through the client's file system."""
    keep = name_filter(path_glob)  # a bad glob fails here, before any listing
    if not classic.is_classic(spark):
        if not is_remote(images) and not any(ch in images for ch in GLOB_CHARS):
            listing = walk_on_executor(spark, images, path_glob)
            if listing is not None:
                return listing
        return list_with_spark(spark, images, path_glob)
    folder = local_folder(images)
    if folder is not None:
        local = walk_local(folder, keep)
        return Listing(spark.createDataFrame(local, LOCAL_LISTING_SCHEMA), len(local), local)
    return list_with_spark(spark, images, path_glob)


def _walk_fn(folder: str, path_glob: str):
    """mapInPandas over one row: `walk_local` of `folder` on the executor running it. A folder that cannot
    be listed comes back as one row with no path and the reason as its error; no folder at all, as none."""

    def walk(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for _ in batches:
            pass
        try:
            local = str(to_local(to_stored(folder)))
        except DataError as e:
            yield _walk_failure(str(e))
            return
        if not os.path.isdir(local):
            return  # not a folder here: a file or a pattern, for Spark's own listing
        try:
            yield walk_local(local, name_filter(path_glob))
        except DataError as e:
            yield _walk_failure(str(e))

    return walk


def _walk_failure(reason: str) -> pd.DataFrame:
    return pd.DataFrame({"path": pd.Series([None], dtype=object), "size_bytes": pd.Series([0], dtype="int64"),
                         "modified": millis_to_times([None]), "error": [reason]})


def walk_on_executor(spark: SparkSession, folder: str, path_glob: str = "") -> Listing | None:
    """A local (or mounted) folder listed by one executor task, the way the driver lists it on a classic
    session; None when the executor sees no folder there (then Spark lists the path)."""
    rows = (spark.range(0, 1, 1, 1).mapInPandas(_walk_fn(folder, path_glob), LOCAL_LISTING_SCHEMA)
            .localCheckpoint())
    failed = rows.where(F.col("path").isNull()).select("error").limit(1).collect()
    if failed:
        raise DataError(failed[0]["error"])
    count = rows.count()
    if count == 0 and not _executor_sees_folder(spark, folder):
        return None
    return Listing(rows, count)


def _executor_sees_folder(spark: SparkSession, folder: str) -> bool:
    def check(batches):
        for _ in batches:
            pass
        try:
            yield pd.DataFrame({"folder": [os.path.isdir(str(to_local(to_stored(folder))))]})
        except DataError:
            yield pd.DataFrame({"folder": [False]})

    return bool(spark.range(0, 1, 1, 1).mapInPandas(check, "folder boolean").first()["folder"])


def local_folder(images: str) -> str | None:
    """The local folder `images` names, when it names one without glob characters; else None."""
    if is_remote(images):
        return None
    try:
        folder = str(to_local(to_stored(images)))
    except DataError:
        return None
    if any(ch in folder for ch in GLOB_CHARS) or not os.path.isdir(folder):
        return None
    return folder


def walk_local(folder: str, keep=None) -> pd.DataFrame:
    """(path, size_bytes, modified, error) of the regular files below a local folder, as Spark's binaryFile
    listing with recursiveFileLookup holds them (stored spelling, sizes, modification times in whole
    milliseconds, zero-length files included, symlinks followed, copies in progress ('._COPYING_') left
    out), minus every name starting with '_' or '.' (files and folders); `keep(name)` filters file names
    (pathGlobFilter). A folder linked into itself is walked once; an unreadable folder raises DataError.
    A path that is not UTF-8, which Spark's listing drops without a word, is kept with its bad bytes
    escaped (`escape_undecodable`) and error NAME_NOT_UTF8, so the table says it is there; where that
    spelling is a real file's name too, the real file has the row."""
    root = to_stored(folder).rstrip("/")
    base = str(to_local(root))
    rows = {}  # path -> (size, milliseconds, error)
    seen = set()
    stack = [(base, root)]
    with tqdm(desc="listing", unit=" files", disable=None, mininterval=2.0) as bar:
        while stack:
            local, stored = stack.pop()
            try:
                st = os.stat(local)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(local))
            except OSError as e:
                raise DataError(f"embed.images: cannot list {local}: {e.strerror or e}") from None
            for entry in entries:
                name = entry.name
                if name[0] in "_." or name.endswith("._COPYING_"):  # the second: Spark's copy in progress
                    continue
                try:
                    if entry.is_dir():
                        stack.append((entry.path, f"{stored}/{name}"))
                        continue
                    if not entry.is_file() or (keep is not None and not keep(name)):
                        continue
                    est = entry.stat()
                except OSError:  # gone meanwhile, or a broken link
                    continue
                path = f"{stored}/{name}"
                spelled = escape_undecodable(path)
                if spelled == path:
                    rows[path] = (est.st_size, hadoop_millis(est), None)
                else:
                    rows.setdefault(spelled, (est.st_size, hadoop_millis(est), NAME_NOT_UTF8))
            bar.update(len(entries))
    paths = sorted(rows)
    sizes, times, errors = zip(*(rows[p] for p in paths)) if rows else ((), (), ())
    return pd.DataFrame({"path": pd.Series(paths, dtype=object), "size_bytes": pd.Series(sizes, dtype="int64"),
                         "modified": millis_to_times(list(times)), "error": pd.Series(errors, dtype=object)})


def list_with_spark(spark: SparkSession, images: str, path_glob: str = "") -> Listing:
    """(path, size_bytes, modified) of every file under a folder (recursive), a glob or a URI,
    materialised on the executors, and their count; names starting with '_' or '.' below the folder are
    skipped (`hidden`). Spark's binaryFile source reads no contents when `content` is not selected, but
    its scan drops zero-length files: those are the files of Spark's file index that the scan lacks,
    found and stat'ed on the executors, so no per-file data is collected to the driver."""
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if path_glob:
        reader = reader.option("pathGlobFilter", path_glob)
    skip = hidden(root_of(images))
    try:  # a classic session finds a missing path at load(), Spark Connect (lazy) at the first action
        files = reader.load(images)
        scanned = (files.select("path", F.col("length").alias("size_bytes"),
                                F.col("modificationTime").alias("modified"), skip.alias("hidden")).localCheckpoint())
    except AnalysisException as e:
        if "PATH_NOT_FOUND" in str(e) or "Path does not exist" in str(e):
            raise DataError(f"embed.images: nothing found at {images}") from None
        raise
    counts = {r["hidden"]: r["count"] for r in scanned.groupBy("hidden").count().collect()}
    listing = scanned.where(~F.col("hidden")).drop("hidden")
    count = counts.get(False, 0)
    indexed, uris = _index_uris(spark, files)
    if indexed > count + counts.get(True, 0):
        # The join is a sort-merge join: a broadcast join would collect the listing on the driver, and
        # Spark judges it small when the files are (its estimate is their bytes, not their number).
        missing = (uris.mapInPandas(_uris_to_paths, "path string").where(~skip)
                   .join(listing.hint("merge"), "path", "left_anti"))
        listing = listing.unionByName(missing.mapInPandas(_stat_files, listing.schema)).localCheckpoint()
        count = listing.count()
    return Listing(listing, count)


def _index_uris(spark: SparkSession, files: DataFrame) -> tuple[int, DataFrame]:
    """(how many, DataFrame of `uri`) of the files in the file index of `files` (zero-length ones too). On a
    classic session the URIs (file:///a%20b) stay in the JVM, converted to stored paths by Python workers,
    never passing through the Python driver; Spark Connect has no such way, and its client gets the list."""
    if classic.is_classic(spark):
        return classic.index_uris(spark, files)
    uris = [str(u) for u in files.inputFiles()]  # a protobuf container under Connect, not a list
    return len(uris), spark.createDataFrame(pd.DataFrame({"uri": pd.Series(uris, dtype=object)}), "uri string")


def read_files(spark: SparkSession, paths: list[str]) -> DataFrame:
    """binaryFile rows (path, modificationTime, length, content) for exactly these file paths; read them
    inside `file_splits(..., paths=paths)`, which says how Spark looks them up."""
    return spark.read.format("binaryFile").load([glob_escape(p) for p in paths])


def lookup_settings(spark: SparkSession, paths: list[str]) -> dict[str, str]:
    """Spark stats explicit paths with one task each beyond a threshold; local files are stat'ed on the
    driver instead (microseconds each), remote ones by at most 2 x default parallelism tasks."""
    key = "spark.sql.sources.parallelPartitionDiscovery"
    if all(is_local(p) for p in paths):
        return {f"{key}.threshold": str(len(paths) + 1)}
    return {f"{key}.parallelism": str(2 * parallelism(spark))}


def local_paths(spark: SparkSession, paths: list[str], partitions: int) -> DataFrame:
    """(path) rows of local files in `partitions` partitions of consecutive paths, for Python workers that
    read the files themselves: no file index on the driver and no file bytes through the JVM."""
    n = max(1, min(partitions, len(paths)))
    slices = [paths[i * len(paths) // n:(i + 1) * len(paths) // n] for i in range(n)]  # sizes differ by <= 1

    def emit(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        # the chunk's paths travel inside the function (Spark ships a large one as a broadcast by itself)
        for pdf in batches:
            for i in pdf["id"]:
                yield pd.DataFrame({"path": pd.Series(slices[int(i)], dtype=object)})

    return spark.range(0, n, 1, n).mapInPandas(emit, "path string")


@contextmanager
def file_splits(spark: SparkSession, files: int, partitions: int, paths: list[str] | None = None):
    """Inside this block a scan of `files` files packs them into `partitions` splits of ceil(files /
    partitions) files each (the last holds the rest), so files reach every core without a shuffle of
    their contents. Spark packs a split until (file sizes + open cost per file) would pass
    maxPartitionBytes; an open cost of 1 TiB makes that a count of files (an image costs about the same
    to embed whatever its size in bytes). The scan is planned when an action runs, so the action
    belongs inside too; the session's settings come back after. `paths`: the files `read_files` reads
    in the block, looked up as `lookup_settings` says."""
    per_split = -(-max(1, files) // max(1, partitions))
    with session_settings(spark, {"spark.sql.files.openCostInBytes": str(1 << 40),
                                  "spark.sql.files.maxPartitionBytes": str(per_split << 40),
                                  # so that maxPartitionBytes alone sets the split size
                                  "spark.sql.files.minPartitionNum": "1",
                                  **(lookup_settings(spark, paths) if paths else {})}):
        yield


