"""`lakelens caption` on Spark local[2] with real Delta: captions of a handful of embedded images land in the
tags table (source caption, the Captioner's own text and score), an unchanged re-run commits nothing, and an
added image is captioned alone while the other captions stay as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from lakelens import DataError, EmbedJob, config, delta_sql, path_id
from lakelens.cli import main
from lakelens.models.registry import ModelSpec
from lakelens.tags.caption_job import CaptionJob
from lakelens.tags.captions import Captioner
from lakelens.train import synth

COCA = "lakelens-tiny-coca"


def captions_of(spark, tags):
    df = spark.read.format("delta").load(str(tags)).toPandas()
    return df, {Path(p).name: (t, s) for p, t, s in zip(df["path"], df["tag"], df["score"])}


def test_caption_job_writes_captions_and_is_incremental(spark, tmp_path, local_conf, capsys):
    images, table, tags = tmp_path / "images", tmp_path / "table", tmp_path / "tags"
    synth.write_dataset(images, 3, seed=3, px=64)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")  # an embedding error: never captioned
    # one task at a time: one Python worker loads torch and both models, as it would stay warm between runs
    embed_conf = local_conf(images, table, "embed.engine=torch", "embed.partitions=1")
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()

    # first run through the command line: every embedded image
    assert main(["caption", "--table", str(table), "--tags", str(tags), "--model", COCA, "--max-tokens", "8",
                 "--conf", str(ROOT / "conf" / "local.yaml"), "--set", "caption.partitions=1"]) == 0
    assert '"mode": "full"' in capsys.readouterr().out
    df, first = captions_of(spark, tags)
    assert sorted(first) == ["img000000.png", "img000001.jpg", "img000002.jpg"]
    assert set(df["source"]) == {"caption"} and set(df["model"]) == {f"{COCA}@none"} and df["vocab"].isna().all()
    assert sorted(df["id"]) == sorted(path_id(p) for p in df["path"])  # the embeddings table's ids
    # the Spark rows are the Captioner's own output on the same files
    local = Captioner(ModelSpec(COCA), max_tokens=8)([(images / name).read_bytes() for name in sorted(first)])
    for name, caption in zip(sorted(first), local):
        assert first[name][0] == caption.text and abs(first[name][1] - caption.score) < 1e-4

    conf = config.load(ROOT / "conf" / "local.yaml", [f"caption.table={table}", f"caption.tags={tags}",
                                                      f"caption.model={COCA}", "caption.max_tokens=8",
                                                      "caption.partitions=1"])
    before = delta_sql.version(spark, str(tags))
    again = CaptionJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert again.mode == "none" and again.captioned == 0
    assert delta_sql.version(spark, str(tags)) == before  # nothing committed

    synth.write_dataset(images, 1, seed=4, px=64, start=3)  # one new image
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()
    added = CaptionJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (added.mode, added.captioned, added.failed, added.dropped) == ("incremental", 1, 0, 0)
    df, now = captions_of(spark, tags)
    assert len(df) == 4 and {k: v for k, v in now.items() if k != "img000003.jpg"} == first
    assert now["img000003.jpg"][0] == Captioner(ModelSpec(COCA), max_tokens=8)([(images / "img000003.jpg")
                                                                                  .read_bytes()])[0].text


@pytest.mark.connect_covered("test_caption_job.py::test_caption_run_on_one_folder_drops_stale_captions_of_other_folders[delta]")
def test_caption_images_scope_captions_only_that_folder_and_keeps_the_rest(spark, tmp_path, local_conf):
    """caption.images (`--images`): a run captions only the table's images under that folder; a run over
    another folder adds its captions beside the first folder's; a run without it takes the whole table."""
    root, table, tags = tmp_path / "images", tmp_path / "table", tmp_path / "tags"
    synth.write_dataset(root / "a", 2, seed=5, px=64)
    synth.write_dataset(root / "b", 1, seed=6, px=64, start=2)
    embed_conf = local_conf(root, table, "embed.engine=torch", "embed.partitions=1")
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()

    def run(*scope):
        conf = config.load(ROOT / "conf" / "local.yaml", [f"caption.table={table}", f"caption.tags={tags}",
                                                          f"caption.model={COCA}", "caption.max_tokens=8",
                                                          "caption.partitions=1", *scope])
        return CaptionJob(spark=spark, conf=conf, log=lambda *_: None).launch()

    def folders():
        df = spark.read.format("delta").load(str(tags)).toPandas()
        return sorted(Path(p).parent.name + "/" + Path(p).name for p in df["path"])

    first = run(f"caption.images={root / 'a'}")
    assert (first.mode, first.captioned) == ("full", 2)
    assert folders() == ["a/img000000.png", "a/img000001.jpg"]
    assert run(f"caption.images={root / 'a'}").mode == "none"  # same scope, same table: nothing to do
    other = run(f"caption.images={root / 'b'}/")  # another scope: its own images, the first folder's stay
    assert (other.mode, other.captioned) == ("full", 1)
    assert folders() == ["a/img000000.png", "a/img000001.jpg", "b/img000002.jpg"]
    whole = run()  # no scope: the whole table, each image once
    assert whole.mode == "full" and whole.captioned == 3
    assert folders() == ["a/img000000.png", "a/img000001.jpg", "b/img000002.jpg"]
    # a folder that holds none of the table's images says so, and writes nothing
    with pytest.raises(DataError, match="caption.images"):
        run(f"caption.images={tmp_path / 'elsewhere'}")


