"""Images inside WebDataset shards laid out as img2dataset writes them: the embed job (one row per image member,
with its caption; bad members and a truncated shard as error rows; per-shard re-runs), the index, and the query
side reading a member by its offset (thumbnails, captions in results)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import encode, noise_image
from PIL import Image
from webdataset import member_bytes, sample_image, write_shard

from lakelens import EmbedJob, IdCollisionError, IndexJob, Searcher, path_id
from lakelens.ingest.shards import TRUNCATED_SHARD, read_members
from lakelens.ingest.storage import StorageError, read_located
from lakelens.web.thumbs import ThumbCache, ThumbError, render

BIG = encode(noise_image(99, size=(400, 300)), "PNG")  # over the run's embed.max_file_bytes


def run(spark, conf):
    return EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()


def rows_by_path(spark, table) -> dict:
    return {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}


def truncate_in_second_member(path):
    """Cut a shard inside the data of its second image member (as an interrupted download leaves it)."""
    with tarfile.open(path) as tar:
        second = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    data = path.read_bytes()
    path.write_bytes(data[:second.offset_data + second.size // 2])


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """Three shards: 00000 (a corrupt member, one too large), 00001 (a key 00000 holds too), 00002 truncated."""
    from conftest import local_config

    base = tmp_path_factory.mktemp("wds")
    shards = base / "shards"
    write_shard(shards, 0, [0, 1, 2, 3], captions={1: "ein Fahrrad, é 🚲"},
                images={2: b"this is not an image", 3: BIG})
    write_shard(shards, 1, [10000, 10001, 0])
    write_shard(shards, 2, [20000, 20001, 20002])
    truncate_in_second_member(shards / "00002.tar")
    conf = local_config(shards, base / "t", "embed.max_file_bytes=60000", f"index.table={base / 't'}",
                        f"index.index={base / 'index'}")
    stats = run(spark, conf)
    return base, shards, conf, stats


@pytest.fixture(scope="module")
def indexed(spark, lake):
    """The index job over the first embedding run, built once for the tests that query it."""
    base, _, conf, _ = lake
    return IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch()


def test_each_image_member_is_a_row_with_its_caption_and_where_it_lives(spark, lake):
    base, shards, _, stats = lake
    rows = rows_by_path(spark, base / "t")
    stored = f"file:{shards}"
    whole = {f"{stored}/00000.tar/00000000{k}.jpg" for k in range(4)} | {
        f"{stored}/00001.tar/{k:09d}.jpg" for k in (10000, 10001, 0)} | {f"{stored}/00002.tar/000020000.jpg"}
    assert set(rows) == whole | {f"{stored}/00002.tar"}  # the truncated shard's own row
    assert (stats.new, stats.embedded, stats.failed) == (3, 6, 3)
    for path, r in rows.items():
        assert r["id"] == path_id(path)
        if path.endswith(".tar"):
            continue
        shard, name = path[:path.index(".tar/") + 4], path[path.index(".tar/") + 5:]
        assert r["container"]["path"] == shard and r["container"]["size_bytes"] == (shards / shard[-9:]).stat().st_size
        data = member_bytes(shards / shard[-9:], name)
        assert r["size_bytes"] == len(data)
        # the offset names exactly the member's bytes
        raw = (shards / shard[-9:]).read_bytes()
        assert raw[r["container"]["offset"]:r["container"]["offset"] + r["size_bytes"]] == data
        key = int(name[:9])
        assert r["caption"] == ("ein Fahrrad, é 🚲" if key == 1 else f"a photo number {key}")
    # one key in two shards: two rows, two ids
    twice = [rows[f"{stored}/0000{s}.tar/000000000.jpg"] for s in (0, 1)]
    assert twice[0]["id"] != twice[1]["id"] and twice[0]["embedding"] == twice[1]["embedding"]
    assert rows[f"{stored}/00000.tar/000000002.jpg"]["error"] == "not an image"
    big = rows[f"{stored}/00000.tar/000000003.jpg"]
    assert big["error"] == "too large" and big["embedding"] is None and big["size_bytes"] == len(BIG)
    cut = rows[f"{stored}/00002.tar"]
    assert cut["error"] == TRUNCATED_SHARD and cut["embedding"] is None
    ok = rows[f"{stored}/00002.tar/000020000.jpg"]
    assert ok["error"] is None and abs(np.linalg.norm(ok["embedding"]) - 1) < 1e-5
    assert (ok["width"], ok["height"]) == Image.open(io.BytesIO(sample_image(20000))).size


def test_members_embed_as_the_same_images_do_as_files(spark, lake, tmp_path):
    from conftest import local_config

    base, shards, _, _ = lake
    rows = rows_by_path(spark, base / "t")
    files = tmp_path / "files"
    files.mkdir()
    for k in (0, 1, 10000, 20000):
        (files / f"{k}.jpg").write_bytes(sample_image(k))
    run(spark, local_config(files, tmp_path / "t"))
    as_files = {int(p.rsplit("/", 1)[1][:-4]): r["embedding"] for p, r in rows_by_path(spark, tmp_path / "t").items()}
    stored = f"file:{shards}"
    for k, path in ((0, "00000.tar/000000000.jpg"), (1, "00000.tar/000000001.jpg"),
                    (10000, "00001.tar/000010000.jpg"), (20000, "00002.tar/000020000.jpg")):
        assert np.allclose(rows[f"{stored}/{path}"]["embedding"], as_files[k], atol=1e-6), path


def test_thumbnails_read_exactly_the_member_and_results_carry_the_caption(spark, lake, indexed):
    base, shards, conf, _ = lake
    assert indexed.rows == 6
    searcher = Searcher.open(base / "index")
    cache = ThumbCache(max_side=64)
    for shard, name in (("00000.tar", "000000001.jpg"), ("00002.tar", "000020000.jpg"), ("00001.tar", "000000000.jpg")):
        id_ = path_id(f"file:{shards}/{shard}/{name}")
        assert cache.get(searcher, id_) == render(member_bytes(shards / shard, name), 64)
    hits = searcher.search_image(sample_image(1), k=2)
    assert hits.iloc[0]["path"] == f"file:{shards}/00000.tar/000000001.jpg"
    assert hits.iloc[0]["caption"] == "ein Fahrrad, é 🚲"
    assert searcher.details(path_id(f"file:{shards}/00001.tar/000010001.jpg"))["caption"] == "a photo number 10001"
    # the captions make a keyword index without any tags table: words and phrases find their images
    found = searcher.search_text("Fahrrad", k=5, mode="keyword")
    assert list(found["path"]) == [f"file:{shards}/00000.tar/000000001.jpg"]
    found = searcher.search_text('"number 10001"', k=5, mode="keyword")
    assert list(found["path"]) == [f"file:{shards}/00001.tar/000010001.jpg"]
    # "more like this" from a member: itself first
    assert searcher.search_id(path_id(f"file:{shards}/00002.tar/000020000.jpg"), k=1).iloc[0]["score"] > 0.999
    # a shard rewritten since it was indexed (same size, another time) holds other bytes: a 404, not a wrong image
    shard = shards / "00001.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    try:
        with pytest.raises(ThumbError, match="changed since it was indexed"):
            cache.get(searcher, path_id(f"file:{shards}/00001.tar/000010001.jpg"))
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the member's place comes from the index, never from a request: a shard outside the roots is refused
    where = json.dumps({"path": f"file:{base}/elsewhere.tar", "offset": 0, "length": 10, "column": None})
    with pytest.raises(StorageError, match="outside"):
        read_located("x", where, 1 << 20, [f"file:{shards}/"])


def test_captions_evaluation_and_fine_tuning_read_members_where_they_live(spark, lake, indexed, tmp_path):
    """After embedding: the table is a captions table for `lakelens eval`, fine-tuning reads the members
    by their locator, and CoCa's caption job captions members as it captions files."""
    from conftest import ROOT

    from lakelens import config
    from lakelens.config import FinetuneConfig
    from lakelens.models.registry import ModelSpec
    from lakelens.tags.caption_job import CaptionJob
    from lakelens.tags.captions import Captioner
    from lakelens.train.eval_run import evaluate_index, read_captions
    from lakelens.train.finetune import finetune

    base, shards, _, _ = lake
    pairs = read_captions(str(base / "t"))
    # the embedded members with captions: not the bad ones, not the truncated shard's own row
    assert len(pairs) == 6 and pairs["locator"].notna().all()
    assert dict(zip(pairs["path"], pairs["caption"]))[f"file:{shards}/00000.tar/000000001.jpg"] == "ein Fahrrad, é 🚲"
    metrics = evaluate_index(str(base / "index"), pairs)
    assert (metrics["queries"], metrics["images"], metrics["missing_images"]) == (6, 6, 0)
    # the split is named: a hash of six paths under a per-run temp folder may leave one side with one pair
    pairs["split"] = ["train", "val"] * 3
    result = finetune(pairs, ModelSpec("lakelens-tiny"), FinetuneConfig(out=str(tmp_path / "ft"), epochs=1,
                                                                         batch_size=2),
                      progress=False)
    assert (result.train_pairs, result.val_pairs, result.skipped_pairs) == (3, 3, 0)

    coca = "lakelens-tiny-coca"
    conf = config.load(ROOT / "conf" / "local.yaml", [f"caption.table={base / 't'}", f"caption.tags={tmp_path / 'tags'}",
                                                      f"caption.model={coca}", "caption.max_tokens=6",
                                                      "caption.partitions=1"])
    made = CaptionJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (made.captioned, made.failed, made.missing) == (6, 0, 0)
    got = {r["path"]: r["tag"] for r in spark.read.format("delta").load(str(tmp_path / "tags")).collect()}
    name = "000000001.jpg"
    want = Captioner(ModelSpec(coca), max_tokens=6)([member_bytes(shards / "00000.tar", name)])[0].text
    assert got[f"file:{shards}/00000.tar/{name}"] == want


