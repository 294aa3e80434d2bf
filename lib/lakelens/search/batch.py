"""Batch queries as a Spark job (`lakelens search --queries FILE --out RESULTS`): a distributed k-NN over
the live version's shards. Each query is parsed as a single query is (search/query.py: filters, phrases,
query arithmetic) and embedded on the executors; each shard is searched for every query by the task that
holds it (shards are loaded once per Python worker), a query's filters applied there to the shard's own
entries; the per-shard top lists are merged per query by Spark in the Searcher's order (score, then
shard, then place in the shard's list) into (query_id, query, rank, id, path, score, error) rows. Nothing
per query is collected on the driver.

Queries are keyed by their row in the file (from 0), so two queries never share a top list: a missing
query_id is that row number, and a query_id given more than once (or not an integer) is an error row for
each query that carries it."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens import index as ix
from lakelens.errors import DataError, QueryError
from lakelens.ingest.small_tables import check_columns, spark_table, table_format
from lakelens.search.query import ParsedQuery, parse_query

RESULT_SCHEMA = "query_id long, query string, rank int, id long, path string, score float, error string"
VECTORS_SCHEMA = "row long, query_id long, query string, vector array<float>, error string"
# k1, k2, k3: the order of a query's hits: (-score, shard, place in the shard's list) for a vector search,
# (0, 0, place in the tag's best-first list or the id) when a query of filters only browses
HITS_SCHEMA = "row long, query_id long, query string, id long, path string, score float, k1 float, k2 long, k3 long"
EMPTY_QUERY = "empty query text: give words, an image, or a filter such as tag:dog"  # as Searcher.search says


def check_queries_file(path: str) -> None:
    """DataError for a local queries file that is not there, looked for before Spark reads it: Spark's own
    look-up logs a JVM warning with a Java stack trace before its error. URIs are left to Spark."""
    from lakelens.config import has_scheme
    from lakelens.ingest.paths import to_local, to_stored

    text = str(path)
    if has_scheme(text) and not text.startswith("file:"):  # s3a://, dbfs:/, hdfs://: Spark's to find
        return
    local = to_local(to_stored(text))
    if not any(ch in str(local) for ch in "*?[{") and not local.exists():
        raise DataError(f"queries: no file at {path}")


def read_queries(spark, path: str):
    """(row, query_id, query, error) of a text file (one query a line), a CSV with a `query` column (and
    optionally `query_id`) or Parquet: `row` is the query's row in the file (from 0), `query_id` the one
    given or else the row, and `error` says why a query_id is unusable (not an integer, or given twice)."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    check_queries_file(path)
    fmt = table_format(str(path), lines=True)
    try:
        df = spark_table(spark, str(path), fmt)
        if fmt == "text":
            df = df.withColumnRenamed("value", "query")
        columns = df.columns  # analysed here under Spark Connect too, so a missing file is found now
    except AnalysisException as e:
        if "PATH_NOT_FOUND" in str(e) or "Path does not exist" in str(e):
            raise DataError(f"queries: no file at {path}") from None
        raise
    check_columns(columns, ["query"], path, "queries")
    given = F.col("query_id") if "query_id" in columns else F.lit(None).cast("string")
    # query files are small: in one partition, Spark's increasing ids are the rows' places in the file
    numbered = (df.coalesce(1).select(F.col("query").cast("string").alias("query"),
                                      given.cast("string").alias("given"))
                .withColumn("row", F.monotonically_increasing_id()))
    raw = F.trim(F.col("given"))
    missing = F.col("given").isNull() | (raw == "")
    as_id = raw.try_cast("long")
    numbered = numbered.withColumn("query_id", F.when(missing, F.col("row")).otherwise(as_id))
    same = Window.partitionBy("query_id")
    return (numbered
            .withColumn("n", F.count(F.lit(1)).over(same))
            .withColumn("rows", F.array_join(F.array_sort(F.collect_list("row").over(same)), ", "))
            .select("row", "query_id", "query", F.when(
                F.col("query_id").isNull(), F.format_string("query_id %s is not an integer", F.col("given")))
                .when(F.col("n") > 1, F.format_string(
                    "query_id %d is given twice or more (rows %s of the file, counted from 0, or a row without "
                    "one there): give each query its own", F.col("query_id"), F.col("rows")))
                .alias("error")))


