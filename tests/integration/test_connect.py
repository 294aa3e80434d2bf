"""The Spark Connect path itself (the Connect half of the suite: LAKELENS_TEST_SPARK=connect): commands with
--remote, the listing of a local folder by an executor, and the clear error when the executors do not see
the index folder the client writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_images

from lakelens import Searcher
from lakelens.connect_server import ConnectServer
from lakelens.errors import DataError
from lakelens.ingest.listing import list_files, walk_local
from lakelens.spark import is_connect

pytestmark = pytest.mark.connect_only
LAKELENS = [sys.executable, "-m", "lakelens.cli"]


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPARK_REMOTE"}  # --remote alone chooses Connect
    return subprocess.run([*LAKELENS, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_embed_index_and_search_with_remote_on_the_command_line(connect_server, tmp_path):
    write_images(tmp_path / "img", 9)
    conf = str(ROOT / "conf" / "local.yaml")
    emb = run_cli("embed", "--remote", connect_server.url, "--conf", conf, "--images", "img", "--table", "t",
                  "--json", cwd=tmp_path)
    assert emb.returncode == 0, emb.stderr[-3000:]
    stats = json.loads(emb.stdout.strip().splitlines()[-1])
    assert stats["embedded"] == 9 and stats["failed"] == 0
    idx = run_cli("index", "--remote", connect_server.url, "--conf", conf, "--table", "t", "--index", "idx",
                  cwd=tmp_path)
    assert idx.returncode == 0, idx.stderr[-3000:]
    hits = Searcher.open(str(tmp_path / "idx"), engine="torch").search_text("a photo", k=3)
    assert len(hits) == 3 and all(p.startswith(f"file:{tmp_path}/img/im") for p in hits["path"])
    again = run_cli("embed", "--remote", connect_server.url, "--conf", conf, "--images", "img", "--table", "t",
                    "--json", cwd=tmp_path)
    assert json.loads(again.stdout.strip().splitlines()[-1])["unchanged"] == 9


def test_a_local_folder_is_listed_by_an_executor_as_the_driver_lists_it(spark, tmp_path):
    assert is_connect(spark)
    write_images(tmp_path / "img" / "sub", 4)
    (tmp_path / "img" / "_hidden.png").write_bytes(b"x")
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    listing = list_files(spark, str(tmp_path / "img"))
    assert listing.local is None  # nothing was read through the client's file system
    got = listing.df.toPandas().sort_values("path").reset_index(drop=True)
    want = walk_local(str(tmp_path / "img"))
    assert listing.count == len(want) == 5
    assert got["path"].tolist() == want["path"].tolist()
    assert got["size_bytes"].tolist() == want["size_bytes"].tolist()


def test_an_index_folder_the_executors_do_not_see_is_a_clear_error(tmp_path):
    """A server whose executors see another file system at the index folder (a private tmpfs mounted over
    it in the server's mount namespace), as a laptop and a cluster do under Databricks Connect."""
    write_images(tmp_path / "img", 5)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs tmpfs '{hidden}' && exec \"$@\"", "sh")
    server = ConnectServer.start(tmp_path / "server.log", wrapper=wrapper)
    conf = str(ROOT / "conf" / "local.yaml")
    try:
        emb = run_cli("embed", "--remote", server.url, "--conf", conf, "--images", "img", "--table", "t",
                      cwd=tmp_path)
        assert emb.returncode == 0, emb.stderr[-3000:]
        idx = run_cli("index", "--remote", server.url, "--conf", conf, "--table", "t", "--index", str(hidden / "idx"),
                      cwd=tmp_path)
    finally:
        server.stop()
    assert idx.returncode == 2 and "Traceback" not in idx.stderr, idx.stderr[-3000:]
    assert "the Spark executors do not see what this machine wrote there" in idx.stderr
    assert not (hidden / "idx" / "CURRENT").exists()


