"""Re-indexing by change on Spark local[2] with real Delta: incremental versions (delta shards and
tombstones from the change feed) against full rebuilds, compaction, and each reason for a full build."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import numpy as np
import pytest
from conftest import ROOT, clustered, exact_topk, recall_at

from lakelens import IndexJob, Searcher, config, delta_sql, path_id
from lakelens import index as ix
from lakelens.ingest.table import SCHEMA, EmbeddingsTable

DIM = 32
NEW_MODEL = "lakelens-tiny@/models/final.pt#0123456789abcdef"


def quiet(*_):
    pass


def rows_for(ids_from: int, n: int, seed: int, model: str = "lakelens-tiny@none"):
    x = clustered(n, DIM, clusters=20, seed=seed, centres_seed=0)
    now = datetime(2026, 1, 1)
    return [(path_id(p), p, "0" * 64, 100, now, 8, 8, model, [float(v) for v in vec], None, now, None)
            for p, vec in zip((f"file:/data/img-{i:06d}.jpg" for i in range(ids_from, ids_from + n)), x)]


def create(spark, table, rows):
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    upsert(spark, table, rows)


def upsert(spark, table, rows):
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows, SCHEMA))


def delete(spark, table, ids):
    spark.sql(f"DELETE FROM {delta_sql.table_ref(str(table))} WHERE " + f"id IN ({','.join(str(int(i)) for i in ids)})")


def change_one_percent(spark, table, n: int, seed: int):
    """0.5% added, 0.25% changed (new vectors at the same paths), 0.25% deleted, as the embed job does it."""
    k = max(2, n // 400)
    added = rows_for(10_000 + seed * 1000, 2 * k, seed=seed)
    changed = rows_for(k, k, seed=seed + 50)  # paths of existing rows k..2k, other vectors
    upsert(spark, table, added + changed)
    gone = [path_id(f"file:/data/img-{i:06d}.jpg") for i in range(3 * k, 4 * k)]
    delete(spark, table, gone)
    return {"added": added, "changed": changed, "deleted": gone}


def conf_for(table, index, *overrides):
    return config.load(ROOT / "conf" / "local.yaml", [f"index.table={table}", f"index.index={index}", *overrides])


def index(spark, table, folder, *overrides):
    return IndexJob(spark=spark, conf=conf_for(table, folder, *overrides), log=quiet).launch()


def live_vectors(spark, table):
    rows = spark.read.format("delta").load(str(table)).select("id", "embedding").toPandas()
    return rows["id"].to_numpy(np.int64), np.stack(rows["embedding"].to_numpy()).astype(np.float32)


# the Connect half: one factory; the change feed is read the same way for all, FAISS runs on the driver
COVERED = pytest.mark.connect_covered(
    "test_reindex.py::test_incremental_equals_a_full_rebuild_for_exact_and_hnsw[Flat]")


@pytest.mark.parametrize("factory", ["Flat", pytest.param("HNSW32,Flat", marks=COVERED)])
def test_incremental_equals_a_full_rebuild_for_exact_and_hnsw(spark, tmp_path, factory):
    table, inc, full = tmp_path / "t", tmp_path / "inc", tmp_path / "full"
    create(spark, table, rows_for(0, 1200, seed=1))
    assert index(spark, table, inc, f"index.factory={factory}", "index.shards=2").build == "full"
    change = change_one_percent(spark, table, 1200, seed=2)
    result = index(spark, table, inc, f"index.factory={factory}", "index.shards=2")
    assert result.build == "incremental" and result.deltas == 1 and "rows changed" in result.build_reason
    m = ix.read_manifest(inc)
    # a tombstone for each changed and deleted image (3 + 3); the 6 new ids had no older copy to hide
    assert m["build"] == "incremental" and m["generation"] == 1 and m["tombstones"]["count"] == 6
    # the base shards are the live version's files, linked, not copied
    for shard in m["shards"]:
        assert (inc / "v0001" / shard["file"]).stat().st_ino == (inc / "v0002" / shard["file"]).stat().st_ino
    index(spark, table, full, f"index.factory={factory}", "index.shards=2", "index.full=true")
    a, b = Searcher.open(inc), Searcher.open(full)
    assert len(a) == len(b) == 1200 + 6 - 3
    q = clustered(40, DIM, clusters=20, seed=9, centres_seed=0)
    for ra, rb in zip(a.search_vectors(q, k=10), b.search_vectors(q, k=10)):
        assert list(ra["id"]) == list(rb["id"]) and np.allclose(ra["score"], rb["score"], atol=1e-6)
    ids, vecs = live_vectors(spark, table)
    for row in change["added"] + change["changed"]:  # new vectors are found, as their own best match
        hit = a.search_vector(np.asarray(row[8], np.float32), k=1)
        assert hit["id"][0] == row[0] and hit["score"][0] == pytest.approx(1.0, abs=1e-5)
        assert a.path_of(row[0]) == row[1]
    gone = set(change["deleted"])
    for r in rows_for(0, 1200, seed=1):  # a deleted image is never returned, not even for its own vector
        if r[0] in gone:
            hits = a.search_vector(np.asarray(r[8], np.float32), k=20)
            assert not gone & set(hits["id"]) and a.path_of(r[0]) is None and a.vector_of(r[0]) is None


@COVERED
def test_incremental_ivf_keeps_recall_and_compaction_equals_a_full_build(spark, tmp_path):
    table, inc, full = tmp_path / "t", tmp_path / "inc", tmp_path / "full"
    create(spark, table, rows_for(0, 2400, seed=3))
    ivf = ("index.factory=IVF24,Flat", "index.shards=2")
    index(spark, table, inc, *ivf)
    # a reader in a loop while incremental and compaction versions are published: never an error
    reader, errors, seen, stop = Searcher.open(inc), [], set(), threading.Event()
    probe = clustered(1, DIM, clusters=20, seed=12, centres_seed=0)[0]

    def read():
        while not stop.is_set():
            try:
                reader.reload()
                seen.add((reader.version, len(reader.search_vector(probe, k=5))))
            except Exception as e:  # noqa: BLE001  any error is a failure of atomic publishing
                errors.append(repr(e))
            stop.wait(0.01)

    thread = threading.Thread(target=read)
    thread.start()
    change_one_percent(spark, table, 2400, seed=4)
    assert index(spark, table, inc, *ivf).build == "incremental"
    index(spark, table, full, *ivf, "index.full=true")
    ids, vecs = live_vectors(spark, table)
    q = clustered(100, DIM, clusters=20, seed=11, centres_seed=0)
    _, truth = exact_topk(q, vecs, ids, 10)
    rec = [recall_at([f["id"].to_numpy() for f in Searcher.open(d).search_vectors(q, k=10)], truth)
           for d in (inc, full)]
    assert abs(rec[0] - rec[1]) <= 0.01 and rec[0] > 0.8
    assert ix.read_manifest(inc).get("drift_recall", 0) >= 0.9
    # a second change past max_deltas=1: compaction merges deltas and drops tombstoned vectors
    change_one_percent(spark, table, 2400, seed=5)
    result = index(spark, table, inc, *ivf, "index.max_deltas=1")
    m = ix.read_manifest(inc)
    assert result.build == m["build"] == "compaction" and "max_deltas" in m["build_reason"]
    assert m["deltas"] == [] and m["tombstones"] is None
    deadline = time.monotonic() + 60
    while "v0003" not in {v for v, _ in seen} and time.monotonic() < deadline:
        time.sleep(0.05)  # the reader's next loop switches to the compacted version
    stop.set()
    thread.join()
    assert errors == [] and {v for v, _ in seen} >= {"v0001", "v0003"} and {n for _, n in seen} == {5}
    v3, v2 = ix.read_manifest(inc, "v0003"), ix.read_manifest(inc, "v0002")
    assert (inc / "v0003" / "trained.faiss").read_bytes() == (inc / "v0002" / "trained.faiss").read_bytes()
    assert v3["rows"] == sum(s["count"] for s in v3["shards"]) and v2["factory"] == v3["factory"]
    ids, vecs = live_vectors(spark, table)
    s = Searcher.open(inc)
    assert sorted(s.ids.tolist()) == sorted(ids.tolist())
    order = np.argsort(ids)
    stored = np.stack([s.vector_of(int(i)) for i in ids[order][:200]])
    assert np.allclose(stored, vecs[order][:200], atol=1e-6)  # IVF-Flat keeps vectors exactly


def test_each_reason_for_a_full_rebuild_is_taken_and_said(spark, tmp_path):
    table, folder = tmp_path / "t", tmp_path / "idx"
    create(spark, table, rows_for(0, 600, seed=6))
    base = ("index.exact_max_rows=605",)
    assert index(spark, table, folder, *base).factory == "Flat"

    # auto outgrows Flat: 10 new rows cross exact_max_rows
    upsert(spark, table, rows_for(5000, 10, seed=7))
    r = index(spark, table, folder, *base)
    assert r.build == "full" and "auto now chooses HNSW32,Flat" in r.build_reason

    # --full
    upsert(spark, table, rows_for(6000, 2, seed=8))
    assert "--full" in index(spark, table, folder, *base, "index.full=true").build_reason

    # a small change is incremental
    upsert(spark, table, rows_for(7000, 2, seed=9))
    assert index(spark, table, folder, *base).build == "incremental"

    # settings changed
    upsert(spark, table, rows_for(7100, 2, seed=9))
    assert "settings changed" in index(spark, table, folder, *base, "index.shards=3").build_reason

    # the model changed: every row re-embedded with other weights
    spark.sql(f"UPDATE {delta_sql.table_ref(str(table))} SET model = {delta_sql.sql_string(NEW_MODEL)}")
    r = index(spark, table, folder, *base, "index.shards=3")
    assert r.build == "full" and "the model changed" in r.build_reason

    # the table was re-created at the same place: its change feed says nothing about the old one
    live_rows = spark.read.format("delta").load(str(table)).collect()
    import shutil

    shutil.rmtree(table)
    create(spark, table, [tuple(x) for x in live_rows])
    r = index(spark, table, folder, *base, "index.shards=3")
    assert r.build == "full" and "re-created" in r.build_reason

    # the change feed does not cover the versions: turned off, then a change
    spark.sql(f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES (delta.enableChangeDataFeed = false)")
    upsert(spark, table, rows_for(8000, 2, seed=10, model=NEW_MODEL))
    r = index(spark, table, folder, *base, "index.shards=3")
    assert r.build == "full" and "change feed does not cover" in r.build_reason


@COVERED
def test_drift_below_the_recall_target_retrains(spark, tmp_path):
    table, folder = tmp_path / "t", tmp_path / "idx"
    create(spark, table, rows_for(0, 3000, seed=12))
    ivf = ("index.factory=IVF30,Flat", "index.shards=1")
    index(spark, table, folder, *ivf)
    # new rows from a distribution the centroids never saw: far from every trained cluster
    shifted = clustered(60, DIM, clusters=3, seed=13, centres_seed=99)
    now = datetime(2026, 1, 2)
    upsert(spark, table, [(path_id(f"file:/new/{i}.jpg"), f"file:/new/{i}.jpg", "0" * 64, 1, now, 8, 8,
                           "lakelens-tiny@none", [float(v) for v in x], None, now, None) for i, x in enumerate(shifted)])
    r = index(spark, table, folder, *ivf, "index.min_recall=1.01")  # no probe can pass: retrain
    assert r.build == "full" and r.build_reason.startswith("drift: recall@10") and ix.versions(folder) == ["v0001",
                                                                                                          "v0002"]
    assert ix.read_manifest(folder)["build"] == "full"


def test_a_table_re_created_at_the_same_version_is_rebuilt(spark, tmp_path):
    """Deleted and made again with other rows, a table reaches the version the live index was built from:
    the version alone says 'unchanged', the table's Delta id says it is another table."""
    import json
    import shutil

    table, folder = tmp_path / "t", tmp_path / "idx"
    create(spark, table, rows_for(0, 300, seed=20))
    assert index(spark, table, folder).build == "full"
    shutil.rmtree(table)
    others = rows_for(5000, 200, seed=21)
    create(spark, table, others)
    assert EmbeddingsTable(spark, str(table)).version() == ix.read_manifest(folder)["source"]["version"]
    r = index(spark, table, folder)
    assert r.build == "full" and "re-created" in r.build_reason and str(table) in r.build_reason
    assert r.version == "v0002" and sorted(Searcher.open(folder).ids.tolist()) == sorted(row[0] for row in others)
    assert index(spark, table, folder).build == "none"  # the same table, unchanged since
    # a live version that records no table id (made before ids were kept): the id is unknown, the
    # version is trusted as before, and nothing is rebuilt
    manifest = folder / "v0002" / "manifest.json"
    legacy = json.loads(manifest.read_text())
    del legacy["source"]["table_id"]
    manifest.write_text(json.dumps(legacy))
    r = index(spark, table, folder)
    assert r.build == "none" and r.version == "v0002"


