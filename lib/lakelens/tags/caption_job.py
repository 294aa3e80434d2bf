"""`lakelens caption` (jobs/caption.py): a generated caption per embedded image, as rows of the tags table.

Reads the embeddings table's rows without error, reads their image files (binaryFile, as the embed job
does), writes captions with a CoCa model on the executors (`captions.Captioner`, cached per Python
worker) and replaces the `caption` rows of those images in the tags table: tag = the caption's text,
score = the CLIP cosine between the image and its caption, model = the caption model's key, vocab = null.

Incremental: the run state (the embeddings table, its Delta version, the model key and the decoding
settings) rides in the tags table's commit. A re-run captions only the images the change feed shows as
new or changed since that version and drops the captions of images gone or failed; another caption model
or other settings caption everything again. A run over another folder (caption.images) captions that
folder in full and keeps the other folders' captions, less those of images changed, failed or gone since
the last caption run: the change feed from the version it read, or where that is gone (Parquet, vacuumed)
the table's rows now against the newest `embedded_at` that run saw."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lakelens.config import CaptionConfig, ModelConfig
from lakelens.errors import ConfigError, DataError
from lakelens.ingest.listing import file_splits, read_files
from lakelens.ingest.located import located_contents
from lakelens.ingest.paths import is_local, to_local, to_stored
from lakelens.ingest.storage import S3Settings
from lakelens.ingest.table import EmbeddingsTable, path_id_col, with_source_columns
from lakelens.models import engines
from lakelens.models import registry as models
from lakelens.models.registry import ModelSpec
from lakelens.spark import Job, parallelism, session_settings
from lakelens.tags import table as tags_table

SOURCE = "caption"
UDF_SCHEMA = "path string, tag string, score float, error string"
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # an image inside a shard or a table larger than this is not read
STATE_KEYS = ("table", "table_id", "model", "max_tokens", "beams", "images")


@dataclass
class CaptionResult:
    table_version: int | None
    mode: str  # full | incremental | none
    reason: str
    model: str  # the caption model's key
    captioned: int  # images given a caption this run
    failed: int  # images read but not captioned (undecodable): no row
    missing: int  # files of the table not found any more: no row
    dropped: int  # images whose caption rows went without a new one (deleted, failed, changed outside the scope)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def caption_spec(c: CaptionConfig, model: ModelConfig) -> ModelSpec:
    """caption.model / caption.pretrained, else the config's model section."""
    name = c.model or model.name
    pretrained = c.pretrained or (model.pretrained if not c.model else "none")
    return ModelSpec.from_config(ModelConfig(name=name, pretrained=pretrained))


def check_coca(spec: ModelSpec, max_tokens: int) -> None:
    """ConfigError on the driver, before any task starts, for an architecture without a text decoder or
    captions longer than its text context (the Captioner checks again where the config is not known)."""
    spec.validate()
    cfg = models.architecture_config(spec.name)
    if cfg is None:
        return
    if "multimodal_cfg" not in cfg:
        raise ConfigError(f"caption.model: {spec.name} has no text decoder, so it cannot write captions; use a CoCa "
                          "architecture (lakelens-tiny-coca, coca_ViT-B-32, ...)")
    context = int(cfg.get("text_cfg", {}).get("context_length", 77))
    if max_tokens > context:
        raise ConfigError(f"caption.max_tokens: at most {spec.name}'s text context ({context}), got {max_tokens}")


def partition_captioner(spec: ModelSpec, c: CaptionConfig):
    """The mapInPandas function: binaryFile batches (path, content, ...) -> (path, tag, score, error)."""
    settings = (c.max_tokens, c.beams, c.batch_size)
    max_pixels = c.max_pixels

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from lakelens.tags.captions import cached_captioner

        captioner = cached_captioner(spec, *settings, threads=engines.task_cpus(), max_pixels=max_pixels)
        for pdf in batches:
            out = captioner(pdf["content"].tolist())
            yield pd.DataFrame({"path": pdf["path"], "tag": [o.text for o in out],
                                "score": [o.score for o in out], "error": [o.error for o in out]})

    return run


