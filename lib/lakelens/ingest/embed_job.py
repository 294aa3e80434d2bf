"""The Spark embed job: list images, diff against the table, embed new/changed files in committed chunks, drop deleted."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pandas as pd
from pyspark.sql import functions as F

from lakelens import classic, delta_sql
from lakelens.config import EmbedConfig, check_utf8
from lakelens.errors import ConfigError, DataError
from lakelens.ingest.embedder import cached_embedder
from lakelens.ingest.listing import file_splits, hadoop_millis, list_files, local_folder, local_paths, millis_to_times, read_files
from lakelens.ingest.paths import glob_escape, is_local, root_of, to_local, to_stored
from lakelens.ingest.regions import MAX_GRID
from lakelens.ingest.shard_job import run_containers, shard_source
from lakelens.ingest.table import (
    COMMIT_NOTE,
    REGIONS_TYPE,
    SCHEMA,
    UDF_SCHEMA,
    ChunkSizes,
    EmbeddingsTable,
    path_id_col,
    with_retries,
)
from lakelens.ingest.table_source import image_column, read_source, table_source
from lakelens.locks import RunLock, table_lock_file
from lakelens.models import engines
from lakelens.models.registry import ModelSpec
from lakelens.spark import Job, is_connect, parallelism, session_settings

# Rows of local paths a worker gets at once (Arrow batch): the worker reads the bytes itself, so a batch
# is small whatever the images. On a 2-core node 128 embedded 1.047x as fast as 32 with AMX (median of 5
# alternating pairs) and as fast without it (BENCHMARKS.md).
LOCAL_ARROW_BATCH = 128
ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"


def read_local(pdf: pd.DataFrame, max_bytes: int) -> tuple[pd.DataFrame, list, list]:
    """(path) rows of local files -> the binaryFile columns (path, modificationTime, length), their bytes,
    and an error per file that could not be read: "unreadable" (gone or refused since the listing) or
    "too large" (grown past embed.max_file_bytes since; nothing past the limit is read)."""
    sizes, times, contents, errors = [], [], [], []
    for path in pdf["path"]:
        try:
            with open(to_local(path), "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(max_bytes + 1)
        except (OSError, DataError):
            sizes.append(0)
            times.append(None)
            contents.append(b"")
            errors.append("unreadable")
            continue
        sizes.append(st.st_size)
        times.append(hadoop_millis(st))
        too_large = len(data) > max_bytes
        contents.append(b"" if too_large else data)
        errors.append("too large" if too_large else None)
    files = pd.DataFrame({"path": pdf["path"], "length": pd.Series(sizes, dtype="int64", index=pdf.index),
                          "modificationTime": millis_to_times(times, pdf.index)})
    return files, contents, errors


def worker_embedder(spec: ModelSpec, conf: EmbedConfig) -> Callable:
    """A function, shipped to the Python workers, that returns the worker's cached Embedder for `spec` and
    these settings; the engine uses as many threads as the task was given cores (spark.task.cpus)."""
    settings = (conf.batch_size, conf.decode_threads, conf.draft, conf.max_pixels, conf.engine, conf.device)
    onnx_cache, grid = conf.onnx_cache, conf.region_grid if conf.regions else 0

    def build():
        return cached_embedder(spec, *settings, threads=engines.task_cpus(), onnx_cache=onnx_cache, region_grid=grid)

    return build


def partition_embedder(spec: ModelSpec, conf: EmbedConfig, local: bool = False):
    """The mapInPandas function: binaryFile batches (path, modificationTime, length, content), or with
    `local` (path) batches of local files that it reads itself, -> rows of tables.UDF_SCHEMA."""
    build, max_bytes = worker_embedder(spec, conf), conf.max_file_bytes

    def embed_batches(batches: Iterator) -> Iterator:
        embedder = build()
        def tagged():  # each batch's bytes listed once: embedded, then hashed
            for pdf in batches:
                if local:
                    pdf, contents, read_errors = read_local(pdf, max_bytes)
                else:
                    contents, read_errors = pdf["content"].tolist(), [None] * len(pdf)
                yield (pdf, contents, read_errors), contents

        for (pdf, contents, read_errors), results in embedder.stream(tagged()):
            yield pd.DataFrame({
                "path": pdf["path"],
                "content_sha256": [None if e else hashlib.sha256(c).hexdigest() for c, e in zip(contents, read_errors)],
                "size_bytes": pdf["length"],
                "modified": pdf["modificationTime"],
                "width": pd.array([None if e else r.width for r, e in zip(results, read_errors)], dtype="Int32"),
                "height": pd.array([None if e else r.height for r, e in zip(results, read_errors)], dtype="Int32"),
                "embedding": [r.embedding for r in results],
                "error": [e or r.error for r, e in zip(results, read_errors)],
                "regions": [None if r.regions is None else
                            [{"box": list(box), "embedding": vec} for box, vec in r.regions] for r in results],
            })

    return embed_batches


def _extensions(folder: str, depth: int = 1) -> set[str]:
    """The extensions of the files at the top of a local folder; for a folder of only folders, theirs."""
    with os.scandir(folder) as entries:
        found = [(e.name, e.is_file(), e.path) for e in entries if not e.name.startswith(("_", "."))]
    files = {name.rsplit(".", 1)[-1] for name, is_file, _ in found if is_file}
    if files or depth == 0:
        return files
    return set().union(*(_extensions(path, depth - 1) for _, is_file, path in found if not is_file))


class Warmup:
    """The Python workers started, each with its model loaded, while the driver lists and plans: a job of
    one task per core that builds the embedder the chunks' tasks then find in their reused workers. It
    runs on its own thread, its job tagged (SparkSession.addTag, classic and Connect alike); `finish` waits
    for it, or interrupts it when there is nothing to embed. A failure here is left for the first chunk to
    report."""

    def __init__(self, spark, spec: ModelSpec, conf: EmbedConfig):
        from pyspark import InheritableThread

        self.spark = spark
        self.tag = f"lakelens-embed-warmup-{uuid.uuid4().hex[:8]}"
        n = parallelism(spark)
        build = worker_embedder(spec, conf)  # the very embedder the chunks' tasks ask their workers for

        def load(batches: Iterator) -> Iterator:
            build()
            yield from batches

        def run():
            try:
                spark.addTag(self.tag)  # tags are the thread's own: the chunks' jobs do not carry it
                spark.range(0, n, 1, n).mapInPandas(load, "id long").collect()
            except Exception:  # cancelled, or the model does not load: the chunks say why
                pass
            finally:
                spark.removeTag(self.tag)

        self.thread = InheritableThread(target=run, daemon=True, **({} if classic.is_classic(spark) else
                                                                      {"session": spark}))
        self.thread.start()

    def finish(self, cancel: bool = False) -> None:
        if cancel and self.thread.is_alive():
            self.spark.interruptTag(self.tag)
        self.thread.join()


def embed_files(files, spec: ModelSpec, conf: EmbedConfig, local: bool = False):
    """Spark DataFrame of binaryFile rows (or with `local`, of local file paths) -> DataFrame of
    tables.UDF_SCHEMA rows."""
    return files.mapInPandas(partition_embedder(spec, conf, local), UDF_SCHEMA)


@dataclass
class EmbedStats:
    embedded: int = 0
    failed: int = 0
    unchanged: int = 0
    deleted: int = 0
    new: int = 0
    changed: int = 0
    chunks: int = 0
    table_version: int | None = None
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per phase: list, plan, embed, commit, delete
    chunk_seconds: list = field(default_factory=list)  # per chunk: [files, seconds to embed, seconds to commit]

    def summary(self) -> str:
        times = " ".join(f"{k}={v:.1f}s" for k, v in self.phases.items())
        return (f"embedded={self.embedded} skipped_unchanged={self.unchanged} failed={self.failed} "
                f"deleted={self.deleted} (new={self.new} changed={self.changed} chunks={self.chunks} "
                f"table_version={self.table_version} seconds={self.seconds:.1f}: {times})")

    def to_dict(self) -> dict:
        return asdict(self)


class EmbedJob(Job):
    """`EmbedJob(spark=None, conf=None).launch()` -> EmbedStats. A run killed part-way and started
    again skips the chunks it already committed and ends with the same table. A run reconciles only the
    rows of the image root it lists (`root_of(embed.images)`): each folder embedded into a table keeps
    its rows until `drop_roots` names it (its rows are deleted and it is forgotten, before any embedding;
    with no embed.images that is all the run does)."""

    def __init__(self, spark=None, conf=None, on_chunk: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] = print, drop_roots: Sequence[str] = ()):
        super().__init__(spark, conf)
        self.on_chunk = on_chunk  # (chunk index, files left) after each committed chunk; tests crash runs here
        self.log = log
        self.drop_roots = list(drop_roots)

    def _check(self) -> ModelSpec | None:
        c = self.conf.embed
        if not c.images and not self.drop_roots:
            raise ConfigError("embed.images: required (a folder, glob or URI of images; --images)")
        for root in self.drop_roots:
            check_utf8("--drop-root", root)
        if not c.table:
            raise ConfigError("embed.table: required (where the embeddings table lives; --table)")
        if not c.images:
            return None  # only dropping roots: no model
        if not 1 <= c.region_grid <= MAX_GRID:
            raise ConfigError(f"embed.region_grid: must be between 1 and {MAX_GRID}, got {c.region_grid}")
        spec = ModelSpec.from_config(self.conf.model)
        spec.validate()
        return spec

    def partitions(self, n_files: int) -> int:
        """Splits per chunk: embed.partitions, else two per core, so every core stays busy."""
        return max(1, min(n_files, self.conf.embed.partitions or 2 * parallelism(self.spark)))

    def _rows(self, files, spec: ModelSpec, local: bool = False):
        rows = embed_files(files, spec, self.conf.embed, local)
        return rows.select(path_id_col().alias("id"), "*", F.lit(spec.key).alias("model"),
                           F.current_timestamp().alias("embedded_at"))

    def _unread_rows(self, unread, spec: ModelSpec):
        return unread.select(
            path_id_col().alias("id"), "path", F.lit(None).cast("string").alias("content_sha256"), "size_bytes",
            "modified", F.lit(None).cast("int").alias("width"), F.lit(None).cast("int").alias("height"),
            F.lit(spec.key).alias("model"), F.lit(None).cast(SCHEMA["embedding"].dataType).alias("embedding"),
            "error", F.current_timestamp().alias("embedded_at"), F.lit(None).cast(REGIONS_TYPE).alias("regions"))

    def run(self) -> EmbedStats:
        spec = self._check()
        c = self.conf.embed
        # one run per table on this machine; runs on other machines meet Delta's conflict checks.
        # Arrow batches the size of a model batch where the rows carry the images' bytes (large rows, and
        # memory is per batch; local chunks set their own), and the run's commit notes: the session has its
        # own values back after the run, for whatever runs in it next (refresh's later stages, a notebook).
        with (RunLock(table_lock_file(to_stored(c.table)), f"embeddings table {c.table}", c.lock_wait),
              session_settings(self.spark, {ARROW_BATCH: str(c.batch_size), COMMIT_NOTE: "lakelens"})):
            dropped = sum(self._drop(root_of(root)) for root in self.drop_roots)
            source = self.source() if spec is not None else "files"
            if source in ("webdataset", "table"):
                # the workers start, their model loaded, while the driver lists and plans
                warmup = Warmup(self.spark, spec, c)
                try:
                    make = shard_source if source == "webdataset" else table_source
                    stats = run_containers(self, spec, make(self, worker_embedder(spec, c)), EmbedStats(), self.log,
                                           ready=lambda todo: warmup.finish(cancel=not todo))
                finally:
                    warmup.finish(cancel=True)
            elif spec is not None:
                stats = self._run(spec)
            else:  # only roots dropped: the version they left the table at, as any run reports
                stats = EmbedStats(table_version=EmbeddingsTable(self.spark, c.table, c.format).version())
            stats.deleted += dropped
            return stats

    def source(self) -> str:
        """embed.source, with `auto` decided: webdataset when the images' folder holds .tar files at its top
        (img2dataset's output: shards beside their Parquet and JSON files), table for a Delta table or a
        folder whose top holds .parquet files (and no shards), else files."""
        c = self.conf.embed
        if c.source != "auto":
            return c.source
        images = c.images.rstrip("/")
        if any(ch in images for ch in "*?[{"):
            return "files"
        if images.endswith(".tar"):
            return "webdataset"
        if delta_sql.is_delta(self.spark, images):
            return "table"
        folder = local_folder(images) if classic.is_classic(self.spark) else None
        if folder is not None:  # the driver sees the folder: a look at its top (and below, when it holds only folders:
            tops = _extensions(folder)  # a Hugging Face dataset's data/)
        else:
            tops = self._spark_extensions(glob_escape(to_stored(images)))
            if tops is None:  # nothing there: the files listing says so
                return "files"
            if not tops:  # only folders at the top: what they hold
                tops = self._spark_extensions(glob_escape(to_stored(images)) + "/*") or set()
        if "tar" in tops:
            return "webdataset"
        # img2dataset's Parquet output keeps NNNNN_stats.json files beside the Parquet files
        if not ("parquet" in tops and tops <= {"parquet", "json"}):
            return "files"
        # its WebDataset output leaves the same files beside the shards, without image bytes: once every
        # shard is gone they are what is left, and the run must drop the shards' rows, not fail on them
        if "json" in tops and not self._has_image_bytes(images):
            return "webdataset"
        return "table"

    def _has_image_bytes(self, images: str) -> bool:
        try:
            image_column(read_source(self.spark, images)[0].schema, self.conf.embed.image_column)
        except ConfigError:
            return False
        return True

    def _spark_extensions(self, pattern: str, sample: int = 1000) -> set[str] | None:
        """The extensions of (up to `sample` of) the files Spark lists at `pattern`, not below it; None when
        nothing is there."""
        try:
            paths = (self.spark.read.format("binaryFile").load(pattern).select("path").limit(sample).collect())
        except Exception:  # nothing there, or folders Spark's partition discovery refuses: files, then
            return None
        names = [r["path"].rsplit("/", 1)[-1] for r in paths]
        return {n.rsplit(".", 1)[-1] for n in names if not n.startswith(("_", "."))}

    def _drop(self, root: str) -> int:
        c = self.conf.embed
        table = EmbeddingsTable(self.spark, c.table, c.format)
        note = f"lakelens embed: drop image root {root}"
        rows = with_retries(lambda: table.drop_root(root, note), c.commit_retries, note, self.log)
        self.log(f"lakelens embed: dropped image root {root}: {rows} rows deleted")
        return rows

    def _run(self, spec: ModelSpec) -> EmbedStats:
        t0 = time.time()
        c = self.conf.embed
        spark = self.spark
        phases: dict = {}

        @contextmanager
        def phase(name):
            start = time.time()
            yield
            phases[name] = phases.get(name, 0.0) + time.time() - start

        table = EmbeddingsTable(spark, c.table, c.format)
        root = root_of(c.images)  # the rows this run reconciles: other roots' rows are not its business
        warmup, plan = Warmup(spark, spec, c), None
        try:
            with phase("list"):
                listing = list_files(spark, c.images, c.path_glob)
            with phase("plan"):
                if listing.local is not None:  # a small listing on the driver: ids and plan in one query
                    plan = table.plan_small(listing.local, spec.key, c.max_file_bytes, c.regions, root=root)
                if plan is None:
                    table.check_ids(listing.df, listing.local)  # listed paths against each other and the rows kept
                    plan = table.plan(listing.df, listing.count, spec.key, c.max_file_bytes, c.regions,
                                      listing.local, root=root)
                if c.format == "delta":
                    if c.regions:
                        with_retries(table.add_regions_column, c.commit_retries, "add the regions column", self.log)
                    created = with_retries(lambda: table.create_if_missing([root]), c.commit_retries,
                                           "create the table", self.log)
                    if not created:  # a new table has the folder already
                        with_retries(lambda: table.add_image_root(root), c.commit_retries,
                                     "record the image folder", self.log)
        finally:
            with phase("embed"):  # the workers' start belongs to embedding
                warmup.finish(cancel=plan is None or plan.to_embed == 0)
        stats = EmbedStats(unchanged=plan.unchanged, deleted=plan.deleted, new=plan.new, changed=plan.changed,
                           phases=phases)
        sizes = ChunkSizes(c.chunk_size, c.chunk_seconds)
        run_id = uuid.uuid4().hex[:8]
        grow = f", later ones sized to about {c.chunk_seconds:g} s each" if c.chunk_seconds else ""
        self.log(f"lakelens embed: {spec.key} over {c.images} ({'Spark Connect' if is_connect(spark) else 'classic'} "
                 f"session): new={plan.new} changed={plan.changed} unchanged={plan.unchanged} "
                 f"deleted={plan.deleted}; {plan.to_embed} files to embed in chunks of {c.chunk_size} files{grow}")
        pending = []  # parquet: rows written together at the end

        def commit(rows, note):
            if c.format == "delta":
                with phase("commit"):
                    with_retries(lambda: table.upsert(rows, note, new_only=not plan.changed), c.commit_retries, note,
                                 self.log)
            else:
                pending.append(rows)

        if plan.unread:  # empty and oversize files, names Spark cannot hold: error rows without reading a byte
            commit(self._unread_rows(plan.unread_rows(), spec),
                   f"lakelens embed {run_id}: {plan.unread} files not read (empty, too large or name not UTF-8)")
            stats.failed += plan.unread
        done = 0
        for i, paths in enumerate(plan.chunks(sizes)):
            before = dict(phases)
            with phase("embed"):
                if all(is_local(p) for p in paths):  # the Python workers read the files themselves
                    files = local_paths(spark, paths, self.partitions(len(paths)))
                    with session_settings(spark, {ARROW_BATCH: str(max(c.batch_size, LOCAL_ARROW_BATCH))}):
                        rows = self._rows(files, spec, local=True).localCheckpoint(eager=True)
                else:
                    with file_splits(spark, len(paths), self.partitions(len(paths)), paths):  # planned by the action
                        rows = self._rows(read_files(spark, paths), spec).localCheckpoint(eager=True)
                ok = rows.where(F.col("error").isNull()).count()
            stats.embedded += ok
            stats.failed += len(paths) - ok
            embed_s = phases["embed"] - before.get("embed", 0.0)
            sizes.observe(len(paths), embed_s)
            what = f"chunk {i + 1}, files {done + 1}-{done + len(paths)} of {plan.to_embed}"
            commit(rows, f"lakelens embed {run_id}: {what}")
            done += len(paths)
            stats.chunks += 1
            stats.chunk_seconds.append([len(paths), round(embed_s, 3),
                                        round(phases.get("commit", 0.0) - before.get("commit", 0.0), 3)])
            self.log(f"  {what} committed: {ok} embedded, {len(paths) - ok} failed")
            if self.on_chunk:
                self.on_chunk(i, plan.to_embed - done)
        with phase("delete" if c.format == "delta" else "commit"):
            if c.format == "delta":
                if plan.deleted:
                    note = f"lakelens embed {run_id}: drop {plan.deleted} deleted files"
                    with_retries(lambda: table.delete_missing(listing.df, root, note), c.commit_retries, note,
                                 self.log)
            elif pending or plan.deleted or not table.exists():
                new_rows = pending[0] if pending else None
                for more in pending[1:]:
                    new_rows = new_rows.unionByName(more)
                table.write_parquet_snapshot(listing.df, new_rows, root)
        stats.table_version = table.version()
        stats.seconds = time.time() - t0
        self.log(f"lakelens embed done: {stats.summary()}")
        return stats
