"""Runs at the same time: the embed run lock between real processes, locks that outlive a killed holder,
Delta commit conflicts retried, index publishers and builds that never collide, prune beside a build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_images

from lakelens import BusyError, EmbedJob, IndexJob, config, path_id
from lakelens import index as ix
from lakelens.index.versions import MANIFEST, STAGING_PREFIX, current_version, index_lock, prune, publish, staging_dir
from lakelens.index.versions import versions as published
from lakelens.ingest import table as tables
from lakelens.locks import RunLock

LAKELENS = str(ROOT / ".venv" / "bin" / "lakelens")
CONF = str(ROOT / "conf" / "local.yaml")
HANG_GUARD = 540  # seconds: a run that takes this long is stuck, not slow


def snapshot(spark, table: Path) -> dict:
    """path -> (id, content_sha256, embedding) of every row; a path twice would be lost, so count too."""
    rows = spark.read.format("delta").load(str(table)).collect()
    out = {r["path"]: (r["id"], r["content_sha256"], np.array(r["embedding"], np.float32)) for r in rows}
    assert len(out) == len(rows), "a path has two rows"
    return out


def same_table(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for path, (i, sha, vec) in got.items():
        assert i == path_id(path) == want[path][0] and sha == want[path][1], path
        # the same model and engine in another process: the same vector (int8 activations are quantised
        # per image, so neither the batch nor the process changes it)
        np.testing.assert_allclose(vec, want[path][2], rtol=0, atol=1e-6, err_msg=path)


# --- a) two embed runs on overlapping folders, as two real processes ---------------------------------------

@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """ROOT with 4 images and ROOT/sub with 4 more; the tables single runs over ROOT and over ROOT/sub give."""
    base = tmp_path_factory.mktemp("concurrent-embed")
    root = base / "imgs"
    write_images(root, 4)
    write_images(root / "sub", 4, seed=1, start=10)
    refs = {}
    for name, images in (("root", root), ("sub", root / "sub")):
        conf = config.load(CONF, [f"embed.images={images}", f"embed.table={base / ('ref-' + name)}"])
        EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
        refs[name] = snapshot(spark, base / f"ref-{name}")
    assert len(refs["root"]) == 8 and len(refs["sub"]) == 4
    return base, root, refs


def start_embed(images: Path, table: Path, locks: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LAKELENS_LOCK_DIR": str(locks), "PYSPARK_PYTHON": sys.executable}
    with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen([LAKELENS, "embed", "--conf", CONF, "--images", str(images), "--table", str(table),
                                 "--model", "lakelens-tiny", "--pretrained", "none", "--json", *extra],
                                cwd=ROOT, env=env, stdout=stdout, stderr=stderr)


def outputs(out: Path) -> tuple[str, str]:
    return out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def wait_first(procs: dict) -> str:
    """The name of the first of `procs` to exit."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                return name
        time.sleep(0.05)
    for p in procs.values():
        p.kill()
    raise AssertionError("neither embed run finished")


def test_second_embed_run_on_a_table_exits_at_once_naming_the_first(spark, lake, tmp_path):
    base, root, refs = lake
    table, locks = tmp_path / "table", tmp_path / "locks"
    procs = {"root": start_embed(root, table, locks, tmp_path / "root"),
             "sub": start_embed(root / "sub", table, locks, tmp_path / "sub")}
    loser = wait_first(procs)
    winner = "sub" if loser == "root" else "root"
    # the loser is done while the winner still works: it did not wait for it
    assert procs[winner].poll() is None, outputs(tmp_path / loser)
    assert procs[loser].returncode == 2, outputs(tmp_path / loser)
    out, err = outputs(tmp_path / loser)
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lakelens embed: error: embeddings table {table} is in use by "
                               f"pid {procs[winner].pid} on "), lines[0]
    assert procs[winner].wait(HANG_GUARD) == 0, outputs(tmp_path / winner)[1][-3000:]
    stats = json.loads(outputs(tmp_path / winner)[0].strip().splitlines()[-1])
    assert stats["embedded"] == len(refs[winner])
    same_table(snapshot(spark, table), refs[winner])