class CaptionJob(Job):
    """`CaptionJob(spark=None, conf=None).launch()` -> CaptionResult."""

    def __init__(self, spark=None, conf=None, log: Callable[[str], None] = print):
        super().__init__(spark, conf)
        self.log = log

    def run(self) -> CaptionResult:
        t0 = time.time()
        c = self.conf.caption
        if not c.table:
            raise ConfigError("caption.table: required (the embeddings table; --table)")
        if not c.tags:
            raise ConfigError("caption.tags: required (the tags table to write; --tags)")
        spec = caption_spec(c, self.conf.model)
        check_coca(spec, c.max_tokens)  # before a session starts
        spark = self.spark
        table = EmbeddingsTable(spark, c.table, c.format)
        if not table.exists():
            raise DataError(f"caption.table: no {c.format} table at {c.table}")
        version = table.version()
        # caption.images: only the table's images under this folder; "" is the whole table
        scope = to_stored(c.images).rstrip("/") + "/" if c.images else ""
        state = {"table": table.location, "table_id": table.table_id(), "model": spec.key,
                 "max_tokens": c.max_tokens, "beams": c.beams, "images": scope}
        last = tags_table.last_state(spark, c.tags, SOURCE)
        previous = None if c.full else last
        differs = None
        if previous is not None and previous.get("model") != spec.key:
            differs = f"the caption model changed ({previous.get('model')} -> {spec.key})"
        elif previous is not None and any(previous.get(k, "" if k == "images" else None) != state[k]
                                          for k in STATE_KEYS):
            differs = "the embeddings table, the decoding settings or caption.images differ from the last run's"
        mode, reason = tags_table.run_mode(previous, differs, version, "--full" if c.full else "no earlier caption run")
        if mode == "none":
            return CaptionResult(version, "none", reason, spec.key, 0, 0, 0, 0, round(time.time() - t0, 1))
        ok = F.col("error").isNull() & F.col("embedding").isNotNull()
        in_scope = F.col("path").startswith(scope) if scope else F.lit(True)
        todo, touched = with_source_columns(table.read(version)).where(ok & in_scope).select("id", "path", "locator"), None
        if mode == "incremental":
            changes, why = tags_table.changes_since(spark, table.location, previous, version)
            if changes is None:
                mode, reason = "full", why
            else:
                todo = changes.rows.where(in_scope).select("id", "path", "locator")
                touched = changes.replaced.select("id").unionByName(todo.select("id")).distinct().localCheckpoint()
        # images inside shards or tables are read by their locator, plain files by Spark
        where = {r["path"]: r["locator"] for r in todo.select("path", "locator").distinct().collect()}
        paths = list(where)
        if scope and mode == "full":
            if not paths and not table.read(version).where(in_scope).limit(1).count():
                raise DataError(f"caption.images: the table {c.table} holds no image under {scope}")
            # a full run of one folder replaces that folder's captions and keeps every other folder's,
            # except those made from pictures that changed or went since the last caption run
            if tags_table.is_table(spark, c.tags):
                captioned = spark.read.format("delta").load(c.tags).where(F.col("source") == SOURCE)
                stale, how = self._stale(captioned.select("id"), table, last, version)
                self.log(f"lakelens caption: captions of other folders checked against {how}")
                touched = (captioned.where(in_scope).select("id").unionByName(todo.select("id"))
                           .unionByName(stale).distinct().localCheckpoint())
        present = [p for p in paths if where[p] or not is_local(p) or os.path.isfile(to_local(p))]
        self.log(f"lakelens caption: {mode} ({reason}): captioning {len(present)} images with {spec.key}"
                 + (f"; {len(paths) - len(present)} files are gone" if len(present) < len(paths) else ""))
        rows = self._caption([p for p in present if not where[p]], [(p, where[p]) for p in present if where[p]], spec)
        counts = rows.agg(F.count("tag").alias("ok"), F.count("error").alias("failed")).first()
        captions = (rows.where(F.col("error").isNull())
                    .select(path_id_col().alias("id"), "path", "tag", "score", F.lit(SOURCE).alias("source"),
                            F.lit(spec.key).alias("model"), F.lit(None).cast("string").alias("vocab")))
        dropped = 0
        if touched is not None:
            dropped = touched.join(captions.select("id"), "id", "left_anti").count()
        mark = table.read(version).agg(F.max(F.unix_micros("embedded_at"))).first()[0]
        tags_table.replace_rows(spark, c.tags, captions, touched, SOURCE,
                                {**state, "version": version, "embedded_through": mark})
        result = CaptionResult(version, mode, reason, spec.key, int(counts["ok"]), int(counts["failed"]),
                               len(paths) - len(present), dropped, round(time.time() - t0, 1))
        self.log(f"lakelens caption: {result.captioned} captioned, {result.failed} failed, {result.missing} gone, "
                 f"{result.dropped} dropped ({result.seconds} s)")
        return result

    def _stale(self, captioned: DataFrame, table: EmbeddingsTable, last: dict | None,
               version: int | None) -> tuple[DataFrame, str]:
        """Ids among `captioned` whose image changed, failed or went since the last caption run (of any
        folder), and what told: the change feed from the version that run read, where it covers the range;
        else the table as it is now (images gone or failed, and rows embedded after that run's newest,
        `embedded_through`)."""
        spark = self.spark
        none = captioned.limit(0)
        if last is None or last.get("table") != table.location:
            return none, "nothing (no earlier caption run of this table)"
        seen = last.get("version")
        if version is not None and seen is not None and last.get("table_id") == table.table_id() \
                and seen <= version:
            if seen == version:
                return none, f"the change feed (the table is unchanged since version {seen})"
            changes, _ = tags_table.changes_since(spark, table.location, last, version)
            if changes is not None:
                return (changes.replaced.select("id").join(captioned, "id", "left_semi"),
                        f"the change feed of versions {seen + 1}..{version}")
        rows = table.read(version)
        live = rows.where(F.col("error").isNull() & F.col("embedding").isNotNull()).select("id")
        stale = captioned.join(live, "id", "left_anti")
        mark = last.get("embedded_through")
        if mark is not None:
            newer = rows.where(F.unix_micros("embedded_at") > F.lit(mark)).select("id")
            stale = stale.unionByName(captioned.join(newer, "id", "left_semi"))
        return stale, "the table's rows now (no change feed reaches back to the last caption run)"

    def _caption(self, paths: list[str], located: list[tuple[str, str]], spec: ModelSpec) -> DataFrame:
        """Captions of plain files (`paths`, read by Spark's binaryFile) and of images inside shards or tables
        (`located`: (path, locator), read on the executors)."""
        spark = self.spark
        if not paths and not located:
            return spark.createDataFrame([], UDF_SCHEMA)
        c = self.conf.caption
        n = len(paths) + len(located)
        splits = max(1, min(n, c.partitions or 2 * parallelism(spark)))
        # image bytes: small Arrow batches; the scan is planned by the action, so it runs inside
        with (session_settings(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(c.batch_size)}),
              file_splits(spark, len(paths), splits, paths)):
            parts = []
            if paths:
                parts.append(read_files(spark, paths).select("path", "content"))
            if located:
                parts.append(located_contents(spark, located, splits, MAX_IMAGE_BYTES,
                                              S3Settings.from_config(self.conf)))
            files = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
            return files.mapInPandas(partition_captioner(spec, c), UDF_SCHEMA).localCheckpoint(eager=True)
