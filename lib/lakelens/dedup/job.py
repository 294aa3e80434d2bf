"""Near-duplicate groups of the embeddings table (`lakelens dedup`, jobs/dedup.py).

Exact copies share a `content_sha256`; near copies have vectors with cosine similarity >= threshold.
Near pairs come from a distributed k-NN self-join: with an index, every image's vector is searched over
the live version's shards by the tasks holding them (as the batch query job does); without one, an exact
blockwise self-join of the table's vectors. Pairs are joined into groups by connected components (a
vectorised union-find over the pairs' ids in one task), then the chaining guard (per component, in
parallel): a group's members must all be at
least `guard` similar to its representative (most pixels, then most bytes, then first path); members
below it leave the group and are grouped again among themselves. Nothing per row is collected on the
driver, except the duplicates' (id, group) map written beside an index for the query driver.

A re-run searches only the images the change feed shows as new or changed since the last run's table
version; the pairs found before among the other images are kept (the pairs table `OUT_pairs`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lakelens import delta_sql
from lakelens import index as ix
from lakelens.errors import ConfigError, DataError
from lakelens.files import write_sorted_arrow
from lakelens.index.layout import GROUPS_FILE
from lakelens.ingest.changes import read_changes
from lakelens.ingest.table import EmbeddingsTable
from lakelens.search.batch import as_images, per_image, shard_hits
from lakelens.spark import Job, parallelism, session_settings

PAIRS_SCHEMA = "a long, b long, similarity float"
STATE_KEYS = ("table", "table_id", "index", "threshold", "neighbors")


def pairs_path(out: str) -> str:
    """The pairs table kept beside the groups table (for incremental re-runs)."""
    return out.rstrip("/") + "_pairs"


@dataclass
class DedupResult:
    table_version: int | None
    mode: str  # full | incremental | none
    reason: str
    searched: int  # images whose vectors were searched this run
    pairs: int  # pairs at or over the threshold (exact copies included)
    groups: int
    duplicates: int  # images in groups, representatives included
    split_off: int  # members the chaining guard moved out of a group at least once
    seconds: float
    index_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --- near pairs ---------------------------------------------------------------------------------------

def index_search_fn(folder: str, manifest_text: str, k: int, threshold: float):
    """mapInPandas: (id, embedding, shard) -> pairs (a < b) over the threshold among each image's k nearest
    neighbours in that shard (tombstoned rows excluded, compressed codes re-ranked exactly)."""

    def search(batches):
        for part, _, scores, ids, meta in shard_hits(batches, folder, manifest_text, k + 1, column="embedding"):
            # a region is a crop, never a copy: its hits do not pair (they only take neighbour slots)
            ids = np.where(as_images(ids, meta) == ids, ids, -1)
            rows, cols = np.nonzero((ids != -1) & (scores >= threshold))
            yield _pairs(part["id"].to_numpy()[rows], ids[rows, cols], scores[rows, cols])

    return search


def _pairs(a: np.ndarray, b: np.ndarray, similarity: np.ndarray) -> pd.DataFrame:
    """Pairs as (a < b, similarity), without self pairs."""
    other = a != b
    a, b = a[other], b[other]
    return pd.DataFrame({"a": np.minimum(a, b), "b": np.maximum(a, b), "similarity": similarity[other].astype(np.float32)})


def block_fn():
    """applyInPandas: the rows of one block -> (block, ids, vectors) with the vectors as float32 bytes."""

    def block(pdf: pd.DataFrame) -> pd.DataFrame:
        ids = pdf["id"].to_numpy(np.int64)
        vecs = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
        return pd.DataFrame({"block": [int(pdf["block"].iloc[0])], "ids": [ids.tobytes()], "vecs": [vecs.tobytes()]})

    return block


def exact_pairs_fn(dim: int, threshold: float, symmetric: bool):
    """mapInPandas: (query block, target block) pairs -> every pair over the threshold between them, by a
    matrix product. `symmetric`: the query blocks are the target blocks and only qb <= tb is given, so
    within one block only the upper triangle counts."""

    def run(batches):
        for pdf in batches:
            for row in pdf.itertuples(index=False):
                qi = np.frombuffer(row.q_ids, np.int64)
                ti = np.frombuffer(row.t_ids, np.int64)
                qv = np.frombuffer(row.q_vecs, np.float32).reshape(len(qi), dim)
                tv = np.frombuffer(row.t_vecs, np.float32).reshape(len(ti), dim)
                scores = qv @ tv.T
                rows, cols = np.nonzero(scores >= threshold)
                if symmetric and row.q_block == row.t_block:  # each pair of one block once
                    upper = cols > rows
                    rows, cols = rows[upper], cols[upper]
                yield _pairs(qi[rows], ti[cols], scores[rows, cols])

    return run


def near_pairs_exact(spark, rows: DataFrame, queries: DataFrame | None, n: int, dim: int, c) -> DataFrame:
    """Every pair over the threshold, exactly: blocks of the table's vectors joined with blocks of the
    queries (all rows: each unordered pair of blocks once)."""
    blocks = max(1, math.ceil(n / c.block_rows))

    def blocked(df, count):
        nb = max(1, math.ceil(count / c.block_rows))
        return (df.select("id", "embedding", F.pmod(F.xxhash64("id"), F.lit(nb)).cast("int").alias("block"))
                .groupBy("block").applyInPandas(block_fn(), "block int, ids binary, vecs binary"))

    targets = blocked(rows, n).localCheckpoint()
    t = targets.select(F.col("block").alias("t_block"), F.col("ids").alias("t_ids"), F.col("vecs").alias("t_vecs"))
    if queries is None:
        q = targets.select(F.col("block").alias("q_block"), F.col("ids").alias("q_ids"), F.col("vecs").alias("q_vecs"))
        pairs = q.crossJoin(t).where(F.col("q_block") <= F.col("t_block"))
        tasks = blocks * (blocks + 1) // 2
    else:
        qn = queries.count()
        q = blocked(queries, qn).select(F.col("block").alias("q_block"), F.col("ids").alias("q_ids"),
                                        F.col("vecs").alias("q_vecs"))
        pairs = q.crossJoin(t)
        tasks = blocks * max(1, math.ceil(qn / c.block_rows))
    pairs = pairs.repartition(max(1, min(tasks, 4 * parallelism(spark))))
    return pairs.mapInPandas(exact_pairs_fn(dim, c.threshold, queries is None), PAIRS_SCHEMA)


def near_pairs_index(spark, queries: DataFrame, index_dir: str, version: str, manifest: dict, c) -> DataFrame:
    """Pairs over the threshold among each query's `neighbors` nearest in the live version: every
    (query, shard) pair searched by the task holding the shard."""
    folder = str(Path(index_dir).resolve() / version)
    entries = len(manifest["shards"]) + len(manifest.get("deltas", []))
    pairs = (queries.select("id", "embedding")
             .crossJoin(spark.range(entries).select(F.col("id").cast("int").alias("shard")))
             .repartition(max(1, min(entries, parallelism(spark) * 2)), "shard"))
    # an image's regions may sit among its neighbours: search as deep as they could fill
    return pairs.mapInPandas(index_search_fn(folder, json.dumps(manifest), c.neighbors * per_image(manifest),
                                             c.threshold), PAIRS_SCHEMA)


def exact_copy_pairs(rows: DataFrame) -> DataFrame:
    """Rows with the same content_sha256: each joined to the group's smallest id, similarity 1."""
    first = rows.where(F.col("content_sha256").isNotNull()).groupBy("content_sha256").agg(
        F.min("id").alias("a"), F.count(F.lit(1)).alias("n")).where("n > 1")
    return (rows.join(first, "content_sha256").where(F.col("id") != F.col("a"))
            .select("a", F.col("id").alias("b"), F.lit(1.0).cast("float").alias("similarity")))