def embed_fn(model_key: str, engine: str, onnx_cache: str, version: str, keywords: bool):
    """mapInPandas: queries -> their vectors (the query's text after its filters, with query arithmetic),
    no vector for a query of filters only, or an error per bad query (as a single query would raise it)."""

    def embed(batches):
        from lakelens.ingest.embedder import cached_embedder
        from lakelens.models.registry import ModelSpec
        from lakelens.search.keyword_side import need
        from lakelens.search.query_vectors import QUERY_MAX_PIXELS, query_vector

        embedder = None

        def embed_text(term: str):
            nonlocal embedder
            if embedder is None:
                embedder = cached_embedder(ModelSpec.from_key(model_key), 32, 1, False, QUERY_MAX_PIXELS, engine,
                                           onnx_cache=onnx_cache)
            return embedder.embed_texts([term.strip()])[0], []

        for pdf in batches:
            vectors, errors = [], []
            for text, error in zip(pdf["query"], pdf["error"]):
                vector = None
                if error is None:
                    try:
                        q = parse_query(text)
                        if (q.tags or q.not_tags) and not keywords:
                            need(None, version, "tag: filters")
                        if q.has_text:
                            vector = query_vector(embed_text, q.text)[0]
                        elif not q.has_filters:
                            raise QueryError(EMPTY_QUERY)
                    except QueryError as e:
                        error = str(e)
                vectors.append(vector)
                errors.append(error)
            yield pd.DataFrame({"row": pdf["row"], "query_id": pdf["query_id"], "query": pdf["query"],
                                "vector": vectors, "error": errors})

    return embed


@functools.lru_cache(maxsize=4)
def _opened(folder: str, manifest_text: str):
    """A version's shards, their exclusions and metadata, opened once per Python worker."""
    from lakelens.index.meta import read_meta
    from lakelens.index.shards import open_version, shard_entries

    manifest = json.loads(manifest_text)
    shards, rerank, excluded, keep = open_version(Path(folder), manifest, mmap=True)
    metas = []
    for e in shard_entries(manifest):
        table = read_meta(Path(folder) / e["meta"])
        images = table.column("image").to_numpy() if "image" in table.column_names else None
        metas.append((table.column("id").to_numpy(), table.column("path"), images))
    return manifest, shards, rerank, excluded, keep, metas


def per_image(manifest: dict) -> int:
    """Entries an image has at most in a version: itself and its regions (embed.regions)."""
    return int(manifest.get("per_image") or 1)


def as_images(ids: np.ndarray, meta) -> np.ndarray:
    """A shard's hit ids -> their images' ids (a region hit is its image; -1 stays -1)."""
    meta_ids, _, images = meta
    if images is None or not len(meta_ids):
        return ids
    pos = np.clip(np.searchsorted(meta_ids, ids), 0, len(meta_ids) - 1)
    return np.where((ids != -1) & (meta_ids[pos] == ids), images[pos], ids)


def shard_hits(batches, folder: str, manifest_text: str, k: int, column: str = "vector"):
    """For mapInPandas bodies over (vector, shard) rows: each shard's rows searched in that shard (its
    tombstoned rows excluded, compressed codes re-ranked) -> (rows, shard, scores, ids, (meta ids, paths)).
    The batch query job and the dedup job search with it."""
    from lakelens.index.shards import search_shards

    manifest, shards, rerank, excluded, _, metas = _opened(folder, manifest_text)
    params = manifest.get("search_params", {})
    factor = int(manifest.get("rerank") or 0)
    for pdf in batches:
        for s, part in pdf.groupby("shard", sort=False):
            s = int(s)
            q = np.stack(part[column].to_numpy()).astype(np.float32)
            scores, ids = search_shards([shards[s]], [rerank[s] if rerank else None], q, k, params.get("nprobe"),
                                        params.get("efSearch"), factor, None, None, [excluded[s]])
            yield part, s, scores, ids, metas[s]


