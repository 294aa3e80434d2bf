"""The embeddings table's change feed (Delta Change Data Feed) between two table versions, reduced per id,
for every job that works incrementally: the index job, the tag and caption jobs, dedup; and the ids a
table's feed touched (the tags table's, for the keyword index)."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lakelens.ingest.table import with_source_columns

# what each touched id's last row keeps: the columns of an index entry (index.meta.META_COLUMNS), its vector
# and the model that made it
ROW_COLUMNS = ("path", "width", "height", "caption", "locator", "embedding", "model")


@dataclass
class Changes:
    """What the change feed shows between two table versions, all computed from the feed alone."""

    replaced: DataFrame  # ids that were embedded rows before the range (so in the live index)
    rows: DataFrame  # each touched id's row at the end, when live and embedded (from a checkpoint)
    count: int  # ids the feed touched
    live_before: int  # index entries (images and their regions) of touched ids before the range
    live_after: int  # index entries of touched ids at its end (the delta's entries)
    models: list  # model keys among the rows at the end
    start: int = 0  # the first table version read
    end: int = 0  # the last
    rows_after: int = 0  # index entries at `end` (the live count, worked out by the job)
    tombstones: DataFrame | None = None  # the live index's entries of the replaced ids: images and regions
    images: int = 0  # images after the range minus images before it (the rest of the entries are regions)
    per_image: int = 1  # the most entries (the image and its regions) a touched image has at the end


# order of a feed's rows for one id: by commit, and within a commit the old image before the new one
_CHANGE_ORDER = {"update_preimage": 0, "delete": 1, "insert": 2, "update_postimage": 3}


def read_changes(spark, location: str, start: int, end: int) -> Changes:
    """The change feed between Delta versions start..end, reduced per id to its first and last image in
    one grouped pass, never a scan of the whole table. LookupError when the feed does not cover the
    range (vacuumed, turned off, or the table re-created)."""
    rank = F.lit(None).cast("int")
    for kind, r in _CHANGE_ORDER.items():
        rank = F.when(F.col("_change_type") == kind, F.lit(r)).otherwise(rank)
    order = F.col("_commit_version").cast("long") * 4 + rank
    ok = F.col("error").isNull() & F.col("embedding").isNotNull()
    last_cols = list(ROW_COLUMNS)
    try:
        rows_feed = with_source_columns(change_feed(spark, location, start, end))
        with_regions = "regions" in rows_feed.columns
        if with_regions:
            last_cols.append("regions")
        n_regions = region_count(rows_feed) if with_regions else F.lit(0)
        per_id = (rows_feed.groupBy("id").agg(
            F.min_by(F.struct(F.col("_change_type").alias("kind"), ok.alias("ok"), n_regions.alias("regions")),
                     order).alias("first"),
            F.max_by(F.struct(*last_cols, F.col("_change_type").alias("kind"), ok.alias("ok")), order).alias("last"))
            .withColumn("was_live", F.col("first.kind").isin("update_preimage", "delete") & F.col("first.ok"))
            .withColumn("is_live", F.col("last.kind").isin("insert", "update_postimage") & F.col("last.ok"))
            .localCheckpoint())  # the feed is read once, here
    except AnalysisException as e:
        raise LookupError(str(e).strip().splitlines()[0][:300]) from None
    after = F.lit(1) + (region_count(F.col("last")) if with_regions else F.lit(0))
    counts = per_id.agg(F.count(F.lit(1)).alias("n"),
                        F.sum(F.when(F.col("was_live"), F.lit(1) + F.col("first.regions"))).alias("before"),
                        F.sum(F.when(F.col("is_live"), after)).alias("after"),
                        F.max(F.when(F.col("is_live"), after)).alias("per_image"),
                        F.sum(F.col("was_live").cast("long")).alias("images_before"),
                        F.sum(F.col("is_live").cast("long")).alias("images_after"),
                        F.collect_set(F.when(F.col("is_live"), F.col("last.model"))).alias("models")).first()
    rows = per_id.where("is_live").select("id", *[F.col(f"last.{c}").alias(c) for c in last_cols])
    replaced = per_id.where("was_live")
    # the live index holds the replaced images and the regions they had: region r of image i is entry
    # xxhash64(i, r), as lakelens.index.update.entries writes it
    tombstones = replaced.select("id").unionByName(
        replaced.where(F.col("first.regions") > 0)
        .select("id", F.explode(F.sequence(F.lit(1), F.col("first.regions"))).alias("r"))
        .select(F.xxhash64("id", "r").alias("id")))
    return Changes(replaced.select("id"), rows, int(counts["n"]), int(counts["before"] or 0),
                   int(counts["after"] or 0), sorted(counts["models"])[:3], start, end, tombstones=tombstones,
                   images=int(counts["images_after"] or 0) - int(counts["images_before"] or 0),
                   per_image=int(counts["per_image"] or 1))


def region_count(row=None):
    """Regions a row holds (0 for null: regions off or an error), from its `regions` column."""
    col = F.col("regions") if row is None else row["regions"]
    return F.when(col.isNull(), F.lit(0)).otherwise(F.size(col))


def changed_ids(spark, location: str, start: int, end: int) -> DataFrame:
    """The ids (column id, once each) whose rows changed between Delta versions start..end of any table with
    a change feed; LookupError when the feed does not cover the range."""
    try:
        return change_feed(spark, location, start, end).select("id").distinct().localCheckpoint()
    except AnalysisException as e:
        raise LookupError(str(e).strip().splitlines()[0][:300]) from None


def change_feed(spark, location: str, start: int, end: int) -> DataFrame:
    """The feed's rows (the table's columns, _change_type, _commit_version, ...) of versions start..end."""
    return (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", start)
            .option("endingVersion", end).load(location))