# --- groups -------------------------------------------------------------------------------------------

def label_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the pairs (a[i], b[i]): (nodes, label) with each node's label the smallest
    id of its component. Vectorised union by hooking roots to the smaller root, then pointer jumping."""
    nodes, inv = np.unique(np.concatenate([a, b]).astype(np.int64), return_inverse=True)
    ea, eb = inv[:len(a)], inv[len(a):]
    parent = np.arange(len(nodes))
    while True:
        ra, rb = parent[ea], parent[eb]
        if (ra == rb).all():
            return nodes, nodes[parent]
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)
        np.minimum.at(parent, rb, low)
        while True:  # every node straight to its root
            up = parent[parent]
            if (up == parent).all():
                break
            parent = up


def components_fn():
    """mapInPandas over one partition holding every pair: (v, label) of each node in a pair. Ids only, 16
    bytes a pair, in one task; the groups' work is spread per component afterwards."""

    def run(batches):
        parts = [(pdf["a"].to_numpy(np.int64), pdf["b"].to_numpy(np.int64)) for pdf in batches]
        if not parts:
            return
        nodes, label = label_components(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        yield pd.DataFrame({"v": nodes, "label": label})

    return run


def components(edges: DataFrame) -> DataFrame:
    """(v, label) of the pair graph's connected components, label the smallest id of each."""
    return edges.select("a", "b").repartition(1).mapInPandas(components_fn(), "v long, label long")


GROUP_ROWS = "group long, id long, path string, similarity float, representative boolean, split boolean"
GROUP_ROWS_COLS = [field.split()[0] for field in GROUP_ROWS.split(", ")]


def guard_fn(guard: float):
    """cogroup applyInPandas per component: (members, pairs) -> each member's group under the chaining
    guard. The representative is the member with the most pixels, then most bytes, then first path;
    members below `guard` to it leave, and the pairs among those who left make their groups, again under
    the guard, until every group holds. Members left alone get no group."""

    def run(members: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
        if members.empty:
            return pd.DataFrame(columns=GROUP_ROWS_COLS)
        members = members.assign(pixels=members["width"].fillna(0).astype(np.int64) * members["height"].fillna(0)
                                 .astype(np.int64)).sort_values(["pixels", "size_bytes", "path", "id"],
                                                                ascending=[False, False, True, True])
        ids = members["id"].to_numpy(np.int64)
        vecs = np.stack(members["embedding"].to_numpy()).astype(np.float32)
        by_id = np.argsort(ids)  # both ends of a component's pairs are among its members
        a = by_id[np.searchsorted(ids, pairs["a"].to_numpy(np.int64), sorter=by_id)]
        b = by_id[np.searchsorted(ids, pairs["b"].to_numpy(np.int64), sorter=by_id)]
        group = np.zeros(len(ids), np.int64)
        grouped = np.zeros(len(ids), bool)  # ids are signed 64-bit: no id can mark "no group"
        similarity = np.zeros(len(ids), np.float32)
        split = np.zeros(len(ids), bool)
        todo = [np.arange(len(ids))]  # positions, in representative order
        while todo:
            pos = todo.pop()
            rep = pos[0]  # rows are sorted by the representative's order, so the first one
            sims = vecs[pos] @ vecs[rep]
            sims[0] = 1.0
            ok = sims >= guard
            if ok.sum() > 1:
                group[pos[ok]] = ids[rep]
                grouped[pos[ok]] = True
                similarity[pos[ok]] = sims[ok]
            out = pos[~ok]
            split[out] = True
            if len(out) > 1:  # those who left: their own pairs, their own components
                inside = np.isin(a, out) & np.isin(b, out)
                if inside.any():
                    nodes, label = label_components(a[inside], b[inside])
                    for lab in np.unique(label):
                        todo.append(np.sort(nodes[label == lab]))
        return pd.DataFrame({"group": pd.Series(group, dtype="Int64").where(grouped),
                             "id": ids, "path": members["path"].to_numpy(), "similarity": similarity,
                             "representative": grouped & (group == ids), "split": split})

    return run


def groups_with_guard(edges: DataFrame, rows: DataFrame, guard: float) -> DataFrame:
    """Each image in a pair -> (group, id, path, similarity, representative, split): the components of
    the pairs (one task), then the chaining guard per component (in parallel). The group is named by its
    representative's id; group is null for an image the guard left alone."""
    labels = components(edges).localCheckpoint()
    info = rows.select("id", "path", "width", "height", "size_bytes", "embedding")
    members = labels.join(info.withColumnRenamed("id", "v"), "v").withColumnRenamed("v", "id")
    pairs = edges.join(labels.select(F.col("v").alias("a"), F.col("label").alias("pair_label")), "a")
    return (members.groupBy("label").cogroup(pairs.select("pair_label", "a", "b").groupBy("pair_label"))
            .applyInPandas(guard_fn(guard), GROUP_ROWS))


# --- the job ------------------------------------------------------------------------------------------

class DedupJob(Job):
    """`DedupJob(spark=None, conf=None).launch()` -> DedupResult."""

    def __init__(self, spark=None, conf=None, log: Callable[[str], None] = print):
        super().__init__(spark, conf)
        self.log = log

    def run(self) -> DedupResult:
        t0 = time.time()
        c, spark = self.conf.dedup, self.spark
        if not c.table:
            raise ConfigError("dedup.table: required (the embeddings table; --table)")
        if not c.out:
            raise ConfigError("dedup.out: required (the duplicates table to write; --out)")
        table = EmbeddingsTable(spark, c.table, c.format)
        if not table.exists():
            raise DataError(f"dedup.table: no {c.format} table at {c.table}")
        index_version, manifest, table_id = None, None, table.table_id()
        if c.index:
            index_version = ix.current_version(c.index)
            if index_version is None:
                raise ix.IndexDirError(f"dedup.index: no published index in {c.index}")
            manifest = ix.read_manifest(c.index, index_version)
            same_table = (manifest["source"].get("table_id") == table_id if manifest["source"].get("table_id")
                          else manifest["source"]["table"] == table.location)
            if not same_table:
                raise DataError(f"dedup.index: {c.index} indexes {manifest['source']['table']}, not {table.location}")
            version = manifest["source"].get("version")  # the table as the index holds it
        else:
            version = table.version()
        ok = F.col("error").isNull() & F.col("embedding").isNotNull()
        rows = (table.read(version).where(ok)
                .select("id", "path", "content_sha256", "size_bytes", "width", "height", "embedding"))
        state = {"table": table.location, "table_id": table_id, "index": str(Path(c.index).resolve()) if c.index else "",
                 "threshold": c.threshold, "neighbors": c.neighbors if c.index else 0}
        previous = self._previous_state(c.out) if not c.full else None
        mode, reason = "full", "--full" if c.full else "no earlier run"
        if previous is not None:
            same = all(previous.get(key) == state[key] for key in STATE_KEYS)
            if not same:
                mode, reason = "full", "the table, index or settings differ from the last run's"
            elif version is None:
                mode, reason = "full", "a Parquet table has no change feed"
            elif previous.get("version") is None or previous["version"] > version:
                mode, reason = "full", f"the last run read a later table version ({previous.get('version')})"
            elif previous.get("version") == version and previous.get("guard") == c.guard:
                return DedupResult(version, "none", f"the table is unchanged since the last run (version {version})",
                                   0, previous.get("pairs", 0), previous.get("groups", 0), previous.get("duplicates", 0),
                                   0, time.time() - t0, index_version)
            else:
                mode, reason = "incremental", f"changes of table versions {previous['version'] + 1}..{version}"
        queries, touched = None, None
        if mode == "incremental" and previous["version"] < version:
            try:
                changes = read_changes(spark, table.location, previous["version"] + 1, version)
            except LookupError as e:
                mode, reason = "full", f"the change feed does not cover the range ({e})"
            else:
                touched = changes.replaced.select("id").unionByName(changes.rows.select("id")).distinct().localCheckpoint()
                queries = rows.join(touched, "id", "left_semi")
        elif mode == "incremental":  # same table version, another guard: regroup the stored pairs
            touched = spark.range(0).select(F.col("id").cast("long"))
            queries = rows.limit(0)
        n = rows.count()
        searched = n if queries is None else queries.count()
        self.log(f"lakelens dedup: {mode} ({reason}): searching {searched} of {n} images "
                 f"({'index ' + index_version if c.index else 'exact blockwise'}; threshold {c.threshold})")
        if n == 0 or searched == 0:
            near = spark.createDataFrame([], PAIRS_SCHEMA)
        elif c.index:
            near = near_pairs_index(spark, rows if queries is None else queries, c.index, index_version, manifest, c)
        else:
            dim = len(rows.select("embedding").first()["embedding"])
            near = near_pairs_exact(spark, rows, queries, n, dim, c)
        if mode == "incremental":  # the pairs found before, among images this run did not touch
            near = near.unionByName(spark.read.format("delta").load(pairs_path(c.out))
                                    .join(touched.withColumnRenamed("id", "a"), "a", "left_anti")
                                    .join(touched.withColumnRenamed("id", "b"), "b", "left_anti")
                                    .select("a", "b", "similarity"))
        # a pair found from both of its images (index path), or found before and again, once
        near = near.groupBy("a", "b").agg(F.max("similarity").alias("similarity")).localCheckpoint()
        near.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(pairs_path(c.out))
        edges = (near.unionByName(exact_copy_pairs(rows)).groupBy("a", "b").agg(F.max("similarity").alias("similarity"))
                 .localCheckpoint())
        n_pairs = edges.count()
        everyone = groups_with_guard(edges, rows, c.guard).localCheckpoint()
        counts = everyone.agg(F.count("group").alias("n"), F.countDistinct("group").alias("g"),
                              F.sum(F.col("split").cast("long")).alias("split")).first()
        groups = everyone.where(F.col("group").isNotNull()).drop("split")
        result = DedupResult(version, mode, reason, searched, n_pairs, int(counts["g"]), int(counts["n"]),
                             int(counts["split"] or 0), 0.0, index_version)
        if result.split_off:
            self.log(f"lakelens dedup: chaining guard: {result.split_off} images below {c.guard} to their "
                     "representative, grouped again among themselves")
        meta = {**state, "version": version, "guard": c.guard, "pairs": n_pairs, "groups": result.groups,
                "duplicates": result.duplicates}
        with session_settings(spark, {delta_sql.SKIP_EMPTY_COMMITS: "false"}):  # no groups is a run too
            (delta_sql.plain_types(groups).write.format("delta").mode("overwrite").option("overwriteSchema", "true")
             .option("userMetadata", json.dumps(meta)).save(c.out))
        if c.index:
            write_groups_file(groups, Path(c.index), index_version, version)
        result.seconds = round(time.time() - t0, 1)
        self.log(f"lakelens dedup: {result.groups} groups of {result.duplicates} images from {n_pairs} pairs "
                 f"({result.seconds} s)")
        return result

    def _previous_state(self, out: str) -> dict | None:
        spark = self.spark
        if not (delta_sql.is_delta(spark, out) and delta_sql.is_delta(spark, pairs_path(out))):
            return None
        text = delta_sql.history(spark, out, 1)[0]["userMetadata"]
        try:
            state = json.loads(text) if text else None
        except json.JSONDecodeError:
            return None
        return state if isinstance(state, dict) and "version" in state else None


def write_groups_file(groups: DataFrame, index_dir: Path, index_version: str, table_version) -> Path:
    """The groups beside the index for the query driver (collapse_duplicates, /api/duplicates)."""
    return write_groups_arrow(groups.toArrow(), index_dir, index_version, table_version)


def write_groups_arrow(table, index_dir: Path, index_version: str, table_version) -> Path:
    """(group, id, path, similarity, representative) rows as an Arrow file sorted by id, replaced atomically."""
    target = Path(index_dir) / GROUPS_FILE
    write_sorted_arrow(target, table.replace_schema_metadata({"index_version": index_version,
                                                              "table_version": str(table_version)}))
    return target
