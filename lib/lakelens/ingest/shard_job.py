"""The embed job over images inside containers: WebDataset shards (`embed.source: webdataset`) listed like files, planned
per shard against the table (a shard of the same size and modification time is not read again), spread
over tasks that each read a shard sequentially and embed its image members a batch at a time, committed
a chunk of shards per Delta commit, rows of removed shards deleted at the end."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakelens.errors import ConfigError
from lakelens.ingest.listing import list_files, millis_to_times
from lakelens.ingest.paths import is_remote, root_of, to_local
from lakelens.ingest.shards import ShardError, member_path, read_members
from lakelens.ingest.storage import S3Settings
from lakelens.ingest.table import SOURCE_UDF_SCHEMA, EmbeddingsTable, path_id_col, under_root, with_retries
from lakelens.spark import parallelism

SHARD_GLOB = "*.tar"
# Image members per Arrow batch a shard task yields (a model batch at most; members are small).
MEMBERS_PER_BATCH = 32


def open_shard(path: str, s3: S3Settings | None):
    """A forward-only binary stream of the shard at stored `path` (local, or s3a through pyarrow)."""
    if is_remote(path):
        scheme, _, rest = path.partition("://")
        return (s3 or S3Settings()).filesystem().open_input_stream(rest)
    return open(to_local(path), "rb", buffering=1 << 20)


def _rows(shard: dict, members: list, results: list) -> pd.DataFrame:
    """Output rows (SOURCE_UDF_SCHEMA) for `members` of `shard` (dict: path, size_bytes, modified)."""
    n = len(members)
    errors = [m.error or (r.error if r is not None else None) for m, r in zip(members, results)]
    return pd.DataFrame({
        "path": [member_path(shard["path"], m.name) for m in members],
        "content_sha256": [hashlib.sha256(m.data).hexdigest() if m.data and not e else None
                           for m, e in zip(members, errors)],
        "size_bytes": pd.Series([m.size for m in members], dtype="int64"),
        "modified": millis_to_times([shard["millis"]] * n),
        "width": pd.array([r.width if r is not None and not m.error else None for m, r in zip(members, results)],
                          dtype="Int32"),
        "height": pd.array([r.height if r is not None and not m.error else None for m, r in zip(members, results)],
                           dtype="Int32"),
        "embedding": [r.embedding if r is not None and not m.error else None for m, r in zip(members, results)],
        "error": errors,
        "regions": [None if r is None or r.regions is None or m.error else
                    [{"box": list(box), "embedding": vec} for box, vec in r.regions] for m, r in zip(members, results)],
        "caption": [m.caption for m in members],
        "container": [{"path": shard["path"], "size_bytes": shard["size_bytes"], "modified": shard["when"],
                       "offset": m.offset, "column": None, "key_column": None, "key": None, "rows": None} for m in members],
    })


def _error_row(shard: dict, failure: ShardError) -> pd.DataFrame:
    """The row of a shard that could not be read to its end: its own path, the reason, no vector."""
    return pd.DataFrame({
        "path": [shard["path"]], "content_sha256": [None], "size_bytes": pd.Series([shard["size_bytes"]], dtype="int64"),
        "modified": millis_to_times([shard["millis"]]), "width": pd.array([None], dtype="Int32"),
        "height": pd.array([None], dtype="Int32"), "embedding": [None], "error": [failure.error],
        "regions": [None], "caption": [None],
        "container": [{"path": shard["path"], "size_bytes": shard["size_bytes"], "modified": shard["when"],
                       "offset": None, "column": None, "key_column": None, "key": None, "rows": None}]})


def shard_embedder(build: Callable, max_bytes: int, caption_key: str, s3: S3Settings | None):
    """The mapInPandas function: (path, size_bytes, millis) rows of shards -> rows of SOURCE_UDF_SCHEMA, one per
    image member (and one per shard read only in part). `build()` returns the worker's Embedder."""

    def embed_shards(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        embedder = build()

        def members() -> Iterator[tuple]:
            for pdf in batches:
                for shard in pdf.to_dict("records"):
                    shard["when"] = millis_to_times([shard["millis"]])[0].to_pydatetime()
                    try:
                        stream = open_shard(shard["path"], s3)
                    except (OSError, ValueError) as e:
                        if shard["part"] == 0:
                            yield shard, ShardError("unreadable", str(e))
                        continue
                    with stream:
                        batch = []
                        for item in read_members(stream, max_bytes, caption_key, shard["part"], shard["parts"]):
                            if isinstance(item, ShardError):
                                if batch:
                                    yield shard, batch
                                    batch = []
                                if shard["part"] == 0:  # one row for the shard, whichever tasks read it
                                    yield shard, item
                                continue
                            batch.append(item)
                            if len(batch) >= MEMBERS_PER_BATCH:
                                yield shard, batch
                                batch = []
                        if batch:
                            yield shard, batch

        def tagged():  # failures pass through the embedder as empty batches, keeping their place
            for shard, item in members():
                if isinstance(item, ShardError):
                    yield (shard, item), []
                else:
                    yield (shard, item), [m.data if m.data is not None and not m.error else b"" for m in item]

        for (shard, item), results in embedder.stream(tagged()):
            if isinstance(item, ShardError):
                yield _error_row(shard, item)
            else:
                yield _rows(shard, item, results)

    return embed_shards


def shard_tasks(spark: SparkSession, shards: pd.DataFrame, parallelism: int) -> DataFrame:
    """(path, size_bytes, millis, part, parts) rows, one task each: every shard, split into `parts` tasks when
    there are too few shards to keep `parallelism` cores busy to the end (each part reads the shard and
    embeds every parts-th image; reading is cheap beside embedding). One task per partition, so Spark
    hands the next one to whichever core is free. The list travels inside the function: no file index and
    no shard bytes pass through the JVM."""
    parts = max(1, min(8, -(-4 * parallelism // max(1, len(shards)))))
    records = [(r["path"], int(r["size_bytes"]), int(r["millis"]), part, parts)
               for r in shards[["path", "size_bytes", "millis"]].to_dict("records") for part in range(parts)]
    n = max(1, len(records))

    def emit(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            for i in pdf["id"]:
                path, size, millis, part, count = records[int(i)]
                yield pd.DataFrame({"path": pd.Series([path], dtype=object), "size_bytes": [size], "millis": [millis],
                                    "part": [part], "parts": [count]})

    return spark.range(0, n, 1, n).mapInPandas(emit, "path string, size_bytes long, millis long, part int, parts int")


@dataclass
class ContainerPlan:
    """Containers (shards, or a table's data files) to read (new, then changed; sorted by path) and what the
    table holds of the rest."""

    listing: pd.DataFrame  # path, size_bytes, millis of every listed container
    to_read: pd.DataFrame
    new: int
    changed: int
    unchanged: int
    deleted: int  # rows to delete: of containers gone, and of plain files under the root
    changed_paths: list


def plan_containers(table: EmbeddingsTable, listing: DataFrame, root: str, model_key: str, regions: bool) -> ContainerPlan:
    """Each listed container against the table's rows of image root `root`: new (no rows), changed (another
    size, modification time or model, or regions wanted and missing), unchanged. Per container a row of
    facts comes to the driver (containers are few: thousands of images each)."""
    # times as epoch milliseconds computed by Spark: pandas would see them in the session's time zone
    rows_col = F.col("rows") if "rows" in listing.columns else F.lit(None).cast("long")
    listed = (listing.select("path", "size_bytes", F.unix_millis("modified").alias("millis"), rows_col.alias("rows"))
              .toPandas().sort_values("path", kind="stable").reset_index(drop=True))
    stored = pd.DataFrame(columns=["path", "size_bytes", "millis", "rows", "stale"])
    deleted = 0
    if table.exists():
        rows = table.read()
        if "container" in rows.columns:
            lacks = (F.col("regions").isNull() & F.col("error").isNull()) if regions and "regions" in rows.columns \
                else F.lit(False)
            mine = rows.where(under_root(root))
            per = (mine.where(F.col("container").isNotNull())
                   .groupBy(F.col("container.path").alias("path"))
                   .agg(F.min("container.size_bytes").alias("size_bytes"), F.max("container.size_bytes").alias("size_max"),
                        F.min(F.unix_millis("container.modified")).alias("millis"),
                        F.max(F.unix_millis("container.modified")).alias("mod_max"),
                        F.max("container.rows").alias("rows"),
                        F.max(((F.col("model") != F.lit(model_key)) & F.col("error").isNull()) | lacks).alias("stale"))
                   .toPandas())
            # a shard whose rows disagree (a run stopped between commits) is read again
            per["stale"] = per["stale"] | (per["size_bytes"] != per["size_max"]) | (per["millis"] != per["mod_max"])
            stored = per[["path", "size_bytes", "millis", "rows", "stale"]]
            loose = mine.where(F.col("container").isNull()).count()
        else:
            loose = rows.where(under_root(root)).count()
        names = set(listed["path"])
        gone = stored[~stored["path"].isin(names)]
        deleted = loose + (int(table.read().where(under_root(root) & F.col("container.path").isin(list(gone["path"])))
                               .count()) if len(gone) else 0)
    both = listed.merge(stored, on="path", how="left", suffixes=("", "_old"))
    is_new = both["size_bytes_old"].isna()
    # a table's data file whose live rows changed (a Delta delete through a deletion vector) changed too
    fewer = both["rows"].notna() & both["rows_old"].notna() & (both["rows"] != both["rows_old"])
    changed = ~is_new & ((both["size_bytes"] != both["size_bytes_old"]) | (both["millis"] != both["millis_old"]) | fewer
                         | both["stale"].astype("boolean").fillna(False).astype(bool))
    to_read = both[is_new | changed][["path", "size_bytes", "millis"]].reset_index(drop=True)
    return ContainerPlan(listed[["path", "size_bytes", "millis"]], to_read, int(is_new.sum()), int(changed.sum()),
                         int((~is_new & ~changed).sum()), deleted, sorted(both.loc[changed, "path"]))


def container_chunks(containers: pd.DataFrame, images: int) -> Iterator[pd.DataFrame]:
    """Consecutive containers whose bytes add up to about `images` typical images (120 kB each), at least one."""
    budget = max(1, images) * 120_000
    start, total = 0, 0
    for i, size in enumerate(containers["size_bytes"]):
        total += int(size)
        if total >= budget:
            yield containers.iloc[start:i + 1]
            start, total = i + 1, 0
    if start < len(containers):
        yield containers.iloc[start:]


@dataclass
class ContainerSource:
    """Images inside containers (WebDataset shards, or a table's data files), for `run_containers`: what
    they are called in the log, the root their rows' paths lie under, the listing of containers (path,
    size_bytes, modified), and `embed(containers) -> rows of SOURCE_UDF_SCHEMA`. `merge_all`: a row may
    move from one container to another (a table's key into a rewritten data file), so every commit
    updates rows it matches instead of only inserting new ones."""

    what: str
    root: str
    listing: DataFrame
    embed: Callable[[pd.DataFrame], DataFrame]
    merge_all: bool = False


def shard_source(job, build: Callable) -> ContainerSource:
    """The WebDataset shards under embed.images (`*.tar`, or embed.path_glob)."""
    c, spark = job.conf.embed, job.spark
    listing = list_files(spark, c.images, c.path_glob or SHARD_GLOB)
    embed = shard_embedder(build, c.max_file_bytes, c.caption_key, S3Settings.from_config(job.conf))

    def rows(chunk: pd.DataFrame) -> DataFrame:
        return shard_tasks(spark, chunk, parallelism(spark)).mapInPandas(embed, SOURCE_UDF_SCHEMA)

    return ContainerSource(f"the WebDataset shards of {c.images}", root_of(c.images), listing.df, rows)


def run_containers(job, spec, source: ContainerSource, stats, log, ready: Callable[[int], None] | None = None):
    """Embed the images inside `source`'s containers into the job's table, a chunk of containers per Delta
    commit: new and changed containers are read whole, unchanged ones not at all, rows of containers gone
    (and plain files' rows under the root) deleted at the end. `stats`: an EmbedStats to fill; `ready(n)` is
    told the containers to read once the plan is made (the job's worker warm-up waits for it)."""
    t0 = time.time()
    c, spark = job.conf.embed, job.spark
    if c.format != "delta":
        raise ConfigError("embed.format: images from shards or tables need a Delta embeddings table (delta)")
    table = EmbeddingsTable(spark, c.table, c.format)
    root = source.root
    phases: dict = {"list": time.time() - t0}
    t = time.time()
    plan = plan_containers(table, source.listing, root, spec.key, c.regions)
    created = with_retries(lambda: table.create_if_missing([root]), c.commit_retries, "create the table", log)
    if not created:
        with_retries(lambda: table.add_columns(["caption", "container", *(["regions"] if c.regions else [])]),
                     c.commit_retries, "add the caption and container columns", log)
        with_retries(lambda: table.add_image_root(root), c.commit_retries, "record the image folder", log)
    phases["plan"] = time.time() - t
    if ready is not None:
        t = time.time()
        ready(len(plan.to_read))
        phases["embed"] = time.time() - t  # the workers' start belongs to embedding
    stats.unchanged, stats.new, stats.changed, stats.phases = plan.unchanged, plan.new, plan.changed, phases
    log(f"lakelens embed: {spec.key} over {source.what}: new={plan.new} changed={plan.changed} "
        f"unchanged={plan.unchanged}, {plan.deleted} rows of removed ones to delete")
    run_id = uuid.uuid4().hex[:8]
    changed = set(plan.changed_paths)
    done = 0
    for i, chunk in enumerate(container_chunks(plan.to_read, c.chunk_size)):
        t = time.time()
        rows = (source.embed(chunk)
                .select(path_id_col().alias("id"), "*", F.lit(spec.key).alias("model"),
                        F.current_timestamp().alias("embedded_at"))
                .localCheckpoint(eager=True))
        counts = rows.agg(F.count(F.lit(1)).alias("n"), F.count(F.col("embedding")).alias("ok")).first()
        table.check_ids(rows)  # members' ids are known only once their shards are read
        embed_s = time.time() - t
        phases["embed"] = phases.get("embed", 0.0) + embed_s
        again = [p for p in chunk["path"] if p in changed]
        if again:  # rows of images the changed containers no longer hold: the commit deletes them
            stats.deleted += (table.read().where(F.col("container.path").isin(again))
                              .join(rows.select("path"), "path", "left_anti").count())
        what = f"chunk {i + 1}, {done + 1}-{done + len(chunk)} of {len(plan.to_read)}"
        note = f"lakelens embed {run_id}: {what}"
        t = time.time()
        with_retries(lambda: table.upsert(rows, note, new_only=not (again or source.merge_all), containers=again),
                     c.commit_retries, note, log)
        phases["commit"] = phases.get("commit", 0.0) + time.time() - t
        stats.chunk_seconds.append([int(counts["n"]), round(embed_s, 3), round(time.time() - t, 3)])
        stats.embedded += int(counts["ok"])
        stats.failed += int(counts["n"]) - int(counts["ok"])
        stats.chunks += 1
        done += len(chunk)
        log(f"  {what} committed: {int(counts['ok'])} images embedded, {int(counts['n']) - int(counts['ok'])} failed")
        if job.on_chunk:
            job.on_chunk(i, len(plan.to_read) - done)
    t = time.time()
    if plan.deleted:  # counted again: rows that moved into a container read above stay
        mine = table.read().where(under_root(root))
        gone = (mine.where(F.col("container").isNull()).count()
                + mine.join(source.listing.select(F.col("path").alias("_container")),
                            F.col("container.path") == F.col("_container"), "left_anti")
                .where(F.col("container").isNotNull()).count())
        if gone:
            note = f"lakelens embed {run_id}: drop rows of {gone} images whose containers are gone"
            with_retries(lambda: table.delete_missing_containers(source.listing, root, note), c.commit_retries, note,
                         log)
        stats.deleted += gone
    phases["delete"] = time.time() - t
    stats.table_version = table.version()
    stats.seconds = time.time() - t0
    log(f"lakelens embed done: {stats.summary()}")
    return stats
