"""Images stored in tables: img2dataset's Parquet output, a Hugging Face `datasets` Image Parquet and a Delta table
with a binary column, embedded in place with their captions (bad rows as error rows, per-data-file re-runs),
indexed, and their thumbnails read back through the Parquet footer."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import local_config
from PIL import Image
from webdataset import sample_image

from lakelens import EmbedJob, IndexJob, Searcher, path_id
from lakelens.errors import ConfigError
from lakelens.web.thumbs import ThumbCache, render


def run(spark, conf):
    return EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()


def rows_by_path(spark, table) -> dict:
    return {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}


def img2dataset_parquet(folder, shard: int, keys: list[int], bad: tuple = ()):
    """One file of img2dataset's `--output_format parquet`: key, jpg (the bytes), caption, url, width, height,
    sha256, status; with its NNNNN_stats.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [b"not an image" if k in bad else sample_image(k) for k in keys]
    pq.write_table(pa.table({
        "key": [f"{k:09d}" for k in keys], "jpg": pa.array(images, pa.binary()),
        "caption": [f"a table photo {k}" for k in keys], "url": [f"http://example/{k}.jpg" for k in keys],
        "width": [64] * len(keys), "height": [48] * len(keys), "status": ["success"] * len(keys)}),
        folder / f"{shard:05d}.parquet", row_group_size=2)
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(keys)}))


def test_img2dataset_parquet_embeds_in_place_with_captions_and_reruns_per_data_file(spark, tmp_path):
    src = tmp_path / "laion parquet"
    img2dataset_parquet(src, 0, [0, 1, 2, 3, 4], bad=(3,))
    img2dataset_parquet(src, 1, [10000, 10001])
    conf = local_config(src, tmp_path / "t", f"index.table={tmp_path / 't'}", f"index.index={tmp_path / 'index'}")
    first = run(spark, conf)
    assert (first.new, first.embedded, first.failed) == (2, 6, 1)
    rows = rows_by_path(spark, tmp_path / "t")
    root = f"file:{src}"
    assert set(rows) == {f"{root}/{k:09d}" for k in (0, 1, 2, 3, 4, 10000, 10001)}
    assert rows[f"{root}/000000003"]["error"] == "not an image"
    r = rows[f"{root}/000000004"]
    assert r["caption"] == "a table photo 4" and r["container"]["offset"] == 4 and r["container"]["column"] == "jpg"
    assert r["container"]["path"] == f"{root}/00000.parquet" and r["size_bytes"] == len(sample_image(4))
    assert (r["width"], r["height"]) == Image.open(io.BytesIO(sample_image(4))).size

    again = run(spark, conf)
    assert (again.unchanged, again.embedded, again.deleted) == (2, 0, 0)
    (src / "00001.parquet").unlink()
    img2dataset_parquet(src, 2, [20000])
    third = run(spark, conf)
    assert (third.new, third.unchanged, third.embedded, third.deleted) == (1, 1, 1, 2)
    assert set(rows_by_path(spark, tmp_path / "t")) == {f"{root}/{k:09d}" for k in (0, 1, 2, 3, 4, 20000)}

    assert IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch().rows == 5
    searcher = Searcher.open(tmp_path / "index")
    cache = ThumbCache(max_side=64)
    for k in (4, 20000, 1):  # rows in the second row group of a file, and in another file
        assert cache.get(searcher, path_id(f"{root}/{k:09d}")) == render(sample_image(k), 64)
    hit = searcher.search_image(sample_image(2), k=1).iloc[0]
    assert hit["path"] == f"{root}/000000002" and hit["caption"] == "a table photo 2"
    assert list(searcher.search_text('"photo 20000"', k=3, mode="keyword")["path"]) == [f"{root}/000020000"]


def test_hugging_face_image_parquet_and_a_delta_table_of_bytes(spark, tmp_path):
    hf = tmp_path / "hf" / "data"
    hf.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": sample_image(k), "path": f"img_{k}.jpg"} for k in range(3)], image_type),
        "text": [f"hugging {k}" for k in range(3)]}), hf / "train-00000-of-00001.parquet")
    conf = local_config(tmp_path / "hf", tmp_path / "t")
    assert (run(spark, conf).embedded) == 3
    rows = rows_by_path(spark, tmp_path / "t")
    assert set(rows) == {f"file:{tmp_path / 'hf'}/img_{k}.jpg" for k in range(3)}
    assert rows[f"file:{tmp_path / 'hf'}/img_1.jpg"]["caption"] == "hugging 1"
    assert rows[f"file:{tmp_path / 'hf'}/img_1.jpg"]["container"]["column"] == "image.bytes"

    # a Delta table with a binary `content` column (Spark's binaryFile's name), read at its latest version
    delta = str(tmp_path / "photos delta")
    spark.createDataFrame([(f"p{k}", bytearray(sample_image(100 + k)), f"delta photo {k}") for k in range(4)],
                          "key string, content binary, caption string").coalesce(1).write.format("delta").save(delta)
    spark.sql(f"DELETE FROM delta.`{delta}` WHERE key = 'p2'")
    conf = local_config(delta, tmp_path / "t2", f"index.table={tmp_path / 't2'}", f"index.index={tmp_path / 'ix'}")
    first = run(spark, conf)
    assert first.embedded == 3
    rows = rows_by_path(spark, tmp_path / "t2")
    assert set(rows) == {f"file:{delta}/p{k}" for k in (0, 1, 3)}
    emb = {k: np.asarray(rows[f"file:{delta}/p{k}"]["embedding"]) for k in (0, 1, 3)}
    # an update rewrites a data file: the moved rows follow it, the changed one is embedded again
    spark.sql(f"UPDATE delta.`{delta}` SET caption = 'a new caption' WHERE key = 'p1'")
    second = run(spark, conf)
    assert second.embedded == 3 and second.deleted == 0
    rows = rows_by_path(spark, tmp_path / "t2")
    assert set(rows) == {f"file:{delta}/p{k}" for k in (0, 1, 3)}
    assert rows[f"file:{delta}/p1"]["caption"] == "a new caption"
    assert np.allclose(rows[f"file:{delta}/p3"]["embedding"], emb[3], atol=1e-6)
    assert IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch().rows == 3
    searcher = Searcher.open(tmp_path / "ix")
    assert ThumbCache(max_side=64).get(searcher, path_id(f"file:{delta}/p3")) == render(sample_image(103), 64)


