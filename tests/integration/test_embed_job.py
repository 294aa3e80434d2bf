"""The embed job on Spark local[2] with real Delta tables."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, encode, forge_kept_rows, noise_image, write_images
from PIL import Image

from lakelens import EmbedJob, IdCollisionError, path_id
from lakelens.cli import main
from lakelens.ingest import listing
from lakelens.ingest import table as tables
from lakelens.models import registry as models
from lakelens.spark import session_settings


def rows_by_path(spark, table, fmt="delta"):
    return {r["path"]: r for r in spark.read.format(fmt).load(str(table)).collect()}


def run(spark, conf, **kw):
    return EmbedJob(spark=spark, conf=conf, log=lambda *_: None, **kw).launch()


def delta_version(spark, table):
    return tables.EmbeddingsTable(spark, str(table)).version()


# the Connect half leaves these out: the named test runs the same Spark path through Connect
# (the torch engine and the engines test: every engine runs inside the same pandas UDF)
BY_PARITY = pytest.mark.connect_covered("test_embed_job.py::test_parity_with_a_plain_open_clip_loop[onnx]")
BY_PARQUET = pytest.mark.connect_covered("test_embed_job.py::test_parquet_format_is_incremental_too")
# runs whose client-side lines (coverage.py, per test) another job test of the Connect half runs too, on
# data the server treats alike (docs/decisions/test-suite-time.md)
BY_RESUME = pytest.mark.connect_covered("test_embed_job.py::test_resume_after_a_crashed_run")
BY_DROP_ROOT = pytest.mark.connect_covered("test_embed_job.py::test_drop_root_deletes_that_folders_rows_and_forgets_it[delta]")


@BY_RESUME
def test_schema_ids_and_change_data_feed(spark, tmp_path, local_conf):
    write_images(tmp_path / "img", 6)
    run(spark, local_conf(tmp_path / "img", tmp_path / "t"))
    df = spark.read.format("delta").load(str(tmp_path / "t"))
    # made by CREATE TABLE (SQL, classic and Spark Connect alike): the columns, their types and which are NOT
    # NULL; SQL cannot declare array elements non-null, so the vectors' elements are declared nullable
    assert ([(f.name, f.dataType.simpleString(), f.nullable) for f in df.schema]
            == [(f.name, f.dataType.simpleString(), f.nullable) for f in tables.TABLE_SCHEMA])
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{tmp_path / 't'}`").collect()[0]
    props = detail["properties"]
    assert props.get("delta.enableChangeDataFeed") == "true"
    # the table's version, id and properties as Delta Kernel reads them from the log (no Spark job)
    # equal what Spark's DESCRIBE HISTORY and DESCRIBE DETAIL say
    table = tables.EmbeddingsTable(spark, str(tmp_path / "t"))
    history = spark.sql(f"DESCRIBE HISTORY delta.`{tmp_path / 't'}` LIMIT 1").collect()[0]["version"]
    assert table._snapshot() == (history, detail["id"], props)
    assert table.version() == history and table.table_id() == detail["id"]
    assert table.image_roots() == [f"file:{tmp_path / 'img'}/"]
    rows = df.collect()
    assert len(rows) == 6
    for r in rows:
        assert r["id"] == path_id(r["path"]) and r["path"].startswith("file:")
        assert r["model"] == "lakelens-tiny@none" and r["error"] is None
        assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5 and len(r["embedding"]) == 128
        local = r["path"][len("file:"):]
        assert r["size_bytes"] == os.path.getsize(local) and r["width"] == Image.open(local).width


@pytest.mark.parametrize("engine", [pytest.param("torch", marks=BY_PARITY), "onnx"])
def test_parity_with_a_plain_open_clip_loop(spark, tmp_path, local_conf, engine):
    """The job's plumbing (files, decoding, preprocessing, rows) against open_clip itself; the fp32
    engines hold the 1e-5 bar, the default int8 engine its own (test_engines_write_the_torch_engines_vectors)."""
    files = write_images(tmp_path / "img", 12)
    run(spark, local_conf(tmp_path / "img", tmp_path / "t", f"embed.engine={engine}"))
    got = rows_by_path(spark, tmp_path / "t")

    oc = models._open_clip()  # open_clip with the shipped configs registered
    torch.manual_seed(0)
    model, _, preprocess = oc.create_model_and_transforms("lakelens-tiny", pretrained=None)
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for f in files:
            x = preprocess(Image.open(f).convert("RGB")).unsqueeze(0)
            v = model.encode_image(x)
            v = (v / v.norm(dim=-1, keepdim=True))[0].numpy()
            worst = max(worst, float(np.abs(np.array(got[f"file:{f}"]["embedding"]) - v).max()))
    assert worst < 1e-5


@BY_RESUME
def test_incremental_add_change_delete_and_idempotent_rerun(spark, tmp_path, local_conf):
    img, table = tmp_path / "img", tmp_path / "t"
    files = write_images(img, 8)
    conf = local_conf(img, table)
    first = run(spark, conf)
    assert (first.embedded, first.new, first.failed) == (8, 8, 0)
    v1, before = delta_version(spark, table), rows_by_path(spark, table)

    again = run(spark, conf)
    assert (again.embedded, again.unchanged, again.deleted) == (0, 8, 0)
    assert delta_version(spark, table) == v1  # nothing to do, nothing committed
    assert rows_by_path(spark, table) == before

    write_images(img, 2, seed=5, start=100)
    changed = files[1]
    changed.write_bytes(encode(noise_image(999, (70, 40)), "JPEG"))
    st = os.stat(changed)
    os.utime(changed, (st.st_atime, st.st_mtime + 10))
    for f in files[2:4]:
        f.unlink()
    third = run(spark, conf)
    assert (third.new, third.changed, third.deleted, third.embedded, third.unchanged) == (2, 1, 2, 3, 5)
    after = rows_by_path(spark, table)
    assert len(after) == 8 and f"file:{files[2]}" not in after and f"file:{files[3]}" not in after
    row = after[f"file:{changed}"]
    assert (row["width"], row["height"]) == (70, 40)
    assert row["embedding"] != before[f"file:{changed}"]["embedding"]
    for f in (files[0], *files[4:]):  # untouched rows were not rewritten
        assert after[f"file:{f}"]["embedded_at"] == before[f"file:{f}"]["embedded_at"]
    df = spark.read.format("delta").load(str(table))
    assert df.count() == df.select("path").distinct().count() == df.select("id").distinct().count()

    changes = (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", v1 + 1)
               .load(str(table)).groupBy("_change_type").count().collect())
    assert {r["_change_type"]: r["count"] for r in changes} == {
        "insert": 2, "update_preimage": 1, "update_postimage": 1, "delete": 2}


def _comparable(rows):
    return {p: (r["content_sha256"], r["error"], tuple(r["embedding"] or ())) for p, r in rows.items()}


def test_resume_after_a_crashed_run(spark, tmp_path, local_conf):
    img = tmp_path / "img"
    write_images(img, 10)

    class Crash(RuntimeError):
        pass

    def crash_after_second(i, n):
        if i == 1:
            raise Crash("killed on purpose")

    conf = local_conf(img, tmp_path / "t", "embed.chunk_size=3", "embed.chunk_seconds=0")  # fixed chunks
    left = []
    with pytest.raises(Crash):
        run(spark, conf, on_chunk=lambda i, n: (left.append(n), crash_after_second(i, n)))
    assert left == [7, 4]
    assert len(rows_by_path(spark, tmp_path / "t")) == 6  # two chunks of 3 were committed
    resumed = run(spark, conf)
    assert (resumed.embedded, resumed.unchanged, resumed.chunks) == (4, 6, 2)
    assert [files for files, *_ in resumed.chunk_seconds] == [3, 1]

    # chunks sized by time: after the first, as many files as 600 s hold at the first's rate, capped at
    # 10x chunk_size (30), so the 7 left make one chunk
    clean = run(spark, local_conf(img, tmp_path / "clean", "embed.chunk_size=3", "embed.chunk_seconds=600"))
    assert [files for files, *_ in clean.chunk_seconds] == [3, 7]
    assert _comparable(rows_by_path(spark, tmp_path / "t")) == _comparable(rows_by_path(spark, tmp_path / "clean"))


def test_bad_images_become_rows_with_errors(spark, tmp_path, local_conf):
    from test_images import _png_with_size

    img = tmp_path / "img"
    write_images(img, 2)
    jpeg = encode(noise_image(7, (300, 200)), "JPEG")
    png = encode(noise_image(8, (64, 64)), "PNG")
    broken = bytearray(png)
    broken[60:400] = b"\xff" * 340
    bad = {
        "empty.jpg": b"", "notes.txt": b"just text\n" * 20, "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": bytes(broken), "bomb.png": _png_with_size(60_000, 60_000),
        "huge.jpg": encode(noise_image(9, (400, 400)), "JPEG", quality=100),
    }
    for name, data in bad.items():
        (img / name).write_bytes(data)
    limit = len(bad["huge.jpg"]) - 1
    stats = run(spark, local_conf(img, tmp_path / "t", f"embed.max_file_bytes={limit}"))
    rows = {os.path.basename(p): r for p, r in rows_by_path(spark, tmp_path / "t").items()}
    assert (stats.embedded, stats.failed) == (2, 6)
    assert {n: rows[n]["error"] for n in bad} == {
        "empty.jpg": "empty file", "notes.txt": "not an image", "truncated.jpg": "truncated",
        "corrupt.png": "corrupt", "bomb.png": "too large", "huge.jpg": "too large"}
    assert all(rows[n]["embedding"] is None for n in bad)
    assert rows["bomb.png"]["width"] == 60_000 and rows["huge.jpg"]["content_sha256"] is None
    again = run(spark, local_conf(img, tmp_path / "t", f"embed.max_file_bytes={limit}"))
    assert (again.embedded, again.failed, again.unchanged) == (0, 0, 8)  # error rows are not retried


def test_parquet_format_is_incremental_too(spark, tmp_path, local_conf):
    img, table = tmp_path / "img", tmp_path / "t"
    files = write_images(img, 5)
    conf = local_conf(img, table, "embed.format=parquet")
    assert run(spark, conf).embedded == 5
    files[0].unlink()
    write_images(img, 1, seed=3, start=50)
    st = run(spark, conf)
    assert (st.embedded, st.deleted, st.unchanged) == (1, 1, 4)
    rows = rows_by_path(spark, table, "parquet")
    assert len(rows) == 5 and f"file:{files[0]}" not in rows
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]  # swap left nothing behind


@pytest.mark.parametrize("fmt", [pytest.param("delta", marks=BY_DROP_ROOT), pytest.param("parquet", marks=BY_PARQUET)])
def test_each_run_reconciles_only_the_rows_of_the_folder_it_lists(spark, tmp_path, local_conf, fmt):
    """Folders embedded one at a time into one table: a run plans new, changed and deleted files under the
    folder it lists and leaves the other folders' rows alone, also those of a folder whose name only
    starts the same (A and AB) or that a LIKE pattern would match ('_' matches any one character)."""
    data, table = tmp_path / "data", tmp_path / "t"
    folders = {name: write_images(data / name, n, seed=i)
               for i, (name, n) in enumerate((("A", 3), ("AB", 2), ("x_y", 2), ("xzy", 2), ("50%", 1)))}

    def embed(name):
        return run(spark, local_conf(data / name, table, f"embed.format={fmt}"))

    for name, files in folders.items():
        stats = embed(name)
        assert (stats.new, stats.deleted, stats.unchanged) == (len(files), 0, 0), name
    paths = {f"file:{f}" for files in folders.values() for f in files}
    assert set(rows_by_path(spark, table, fmt)) == paths
    if fmt == "delta":
        assert tables.EmbeddingsTable(spark, str(table)).image_roots() == sorted(f"file:{data / n}/" for n in folders)

    # a file gone from A and one from x_y: each folder's run again, after the others, deletes its own and
    # counts only its own as unchanged; AB's and xzy's rows stay
    gone = [folders["A"][0], folders["x_y"][0]]
    for f in gone:
        f.unlink()
    again = embed("A")
    assert (again.new, again.changed, again.deleted, again.unchanged) == (0, 0, 1, 2)
    again = embed("x_y")
    assert (again.new, again.changed, again.deleted, again.unchanged) == (0, 0, 1, 1)
    assert set(rows_by_path(spark, table, fmt)) == paths - {f"file:{f}" for f in gone}


@pytest.mark.parametrize("fmt", ["delta", pytest.param("parquet", marks=BY_PARQUET)])
def test_drop_root_deletes_that_folders_rows_and_forgets_it(spark, tmp_path, local_conf, fmt, capsys):
    data, table = tmp_path / "data", tmp_path / "t"
    folders = {name: write_images(data / name, 2, seed=i) for i, name in enumerate(("A", "AB", "it's 50%_"))}
    for name in folders:
        assert run(spark, local_conf(data / name, table, f"embed.format={fmt}")).new == 2
    base = ["embed", "--table", str(table), "--format", fmt, "--conf", str(ROOT / "conf" / "local.yaml"), "--json"]
    assert main([*base, "--drop-root", str(data / "it's 50%_"), "--drop-root", str(data / "A")]) == 0
    dropped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dropped["deleted"] == 4
    assert set(rows_by_path(spark, table, fmt)) == {f"file:{f}" for f in folders["AB"]}
    # a run that only drops roots reports the version it left the table at, as any run does
    assert dropped["table_version"] == (tables.EmbeddingsTable(spark, str(table)).version() if fmt == "delta" else None)
    if fmt == "delta":
        assert tables.EmbeddingsTable(spark, str(table)).image_roots() == [f"file:{data / 'AB'}/"]
        for text in ("it's 50%_", "back\\slash\\'", "\\u0041 ção"):  # the SQL literals of the DELETE
            assert spark.sql(f"SELECT {tables.sql_string(text)}").first()[0] == text
    # a root the table does not have (here: dropped already) is an error, nothing is deleted
    assert main([*base, "--drop-root", str(data / "A")]) == 2
    err = capsys.readouterr().err
    assert "--drop-root" in err and str(data / "A") in err and "Traceback" not in err
    assert set(rows_by_path(spark, table, fmt)) == {f"file:{f}" for f in folders["AB"]}


def test_the_session_gets_its_settings_back_after_a_run_and_after_a_failed_chunk(spark, tmp_path, local_conf,
                                                                                  monkeypatch):
    """The embed job's Arrow batch size and Delta commit notes are its own: after a run, also one whose
    chunk fails, the shared session has the values it had before (the later stages of `lakelens refresh`
    run in it), while the run's commits carry the run's notes."""
    img, table = tmp_path / "img", tmp_path / "t"
    write_images(img, 4)
    key, note = "spark.sql.execution.arrow.maxRecordsPerBatch", "spark.databricks.delta.commitInfo.userMetadata"
    conf = local_conf(img, table, "embed.batch_size=16")
    with session_settings(spark, {key: "1000", note: "the notebook's own note"}):  # the shared session's back after
        assert run(spark, conf).embedded == 4
        assert (spark.conf.get(key), spark.conf.get(note)) == ("1000", "the notebook's own note")
        notes = [r[0] for r in spark.sql(f"DESCRIBE HISTORY delta.`{table}`").select("userMetadata").collect()]
        assert notes and all(n is None or n.startswith("lakelens") for n in notes), notes

        spark.conf.unset(note)
        write_images(img, 2, seed=5, start=10)  # two new files: one more chunk to embed
        seen = []

        def lost(self, files, spec, local=False):
            seen.append((local, spark.conf.get(key)))
            raise RuntimeError("executor lost")

        monkeypatch.setattr(EmbedJob, "_rows", lost)
        with pytest.raises(RuntimeError, match="executor lost"):
            run(spark, conf)
        assert seen == [(True, "128")]  # local paths: 128-row Arrow batches while the chunk ran
        assert (spark.conf.get(key), spark.conf.get(note, None)) == ("1000", None)
        assert len(rows_by_path(spark, table)) == 4  # nothing half-written


def test_id_collision_is_detected_and_nothing_written(spark, tmp_path, local_conf, monkeypatch):
    img, table = tmp_path / "img", tmp_path / "t"
    first = write_images(img, 3)[0]
    conf = local_conf(img, table)
    run(spark, conf)
    newcomer = write_images(img, 1, seed=4, start=20)[0]
    # forge rows whose id equals the newcomer's id: one elsewhere, what a 64-bit hash collision looks like,
    # and one at a listed file's path (a row whose id is not its path's)
    forge_kept_rows(spark, table, path_id(f"file:{newcomer}"), ["file:/elsewhere/ghost.png", f"file:{first}"])
    version = delta_version(spark, table)
    # a listing held on the driver is checked one way up to SMALL_LISTING files and another above: both
    for small in (tables.SMALL_LISTING, 0):
        monkeypatch.setattr(tables, "SMALL_LISTING", small)
        with pytest.raises(IdCollisionError) as clash:
            run(spark, conf)
        assert "ghost.png" in str(clash.value) and f"{first.name}'" in str(clash.value), small
        assert str(newcomer) in str(clash.value)
    assert delta_version(spark, table) == version


@pytest.mark.classic_only  # reads the splits through RDDs and the JVM's plan
def test_spreads_files_over_every_core_without_a_shuffle(spark, tmp_path, local_conf):
    write_images(tmp_path / "img", 10)
    paths = [f"file:{p}" for p in sorted((tmp_path / "img").iterdir())]
    job = EmbedJob(spark=spark, conf=local_conf(tmp_path / "img", tmp_path / "t"))
    assert job.partitions(10) == 2 * spark.sparkContext.defaultParallelism and job.partitions(3) == 3
    default_splits = listing.read_files(spark, paths).rdd.getNumPartitions()
    for want in (2, 4, 10):
        with listing.file_splits(spark, 10, want):
            files = listing.read_files(spark, paths)
            rdd = files.rdd
            assert rdd.getNumPartitions() == want  # 2 x 5, 4 = 3+3+3+1, 10 x 1
            assert "Exchange" not in files._jdf.queryExecution().executedPlan().toString()
            sizes = [len(p) for p in rdd.glom().collect()]
            per = -(-10 // want)  # PNGs and JPEGs of unequal bytes, packed by count: the last split has the rest
            assert sorted(sizes, reverse=True) == [per] * (len(sizes) - 1) + [10 - per * (len(sizes) - 1)]
    assert spark.conf.get("spark.sql.files.minPartitionNum", None) is None  # the session's settings are back
    assert listing.read_files(spark, paths).rdd.getNumPartitions() == default_splits
    for want in (2, 4, 10, 20):  # local files, which the workers read themselves: consecutive paths per split
        files = listing.local_paths(spark, paths, want)
        assert "Exchange" not in files._jdf.queryExecution().executedPlan().toString()
        parts = [[r["path"] for r in part] for part in files.rdd.glom().collect()]
        assert len(parts) == min(want, 10) and [p for part in parts for p in part] == paths
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_glob_characters_in_file_names(spark, tmp_path, local_conf):
    img = tmp_path / "img"
    img.mkdir()
    for name in ("a[1].png", "b{x,y}.png", "c*?.png"):
        (img / name).write_bytes(encode(noise_image(len(name)), "PNG"))
    assert run(spark, local_conf(img, tmp_path / "t")).embedded == 3


def test_cli_embed_json_and_bad_config(spark, tmp_path, capsys):
    write_images(tmp_path / "img", 3)
    args = ["embed", "--images", str(tmp_path / "img"), "--table", str(tmp_path / "t"),
            "--conf", str(ROOT / "conf" / "local.yaml"), "--json"]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["embedded"] == 3 and stats["failed"] == 0
    assert main(args[:-1] + ["--set", "embed.chunk_size=0"]) == 2
    assert "embed.chunk_size" in capsys.readouterr().err
    assert main(["embed", "--table", str(tmp_path / "t")]) == 2
    assert "embed.images" in capsys.readouterr().err


def test_relative_paths_are_read_against_the_working_folder(spark, tmp_path, monkeypatch, capsys):
    """`lakelens embed --images A --table T`, then `lakelens refresh --images B --table T --index I ...` from
    the folder holding them, as a user types it: every relative path is read against the working folder,
    the second run into the table included (Delta's SQL names a table by an absolute path only). The
    commands run in this process, whose working folder is not the Spark JVM's (nor the Connect server's):
    a relative path that reached Spark would be read against the wrong folder."""
    write_images(tmp_path / "A", 2)
    write_images(tmp_path / "B", 2, seed=1)
    monkeypatch.setenv("LAKELENS_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.chdir(tmp_path)
    conf = ["--conf", str(ROOT / "conf" / "local.yaml")]
    assert main(["embed", "--images", "A", "--table", "T", *conf]) == 0
    assert main(["refresh", "--images", "B", "--table", "T", "--index", "I", "--tags", "tags",
                 "--vocab", "shapes", "--set", "tag.threshold=-1", *conf]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["embed"]["new"] == 2 and line["embed"]["deleted"] == 0 and line["index"]["rows"] == 4
    manifest = json.loads((tmp_path / "I" / line["index"]["version"] / "manifest.json").read_text())
    assert manifest["source"]["table"] == str(tmp_path / "T")
    assert manifest["source"]["image_roots"] == [f"file:{tmp_path / 'A'}/", f"file:{tmp_path / 'B'}/"]
    assert (tmp_path / "tags" / "_delta_log").is_dir()
    assert {r["path"] for r in spark.read.format("delta").load(str(tmp_path / "T")).collect()} == {
        f"file:{f}" for f in sorted((tmp_path / "A").iterdir()) + sorted((tmp_path / "B").iterdir())}


@BY_PARITY
def test_engines_write_the_torch_engines_vectors(spark, tmp_path, local_conf):
    write_images(tmp_path / "img", 10)
    cache = f"embed.onnx_cache={tmp_path / 'onnx'}"
    runs = {engine: run(spark, local_conf(tmp_path / "img", tmp_path / f"t-{engine}", f"embed.engine={engine}", cache))
            for engine in ("torch", "onnx")}
    runs["onnx-int8"] = run(spark, local_conf(tmp_path / "img", tmp_path / "t-default", cache))  # the default
    assert [r.embedded for r in runs.values()] == [10, 10, 10]
    ref = rows_by_path(spark, tmp_path / "t-torch")
    for engine, table, bar in (("onnx", "t-onnx", 0.99999), ("onnx-int8", "t-default", 0.999)):
        got = rows_by_path(spark, tmp_path / table)
        assert got.keys() == ref.keys() and {r["model"] for r in got.values()} == {"lakelens-tiny@none"}
        cos = [float(np.dot(ref[p]["embedding"], got[p]["embedding"])) for p in ref]
        assert min(cos) >= bar, engine
        if engine == "onnx-int8":  # really int8 (no silent fp32 fallback): close, not equal
            assert max(cos) < 0.9999999
    assert [p.name for p in (tmp_path / "onnx").iterdir()]  # the workers exported into the configured cache


@pytest.mark.parametrize("listed_by", ["driver", "spark"])
def test_id_collision_among_new_files_is_detected_before_the_table_exists(spark, tmp_path, local_conf, monkeypatch,
                                                                          listed_by):
    """A new table's ids are checked before anything is written: with a weak hash standing in for
    sha256, two listed files collide and the table is never created. A local folder is checked on the
    driver; a glob is listed by Spark and checked on the executors."""
    from pyspark.sql import functions as F

    img, table = tmp_path / "img", tmp_path / "t"
    write_images(img, 3)
    # every name has the same length here
    monkeypatch.setattr(tables, "path_id_col", lambda col="path": F.length(F.col(col)).cast("long"))
    monkeypatch.setattr(tables, "path_id", len)
    images = img if listed_by == "driver" else img / "im*"
    with pytest.raises(IdCollisionError, match=r"im0000\.png.*im0001\.jpg"):
        run(spark, local_conf(images, table))
    assert not table.exists()


@pytest.mark.classic_only  # reads the splits through RDDs and the JVM's plan
@pytest.mark.parametrize("listed_by", ["driver", "spark"])
def test_id_collision_among_new_files_is_detected_when_the_table_exists(spark, tmp_path, local_conf, monkeypatch,
                                                                        listed_by):
    """New files that collide with each other (not with a kept row) are refused on a table that exists too,
    and the table stays at its version."""
    from pyspark.sql import functions as F

    img, table = tmp_path / "img", tmp_path / "t"
    write_images(img, 2)
    run(spark, local_conf(img, table))
    version = delta_version(spark, table)
    write_images(img, 2, seed=3, start=10)  # im0010.jpg, im0011.jpg: names of one length
    # the kept rows keep their sha256 ids; every new name of one length shares an id
    monkeypatch.setattr(tables, "path_id_col", lambda col="path": F.length(F.col(col)).cast("long"))
    monkeypatch.setattr(tables, "path_id", len)
    images = img if listed_by == "driver" else img / "im*"
    with pytest.raises(IdCollisionError, match=r"im0010\.jpg.*im0011\.jpg"):
        run(spark, local_conf(images, table))
    assert delta_version(spark, table) == version


def test_local_files_read_by_the_workers_keep_what_changed_after_the_listing(tmp_path):
    """Chunks of local files are read by the Python workers themselves (read_local): a file gone since the
    listing is an `unreadable` row, one grown past embed.max_file_bytes is `too large` without its bytes
    being read past the limit, and the others carry the size and modification time read with them."""
    from lakelens.ingest.embed_job import read_local

    img = tmp_path / "img"
    write_images(img, 3)
    files = sorted(img.iterdir())
    paths = [f"file:{p}" for p in files] + [f"file:{img}/gone.png"]
    sizes = [p.stat().st_size for p in files]
    limit = sorted(sizes)[1]  # the largest file is over it
    meta, contents, errors = read_local(pd.DataFrame({"path": paths}), limit)
    assert meta["path"].tolist() == paths
    for i, p in enumerate(files):
        big = sizes[i] > limit
        assert errors[i] == ("too large" if big else None)
        assert contents[i] == (b"" if big else p.read_bytes())
        assert meta["length"][i] == sizes[i]
        assert meta["modificationTime"][i] == pd.Timestamp(p.stat().st_mtime_ns // 1_000_000, unit="ms", tz="UTC")
    assert errors[3] == "unreadable" and contents[3] == b"" and meta["length"][3] == 0
    assert pd.isna(meta["modificationTime"][3])


@pytest.mark.classic_only  # a listing held on the driver: a classic session walks a local folder there
def test_a_small_listing_is_planned_on_the_driver_as_spark_plans_it(spark, tmp_path, local_conf, monkeypatch):
    """`plan_small` (a listing held on the driver, the table's rows brought to it in one query) classifies
    every file as `plan` does on the executors: new, changed by size, time, model or missing regions,
    deleted, unchanged, unread (empty, too large), with the same rows to write and the same paths to embed,
    and leaves another folder's rows alone. Beyond its bounds it plans nothing."""
    from lakelens.ingest.paths import root_of

    images, table = tmp_path / "images", tmp_path / "t"
    a, b = images / "a", images / "b"
    write_images(a, 5)
    (a / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")  # an error row: never short of regions
    write_images(b, 2, seed=2)
    for folder in (a, b):
        run(spark, local_conf(folder, table))
    (a / "im0000.png").unlink()  # deleted
    (a / "im0001.jpg").write_bytes(encode(noise_image(99, size=(90, 70)), "JPEG"))  # changed
    os.utime(a / "im0002.jpg", ns=(10**18, 10**18))  # touched: same size, another time
    write_images(a, 1, seed=5, start=10)  # new
    (a / "empty.jpg").write_bytes(b"")  # new, not read
    (a / "large.png").write_bytes(encode(noise_image(7, size=(300, 300)), "PNG"))  # new, too large below
    t = tables.EmbeddingsTable(spark, str(table))
    listed = listing.list_files(spark, str(a))
    key, root = models.ModelSpec.from_config(local_conf(a, table).model).key, root_of(str(a))
    cases, found = [(key, False, 10**9), (key, True, 10**9), ("another-model", False, 100_000)], []
    for model_key, regions, max_bytes in cases:
        spark_plan = t.plan(listed.df, listed.count, model_key, max_bytes, regions, None, root=root)
        driver_plan = t.plan_small(listed.local, model_key, max_bytes, regions, root=root)
        counts = [(p.to_embed, p.unread, p.deleted, p.unchanged, p.new, p.changed)
                  for p in (spark_plan, driver_plan)]
        assert counts[0] == counts[1], (model_key, regions)
        todo = [sorted(tuple(r) for r in p.todo.select("path", "size_bytes", "modified", "status", "error").collect())
                for p in (spark_plan, driver_plan)]
        assert todo[0] == todo[1], (model_key, regions)
        assert [p for chunk in spark_plan.chunks(1000) for p in chunk] == driver_plan.paths
        found.append({r[0].rsplit("/", 1)[1]: (r[3], r[4]) for r in todo[1]})
    assert found[0] == {"im0000.png": ("deleted", None), "im0001.jpg": ("changed", None),
                        "im0002.jpg": ("changed", None), "im0010.jpg": ("new", None),
                        "empty.jpg": ("new", "empty file"), "large.png": ("new", None)}
    # regions wanted: the embedded rows lack them, the error row does not
    assert {n: s for n, s in found[1].items() if n not in found[0]} == {n: ("changed", None) for n in
                                                                        ("im0003.png", "im0004.jpg")}
    assert found[2]["large.png"] == ("new", "too large") and found[2]["broken.jpg"] == ("changed", None)
    monkeypatch.setattr(tables, "SMALL_PLAN_ROWS", 3)  # more of the table's rows than it brings back
    assert t.plan_small(listed.local, key, 10**9, root=root) is None
    monkeypatch.setattr(tables, "SMALL_LISTING", 3)  # a larger listing
    assert t.plan_small(listed.local, key, 10**9, root=root) is None
