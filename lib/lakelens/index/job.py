"""The Spark index job: embeddings table version -> sharded FAISS indexes built on executors, published atomically."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from lakelens.config import parse_size
from lakelens.errors import ConfigError, DataError
from lakelens.index.build import META_COLUMNS, TUNING_QUERIES, assemble
from lakelens.index.factory import Choice, choose_factory, explicit_choice, training_rows
from lakelens.index.incremental import Decision, link_version
from lakelens.index.keyword_job import keywords_stale, load_vocab_file, stage_full, stage_incremental, tags_state
from lakelens.index.layout import TOMBSTONES, TRAINED
from lakelens.index.update import (
    ROWS_PER_AUTO_SHARD,
    build_fn,
    build_incremental,
    check_executors_see,
    decide_from_changes,
    entries,
    precheck,
    recreated,
    shard_rows,
)
from lakelens.index.versions import current_version, index_lock, prune_locked, publish, read_manifest, staging_dir
from lakelens.ingest.changes import read_changes, region_count
from lakelens.ingest.paths import common_root
from lakelens.ingest.table import EmbeddingsTable, with_source_columns
from lakelens.spark import Job, parallelism


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
    build: str = ""  # none | full | incremental | compaction
    build_reason: str = ""
    deltas: int = 0
    tombstones: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_entry_ids(good) -> None:
    """Region entries get 64-bit hashed ids: a clash with another entry would hide one of them, so it
    stops the build (as path id clashes stop the embed job)."""
    clash = entries(good).groupBy("id").count().where("count > 1").limit(3).collect()
    if clash:
        raise DataError(f"index entry ids collide ({', '.join(str(r['id']) for r in clash)}); nothing was published")


def _fingerprint(table: EmbeddingsTable, df, version: int | None) -> str:
    if version is not None:
        return f"delta:{version}"
    files = sorted(df.inputFiles())  # parquet rewrites every file on each run, so names change
    return "parquet:" + hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


class IndexJob(Job):
    """`IndexJob(spark=None, conf=None).launch()` -> IndexResult. Does nothing when the table has not
    changed since the live version (unless index.force)."""

    def __init__(self, spark=None, conf=None, log: Callable[[str], None] = print):
        super().__init__(spark, conf)
        self.log = log

    def run(self) -> IndexResult:
        c = self.conf.index
        if not c.table:
            raise ConfigError("index.table: required (the embeddings table; --table)")
        if not c.index:
            raise ConfigError("index.index: required (the index folder; --index)")
        with index_lock(c.index, wait=c.lock_wait):
            return self._run()

    def _run(self) -> IndexResult:
        t0 = time.time()
        c = self.conf.index
        spark = self.spark
        table = EmbeddingsTable(spark, c.table, c.format)
        if not table.exists():
            raise DataError(f"index.table: no {c.format} table at {c.table}")
        version = (c.version if c.version >= 0 else table.version()) if c.format == "delta" else None
        df = with_source_columns(table.read(version))
        fingerprint = _fingerprint(table, df, version)
        table_id = table.table_id()
        settings = {"factory": c.factory, "shards": c.shards, "memory_budget": c.memory_budget}
        live_name = current_version(c.index)
        live = read_manifest(c.index, live_name) if live_name else None
        self._tags = None
        if c.tags:
            if c.format != "delta":
                raise ConfigError("index.tags: a keyword index needs a Delta embeddings table (index.format delta)")
            location = c.tags.rstrip("/")
            vocab = load_vocab_file(c.vocab)
            tags_at, tags_id = tags_state(spark, location)
            self._tags = {"table": location, "tags_version": tags_at, "table_id": tags_id,
                          "vocab": vocab.digest if vocab else None}
        elif c.format == "delta" and "container" in df.columns and df.where(F.col("caption").isNotNull()).limit(1).count():
            # images from shards or tables brought their own captions: a keyword index of those, no tags table
            vocab = load_vocab_file(c.vocab)
            self._tags = {"table": "", "tags_version": None, "table_id": None, "vocab": vocab.digest if vocab else None}
        if live and not (c.force or c.full):
            old = live["source"]
            # the version alone cannot tell a table deleted and made again up to the same version
            if old["fingerprint"] == fingerprint and old["table"] == table.location \
                    and live.get("settings") == settings and not recreated(old.get("table_id"), table_id):
                stale = keywords_stale(live.get("keywords"), self._tags) if self._tags else None
                if stale:
                    return self._keywords_only(live_name, live, df, t0, stale)
                if c.format == "delta" and not old.get("table_id"):
                    self.log(f"lakelens index: {live_name} records no table id (made before ids were kept): "
                             f"trusting the table version alone")
                self.log(f"lakelens index: {c.table} unchanged since {live_name} ({fingerprint}); nothing to do")
                pruned = prune_locked(c.index, c.prune) if c.prune else []
                return IndexResult(live_name, False, live["rows"], len(live["shards"]), live["factory"],
                                   live["reason"], time.time() - t0, pruned, build="none",
                                   build_reason="the table has not changed")

        source = {"table": table.location, "format": c.format, "version": version, "fingerprint": fingerprint,
                  "table_id": table_id}
        decision = Decision("full", "no live version") if not live else precheck(c, live, source, settings)
        if decision.kind == "changes":  # the change feed tells the rest, without a table scan
            decision, changes = self._from_changes(live, source, table, version)
            if decision.kind == "incremental":
                # the table's roots when it records them (a dropped root is gone from there), else the live ones
                source["image_roots"] = sorted(table.image_roots() or live["source"].get("image_roots", []))
                rows_at = with_source_columns(table.read(version)).where(F.col("error").isNull()
                                                                         & F.col("embedding").isNotNull())
                finish = None
                if self._tags:
                    def finish(staged, touched):
                        kw = live.get("keywords")
                        if kw:
                            return {"keywords": stage_incremental(
                                spark, staged, Path(c.index) / live_name, kw, rows_at, touched, self._tags["table"],
                                self._tags["tags_version"], c.vocab, self.log, self._tags["table_id"])}
                        return {"keywords": stage_full(spark, staged, rows_at, self._tags["table"],
                                                       self._tags["tags_version"], c.vocab, self.log,
                                                       self._tags["table_id"])}
                published, drift = build_incremental(spark, c.index, live_name, live, changes, source, decision,
                                                     c.min_recall, self.log, finish)
                if published:
                    pruned = prune_locked(c.index, c.prune) if c.prune else []
                    self.log(f"lakelens index: published {published} (incremental, {time.time() - t0:.1f} s)")
                    m = read_manifest(c.index, published)
                    return IndexResult(published, True, m["rows"], len(m["shards"]), m["factory"], m["reason"],
                                       time.time() - t0, pruned, build="incremental", build_reason=decision.reason,
                                       deltas=len(m["deltas"]), tombstones=m["tombstones"]["count"])
                decision = Decision("full", drift)
                self.log(f"lakelens index: {drift}; rebuilding with new training")

        # a row is embedded exactly when it has no error (the table's contract): counting rows and models
        # reads two small columns, never the vectors of the whole table
        good = df.where(F.col("error").isNull())
        model_keys = [r["model"] for r in good.select("model").distinct().limit(3).collect()]
        if not model_keys:
            raise DataError(f"index.table: {c.table} has no embedded rows to index")
        if len(model_keys) > 1:
            raise DataError(f"index.table: rows of several models ({', '.join(model_keys)}); re-embed first")
        with_regions = "regions" in df.columns
        counted = good.agg(F.count(F.lit(1)).alias("n"),
                           F.sum(region_count() if with_regions else F.lit(0)).alias("regions"),
                           F.max(region_count() if with_regions else F.lit(0)).alias("most")).first()
        images, regions = int(counted["n"]), int(counted["regions"] or 0)
        n = images + regions  # index entries: images and their regions (embed.regions)
        dim = len(good.select("embedding").first()["embedding"])
        choice = (choose_factory(n, dim, parse_size(c.memory_budget), c.exact_max_rows, c.hnsw_max_rows)
                  if c.factory == "auto" else explicit_choice(c.factory, dim))
        source["image_roots"] = self._roots(table, good)
        self.log(f"lakelens index: {n} rows x {dim} from {c.table} ({fingerprint}): {decision.kind} "
                 f"({decision.reason})")
        trained = None
        if decision.kind == "compaction":
            choice = Choice(live["factory"], live["reason"], "IVF" in live["factory"], dict(live["search_params"]),
                            live.get("rerank", 0))
            trained = (Path(c.index) / live_name / TRAINED).read_bytes()
        good = (good.where(F.col("embedding").isNotNull())
                .select(*META_COLUMNS, "embedding", *(["regions"] if regions else [])).localCheckpoint())
        if regions:
            check_entry_ids(good)
        return self._full(good, n, dim, choice, model_keys[0], source, settings, decision, trained, t0,
                          {"images": images, "regions": regions, "per_image": 1 + int(counted["most"] or 0)})

    def _keywords_only(self, live_name: str, live: dict, df, t0: float, why: str) -> IndexResult:
        """The vectors are current but the tags changed: a version that shares every file of the live one
        (hard links) and re-indexes the images whose tags changed."""
        c = self.conf.index
        staged = staging_dir(c.index)
        try:
            link_version(Path(c.index) / live_name, staged)
            if (Path(c.index) / live_name / TOMBSTONES).is_file():
                shutil.copy2(Path(c.index) / live_name / TOMBSTONES, staged / TOMBSTONES)
            rows = df.where(F.col("error").isNull() & F.col("embedding").isNotNull())
            kw = live.get("keywords")
            touched = self.spark.createDataFrame([], "id long")
            entry = (stage_incremental(self.spark, staged, Path(c.index) / live_name, kw, rows, touched,
                                       self._tags["table"], self._tags["tags_version"], c.vocab, self.log,
                                       self._tags["table_id"])
                     if kw else stage_full(self.spark, staged, rows, self._tags["table"], self._tags["tags_version"],
                                           c.vocab, self.log, self._tags["table_id"]))
            published = publish(c.index, staged, {**live, "build": "incremental", "build_reason": why,
                                                  "keywords": entry})
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        pruned = prune_locked(c.index, c.prune) if c.prune else []
        self.log(f"lakelens index: published {published} (vectors shared with {live_name}; {why}, "
                 f"{time.time() - t0:.1f} s)")
        return IndexResult(published, True, live["rows"], len(live["shards"]), live["factory"], live["reason"],
                           time.time() - t0, pruned, build="incremental", build_reason=why,
                           deltas=len(live.get("deltas", [])), tombstones=(live.get("tombstones") or {}).get("count", 0))

    def _from_changes(self, live: dict, source: dict, table: EmbeddingsTable, version: int):
        """Read the change feed since the live version and finish the decision from it: the rows and
        models it touched, the row count after it, and the index kind `auto` would now pick."""
        c = self.conf.index
        try:
            changes = read_changes(self.spark, table.location, live["source"]["version"] + 1, version)
        except LookupError as e:
            return Decision("full", f"the change feed does not cover table versions {live['source']['version'] + 1}"
                                    f"..{version}: {e}"), None
        rows = live["rows"] - changes.live_before + changes.live_after
        choice = (choose_factory(rows, live["dim"], parse_size(c.memory_budget), c.exact_max_rows, c.hnsw_max_rows)
                  if c.factory == "auto" else None)
        decision = decide_from_changes(c, live, changes, choice, rows)
        self.log(f"lakelens index: {rows} rows from {c.table} (delta:{version}): {decision.kind} ({decision.reason})")
        changes.rows_after = rows
        return decision, changes

    def _roots(self, table: EmbeddingsTable, good) -> list[str]:
        """Folders thumbnails may be read from: those the embed job listed, else the rows' common folder."""
        roots = table.image_roots()
        if not roots:
            bounds = good.agg(F.min("path"), F.max("path")).first()
            roots = [common_root([bounds[0], bounds[1]])]
        return roots

    def _full(self, good, n: int, dim: int, choice: Choice, model_key: str, source: dict, settings: dict,
              decision: Decision, trained: bytes | None, t0: float, counts: dict) -> IndexResult:
        """A full build (trained afresh) or a compaction (`trained`: the live version's structures)."""
        c, spark = self.conf.index, self.spark
        shards = c.shards or max(1, min(2 * parallelism(spark), math.ceil(n / ROWS_PER_AUTO_SHARD)))
        self.log(f"lakelens index: {shards} shard(s) of {choice.factory}: {choice.reason}")
        # bounded samples on the driver: tuning queries first, then training rows that leave them out
        probe_pdf = (good.sample(fraction=min(1.0, 1.5 * TUNING_QUERIES / n), seed=1).limit(TUNING_QUERIES)
                     .select("id", "embedding").toPandas()) if choice.needs_training and n > 2 * TUNING_QUERIES \
            else pd.DataFrame({"id": np.zeros(0, np.int64), "embedding": []})
        probe_ids = probe_pdf["id"].to_numpy(np.int64)
        probe = (np.stack(probe_pdf["embedding"].to_numpy()).astype(np.float32) if len(probe_pdf)
                 else np.zeros((0, dim), np.float32), probe_ids)
        sample = None
        if choice.needs_training and trained is None:
            size = training_rows(choice, n - len(probe_ids), c.train_sample)
            rest = good.where(~F.col("id").isin([int(i) for i in probe_ids])) if len(probe_ids) else good
            sample = np.stack(rest.sample(fraction=min(1.0, 1.2 * size / n), seed=0).limit(size)
                              .select("embedding").toPandas()["embedding"].to_numpy()).astype(np.float32)

        def build(trained_bytes, staged):  # assemble wrote trained_bytes into staged: the tasks read them there
            check_executors_see(spark, staged)
            built = (shard_rows(good, shards).mapInPandas(build_fn(str(staged), bool(choice.rerank)),
                                                          "shard int, count long").collect())
            return {r["shard"]: r["count"] for r in built}

        published, choice, pruned = assemble(
            c.index, dim=dim, choice=choice, shards=shards, rows=n, model_key=model_key, sample=sample,
            probe=probe, build=build, prune=c.prune, log=self.log, settings=settings, source=source,
            trained=trained, kind=decision.kind, why=decision.reason, build_seconds=round(time.time() - t0, 2),
            **counts,
            finish=(lambda staged: {"keywords": stage_full(spark, staged, good, self._tags["table"],
                                                           self._tags["tags_version"], c.vocab, self.log,
                                                           self._tags["table_id"])})
            if self._tags else None)
        self.log(f"lakelens index: published {published} ({decision.kind}, {n} vectors, {shards} shards, "
                 f"{time.time() - t0:.1f} s){'; pruned ' + ', '.join(pruned) if pruned else ''}")
        return IndexResult(published, True, n, shards, choice.factory, choice.reason, time.time() - t0, pruned,
                           build=decision.kind, build_reason=decision.reason)