def test_with_lock_wait_both_runs_succeed_one_after_the_other(spark, lake, tmp_path):
    base, root, refs = lake
    table, locks = tmp_path / "table", tmp_path / "locks"
    wait = ("--set", "embed.lock_wait=600")
    procs = {"root": start_embed(root, table, locks, tmp_path / "root", *wait),
             "sub": start_embed(root / "sub", table, locks, tmp_path / "sub", *wait)}
    stats = {}
    for name, p in procs.items():
        assert p.wait(HANG_GUARD) == 0, outputs(tmp_path / name)[1][-3000:]
        out, err = outputs(tmp_path / name)
        assert "Traceback" not in err
        stats[name] = json.loads(out.strip().splitlines()[-1])
    # one ran after the other, never both at once: the later one saw every commit of the earlier
    first, last = sorted(stats, key=lambda n: stats[n]["table_version"])
    assert stats[first]["embedded"] == len(refs[first]) and stats[first]["unchanged"] == 0
    if last == "sub":  # ROOT/sub's files were embedded already; a run reconciles only the rows under
        # the folder it lists, so the rest of ROOT stays
        assert (stats[last]["embedded"], stats[last]["unchanged"], stats[last]["deleted"]) == (0, 4, 0)
    else:  # ROOT adds its own 4 files to ROOT/sub's
        assert (stats[last]["embedded"], stats[last]["unchanged"], stats[last]["deleted"]) == (4, 4, 0)
    # either order ends with every file of ROOT, ROOT/sub's included
    same_table(snapshot(spark, table), refs["root"])


# --- b) a lock outlives nothing: a killed holder leaves no stale lock -------------------------------------

HOLDER = """
import sys, time
from lakelens.locks import RunLock
RunLock(sys.argv[1], "the test table").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "locks" / "table.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"^the test table is in use by pid {holder.pid} on .*{path}"):
            RunLock(path, "the test table").acquire()
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):  # waiting a little does not help either
            RunLock(path, "the test table", wait=0.5).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert json.loads(path.read_text())["pid"] == holder.pid  # the dead holder's note is still there ...
    lock = RunLock(path, "the test table").acquire()  # ... and does not matter: the kernel dropped the lock
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    with RunLock(path, "the test table"):  # released, taken again
        pass


# --- c) Delta commit conflicts are retried ----------------------------------------------------------------

def rows_for(spark, paths: list[str]):
    now = datetime(2024, 1, 1)
    return spark.createDataFrame(
        [(path_id(p), p, f"{path_id(p) & 0xFFFF:064x}", 10, now, 4, 4, "lakelens-tiny@none",
          [float(len(p)), 1.0], None, now, None) for p in paths], tables.SCHEMA)


def test_a_table_made_by_another_writer_first_is_not_created_twice_and_keeps_its_roots(spark, tmp_path):
    """create_if_missing says whether this call made the table (the job then skips recording the folder,
    which the create recorded). A table another writer made after this one looked is left as it is, and
    the call says so: the job then records its folder beside the other writer's."""
    location = str(tmp_path / "t")
    assert tables.EmbeddingsTable(spark, location).create_if_missing(["/a"]) is True

    class LooksFirst(tables.EmbeddingsTable):  # its first look still finds no table: the other writer was faster
        looked = False

        def exists(self):
            if not self.looked:
                self.looked = True
                return False
            return super().exists()

    late = LooksFirst(spark, location)
    assert late.create_if_missing(["/b"]) is False
    assert late.image_roots() == ["/a"]
    late.add_image_root("/b")
    assert late.image_roots() == ["/a", "/b"]


def test_concurrent_merges_are_retried_and_every_row_lands_once(spark, tmp_path):
    table = tables.EmbeddingsTable(spark, str(tmp_path / "t"))
    table.create_if_missing()
    rounds, threads = 4, 2
    logs: list[str] = []
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(w: int):
        try:
            for r in range(rounds):
                mine = [f"file:/w{w}/r{r}/img-{i}.png" for i in range(5)]
                shared = [f"file:/shared/r{r}.png"]  # every writer upserts this row too: the rows overlap
                rows = rows_for(spark, mine + shared)
                barrier.wait()  # both MERGEs read the same snapshot, and one of them commits second
                tables.with_retries(lambda: table.upsert(rows, f"writer {w} round {r}"), 10,
                                    f"writer {w} round {r}", logs.append)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(HANG_GUARD)
    assert not errors, errors
    got = spark.read.format("delta").load(table.location)
    want = {f"file:/w{w}/r{r}/img-{i}.png" for w in range(threads) for r in range(rounds) for i in range(5)}
    want |= {f"file:/shared/r{r}.png" for r in range(rounds)}
    paths = [r["path"] for r in got.select("path").collect()]
    assert len(paths) == len(want) and set(paths) == want  # every row exactly once
    conflicts = [line for line in logs if "concurrent commit" in line]
    assert conflicts, "no commit ever lost a race: the retry path did not run"
    # version 0 is the create, then one commit per upsert: a retried MERGE never committed twice
    assert tables.EmbeddingsTable(spark, table.location).version() == rounds * threads


# --- d) index folders: publishers, builds and prune -------------------------------------------------------