@functools.lru_cache(maxsize=4)
def _version_facts(folder: str, manifest_text: str, keywords: bool):
    """(live entries of the version, per shard the ids it holds that are not live there, the tag file or
    None), once per Python worker."""
    from lakelens.index.keyword import TagStore
    from lakelens.index.shards import dead_ids, read_tombstones, shard_entries

    manifest, *_, metas = _opened(folder, manifest_text)
    tomb = read_tombstones(Path(folder), manifest)
    dead = [dead_ids(tomb, int(e.get("generation", 0))) for e in shard_entries(manifest)]
    live = sum(int(len(ids) - np.isin(ids, d).sum()) for (ids, _, _), d in zip(metas, dead))
    return live, dead, TagStore(Path(folder)) if keywords else None


def shard_allowed(q: ParsedQuery, meta, tags) -> np.ndarray:
    """The entries of one shard a query's filters allow (sorted ids): path: filters test the entry's path
    (a region carries its image's), tag: filters its image's tags, as the Searcher's allowed ids do."""
    import pyarrow.compute as pc

    ids, paths, images = meta
    image_of = ids if images is None else images
    keep = np.ones(len(ids), bool)
    for text, wanted in [(p, True) for p in q.paths] + [(p, False) for p in q.not_paths]:
        keep &= pc.match_substring(paths, text).to_numpy(zero_copy_only=False) == wanted
    for tag, wanted in [(t, True) for t in q.tags] + [(t, False) for t in q.not_tags]:
        keep &= np.isin(image_of, tags.ids_with(tag)) == wanted
    return ids[keep]


def search_fn(folder: str, manifest_text: str, k: int, keywords: bool = False):
    """mapInPandas: (query, shard) pairs -> HITS_SCHEMA rows: each query's top k in that shard among the
    entries its filters allow, or for a query of filters only the first k images it allows there."""

    def search(batches):
        import faiss
        import pyarrow as pa

        from lakelens.index.shards import search_shards

        manifest, shards, rerank, excluded, _, metas = _opened(folder, manifest_text)
        live, dead, tags = _version_facts(folder, manifest_text, keywords)
        params = manifest.get("search_params", {})
        factor = int(manifest.get("rerank") or 0)
        fetch = min(live or 1, k * per_image(manifest))  # as deep as the Searcher's search of all shards

        def frame(part, rows, ids, scores, k1, k2, k3, meta):
            meta_ids, meta_paths, _ = meta
            pos = np.searchsorted(meta_ids, ids)
            return pd.DataFrame({"row": part["row"].to_numpy()[rows], "query_id": part["query_id"].to_numpy()[rows],
                                 "query": part["query"].to_numpy()[rows], "id": as_images(ids, meta),
                                 "path": meta_paths.take(pa.array(pos)).to_pylist() if len(pos) else [],
                                 "score": np.asarray(scores, np.float32), "k1": np.asarray(k1, np.float32),
                                 "k2": np.asarray(k2, np.int64), "k3": np.asarray(k3, np.int64)})

        def hits(part, s, q, selector=None):
            scores, ids = search_shards([shards[s]], [rerank[s] if rerank else None], q, fetch, params.get("nprobe"),
                                        params.get("efSearch"), factor, None, selector, [excluded[s]])
            rows, cols = np.nonzero(ids != -1)
            return frame(part, rows, ids[rows, cols], scores[rows, cols], -scores[rows, cols],
                         np.full(len(rows), s), cols, metas[s])

        def browse(part, s, q: ParsedQuery, allowed):
            meta_ids, _, images = metas[s]
            whole = allowed if images is None else np.intersect1d(allowed, meta_ids[images == meta_ids])
            whole = np.setdiff1d(whole, dead[s])
            if q.tags:  # by the first tag's score, best first
                best, score = tags.best_for(q.tags[0])
                place = np.flatnonzero(np.isin(best, whole))[:k]
                ids, scores = best[place], np.nan_to_num(score[place], nan=0.0)
            else:  # by id
                ids = place = whole[:k]
                scores = np.zeros(len(ids), np.float32)
            zeros = np.zeros(len(ids))
            return frame(part, np.zeros(len(ids), int), ids, scores, zeros, zeros, place, metas[s])

        for pdf in batches:
            for s, part in pdf.groupby("shard", sort=False):
                s = int(s)
                queries = [parse_query(text) for text in part["query"]]
                plain = [i for i, q in enumerate(queries) if not q.has_filters]
                if plain:  # no filter: one search for all of them
                    yield hits(part.iloc[plain], s, np.stack(part["vector"].iloc[plain].to_numpy()).astype(np.float32))
                for i, q in enumerate(queries):
                    if not q.has_filters:
                        continue
                    allowed = shard_allowed(q, metas[s], tags)
                    one = part.iloc[[i]]
                    if not len(allowed):
                        continue
                    if one["vector"].iloc[0] is None:
                        yield browse(one, s, q, allowed)
                    else:
                        selector = faiss.IDSelectorBatch(allowed)
                        yield hits(one, s, np.asarray(one["vector"].iloc[0], np.float32)[None, :], selector)

    return search


