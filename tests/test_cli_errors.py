"""Expected failures print one line, `lakelens CMD: error: REASON`, and exit 2; never a traceback.

Commands that need Spark run in-process (lakelens.cli.main picks up the shared session as the active one);
the search command runs as a real process, as a user would start it."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest
from conftest import ROOT, write_images

from lakelens import ConfigError, path_id
from lakelens import index as ix
from lakelens.cli import main
from lakelens.index.factory import explicit_choice
from lakelens.ingest import table as tables
from lakelens.ingest.paths import to_stored
from lakelens.locks import RunLock, table_lock_file

CONF = str(ROOT / "conf" / "local.yaml")
LAKELENS = str(ROOT / ".venv" / "bin" / "lakelens")


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAKELENS_LOCK_DIR", str(tmp_path / "locks"))


def one_line_error(capsys, cmd: str, argv: list[str]) -> str:
    """Run `lakelens CMD ...` in-process; it must exit 2 with exactly one line on stderr. Returns the reason."""
    code = main([cmd, *argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"lakelens {cmd}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.fixture(scope="module")
def small_table(spark, tmp_path_factory):
    """A Delta table of 60 embedded rows of 16-dim unit vectors, written directly with Spark."""
    folder = tmp_path_factory.mktemp("cli-errors") / "table"
    vecs = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    now = datetime(2024, 1, 1)
    rows = [(path_id(p), p, "0" * 64, 10, now, 8, 8, "lakelens-tiny@none", [float(x) for x in v], None, now, None)
            for p, v in ((f"file:/data/img-{i:03d}.jpg", v) for i, v in enumerate(vecs))]
    spark.createDataFrame(rows, tables.SCHEMA).write.format("delta").save(str(folder))
    return folder


@pytest.mark.parametrize("factory, why", [("NOPE", "could not parse"), ("IVF4,PQ7", "multiple of"),
                                          ("IDMap,Flat", "without IDMap")])
def test_bad_factory_string_is_a_config_error_naming_index_factory(spark, small_table, tmp_path, capsys,
                                                                   factory, why):
    index = tmp_path / "index"
    reason = one_line_error(capsys, "index", ["--table", str(small_table), "--index", str(index),
                                              "--factory", factory, "--conf", CONF])
    assert reason.startswith("index.factory: ") and why in reason and factory in reason
    assert ix.current_version(index) is None and not list(index.glob(".building-*"))  # nothing staged or published


def test_explicit_factory_strings_are_checked_for_the_real_dimension():
    assert explicit_choice("IVF16,PQ8", 64).needs_training
    assert explicit_choice("HNSW32,Flat", 24).search_params == {"efSearch": 128}
    assert explicit_choice(" Flat ", 24).factory == "Flat"
    with pytest.raises(ConfigError, match=r"^index\.factory: .*'IVF16,PQ8'.*12-dim"):
        explicit_choice("IVF16,PQ8", 12)  # 12 % 8 != 0: FAISS's RuntimeError never escapes
    with pytest.raises(ConfigError, match=r"^index\.factory: "):
        explicit_choice("", 12)


@pytest.mark.parametrize("flags, key", [(["--prune", "-1"], "index.prune"), (["--shards", "-2"], "index.shards"),
                                        (["--set", "index.lock_wait=-5"], "index.lock_wait"),
                                        (["--set", "index.prune=many"], "index.prune"),
                                        (["--set", "index.nope=1"], "index.nope")])
def test_bad_index_arguments_name_their_key(tmp_path, capsys, flags, key):
    reason = one_line_error(capsys, "index", ["--table", str(tmp_path / "t"), "--index", str(tmp_path / "i"),
                                              "--conf", CONF, *flags])
    assert key in reason
    assert not (tmp_path / "i").exists()


def test_prune_keeps_at_least_one_version(tmp_path):
    with pytest.raises(ConfigError, match="index.prune"):
        ix.prune(tmp_path, 0)


def test_missing_table_for_the_index_job(spark, tmp_path, capsys):
    reason = one_line_error(capsys, "index", ["--table", str(tmp_path / "no table"), "--index",
                                              str(tmp_path / "index"), "--conf", CONF])
    assert reason.startswith("index.table: ") and "no table" in reason


def test_missing_images_folder(spark, tmp_path, capsys):
    table = tmp_path / "t"
    reason = one_line_error(capsys, "embed", ["--images", str(tmp_path / "no such folder"), "--table", str(table),
                                              "--model", "lakelens-tiny", "--pretrained", "none", "--conf", CONF])
    assert reason.startswith("embed.images: nothing found at ") and "no such folder" in reason
    assert not table.exists()


def test_a_folder_named_in_bytes_that_are_not_utf8_is_a_one_line_error(tmp_path, capsys):
    """Spark and Hadoop cannot name a folder whose name is not UTF-8 (Linux names are bytes): as --images,
    --table or --drop-root it is refused in one line naming the flag's key, before any Spark work."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(raw)
    write_images(tmp_path / "ok", 1)
    folder = os.fsdecode(raw)
    common = ["--model", "lakelens-tiny", "--pretrained", "none", "--conf", CONF]
    reason = one_line_error(capsys, "embed", ["--images", folder, "--table", str(tmp_path / "t"), *common])
    assert reason.startswith("embed.images: ") and "not valid UTF-8" in reason and "caf\\xe9" in reason
    reason = one_line_error(capsys, "embed", ["--images", str(tmp_path / "ok"), "--table", folder + "/t", *common])
    assert reason.startswith("embed.table: ") and "not valid UTF-8" in reason
    reason = one_line_error(capsys, "embed", ["--table", str(tmp_path / "t"), "--drop-root", folder, "--conf", CONF])
    assert reason.startswith("--drop-root: ") and "not valid UTF-8" in reason
    assert not (tmp_path / "t").exists()