def test_a_table_without_image_bytes_is_a_config_error_naming_the_columns(spark, tmp_path):
    src = tmp_path / "numbers"
    src.mkdir()
    pq.write_table(pa.table({"key": ["a"], "jpg": ["not bytes"], "caption": ["x"]}), src / "part-0.parquet")
    with pytest.raises(ConfigError, match=r"'jpg' is string, not image bytes.*key \(string\), jpg \(string\)"):
        run(spark, local_config(src, tmp_path / "t", "embed.image_column=jpg"))
    with pytest.raises(ConfigError, match=r"no image columns found.*jpg \(string\)"):
        run(spark, local_config(src, tmp_path / "t"))


def test_a_delta_source_deleting_through_deletion_vectors_loses_those_rows(spark, tmp_path):
    """A delete that marks rows in a deletion vector leaves the data file's bytes as they were: the file's
    live rows tell the change, and the deleted row's image goes from the embeddings table."""
    delta = str(tmp_path / "dv")
    spark.createDataFrame([(f"k{k}", bytearray(sample_image(200 + k))) for k in range(4)],
                          "key string, jpg binary").coalesce(1).write.format("delta") \
        .option("delta.enableDeletionVectors", "true").save(delta)
    conf = local_config(delta, tmp_path / "t")
    assert run(spark, conf).embedded == 4
    files_before = set(spark.read.format("delta").load(delta).inputFiles())
    spark.sql(f"DELETE FROM delta.`{delta}` WHERE key = 'k1'")
    assert set(spark.read.format("delta").load(delta).inputFiles()) == files_before  # a vector, not a rewrite
    second = run(spark, conf)
    assert second.changed == 1
    assert set(rows_by_path(spark, tmp_path / "t")) == {f"file:{delta}/k{k}" for k in (0, 2, 3)}


def test_integer_keys_null_image_paths_and_duplicate_keys(spark, tmp_path):
    """A `key` column of integers is the key; a Hugging Face Image without a `path` is named by its data file and
    row; a key two rows share stops the run before anything is written, naming the key."""
    from lakelens.errors import DataError

    delta = str(tmp_path / "ints")
    spark.createDataFrame([(k, bytearray(sample_image(300 + k))) for k in range(2)],
                          "key long, jpg binary").coalesce(1).write.format("delta").save(delta)
    assert run(spark, local_config(delta, tmp_path / "t")).embedded == 2
    assert set(rows_by_path(spark, tmp_path / "t")) == {f"file:{delta}/{k}" for k in range(2)}

    hf = tmp_path / "hf"
    hf.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": sample_image(k), "path": p} for k, p in
                                                ((0, "a.jpg"), (1, None), (2, None))], image_type)}),
                   hf / "train.parquet")
    assert run(spark, local_config(hf, tmp_path / "t2")).embedded == 3
    rows = rows_by_path(spark, tmp_path / "t2")
    assert set(rows) == {f"file:{hf}/{p}" for p in ("a.jpg", "train.parquet#1", "train.parquet#2")}
    from lakelens.ingest.storage import read_located
    from lakelens.ingest.table import with_source_columns

    located = {r["path"]: r["locator"] for r in with_source_columns(
        spark.read.format("delta").load(str(tmp_path / "t2"))).collect()}
    for k, p in ((0, "a.jpg"), (2, "train.parquet#2")):  # thumbnails: by the path, by the row's place
        assert read_located(f"file:{hf}/{p}", located[f"file:{hf}/{p}"], 1 << 20) == sample_image(k)

    dup = tmp_path / "dup"
    dup.mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "a"], "jpg": [sample_image(k) for k in range(3)]}), dup / "p.parquet")
    with pytest.raises(DataError, match=r"key 'a' .*2 rows"):
        run(spark, local_config(dup, tmp_path / "t3"))
    assert not (tmp_path / "t3" / "_delta_log").exists() or rows_by_path(spark, tmp_path / "t3") == {}
