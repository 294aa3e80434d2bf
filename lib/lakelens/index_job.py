"""The Spark index job: embeddings table version -> sharded FAISS indexes built on executors, published atomically."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pyspark.sql import functions as F

from . import index as ix
from .config import ConfigError
from .spark import Job
from .tables import EmbeddingsTable

ROWS_PER_AUTO_SHARD = 250_000


@dataclass
class IndexResult:
    version: str | None  # the live version after the run
    built: bool
    rows: int = 0
    shards: int = 0
    factory: str = ""
    reason: str = ""
    seconds: float = 0.0
    pruned: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fingerprint(table: EmbeddingsTable, df, version: int | None) -> str:
    if version is not None:
        return f"delta:{version}"
    files = sorted(df.inputFiles())  # parquet rewrites every file on each run, so names change
    return "parquet:" + hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def build_partition_fn(trained_bc, staged: str, rerank: bool):
    """applyInPandas function: all rows of one shard -> one FAISS file in the staging folder."""

    def build(pdf):
        import pandas as pd

        shard = int(pdf["shard"].iloc[0])
        vectors = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
        name = f"shard-{shard:04d}.faiss"
        count = ix.build_shard(trained_bc.value, pdf["id"].to_numpy(np.int64), vectors, Path(staged) / name,
                               rerank)
        return pd.DataFrame({"shard": [shard], "count": [count], "file": [name]})

    return build


class IndexJob(Job):
    """`IndexJob(spark=None, conf=None).launch()` -> IndexResult. Does nothing when the table has not
    changed since the live version (unless index.force)."""

    def __init__(self, spark=None, conf=None, log: Callable[[str], None] = print):
        super().__init__(spark, conf)
        self.log = log

    def run(self) -> IndexResult:
        t0 = time.time()
        c = self.conf.index
        if not c.table:
            raise ConfigError("index.table: required (the embeddings table; --table)")
        if not c.index:
            raise ConfigError("index.index: required (the index folder; --index)")
        spark = self.spark
        table = EmbeddingsTable(spark, c.table, c.format)
        if not table.exists():
            raise ConfigError(f"index.table: no {c.format} table at {c.table}")
        version = (c.version if c.version >= 0 else table.version()) if c.format == "delta" else None
        df = table.read(version)
        fingerprint = _fingerprint(table, df, version)
        settings = {"factory": c.factory, "shards": c.shards, "memory_budget": c.memory_budget}
        live = ix.current_version(c.index)
        if live and not c.force:
            m = ix.read_manifest(c.index, live)
            if m["source"]["fingerprint"] == fingerprint and m["source"]["table"] == table.location \
                    and m.get("settings") == settings:
                self.log(f"lakelens index: {c.table} unchanged since {live} ({fingerprint}); nothing to do")
                pruned = ix.prune(c.index, c.prune) if c.prune else []
                return IndexResult(live, False, m["rows"], len(m["shards"]), m["factory"], m["reason"],
                                   time.time() - t0, pruned)

        good = df.where(F.col("embedding").isNotNull() & F.col("error").isNull())
        model_keys = [r["model"] for r in good.select("model").distinct().limit(3).collect()]
        if not model_keys:
            raise ConfigError(f"index.table: {c.table} has no embedded rows to index")
        if len(model_keys) > 1:
            raise ConfigError(f"index.table: rows of several models ({', '.join(model_keys)}); re-embed first")
        good = good.select("id", "path", "width", "height", "embedding").localCheckpoint()
        n = good.count()
        dim = len(good.select("embedding").first()["embedding"])
        budget = ix.parse_size(c.memory_budget)
        choice = (ix.choose_factory(n, dim, budget, c.exact_max_rows, c.hnsw_max_rows) if c.factory == "auto"
                  else ix.explicit_choice(c.factory))
        shards = c.shards or max(1, min(2 * spark.sparkContext.defaultParallelism,
                                         math.ceil(n / ROWS_PER_AUTO_SHARD)))
        self.log(f"lakelens index: {n} rows x {dim} from {c.table} ({fingerprint}) -> {shards} shard(s) "
                 f"of {choice.factory}: {choice.reason}")

        sample = None
        if choice.needs_training:
            size = ix.training_rows(choice, n, c.train_sample)
            frac = min(1.0, 1.2 * size / n)
            sample = np.stack(good.sample(fraction=frac, seed=0).limit(size)
                              .select("embedding").toPandas()["embedding"].to_numpy()).astype(np.float32)
        trained = ix.train(dim, choice, sample)
        staged = ix.staging_dir(c.index)
        try:
            bc = spark.sparkContext.broadcast(trained)
            built = (good.select(F.pmod("id", F.lit(shards)).cast("int").alias("shard"), "id", "embedding")
                     .groupBy("shard").applyInPandas(build_partition_fn(bc, str(staged), bool(choice.rerank)),
                                                     "shard int, count long, file string").collect())
            bc.unpersist()
            counts = {r["shard"]: r["count"] for r in built}
            for s in range(shards):  # a shard that got no rows still gets a (empty) file
                if s not in counts:
                    counts[s] = ix.build_shard(trained, np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                                               staged / f"shard-{s:04d}.faiss", bool(choice.rerank))
            if sum(counts.values()) != n:
                raise ix.IndexDirError(f"shards hold {sum(counts.values())} vectors, the table {n}")
            if choice.needs_training:  # IVF: the smallest nprobe that reaches the recall target
                probe = (good.sample(fraction=min(1.0, 1.5 * ix.TUNING_QUERIES / n), seed=1)
                         .limit(ix.TUNING_QUERIES).select("id", "embedding").toPandas())
                choice.search_params = ix.tune_nprobe(
                    staged, [f"shard-{s:04d}.faiss" for s in range(shards)], choice,
                    np.stack(probe["embedding"].to_numpy()).astype(np.float32), probe["id"].to_numpy(np.int64))
                self.log(f"lakelens index: tuned {choice.search_params}")
            good.select("id", "path", "width", "height").toPandas().to_parquet(staged / ix.META, index=False)
            manifest = ix.make_manifest(
                model_keys[0], dim, choice, [counts[s] for s in range(shards)],
                {"table": table.location, "format": c.format, "version": version, "fingerprint": fingerprint},
                settings, build_seconds=round(time.time() - t0, 2))
            published = ix.publish(c.index, staged, manifest)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        pruned = ix.prune(c.index, c.prune) if c.prune else []
        self.log(f"lakelens index: published {published} ({n} vectors, {shards} shards, "
                 f"{time.time() - t0:.1f} s){'; pruned ' + ', '.join(pruned) if pruned else ''}")
        return IndexResult(published, True, n, shards, choice.factory, choice.reason, time.time() - t0, pruned)