def test_busy_table_names_the_holder(spark, tmp_path, capsys):
    write_images(tmp_path / "img", 1)
    table = tmp_path / "t"
    with RunLock(table_lock_file(to_stored(str(table))), "test"):
        reason = one_line_error(capsys, "embed", ["--images", str(tmp_path / "img"), "--table", str(table),
                                                  "--model", "lakelens-tiny", "--pretrained", "none", "--conf", CONF])
    assert f"is in use by pid {os.getpid()}" in reason and str(table) in reason
    assert not table.exists()


def test_id_collision(spark, tmp_path, capsys):
    img, table = tmp_path / "img", tmp_path / "t"
    write_images(img, 3)
    args = ["--images", str(img), "--table", str(table), "--model", "lakelens-tiny", "--pretrained", "none",
            "--conf", CONF]
    assert main(["embed", *args]) == 0
    capsys.readouterr()
    newcomer = write_images(img, 1, seed=4, start=20)[0]
    # forge a row elsewhere whose id equals the newcomer's: what a 64-bit hash collision looks like
    ghost = spark.read.format("delta").load(str(table)).limit(1).drop("id", "path").selectExpr(
        f"{path_id('file:' + str(newcomer))} as id", "'file:/elsewhere/ghost.png' as path", "*")
    ghost.select(tables.COLUMNS).write.format("delta").mode("append").save(str(table))
    version = tables.EmbeddingsTable(spark, str(table)).version()
    reason = one_line_error(capsys, "embed", args)
    assert reason.startswith("64-bit path ids collide, nothing was written: ")
    assert "file:/elsewhere/ghost.png" in reason and f"file:{newcomer}" in reason
    assert tables.EmbeddingsTable(spark, str(table)).version() == version


def test_a_reason_of_several_lines_is_printed_on_one(monkeypatch, capsys):
    from lakelens.errors import IndexDirError
    from lakelens.search import Searcher

    def broken(*_a, **_k):
        raise IndexDirError("the index is broken:\n  shard-0001.faiss is missing\n")

    monkeypatch.setattr(Searcher, "open", broken)
    reason = one_line_error(capsys, "search", ["--index", "/nowhere", "q"])
    assert reason == "the index is broken: shard-0001.faiss is missing"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    return subprocess.run([LAKELENS, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_search_without_an_index_as_a_real_process(tmp_path, make):
    index = tmp_path / "index dir"
    if make == "empty":
        index.mkdir()
    proc = run_cli("search", "--index", str(index), "a red bicycle")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lakelens search: error: "), proc.stderr
    assert str(index) in lines[0]
    assert ("not found" if make == "missing" else "no published index") in lines[0]


def test_batch_search_without_its_queries_file_as_a_real_process(tmp_path):
    """A missing queries file is one line on stderr, as a user sees it: no JVM warning with a Java stack
    trace before it (the file is looked for before Spark starts)."""
    v = np.eye(4, dtype=np.float32)
    ix.build_local(tmp_path / "index", np.arange(4), v, [f"file:/p/{i}.jpg" for i in range(4)],
                   ix.Choice("Flat", "test", False))
    proc = run_cli("search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "nope.txt"),
                   "--out", str(tmp_path / "out"), "--conf", CONF)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"lakelens search: error: queries: no file at {tmp_path / 'nope.txt'}"], proc.stderr
    assert not (tmp_path / "out").exists()