def test_a_rerun_reads_only_new_and_changed_shards_and_drops_removed_ones(spark, lake):
    base, shards, conf, _ = lake
    before = rows_by_path(spark, base / "t")
    again = run(spark, conf)
    assert (again.new, again.changed, again.unchanged, again.embedded, again.deleted) == (0, 0, 3, 0, 0)
    write_shard(shards, 3, [30000, 30001])  # added
    (shards / "00001.tar").unlink()  # removed
    write_shard(shards, 0, [0, 1], captions={1: "a new caption"})  # rewritten with fewer samples
    third = run(spark, conf)
    # deleted: the removed shard's three images, and the two the rewritten shard no longer holds
    assert (third.new, third.changed, third.unchanged, third.embedded, third.deleted) == (1, 1, 1, 4, 5)
    rows = rows_by_path(spark, base / "t")
    stored = f"file:{shards}"
    assert set(rows) == {f"{stored}/00000.tar/00000000{k}.jpg" for k in (0, 1)} | {
        f"{stored}/00003.tar/0000{k}.jpg" for k in (30000, 30001)} | {
        f"{stored}/00002.tar", f"{stored}/00002.tar/000020000.jpg"}
    assert rows[f"{stored}/00000.tar/000000001.jpg"]["caption"] == "a new caption"
    # the untouched truncated shard keeps its rows as they were
    for path in (f"{stored}/00002.tar", f"{stored}/00002.tar/000020000.jpg"):
        assert rows[path]["embedded_at"] == before[path]["embedded_at"]


