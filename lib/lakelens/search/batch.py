"""Batch queries as a Spark job (`lakelens search --queries FILE --out RESULTS`): a distributed k-NN over
the live version's shards. Queries are embedded on the executors (with the Searcher's query arithmetic),
each shard is searched for every query by the task that holds it (shards are loaded once per Python
worker), and the per-shard top lists are merged per query by Spark into (query_id, query, rank, id,
path, score, error) rows. Nothing per query is collected on the driver."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens import index as ix
from lakelens.errors import DataError, QueryError

RESULT_SCHEMA = "query_id long, query string, rank int, id long, path string, score float, error string"
VECTORS_SCHEMA = "query_id long, query string, vector array<float>, error string"


def read_queries(spark, path: str):
    """(query_id, query) from a text file (one query a line; ids are line numbers from 0), a CSV with a
    `query` column (and optionally `query_id`), or Parquet."""
    from pyspark.sql import functions as F

    name = str(path).lower()
    if name.endswith(".csv"):
        df = spark.read.option("header", True).csv(str(path))
    elif name.endswith(".parquet"):
        df = spark.read.parquet(str(path))
    else:
        df = spark.read.text(str(path)).withColumnRenamed("value", "query")
    if "query" not in df.columns:
        raise DataError(f"queries {path}: no 'query' column (columns: {', '.join(df.columns)})")
    if "query_id" in df.columns:
        return df.select(F.col("query_id").cast("long"), F.col("query").cast("string"))
    numbered = df.select("query").rdd.zipWithIndex().map(lambda r: (r[1], r[0]["query"]))
    return spark.createDataFrame(numbered, "query_id long, query string")


def embed_fn(model_key: str, engine: str, onnx_cache: str):
    """mapInPandas: queries -> their vectors (query arithmetic included), or an error per bad query."""

    def embed(batches):
        from lakelens.ingest.embedder import cached_embedder
        from lakelens.models.registry import ModelSpec
        from lakelens.search.searcher import QUERY_MAX_PIXELS, query_vector

        embedder = cached_embedder(ModelSpec.from_key(model_key), 32, 1, False, QUERY_MAX_PIXELS, engine,
                                   onnx_cache=onnx_cache)

        def embed_text(term: str):
            return embedder.embed_texts([term.strip()])[0], []

        for pdf in batches:
            vectors, errors = [], []
            for text in pdf["query"]:
                try:
                    if text is None or not str(text).strip():
                        raise QueryError("empty query text")
                    vectors.append(query_vector(embed_text, str(text))[0])
                    errors.append(None)
                except QueryError as e:
                    vectors.append(None)
                    errors.append(str(e))
            yield pd.DataFrame({"query_id": pdf["query_id"], "query": pdf["query"], "vector": vectors,
                                "error": errors})

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


def search_fn(folder: str, manifest_text: str, k: int):
    """mapInPandas: (query, shard) pairs -> each query's top k in that shard, with paths."""

    def search(batches):
        import pyarrow as pa

        for part, _, scores, ids, meta in shard_hits(batches, folder, manifest_text, k):
            rows, cols = np.nonzero(ids != -1)
            meta_ids, meta_paths, _ = meta
            found = ids[rows, cols]
            pos = np.searchsorted(meta_ids, found)
            yield pd.DataFrame({"query_id": part["query_id"].to_numpy()[rows],
                                "query": part["query"].to_numpy()[rows], "id": as_images(found, meta),
                                "path": meta_paths.take(pa.array(pos)).to_pylist() if len(pos) else [],
                                "score": scores[rows, cols].astype(np.float32)})

    return search


def run_batch(spark, index_dir: str, queries: str, out: str, k: int = 10, engine: str | None = None,
              onnx_cache: str = "", fmt: str = "delta") -> dict:
    """Search every query of `queries` in the live version of `index_dir`; write RESULT_SCHEMA rows to
    `out` (Delta or Parquet, overwritten). Returns counts and seconds."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from lakelens.models.engines import DEFAULT_ENGINE, check_engine
    from lakelens.models.registry import ModelSpec
    from lakelens.search.searcher import MAX_K

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
    entries = len(manifest["shards"]) + len(manifest.get("deltas", []))
    vectors = (read_queries(spark, queries)
               .mapInPandas(embed_fn(manifest["model"]["key"], engine, onnx_cache), VECTORS_SCHEMA)
               .localCheckpoint())
    good = vectors.where(F.col("error").isNull())
    pairs = (good.crossJoin(spark.range(entries).select(F.col("id").cast("int").alias("shard")))
             .repartition(max(1, min(entries, spark.sparkContext.defaultParallelism * 2)), "shard"))
    hits = pairs.mapInPandas(search_fn(folder, json.dumps(manifest), k * per_image(manifest)),
                             "query_id long, query string, id long, path string, score float")
    if per_image(manifest) > 1:  # region hits are their images: each image once, at its best entry
        best = F.row_number().over(Window.partitionBy("query_id", "id").orderBy(F.col("score").desc()))
        hits = hits.withColumn("best", best).where("best = 1").drop("best")
    rank = F.row_number().over(Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("id")))
    ranked = (hits.withColumn("rank", rank).where(F.col("rank") <= k)
              .select("query_id", "query", "rank", "id", "path", "score", F.lit(None).cast("string").alias("error")))
    failed = vectors.where(F.col("error").isNotNull()).select(
        "query_id", "query", F.lit(None).cast("int").alias("rank"), F.lit(None).cast("long").alias("id"),
        F.lit(None).cast("string").alias("path"), F.lit(None).cast("float").alias("score"), "error")
    result = ranked.unionByName(failed)
    result.write.format(fmt).mode("overwrite").option("overwriteSchema", "true").save(str(out))
    counts = vectors.agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("error").isNotNull().cast("int")).alias("bad")).first()
    return {"index_version": version, "queries": int(counts["n"]), "failed": int(counts["bad"] or 0), "k": k,
            "out": str(out), "format": fmt, "seconds": round(time.time() - t0, 1)}
