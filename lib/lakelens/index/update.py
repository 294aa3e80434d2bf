"""The Spark side of re-indexing by change: from the change feed (lakelens.ingest.changes), decide what the
next version is, and build an incremental version (delta shards on the executors, tombstones, links to the live files)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lakelens import classic
from lakelens.errors import IndexDirError
from lakelens.index.build import META_COLUMNS, build_batches
from lakelens.index.incremental import (
    Decision,
    index_kind,
    link_version,
    stored_rows,
    write_tombstones,
)
from lakelens.index.layout import TOMBSTONES, TRAINED, delta_file, delta_meta_file
from lakelens.index.meta import ENTRY_COLUMNS
from lakelens.index.shards import (
    dead_ids,
    exact_topk,
    merge_topk,
    open_version,
    read_tombstones,
    search_shards,
    shard_entries,
    shared_quantizer,
)
from lakelens.index.versions import publish, staging_dir
from lakelens.ingest.changes import Changes

ROWS_PER_AUTO_SHARD = 250_000
DRIFT_QUERIES = 100


def entries(rows: DataFrame) -> DataFrame:
    """Image rows (id, path, width, height, embedding[, regions]) -> index entries (ENTRY_COLUMNS and
    embedding): each image as itself (image = id, no box), and each of its regions as entry
    xxhash64(id, r) for r = 1, 2, ... with the image's id, path and size and the region's box."""
    whole = rows.select(*META_COLUMNS, F.col("id").alias("image"), F.lit(None).cast("array<float>").alias("box"),
                        "embedding")
    if "regions" not in rows.columns:
        return whole
    crops = (rows.where(F.col("regions").isNotNull())
             .select(*META_COLUMNS, F.posexplode("regions").alias("r", "region"))
             .select(F.xxhash64("id", F.col("r") + 1).alias("id"), "path", "width", "height", "caption", "locator",
                     F.col("id").alias("image"), F.col("region.box").alias("box"),
                     F.col("region.embedding").alias("embedding")))
    return whole.unionByName(crops)


def recreated(old_id: str | None, new_id: str | None) -> bool:
    """Whether a Delta table is not the one a live version was built from: deleted and made again at the
    same place, it gets a new id (at any version, the same one included). An id the live version does not
    record (versions made before ids were kept) is unknown: the table is taken to be the same one, as
    before ids were kept, so upgrading never forces a rebuild; the next version built records the id."""
    return bool(old_id) and bool(new_id) and old_id != new_id


def precheck(conf, live: dict, source: dict, settings: dict) -> Decision:
    """Reasons for a full build that need no data; kind 'changes' when none applies: the change feed
    decides the rest (decide_from_changes)."""
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
    if recreated(old.get("table_id"), source.get("table_id")):
        return Decision("full", f"the table {source['table']} was re-created since the live version (Delta id "
                                f"{old['table_id']} -> {source['table_id']})")
    if live.get("settings") != settings:
        return Decision("full", f"index settings changed ({live.get('settings')} -> {settings})")
    if source["version"] < old["version"]:
        return Decision("full", f"table version {source['version']} is older than the live version's "
                                f"{old['version']}")
    return Decision("changes", "no reason for a full build without reading the change feed")


def decide_from_changes(conf, live: dict, changes: Changes, choice, rows: int) -> Decision:
    """The rest of the decision, from what the feed shows: `choice` is what `auto` picks for the new row
    count (None for an explicit factory)."""
    if any(m != live["model"]["key"] for m in changes.models):
        return Decision("full", f"the model changed ({live['model']['key']} -> "
                                f"{next(m for m in changes.models if m != live['model']['key'])})")
    if choice is not None and index_kind(choice.factory) != index_kind(live["factory"]):
        return Decision("full", f"auto now chooses {choice.factory} for {rows} rows instead of "
                                f"{live['factory']} ({choice.reason})")
    deltas = len(live.get("deltas", [])) + 1
    if deltas > conf.max_deltas:
        return Decision("compaction", f"{deltas} delta shard generations > index.max_deltas {conf.max_deltas}")
    dead = (live.get("tombstones") or {}).get("count", 0) + changes.live_before
    held = stored_rows(live) + changes.live_after
    if held and dead / held > conf.max_deleted_fraction:
        return Decision("compaction", f"tombstones would be {dead / held:.1%} of the vectors held "
                                      f"> index.max_deleted_fraction {conf.max_deleted_fraction:.0%}")
    return Decision("incremental", f"{changes.count} rows changed between table versions {changes.start - 1} "
                                   f"and {changes.end}")


def shard_rows(df, shards: int):
    """Image rows as index entries (`entries`) with their shard (pmod(image id, shards): an image's regions
    live in its shard), range-partitioned by shard into `shards` partitions (about one shard a task; a
    task given several builds each): a task streams its rows batch by batch into the shards (Spark's Arrow
    batches), never a whole shard in pandas."""
    return (entries(df).select(F.pmod("image", F.lit(shards)).cast("int").alias("shard"), *ENTRY_COLUMNS,
                               "embedding")
            .repartitionByRange(shards, "shard"))


def check_executors_see(spark, staged) -> None:
    """Under Spark Connect the client may sit on another machine than the executors (Databricks Connect):
    the index folder must be the same folder for both. One task looks for the trained structures this
    process just wrote into the staging folder; IndexDirError when it does not find them. A classic
    session's driver is where its executors' shared folder is mounted, as before: nothing to ask."""
    if classic.is_classic(spark):
        return
    target = str(Path(staged) / TRAINED)

    def look(batches):
        for _ in batches:
            pass
        yield pd.DataFrame({"seen": [os.path.isfile(target)]})

    if not spark.range(0, 1, 1, 1).mapInPandas(look, "seen boolean").first()["seen"]:
        shutil.rmtree(staged, ignore_errors=True)
        raise IndexDirError(f"index folder {Path(staged).parent}: the Spark executors do not see what this "
                            "machine wrote there; under Spark Connect the index folder must be a path both see "
                            "(a shared mount, a Databricks volume)")


def build_fn(staged: str, rerank: bool, generation: int = 0):
    """mapInPandas function: the rows of a partition -> their shards' files in the staging folder, written
    on the executor; only (shard, count) comes back to the driver."""

    def build(batches):
        # the trained structures come from the staging folder, which the executors write the shards into
        # anyway: no broadcast (Spark Connect has none), and each task reads them once
        trained = (Path(staged) / TRAINED).read_bytes()
        yield from build_batches(trained, staged, rerank, batches, generation)

    return build


class DecodedCodes:
    """The vectors a compressed IVF shard's codes (SQ, PQ) stand for, decoded a slice of positions at a
    time (positions in list order), with their `ids`: what exact_topk reads in place of the raw vectors a
    shard of an explicit compressed factory does not keep. Their inner products are the scores FAISS
    gives the codes, so exact search over them is the shard visiting every list. ValueError for codes
    that cannot be decoded this way (fast-scan's packed blocks)."""

    def __init__(self, shard):
        self.ivf = ivf = faiss.extract_index_ivf(shard)
        lists = ivf.invlists
        if lists.code_size == faiss.InvertedLists.INVALID_CODE_SIZE:
            raise ValueError(f"{type(faiss.downcast_InvertedLists(lists)).__name__} codes are packed")
        self.code_size, self.prefix = int(lists.code_size), int(ivf.coarse_code_size())
        sizes = np.array([lists.list_size(lst) for lst in range(ivf.nlist)], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        ids = []
        for lst in np.flatnonzero(sizes):
            ptr = lists.get_ids(int(lst))
            ids.append(faiss.rev_swig_ptr(ptr, int(sizes[lst])).copy())
            lists.release_ids(int(lst), ptr)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        try:
            self[:1]
        except RuntimeError as e:  # an index type without standalone decoding
            raise ValueError(str(e).strip().splitlines()[0]) from None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(len(self))
        lists, out = self.ivf.invlists, []
        lst = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            a, b = start - self.starts[lst], min(stop, self.starts[lst + 1]) - self.starts[lst]
            if b > a:
                ptr = lists.get_codes(lst)
                codes = faiss.rev_swig_ptr(ptr, int(b) * self.code_size).reshape(-1, self.code_size)[a:b]
                # FAISS's standalone code: the list number (little-endian), then the list's code
                standalone = np.empty((b - a, self.prefix + self.code_size), np.uint8)
                standalone[:, :self.prefix] = np.array([lst], "<i8").view(np.uint8)[:self.prefix]
                standalone[:, self.prefix:] = codes
                lists.release_codes(lst, ptr)
                out.append(self.ivf.sa_decode(standalone))
                start = int(self.starts[lst] + b)
            lst += 1
        return np.concatenate(out) if out else np.zeros((0, self.ivf.d), np.float32)


def exact_over(folder: Path, manifest: dict, tomb, q: np.ndarray, k: int = 10):
    """Exact top-k of queries over the live vectors of a version's shards (`tomb`: its tombstones): the
    raw vectors beside compressed shards, IVF-Flat's codes, or, for compressed shards without raw vectors
    (an explicit SQ8 or PQ factory), their decoded codes. The probe then measures what the tuned nprobe
    misses against visiting every list, as tune_nprobe does, not the codes' error, which no incremental
    build changes (comparing with the table's vectors would fail PQ's probe on every run)."""
    shards, rerank, excluded, keep = open_version(folder, manifest, mmap=True, tomb=tomb)
    dead = [dead_ids(tomb, e.get("generation", 0)) for e in shard_entries(manifest)]
    try:
        stored = [_stored(shard, raw) for shard, raw in zip(shards, rerank)]
    except ValueError:  # codes FAISS decodes only inside its scan: the scan of every list is the reference
        nlist = faiss.extract_index_ivf(shards[0]).nlist
        result = search_shards(shards, rerank, q, k, nlist, None, int(manifest.get("rerank") or 0), None, None,
                               excluded)
    else:
        result = exact_topk(shards, stored, q, k, dead)
    del keep
    return result


def _stored(shard, raw):
    """What exact_topk reads for one IVF shard: its raw vectors (`raw`), None for IVF-Flat (its codes are
    the vectors), else its codes decoded."""
    ivf = faiss.extract_index_ivf(shard)
    if raw is not None or ivf.invlists.code_size == 4 * ivf.d:
        return raw
    decoded = DecodedCodes(shard)
    return decoded, decoded.ids


def drift_recall(folder: Path, manifest: dict, queries: np.ndarray, k: int = 10, live_exact=None) -> float | None:
    """IVF only: recall@k of the version at its nprobe against exact search over every live vector, on
    the new vectors as queries: centroids trained on old data send new data to too few lists when the
    distribution has moved. The exact side is matrix products over the stored vectors, not FAISS with
    nprobe = nlist (a pass over the whole index per query). `live_exact`: a future of the exact side
    over the shards the version shares with the live one (started beside the delta build); the newest
    deltas are added here. None for index kinds without lists."""
    nprobe = manifest.get("search_params", {}).get("nprobe")
    if not nprobe or not len(queries):
        return None
    tomb = read_tombstones(folder, manifest)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if live_exact is None:
        _, exact = exact_over(folder, manifest, tomb, q, k)
    else:
        newest = {**manifest, "shards": [],
                  "deltas": [d for d in manifest.get("deltas", []) if d["generation"] == manifest["generation"]]}
        _, exact = merge_topk(live_exact.result(), exact_over(folder, newest, tomb, q, k), k)
    shards, rerank, excluded, keep = open_version(folder, manifest, mmap=True, tomb=tomb)
    _, found = search_shards(shards, rerank, q, k, nprobe, None, int(manifest.get("rerank") or 0), None, None,
                             excluded, shared_quantizer(shards))
    del keep
    return float(np.mean([len(set(f) & set(e)) / max(1, len(set(e) - {-1})) for f, e in zip(found, exact)]))


def build_incremental(spark, index_dir: str, live_name: str, live: dict, changes: Changes, source: dict,
                      decision: Decision, min_recall: float, log: Callable[[str], None],
                      finish: Callable | None = None) -> tuple[str | None, str]:
    """Stage and publish an incremental version over `live`. Returns (version, "") or, when the drift
    probe fails, (None, the reason for a full rebuild) with nothing published. The drift probe's costly
    part, exact search over the live version's vectors, runs in a thread while Spark builds the deltas.
    `finish(staged, touched ids) -> manifest entries` adds the keyword part before publishing."""
    generation = int(live.get("generation", 0)) + 1
    staged = staging_dir(index_dir)
    try:
        with ThreadPoolExecutor(1) as pool:
            return _build_incremental(spark, index_dir, live_name, live, changes, source, decision, min_recall,
                                      log, generation, staged, pool, finish)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _build_incremental(spark, index_dir, live_name, live, changes, source, decision, min_recall, log, generation,
                       staged, pool, finish):
    link_version(Path(index_dir) / live_name, staged)
    changed, rows, n = changes.rows, changes.rows_after, changes.live_after
    # the replaced and deleted ids come to the driver: bounded by the change, not by the table
    ids = (changes.tombstones if changes.tombstones is not None else changes.replaced).toPandas()["id"].to_numpy(np.int64)
    tomb = write_tombstones(staged, read_tombstones(Path(index_dir) / live_name, live), ids, generation)
    queries, live_exact = np.zeros((0, live["dim"]), np.float32), None
    if n and live.get("search_params", {}).get("nprobe"):  # IVF: the drift probe's queries are new rows
        probe = changed.limit(DRIFT_QUERIES).select("embedding").toPandas()["embedding"]
        queries = np.ascontiguousarray(np.stack(probe.to_numpy()), dtype=np.float32)
        live_exact = pool.submit(exact_over, staged, live, tomb, queries)
    shards = max(1, math.ceil(n / ROWS_PER_AUTO_SHARD)) if n else 0
    deltas = []
    if n:
        check_executors_see(spark, staged)
        built = (shard_rows(changed, shards)
                 .mapInPandas(build_fn(str(staged), bool(live.get("rerank")), generation), "shard int, count long")
                 .collect())
        deltas = [{"file": delta_file(generation, r["shard"]), "meta": delta_meta_file(generation, r["shard"]),
                   "count": int(r["count"]), "factory": live["factory"], "generation": generation}
                  for r in sorted(built, key=lambda r: r["shard"])]
    images = int(live.get("images", live["rows"])) + changes.images
    manifest = {**live, "rows": int(rows), "images": images, "regions": int(rows) - images,
                "per_image": max(int(live.get("per_image", 1)), changes.per_image),
                "source": source, "build": "incremental",
                "build_reason": decision.reason, "generation": generation,
                "deltas": [*live.get("deltas", []), *deltas],
                "tombstones": {"file": TOMBSTONES, "count": len(tomb)}}
    recall = drift_recall(staged, manifest, queries, live_exact=live_exact) if live_exact is not None else None
    if recall is not None:
        manifest["drift_recall"] = round(recall, 4)
        log(f"lakelens index: drift probe recall@10 {recall:.3f} (target {min_recall})")
        if recall < min_recall:
            shutil.rmtree(staged, ignore_errors=True)
            return None, (f"drift: recall@10 of the new rows at nprobe {manifest['search_params']['nprobe']} "
                          f"is {recall:.3f} < index.min_recall {min_recall}")
    manifest.pop("keywords", None)
    if finish is not None:
        manifest.update(finish(staged, changes.replaced.select("id").unionByName(changed.select("id"))))
    return publish(index_dir, staged, manifest), ""