@pytest.mark.parametrize("fmt", ["delta", pytest.param("parquet", marks=pytest.mark.connect_covered(
    "test_caption_job.py::test_caption_run_on_one_folder_drops_stale_captions_of_other_folders[delta]"))])
def test_caption_run_on_one_folder_drops_stale_captions_of_other_folders(spark, tmp_path, local_conf, fmt):
    """A caption run over folder b after images of folder a changed or went: a's deleted image and a's
    changed image lose their captions (they were made from pictures that are gone), a's unchanged image
    keeps its own; a later run over a captions the changed image from its new picture. Delta tables tell
    by their change feed; Parquet tables by their rows now (gone, or embedded after the last run)."""
    root, table, tags = tmp_path / "images", tmp_path / "table", tmp_path / "tags"
    synth.write_dataset(root / "a", 3, seed=5, px=64)
    synth.write_dataset(root / "b", 2, seed=6, px=64, start=3)
    embed_conf = local_conf(root, table, "embed.engine=torch", "embed.partitions=1", f"embed.format={fmt}")
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()

    def run(*scope):
        conf = config.load(ROOT / "conf" / "local.yaml", [f"caption.table={table}", f"caption.tags={tags}",
                                                          f"caption.model={COCA}", "caption.max_tokens=8",
                                                          "caption.partitions=1", f"caption.format={fmt}",
                                                          *scope])
        return CaptionJob(spark=spark, conf=conf, log=lambda *_: None).launch()

    def captions():
        df = spark.read.format("delta").load(str(tags)).toPandas()
        return {Path(p).parent.name + "/" + Path(p).name: t for p, t in zip(df["path"], df["tag"])}

    assert run(f"caption.images={root / 'a'}").captioned == 3
    first = captions()
    assert sorted(first) == ["a/img000000.png", "a/img000001.jpg", "a/img000002.jpg"]

    (root / "a" / "img000000.png").unlink()
    changed = root / "a" / "img000001.jpg"
    synth.render(synth.samples(1, seed=77)[0], 64, seed=77).save(changed, quality=92)  # another picture
    EmbedJob(spark=spark, conf=embed_conf, log=lambda *_: None).launch()

    other = run(f"caption.images={root / 'b'}")
    assert (other.mode, other.captioned, other.dropped) == ("full", 2, 2)
    now = captions()
    assert sorted(now) == ["a/img000002.jpg", "b/img000003.jpg", "b/img000004.png"]
    assert now["a/img000002.jpg"] == first["a/img000002.jpg"]

    again = run(f"caption.images={root / 'a'}")  # the changed image is captioned from its new picture
    assert (again.mode, again.captioned) == ("full", 2)
    now = captions()
    assert sorted(now) == ["a/img000001.jpg", "a/img000002.jpg", "b/img000003.jpg", "b/img000004.png"]
    assert now["a/img000001.jpg"] == Captioner(ModelSpec(COCA), max_tokens=8)([changed.read_bytes()])[0].text
