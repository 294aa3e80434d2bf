"""Delta readers other than Spark: delta-rs (the `deltalake` package, and through it Polars, DuckDB, ...) reads
every table lakelens writes (embeddings, tags with zero-shot tags and captions, duplicate groups and pairs,
batch search results) and the embeddings and tags change feeds, with the rows Spark reads. delta-rs checks
each column's declared nullability against the files, array elements included."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ROOT
from deltalake import DeltaTable

from lakelens import EmbedJob, config, delta_sql
from lakelens.dedup.job import DedupJob, pairs_path
from lakelens.index.job import IndexJob
from lakelens.ingest.table import ROOTS_PROPERTY, SCHEMA
from lakelens.search.batch import run_batch
from lakelens.tags.caption_job import CaptionJob
from lakelens.tags.job import TagJob
from lakelens.train import synth

LOCAL = ROOT / "conf" / "local.yaml"
CHANGE_COLUMNS = ["_change_type", "_commit_version"]  # (the commit timestamp: each reader its own source)


def plain(table: pa.Table, drop=()) -> list[tuple]:
    """Rows as sorted tuples of Python values, timestamps as UTC microseconds, whichever reader made them."""
    cols = {}
    for name in sorted(c for c in table.column_names if c not in drop):
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64())
        cols[name] = col.to_pylist()
    rows = list(zip(*cols.values())) if cols else []
    return sorted(rows, key=repr)


def spark_rows(spark, path: str, changes: bool = False) -> list[tuple]:
    reader = spark.read.format("delta")
    if changes:
        reader = reader.option("readChangeFeed", "true").option("startingVersion", 0)
    return plain(reader.load(path).toArrow(), drop=["_commit_timestamp"])


def rs_rows(path: str, changes: bool = False) -> list[tuple]:
    table = DeltaTable(path)
    data = pa.table(table.load_cdf(starting_version=0)) if changes else table.to_pyarrow_table()
    return plain(data, drop=["_commit_timestamp"])


def test_delta_rs_reads_every_table_and_the_change_feeds_as_spark_does(spark, tmp_path, local_conf):
    images, table, tags = tmp_path / "img", tmp_path / "table", tmp_path / "tags"
    synth.write_dataset(images, 4, seed=7, px=48)
    embed_conf = local_conf(images, table, "embed.engine=torch", "embed.partitions=1")
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()
    # a second run with an image added, one changed and one deleted: inserts, updates and deletes in the feed
    synth.write_dataset(images, 1, seed=8, px=48, start=4)
    changed = sorted(images.glob("img000001.*"))[0]
    changed.write_bytes((images / sorted(p.name for p in images.glob("img000002.*"))[0]).read_bytes())
    os.utime(changed, (1_900_000_000, 1_900_000_000))
    sorted(images.glob("img000003.*"))[0].unlink()
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()

    TagJob(spark=spark, conf=config.load(LOCAL, [f"tag.table={table}", f"tag.tags={tags}", "tag.vocab=shapes",
                                                  "tag.threshold=-1", "tag.max_tags=2"]), log=lambda *_: None).launch()
    CaptionJob(spark=spark, conf=config.load(LOCAL, [f"caption.table={table}", f"caption.tags={tags}",
                                                      "caption.model=lakelens-tiny-coca", "caption.max_tokens=6",
                                                      "caption.partitions=1"]), log=lambda *_: None).launch()
    dups = tmp_path / "dups"
    DedupJob(spark=spark, conf=config.load(LOCAL, [f"dedup.table={table}", f"dedup.out={dups}",
                                                    "dedup.threshold=0.5", "dedup.guard=0.5"]), log=lambda *_: None).launch()
    index = tmp_path / "index"
    IndexJob(spark=spark, conf=config.load(LOCAL, [f"index.table={table}", f"index.index={index}"]),
             log=lambda *_: None).launch()
    (tmp_path / "queries.txt").write_text("a red circle\n\na blue square\n")  # the empty line: an error row
    run_batch(spark, str(index), str(tmp_path / "queries.txt"), str(tmp_path / "batch"), k=3)

    tables = {"embeddings": table, "tags": tags, "duplicates": dups, "pairs": pairs_path(str(dups)),
              "batch results": tmp_path / "batch"}
    for name, path in tables.items():
        assert delta_sql.is_delta(spark, str(path)), name
        got = rs_rows(str(path))
        assert got == spark_rows(spark, str(path)), name
        assert got or name == "pairs", f"{name}: no rows to compare"
    for name in ("embeddings", "tags"):
        feed = rs_rows(str(tables[name]), changes=True)
        assert feed == spark_rows(spark, str(tables[name]), changes=True), f"{name} change feed"
    kinds = {row[0] for row in rs_rows(str(table), changes=True)}  # _change_type sorts first
    assert kinds == {"insert", "update_preimage", "update_postimage", "delete"}


@pytest.mark.classic_only  # the table is made as lakelens made it then: with Delta's Python table API
def test_a_table_made_before_nullable_elements_reads_after_the_documented_rewrite(spark, tmp_path, local_conf):
    from delta.tables import DeltaTable as SparkDeltaTable

    images, table = tmp_path / "img", str(tmp_path / "table")
    (SparkDeltaTable.create(spark).location(table).addColumns(SCHEMA)
     .property("delta.enableChangeDataFeed", "true").property(ROOTS_PROPERTY, "[]").execute())
    synth.write_dataset(images, 3, seed=7, px=48)
    embed_conf = local_conf(images, table, "embed.engine=torch", "embed.partitions=1")
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()
    synth.write_dataset(images, 1, seed=8, px=48, start=3)
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()
    assert rs_rows(table) == spark_rows(spark, table)  # the table itself reads
    with pytest.raises(Exception, match="Cannot cast column 'embedding'"):  # the change feed does not
        rs_rows(table, changes=True)

    assert delta_sql.rewrite_with_nullable_elements(spark, table)  # docs/delta-readers.md
    assert not delta_sql.rewrite_with_nullable_elements(spark, table)  # once is enough
    assert rs_rows(table, changes=True) == spark_rows(spark, table, changes=True)
    schema = spark.read.format("delta").load(table).schema
    assert schema["embedding"].dataType.containsNull
    properties = delta_sql.snapshot(spark, table)[2]
    assert properties["delta.enableChangeDataFeed"] == "true" and ROOTS_PROPERTY in properties
    # the NOT NULL columns are CHECK constraints now (a DataFrame write declares every column nullable)
    assert {k for k in properties if k.startswith("delta.constraints.")} == {
        f"delta.constraints.{f.name}_not_null" for f in SCHEMA.fields if not f.nullable}
    with pytest.raises(Exception, match="id_not_null"):
        spark.sql(f"INSERT INTO {delta_sql.table_ref(table)} (id, path, size_bytes, model, embedded_at) "
                  "VALUES (NULL, 'x', 1, 'm', current_timestamp())")
    # later runs carry on, and their changes read too
    synth.write_dataset(images, 1, seed=9, px=48, start=4)
    result = EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()
    assert result.embedded == 1
    assert rs_rows(table, changes=True) == spark_rows(spark, table, changes=True)



@pytest.mark.connect_covered("test_delta_readers.py::test_delta_rs_reads_every_table_and_the_change_feeds_as_spark_does")
def test_delta_rs_reads_the_embeddings_table_after_drop_root(spark, tmp_path, local_conf):
    """`lakelens embed --drop-root`: a DELETE and a table property change; delta-rs reads the rows and the
    feed as Spark does."""
    first, second, table = tmp_path / "a", tmp_path / "b", tmp_path / "table"
    synth.write_dataset(first, 3, seed=7, px=48)
    synth.write_dataset(second, 2, seed=8, px=48)
    for images in (first, second):
        EmbedJob(spark=spark, conf=local_conf(images, table, "embed.engine=torch", "embed.partitions=1"),
                 log=lambda *_: None).launch()
    EmbedJob(spark=spark, conf=local_conf(second, table, "embed.engine=torch", "embed.partitions=1"),
             log=lambda *_: None, drop_roots=[str(first)]).launch()
    got = rs_rows(str(table))
    assert got == spark_rows(spark, str(table)) and len(got) == 2
    assert rs_rows(str(table), changes=True) == spark_rows(spark, str(table), changes=True)
    assert DeltaTable(str(table)).to_pyarrow_dataset().count_rows() == 2