def test_a_shard_is_read_forward_once_with_samples_grouped_by_key():
    """read_members over a stream that cannot seek back: samples whose caption comes before or after the
    image, a member with folders in its name, a second member of the same name, a non-tar file."""

    class ForwardOnly(io.RawIOBase):
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), len(self.data) - self.pos)
            buf[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a/k1.txt", b"caption first"), ("a/k1.jpg", b"J1"), ("k2.png", b"P2"), ("k2.txt", b" after "),
                           ("k3.seg.png", b"S3"), ("k3.json", b"{}"), ("k2.png", b"again")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(read_members(ForwardOnly(buf.getvalue()), 100))
    assert [(m.name, m.data, m.caption) for m in got] == [
        ("a/k1.jpg", b"J1", "caption first"), ("k2.png", b"P2", "after"), ("k3.seg.png", b"S3", None)]
    # a shard split between two tasks: each reads it whole and takes every other image, together all of them
    halves = [[m.name for m in read_members(ForwardOnly(buf.getvalue()), 100, part=p, parts=2)] for p in (0, 1)]
    assert halves == [["a/k1.jpg", "k3.seg.png"], ["k2.png"]]
    bad = list(read_members(io.BytesIO(b"not a tar at all" * 64), 100))
    assert len(bad) == 1 and bad[0].error in ("not a tar shard", TRUNCATED_SHARD)


def test_deleting_every_shard_drops_their_rows_though_img2dataset_metadata_stays(spark, tmp_path):
    """img2dataset leaves NNNNN.parquet (metadata, no image bytes) and NNNNN_stats.json beside each shard:
    with the shards gone, those are not a table of images, and the shards' rows go."""
    from conftest import local_config

    shards = tmp_path / "shards"
    write_shard(shards, 0, [0, 1])
    conf = local_config(shards, tmp_path / "t")
    assert run(spark, conf).embedded == 2
    (shards / "00000.tar").unlink()
    gone = run(spark, conf)
    assert gone.deleted == 2 and rows_by_path(spark, tmp_path / "t") == {}


@pytest.mark.connect_covered(
    "test_shards.py::test_deleting_every_shard_drops_their_rows_though_img2dataset_metadata_stays")
def test_a_member_whose_id_a_kept_row_holds_stops_the_run_and_nothing_is_written(spark, tmp_path):
    """A new shard's member whose 64-bit id a kept row of another path already has (what a hash collision
    looks like; forged here) is refused before its chunk is committed."""
    from conftest import forge_kept_rows, local_config

    shards, table = tmp_path / "shards", tmp_path / "t"
    write_shard(shards, 0, [0, 1])
    conf = local_config(shards, table)
    run(spark, conf)
    write_shard(shards, 1, [10000])
    newcomer = f"file:{shards}/00001.tar/000010000.jpg"
    forge_kept_rows(spark, table, path_id(newcomer), ["file:/elsewhere/ghost.jpg"])
    version = spark.sql(f"DESCRIBE HISTORY delta.`{table}`").first()["version"]
    with pytest.raises(IdCollisionError, match="ghost.jpg"):
        run(spark, conf)
    assert spark.sql(f"DESCRIBE HISTORY delta.`{table}`").first()["version"] == version
