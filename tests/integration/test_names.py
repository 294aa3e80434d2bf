"""Any file name works end to end: embed job (Spark local[2], real Delta), index job, thumbnails served by
the real waitress server. Stored paths are `file:` + the absolute path with the literal name."""

from __future__ import annotations

import io
import os
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from conftest import encode, noise_image
from PIL import Image
from webindex import ThreadServer

from lakelens import EmbedJob, IndexJob, path_id
from lakelens import index as ix
from lakelens.ingest.listing import list_files
from lakelens.ingest.paths import from_uri
from lakelens.web.thumbs import render

LONG = "L" * 196 + ".png"  # 200 characters
# name -> seed of its pixels; every file is a different image
NAMES = {
    "name with spaces ü.jpg": 1, "100% sure.png": 2, "a%20b.png": 3, "a b.png": 4, "%41.png": 5, "A.png": 6,
    "a#b.png": 7, "a": 8, "q?x.png": 9, "q": 10, "[x].png": 11, "b]c.jpg": 12, "star*.png": 13,
    "{a,b}.png": 14, "-lead.jpg": 15, LONG: 16, "fotos ção/x.png": 17, "fotos ção/sub dir #2/y?.jpg": 18,
    "plus+sign;semi=eq&amp'.png": 19, "sub/k=v/w.png": 20, "sub/x_y.png": 21,
}
EMPTY = ["empty one.jpg", "empty #2 %41 ü?.png", "fotos ção/empty[3].jpg"]
# Names starting with '_' or '.' below the listed folder are skipped, files and folders alike (docs/embedding.md).
# Spark's own rule has exceptions that lakelens does not keep: its file index holds '_metadata*' and
# '_common_metadata*' files (its scan then drops them) and '_metadata*' folders, and its scan keeps
# '_' names holding '='. Spark also skips files ending in '._COPYING_' (a copy in progress).
HIDDEN = ["_under.png", ".dot.png", "_hidden dir/h.png", ".dot dir/d.png", "sub/.deep/e.png", "sub/_deep/f.png",
          "fotos ção/.x.png", "_x=1.png", "_k=v/g.png", "_metadata.png", "_common_metadata x.png",
          "sub/_metadata dir/z.png", "_empty hidden.png", "copying.png._COPYING_"]


def image_bytes(name: str, seed: int) -> bytes:
    fmt = "JPEG" if name.endswith(".jpg") else "PNG"
    return encode(noise_image(seed, size=(40 + seed % 5 * 7, 30 + seed % 3 * 9)), fmt)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    base = tmp_path_factory.mktemp("names")
    root = base / "imgs"
    files: dict[str, Path] = {}
    for name, seed in NAMES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(image_bytes(name, seed))
        files[name] = p
    for name in EMPTY:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    for i, name in enumerate(HIDDEN):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"" if "empty" in name else image_bytes(name, 500 + i))
    # a symlinked file and a symlinked folder, their targets outside the listed folder: rows keep the
    # links' own names
    outside = base / "outside"
    outside.mkdir()
    (outside / "target.png").write_bytes(image_bytes("target.png", 30))
    os.symlink(outside / "target.png", root / "link to target #.png")
    files["link to target #.png"] = root / "link to target #.png"
    (outside / "dir").mkdir()
    (outside / "dir" / "inner %20.png").write_bytes(image_bytes("inner.png", 31))
    os.symlink(outside / "dir", root / "linked folder")
    files["linked folder/inner %20.png"] = root / "linked folder" / "inner %20.png"
    return base, root, files