@COVERED
@pytest.mark.parametrize("factory", ["IVF2,SQ8", "IVF12,PQ16"])
def test_an_explicit_compressed_factory_updates_incrementally(spark, tmp_path, factory):
    """SQ8 and PQ codes without raw vectors beside them (an explicit factory keeps none): the drift probe's
    exact side decodes the codes, and the new rows are found in the incremental version."""
    table, folder = tmp_path / "t", tmp_path / "idx"
    create(spark, table, rows_for(0, 1200, seed=22))
    first = index(spark, table, folder, f"index.factory={factory}", "index.shards=2")
    assert first.build == "full" and ix.read_manifest(folder)["rerank"] == 0
    added = rows_for(20_000, 20, seed=23)  # the probe's queries: enough that one query's misses do not decide
    upsert(spark, table, added)
    r = index(spark, table, folder, f"index.factory={factory}", "index.shards=2")
    m = ix.read_manifest(folder)
    assert (r.build, r.version, m["build"], m["factory"]) == ("incremental", "v0002", "incremental", factory), r
    assert m["drift_recall"] >= 0.9 and r.deltas == 1
    s = Searcher.open(folder)
    assert len(s) == 1220
    for row in added:
        assert row[0] in set(s.search_vector(np.asarray(row[8], np.float32), k=5)["id"])
        assert s.path_of(row[0]) == row[1]
