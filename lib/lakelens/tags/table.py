"""The tags table (Delta): one row per (image, tag or caption, source). Zero-shot tags, generated captions,
region tags and manual tags live in one table, told apart by `source`; each writer replaces only its own
source's rows of the images it touched, so a re-tag never drops captions and a caption run never drops tags."""

from __future__ import annotations

import json

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lakelens import delta_sql
from lakelens.ingest.changes import read_changes
from lakelens.spark import session_settings

SOURCES = ("zero-shot", "caption", "region", "manual")
SCHEMA = T.StructType([
    T.StructField("id", T.LongType(), False),
    T.StructField("path", T.StringType(), False),
    T.StructField("tag", T.StringType(), False),  # the tag's name, or a caption's text (source = caption)
    T.StructField("score", T.FloatType(), True),  # zero-shot: cosine to the tag's text vector; caption: CLIP cosine
    T.StructField("source", T.StringType(), False),  # zero-shot | caption | region | manual
    T.StructField("model", T.StringType(), True),  # the model key that made the row
    T.StructField("vocab", T.StringType(), True),  # the vocabulary's digest (zero-shot, region), else null
])


def is_table(spark: SparkSession, location: str) -> bool:
    return delta_sql.is_delta(spark, location)


def last_state(spark: SparkSession, location: str, source: str) -> dict | None:
    """The run state the newest commit of `source`'s writer left in its commit's userMetadata, or None."""
    if not is_table(spark, location):
        return None
    for row in delta_sql.history(spark, location, 50):
        try:
            state = json.loads(row["userMetadata"] or "")
        except ValueError:
            continue
        if isinstance(state, dict) and state.get("source") == source:
            return state
    return None


def run_mode(previous: dict | None, differs: str | None, version: int | None, first: str) -> tuple[str, str]:
    """How a tag or caption run goes, from its last run's state: ("full" | "none" | "incremental", why).
    `differs`: why the last run's settings no longer hold, or None; `first`: why, when there is no last run."""
    if previous is None:
        return "full", first
    if differs:
        return "full", differs
    if version is None:
        return "full", "a Parquet table has no change feed"
    last = previous.get("version")
    if last is None or last > version:
        return "full", f"the last run read a later table version ({last})"
    if last == version:
        return "none", f"the table is unchanged since the last run (version {version})"
    return "incremental", f"changes of table versions {last + 1}..{version}"


def changes_since(spark: SparkSession, location: str, previous: dict, version: int):
    """The embeddings table's change feed since the last run: (Changes, None), or (None, why a full run)."""
    try:
        return read_changes(spark, location, previous["version"] + 1, version), None
    except LookupError as e:
        return None, f"the change feed does not cover the range ({e})"


def replace_rows(spark: SparkSession, location: str, rows: DataFrame, touched: DataFrame | None, source: str,
                 state: dict) -> None:
    """Make `rows` the `source` rows of the images they cover. touched=None: every `source` row of the table
    is replaced (one overwrite of that source, atomic). Else `touched` (column id) names the images whose
    `source` rows go before `rows` are appended: a MERGE that deletes them, then an append carrying the run
    state. A run killed between the two is repeated from the same state, so nothing is lost."""
    # the run's state rides in this commit, also when the run kept no tag or replaced no caption
    with session_settings(spark, {delta_sql.SKIP_EMPTY_COMMITS: "false"}):
        _replace_rows(spark, location, rows, touched, source, state)


def _replace_rows(spark: SparkSession, location: str, rows: DataFrame, touched: DataFrame | None, source: str,
                  state: dict) -> None:
    rows = delta_sql.plain_types(rows.select(*[F.col(f.name).cast(f.dataType) for f in SCHEMA.fields]))
    meta = json.dumps({**state, "source": source})
    if not is_table(spark, location):
        (rows.write.format("delta").option("delta.enableChangeDataFeed", "true").option("userMetadata", meta)
         .save(location))
        return
    if touched is None:
        (rows.write.format("delta").mode("overwrite").option("replaceWhere", f"source = '{source}'")
         .option("userMetadata", meta).save(location))
        return
    ids = touched.select("id").distinct()
    delta_sql.merge(spark, location, ids, f"t.id = s.id AND t.source = '{source}'", "WHEN MATCHED THEN DELETE")
    rows.write.format("delta").mode("append").option("userMetadata", meta).save(location)


def read_tags(spark: SparkSession, location: str, version: int | None = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(location)