def test_spark_submit_with_remote_runs_the_embed_and_index_jobs_on_the_server(connect_server, tmp_path):
    """`spark-submit --remote sc://HOST:PORT jobs/...`, the way a Python job reaches an open-source cluster's
    Connect server: spark-submit hands the URL to the job as SPARK_REMOTE and the job runs on a Connect
    session; the jobs' flags are the same as the commands'."""
    import pyspark

    write_images(tmp_path / "img", 7)
    submit = str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    conf = str(ROOT / "conf" / "local.yaml")

    def job(script: str, *args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([submit, "--remote", connect_server.url, str(ROOT / "jobs" / script), "--conf", conf,
                              *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    emb = job("embed_images.py", "--images", "img", "--table", "t", "--json")
    assert "(Spark Connect session)" in emb.stdout  # the job ran on a Connect session, not a classic one
    stats = json.loads(emb.stdout.strip().splitlines()[-1])
    assert (stats["embedded"], stats["failed"]) == (7, 0)
    job("build_index.py", "--table", "t", "--index", "idx")
    hits = Searcher.open(str(tmp_path / "idx"), engine="torch").search_text("a photo", k=7)
    assert sorted(hits["path"]) == sorted(f"file:{p}" for p in (tmp_path / "img").iterdir())


def test_spark_submit_in_connect_mode_without_a_server_is_one_clear_line(tmp_path):
    """`spark-submit --conf spark.api.mode=connect` with no --remote: spark-submit leaves Spark SQL off the
    Python driver's classpath, so no Connect server can start inside it; the job says what to do instead."""
    import pyspark

    from lakelens.spark import submit_jars_arg

    write_images(tmp_path / "img", 2)
    submit = str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    out = subprocess.run([submit, "--master", "local[2]", *submit_jars_arg(), "--conf", "spark.api.mode=connect",
                          str(ROOT / "jobs" / "embed_images.py"), "--conf", str(ROOT / "conf" / "local.yaml"),
                          "--images", "img", "--table", "t"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    said = out.stdout + out.stderr  # spark-submit sends the Python driver's stderr to its stdout
    assert out.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert "pass spark-submit --remote sc://HOST:15002 instead" in said
    assert not (tmp_path / "t").exists()


def test_a_connect_server_without_delta_is_one_clear_line(connect_server, tmp_path):
    """pyspark's server class started without Delta's SQL extension (and catalog): embed and index say what the
    server lacks in one line, rather than a JVM trace or 'no delta table' for a table that is there."""
    write_images(tmp_path / "img", 3)
    conf = str(ROOT / "conf" / "local.yaml")
    made = run_cli("embed", "--remote", connect_server.url, "--conf", conf, "--images", "img", "--table", "t",
                   cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    server = ConnectServer.start(tmp_path / "server.log", delta=False)
    try:
        emb = run_cli("embed", "--remote", server.url, "--conf", conf, "--images", "img", "--table", "t2",
                      cwd=tmp_path)
        idx = run_cli("index", "--remote", server.url, "--conf", conf, "--table", "t", "--index", "idx",
                      cwd=tmp_path)
    finally:
        server.stop()
    for command, out in (("embed", emb), ("index", idx)):
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.strip().splitlines() == [
            f"lakelens {command}: error: the Spark Connect server does not understand Delta Lake's SQL (DESCRIBE "
            "DETAIL): start it with Delta's jars and --conf spark.sql.extensions=io.delta.sql."
            "DeltaSparkSessionExtension --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog."
            "DeltaCatalog (docs/spark-connect.md)"], out.stderr[-3000:]
    assert not (tmp_path / "t2").exists() and not (tmp_path / "idx" / "CURRENT").exists()


def test_a_glob_that_matches_nothing_is_one_line_as_on_a_classic_session(spark, tmp_path):
    """`--images` with glob characters is a glob (a folder named `a [x]` needs them escaped: `a \\[x\\]`); one that
    matches nothing is the one line a classic session gives, not PATH_NOT_FOUND from Spark's first action."""
    assert is_connect(spark)
    write_images(tmp_path / "gl [x]", 2)
    for images in (str(tmp_path / "gl [x]"), str(tmp_path / "none" / "*.jpg")):
        with pytest.raises(DataError, match=r"^embed\.images: nothing found at "):
            list_files(spark, images)
    assert list_files(spark, str(tmp_path / "gl \\[x\\]")).count == 2