def test_publishers_never_share_a_version_number(tmp_path):
    index = tmp_path / "index"
    writers, rounds = 8, 3
    names: dict[tuple[int, int], str] = {}
    for r in range(rounds):  # into an empty folder, then beside versions published already
        staged = [staging_dir(index) for _ in range(writers)]
        for w, d in enumerate(staged):
            (d / "payload.bin").write_bytes(bytes([r, w]) * 1000)
        barrier = threading.Barrier(writers)

        def go(w, r=r, staged=staged, barrier=barrier):
            barrier.wait()
            names[r, w] = publish(index, staged[w], {"writer": [r, w]})

        workers = [threading.Thread(target=go, args=(w,)) for w in range(writers)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not any(d.exists() for d in staged)
        this_round = {names[r, w] for w in range(writers)}
        assert len(this_round) == writers and current_version(index) in this_round
    assert sorted(names.values()) == [f"v{i:04d}" for i in range(1, writers * rounds + 1)]  # distinct, no gaps
    for (r, w), name in names.items():
        manifest = json.loads((index / name / MANIFEST).read_text())
        assert manifest["writer"] == [r, w] and manifest["version"] == name
        assert (index / name / "payload.bin").read_bytes() == bytes([r, w]) * 1000
    assert published(index) == sorted(names.values(), key=lambda n: int(n[1:]))


@pytest.fixture(scope="module")
def small_table(spark, tmp_path_factory):
    """A Delta table of 50 embedded rows of 8-dim unit vectors, written directly."""
    folder = tmp_path_factory.mktemp("concurrent-index") / "table"
    vecs = np.random.default_rng(1).normal(size=(50, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    now = datetime(2024, 1, 1)
    paths = [f"file:/data/img-{i:03d}.jpg" for i in range(50)]
    spark.createDataFrame([(path_id(p), p, "0" * 64, 10, now, 8, 8, "lakelens-tiny@none", [float(x) for x in v],
                            None, now, None) for p, v in zip(paths, vecs)], tables.SCHEMA).write.format("delta").save(str(folder))
    return folder


def index_conf(table: Path, index: Path, *overrides: str):
    return config.load(CONF, [f"index.table={table}", f"index.index={index}", *overrides])


def test_a_second_index_job_on_a_locked_folder_fails_at_once_or_waits(spark, small_table, tmp_path):
    index = tmp_path / "index"
    with index_lock(index):
        with pytest.raises(BusyError, match=rf"^index folder {index} is in use by pid {os.getpid()} "):
            IndexJob(spark=spark, conf=index_conf(small_table, index), log=lambda *_: None).launch()
    assert current_version(index) is None and not list(index.glob(".building-*"))

    # with index.lock_wait the second job waits for the first, then builds
    results, errors = [], []
    lock = index_lock(index).acquire()

    def second():
        try:
            results.append(IndexJob(spark=spark, conf=index_conf(small_table, index, "index.lock_wait=600"),
                                    log=lambda *_: None).launch())
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    job = threading.Thread(target=second)
    job.start()
    try:
        time.sleep(2)  # let it reach the lock (not an assertion: the checks below hold for any delay)
        assert current_version(index) is None  # nothing published while the first holds the folder
    finally:
        release_time = time.time()
        lock.release()
    job.join(HANG_GUARD)
    assert not errors, errors
    assert results and results[0].built and results[0].rows == 50
    assert current_version(index) == results[0].version
    assert (index / results[0].version / MANIFEST).stat().st_mtime >= release_time - 1


def test_prune_never_touches_a_build_in_progress(tmp_path):
    index = tmp_path / "index"
    vecs = np.eye(4, dtype=np.float32)
    ids = np.arange(4, dtype=np.int64)
    for _ in range(3):
        ix.build_local(index, ids, vecs, [f"file:/x/{i}.png" for i in ids], ix.Choice("Flat", "test", False))
    assert published(index) == ["v0001", "v0002", "v0003"]

    build = index_lock(index).acquire()  # a build holds the folder and writes its staging folder
    try:
        staged = staging_dir(index)
        (staged / "shard-0000.faiss").write_bytes(b"half written")
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"):
            prune(index, 1)
        assert (staged / "shard-0000.faiss").read_bytes() == b"half written"
        assert published(index) == ["v0001", "v0002", "v0003"]
    finally:
        build.release()
    # the build is gone (crashed: its staging folder stayed behind); prune clears it with the old versions
    assert prune(index, 1) == ["v0001", "v0002"]
    assert not staged.exists() and not list(index.glob(STAGING_PREFIX + "*"))
    assert published(index) == ["v0003"] == [current_version(index)]