def test_every_name_is_one_row_with_its_literal_path_then_served_as_its_own_thumbnail(spark, lake, local_conf):
    base, root, files = lake
    table, index = base / "table", base / "index"
    logs: list[str] = []
    conf = local_conf(root, table, f"index.table={table}", f"index.index={index}", "embed.chunk_size=7")
    first = EmbedJob(spark=spark, conf=conf, log=logs.append).launch()

    rows = {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}
    want = {f"file:{os.path.abspath(p)}" for p in files.values()}
    empty = {f"file:{os.path.abspath(root / n)}" for n in EMPTY}
    assert len(rows) == len(want) + len(empty)  # exactly one row per file: none twice, none hidden
    assert set(rows) == want | empty
    assert (first.new, first.embedded, first.failed) == (len(want) + len(empty), len(want), len(empty))
    for path, r in rows.items():
        assert r["id"] == path_id(path)
        assert r["model"] == "lakelens-tiny@none"
    for path in want:
        r = rows[path]
        assert r["error"] is None and len(r["embedding"]) == 128, path
        assert r["size_bytes"] == os.path.getsize(path[len("file:"):])
    for name in EMPTY:
        p = root / name
        r = rows[f"file:{p}"]
        assert (r["error"], r["size_bytes"], r["embedding"], r["content_sha256"]) == ("empty file", 0, None, None)
        # the modification time of a zero-length file is the file's own, as for every other file
        ms = os.stat(p).st_mtime_ns // 1_000_000
        assert r["modified"] == datetime.fromtimestamp(ms // 1000).replace(microsecond=ms % 1000 * 1000)
    assert rows[f"file:{root / LONG}"]["path"].endswith("/" + LONG) and len(LONG) == 200
    for hidden in HIDDEN:
        assert f"file:{root / hidden}" not in rows

    # a second run: nothing to embed, nothing deleted, the same ids
    again = EmbedJob(spark=spark, conf=conf, log=logs.append).launch()
    assert (again.embedded, again.new, again.changed, again.deleted, again.failed) == (0, 0, 0, 0, 0)
    assert again.unchanged == len(rows)
    rows2 = {r["path"]: r["id"] for r in spark.read.format("delta").load(str(table)).collect()}
    assert rows2 == {p: r["id"] for p, r in rows.items()}

    result = IndexJob(spark=spark, conf=conf, log=logs.append).launch()
    assert result.built and result.rows == len(want)
    manifest = ix.read_manifest(index)
    assert manifest["rows"] == len(want)

    server = ThreadServer(index)
    try:
        thumbs = {}
        for name, p in files.items():
            got = fetch(f"{server.base}/thumb/{path_id('file:' + str(p))}")
            assert got == (200, render(p.read_bytes())), name
            with Image.open(p) as original, Image.open(io.BytesIO(got[1])) as thumb:
                assert thumb.size == original.size, name  # small images keep their size
            thumbs[name] = got[1]
        # '#', '?' and '%' are characters of the name, never a fragment, query or escape
        for name, decoy in (("a#b.png", "a"), ("q?x.png", "q"), ("a%20b.png", "a b.png"), ("%41.png", "A.png")):
            assert thumbs[name] != thumbs[decoy]
        for name in EMPTY:  # error rows are not indexed
            assert fetch(f"{server.base}/thumb/{path_id('file:' + str(root / name))}")[0] == 404
    finally:
        server.close()


def test_names_starting_with_underscore_or_dot_are_skipped(spark, lake):
    """What the listing skips, next to what Spark's own file index holds: lakelens keeps one rule (no part
    below the listed folder starts with '_' or '.'), where Spark keeps partition-like '_k=v' names and its
    index holds Parquet summary names ('_metadata*', '_common_metadata*')."""
    base, root, files = lake
    listed, count, _ = list_files(spark, str(root))
    paths = {r["path"] for r in listed.collect()}
    assert count == len(paths) == len(files) + len(EMPTY)
    assert paths == {f"file:{p}" for p in files.values()} | {f"file:{root / n}" for n in EMPTY}
    indexed = {from_uri(u) for u in spark.read.format("binaryFile").option("recursiveFileLookup", "true")
               .load(str(root)).inputFiles()}
    spark_keeps = {n for n in HIDDEN if f"file:{root / n}" in indexed}
    assert spark_keeps == {"_x=1.png", "_k=v/g.png", "_metadata.png", "_common_metadata x.png",
                           "sub/_metadata dir/z.png"}  # lakelens skips them all the same
    assert not any(f"file:{root / n}" in paths for n in HIDDEN)


@pytest.mark.parametrize("path_glob", ["", "*.{png,jpg}", "[!a]*", "*%*"])
def test_a_local_folder_is_listed_on_the_driver_as_spark_lists_it(spark, lake, path_glob):
    """The driver's walk of a local folder holds exactly the rows (stored path, size, modification time) of
    Spark's binaryFile listing of it, with links followed and names skipped alike, also through a
    pathGlobFilter (Hadoop's glob syntax: braces, negated classes)."""
    from lakelens.ingest.listing import list_with_spark
    from lakelens.spark import is_connect

    base, root, files = lake
    driver = list_files(spark, str(root), path_glob)
    # a local folder: walked on the driver; under Spark Connect by an executor (the client may be elsewhere)
    assert (driver.local is None) == is_connect(spark)
    by_spark = list_with_spark(spark, str(root), path_glob)
    assert by_spark.local is None

    def rows(df):
        return sorted((r["path"], r["size_bytes"], r["modified"]) for r in df.collect())

    assert driver.count == by_spark.count > 0
    assert rows(driver.df) == rows(by_spark.df)
    if driver.local is None:
        return
    assert driver.local["path"].tolist() == sorted(driver.local["path"])
    if path_glob == "*.{png,jpg}":
        assert driver.count == sum(n.endswith((".png", ".jpg")) for n in [*files, *EMPTY])
    if path_glob == "":
        assert {"file:" + str(files["linked folder/inner %20.png"]), f"file:{root}/empty one.jpg"} <= set(
            driver.local["path"])


def test_a_folder_linked_into_itself_is_walked_once(tmp_path):
    from lakelens.ingest.listing import walk_local

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "up")  # a cycle: a/up -> . -> a/up ...
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")  # a broken link is no file
    listed = walk_local(str(tmp_path))
    assert listed["path"].tolist() == [f"file:{tmp_path}/a/x.png"]
    assert listed["size_bytes"].tolist() == [1]


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_name_that_is_not_utf8_is_an_error_row_and_the_rest_is_embedded(spark, tmp_path, local_conf):
    """Linux names are bytes: one that is not UTF-8 (here byte 0xff, and a folder with 0xfe) cannot be
    a Spark string as it is, so it gets an error row whose path spells each such byte as `\\xNN`, with the
    file's size and time, and the rest of the folder is embedded. A re-run leaves it unchanged, and the
    index job builds over the rows that have vectors."""
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "ok.png").write_bytes(image_bytes("ok.png", 40))
    raw = os.fsencode(root)
    with open(raw + b"/bad\xff.png", "wb") as f:
        f.write(image_bytes("bad.png", 41))
    os.mkdir(raw + b"/dir\xfe")
    with open(raw + b"/dir\xfe/in.png", "wb") as f:
        f.write(image_bytes("in.png", 42))
    table, index = tmp_path / "table", tmp_path / "index"
    conf = local_conf(root, table, f"index.table={table}", f"index.index={index}")
    first = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (first.new, first.embedded, first.failed) == (3, 1, 2)

    rows = {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}
    bad, inner = f"file:{root}/bad\\xff.png", f"file:{root}/dir\\xfe/in.png"
    assert set(rows) == {f"file:{root}/ok.png", bad, inner}
    assert rows[f"file:{root}/ok.png"]["error"] is None
    for path, raw_path in ((bad, raw + b"/bad\xff.png"), (inner, raw + b"/dir\xfe/in.png")):
        r = rows[path]
        assert (r["error"], r["embedding"], r["id"]) == ("name not UTF-8", None, path_id(path))
        assert r["size_bytes"] == os.path.getsize(raw_path)

    again = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (again.new, again.changed, again.deleted, again.embedded, again.failed, again.unchanged) == (0, 0, 0, 0, 0, 3)
    assert {r["path"]: r["embedded_at"] for r in spark.read.format("delta").load(str(table)).collect()} == {
        p: r["embedded_at"] for p, r in rows.items()}

    with open(raw + b"/later\xfd.png", "wb") as f:  # one more, into the table that exists now
        f.write(image_bytes("later.png", 43))
    third = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (third.new, third.embedded, third.failed, third.unchanged) == (1, 0, 1, 3)
    rows = {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}
    assert len(rows) == 4 and rows[f"file:{root}/later\\xfd.png"]["error"] == "name not UTF-8"

    result = IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert result.built and result.rows == 1