def run_batch(spark, index_dir: str, queries: str, out: str, k: int = 10, engine: str | None = None,
              onnx_cache: str = "", fmt: str = "delta") -> dict:
    """Search every query of `queries` in the live version of `index_dir` as `Searcher.search_text` does
    (mode vector); write RESULT_SCHEMA rows to `out` (Delta or Parquet, overwritten): a query's hits, or
    one row with its error, or one row with neither when nothing matches it. Returns counts and seconds."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from lakelens import delta_sql
    from lakelens.index.layout import KEYWORD_DIR
    from lakelens.models.engines import DEFAULT_ENGINE, check_engine
    from lakelens.models.registry import ModelSpec
    from lakelens.search.results import MAX_K

    t0 = time.time()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an integer between 1 and {MAX_K}, got {k!r}")
    engine = engine or DEFAULT_ENGINE
    check_engine(engine)
    version = ix.current_version(index_dir)
    if version is None:
        raise ix.IndexDirError(f"no published index in {index_dir}")
    manifest = ix.read_manifest(index_dir, version)
    ModelSpec.from_key(manifest["model"]["key"]).check_weights()  # the index's weights, or nothing
    folder = str(Path(index_dir).resolve() / version)
    keywords = bool(manifest.get("keywords")) and (Path(folder) / KEYWORD_DIR).is_dir()
    entries = len(manifest["shards"]) + len(manifest.get("deltas", []))
    read = read_queries(spark, queries).localCheckpoint()
    # only rows with a query_id reach pandas: a null among 64-bit ids would make them floats there
    vectors = (read.where(F.col("error").isNull()).repartition(max(1, entries))
               .mapInPandas(embed_fn(manifest["model"]["key"], engine, onnx_cache, version, keywords), VECTORS_SCHEMA)
               .localCheckpoint())
    good = vectors.where(F.col("error").isNull())
    pairs = (good.crossJoin(spark.range(entries).select(F.col("id").cast("int").alias("shard")))
             .repartition(max(1, entries), "shard"))
    hits = pairs.mapInPandas(search_fn(folder, json.dumps(manifest), k, keywords), HITS_SCHEMA)
    order = [F.col("k1"), F.col("k2"), F.col("k3")]  # the Searcher's merge: score, then shard, then place
    if per_image(manifest) > 1:  # region hits are their images: each image once, at its first entry
        hits = (hits.withColumn("first", F.row_number().over(Window.partitionBy("row", "id").orderBy(*order)))
                .where("first = 1").drop("first"))
    ranked = (hits.withColumn("rank", F.row_number().over(Window.partitionBy("row").orderBy(*order)))
              .where(F.col("rank") <= k).localCheckpoint())  # k rows a query: the shards are searched once
    nothing = good.join(ranked.select("row").distinct(), "row", "left_anti")  # no image matches the query
    errors = (vectors.where(F.col("error").isNotNull()).select("query_id", "query", "error")
              .unionByName(read.where(F.col("error").isNotNull()).select("query_id", "query", "error")))
    blank = [F.lit(None).cast(t).alias(c) for c, t in (("rank", "int"), ("id", "long"), ("path", "string"),
                                                        ("score", "float"))]
    result = (ranked.select("query_id", "query", "rank", "id", "path", "score", F.lit(None).cast("string").alias("error"))
              .unionByName(nothing.select("query_id", "query", *blank, F.lit(None).cast("string").alias("error")))
              .unionByName(errors.select("query_id", "query", *blank, "error")))
    delta_sql.plain_types(result).write.format(fmt).mode("overwrite").option("overwriteSchema", "true").save(str(out))
    return {"index_version": version, "queries": read.count(), "failed": errors.count(), "unmatched": nothing.count(),
            "k": k, "out": str(out), "format": fmt, "seconds": round(time.time() - t0, 1)}
