"""Near-duplicate groups on Spark local[2] with real Delta and FAISS: a constructed table whose groups
are known exactly (near copies, exact copies by content hash, a chain the guard must cut), the same
groups from the index path, an incremental re-run, and collapsed search results."""

from __future__ import annotations

import json
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pyarrow.ipc as ipc
import pytest
from conftest import ROOT

from lakelens import IndexJob, Searcher, config, delta_sql, path_id
from lakelens.cli import main
from lakelens.dedup.job import DedupJob, label_components
from lakelens.index.layout import GROUPS_FILE
from lakelens.ingest.table import SCHEMA, EmbeddingsTable

DIM = 16
NOW = datetime(2026, 1, 1)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x)


def constructed():
    """name -> (vector, content hash, pixels side, bytes). Background images are random and far apart."""
    rng = np.random.default_rng(3)
    items = {f"bg{i:02d}": (unit(rng.normal(size=DIM)), f"{i:064x}", 64, 1000) for i in range(30)}
    a0 = unit(rng.normal(size=DIM))
    items["a0"] = (a0, "a" * 64, 64, 1000)
    items["a1"] = (unit(a0 + 0.03 * rng.normal(size=DIM)), "a1" * 32, 128, 900)  # most pixels: representative
    items["a2"] = (unit(a0 + 0.03 * rng.normal(size=DIM)), "a2" * 32, 64, 1200)
    e = unit(rng.normal(size=DIM))
    items["e0"] = (e, "e" * 64, 64, 500)
    items["e1"] = (e, "e" * 64, 64, 500)  # the same bytes at another path: an exact copy
    # a chain: neighbours 0.975 apart, the ends far apart; c2 is the representative (most pixels)
    u, v = np.linalg.qr(rng.normal(size=(DIM, 2)))[0].T
    theta = np.arccos(0.975)
    for i in range(6):
        items[f"c{i}"] = (np.cos(i * theta) * u + np.sin(i * theta) * v, f"c{i}" * 32, 96 if i == 2 else 64 - i, 800)
    return items


def rows(items):
    return [(path_id(f"file:/lib/{name}.jpg"), f"file:/lib/{name}.jpg", sha, size, NOW, side, side,
             "lakelens-tiny@none", [float(x) for x in vec], None, NOW, None) for name, (vec, sha, side, size) in items.items()]


def groups_of(spark, out):
    df = spark.read.format("delta").load(str(out)).toPandas()
    names = {g: sorted(p.rsplit("/", 1)[1][:-4] for p in part["path"]) for g, part in df.groupby("group")}
    reps = {g: part.loc[part["representative"], "path"].iloc[0].rsplit("/", 1)[1][:-4] for g, part in df.groupby("group")}
    return sorted((reps[g], tuple(m)) for g, m in names.items()), df


def dedup_conf(table, out, *overrides):
    # the constructed set is built around these: near copies at 0.975 and more, the guard at 0.92
    return config.load(ROOT / "conf" / "local.yaml", [f"dedup.table={table}", f"dedup.out={out}", "dedup.threshold=0.97",
                                                     "dedup.guard=0.92", *overrides])


def test_components_of_a_pair_graph():
    # a long chain listed from its far end (many hooking rounds), a star, a pair, negative ids
    a = np.array([9, 8, 7, 6, 5, 4, 3, 20, 20, 20, -5])
    b = np.array([10, 9, 8, 7, 6, 5, 4, 21, 22, 23, 40])
    nodes, label = label_components(a, b)
    assert dict(zip(nodes.tolist(), label.tolist())) == {
        **{i: 3 for i in range(3, 11)}, **{i: 20 for i in (20, 21, 22, 23)}, -5: -5, 40: -5}


def test_dedup_groups_guard_incremental_and_index(spark, tmp_path, capsys):
    items = constructed()
    table = tmp_path / "table"
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows(items), SCHEMA))

    # exact blockwise path (blocks of 8 rows: pairs inside one block and across blocks), by the command
    out = tmp_path / "dups"
    assert main(["dedup", "--table", str(table), "--out", str(out), "--threshold", "0.97", "--guard", "0.92",
                 "--conf", str(ROOT / "conf" / "local.yaml"), "--set", "dedup.block_rows=8"]) == 0
    result = SimpleNamespace(**json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    expected = [("a1", ("a0", "a1", "a2")), ("c2", ("c1", "c2", "c3")), ("c4", ("c4", "c5")), ("e0", ("e0", "e1"))]
    got, df = groups_of(spark, out)
    assert got == expected
    assert result.mode == "full" and result.searched == len(items) and result.groups == 4 and result.duplicates == 10
    assert result.split_off == 3  # c0, c4, c5 left c2's group; c4 and c5 formed their own
    sims = df.set_index(df["path"].str.rsplit("/", n=1).str[1])["similarity"]
    assert abs(sims["c1.jpg"] - 0.975) < 1e-4 and sims["c2.jpg"] == 1.0 and sims["e1.jpg"] > 0.9999
    vec = {n: v for n, (v, *_) in items.items()}
    assert abs(sims["a0.jpg"] - float(vec["a0"] @ vec["a1"])) < 1e-4

    # unchanged table: nothing to do
    again = DedupJob(spark=spark, conf=dedup_conf(table, out), log=print).launch()
    assert again.mode == "none" and again.groups == 4

    # incremental: a near copy of bg07 arrives, a2 is deleted; only the new image is searched
    added = {"n0": (unit(items["bg07"][0] + 0.02 * np.random.default_rng(9).normal(size=DIM)), "9" * 64, 200, 700)}
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows(added), SCHEMA))
    spark.sql(f"DELETE FROM {delta_sql.table_ref(str(table))} WHERE " + f"id = {path_id('file:/lib/a2.jpg')}")
    inc = DedupJob(spark=spark, conf=dedup_conf(table, out), log=print).launch()
    assert inc.mode == "incremental" and inc.searched == 1
    expected_after = [("a1", ("a0", "a1")), ("c2", ("c1", "c2", "c3")), ("c4", ("c4", "c5")), ("e0", ("e0", "e1")),
                      ("n0", ("bg07", "n0"))]
    assert groups_of(spark, out)[0] == expected_after

    # the index path (a full run into another output) finds the same groups and writes the map that
    # the query driver collapses results with
    index = tmp_path / "index"
    IndexJob(spark=spark, conf=config.load(ROOT / "conf" / "local.yaml", [f"index.table={table}", f"index.index={index}"]),
             log=print).launch()
    via_index = DedupJob(spark=spark, conf=dedup_conf(table, tmp_path / "dups-ix", f"dedup.index={index}"), log=print).launch()
    assert via_index.index_version is not None and groups_of(spark, tmp_path / "dups-ix")[0] == expected_after
    groups_file = ipc.open_file(str(index / GROUPS_FILE)).read_all()
    assert groups_file.num_rows == 11 and groups_file.schema.metadata[b"index_version"] == via_index.index_version.encode()

    searcher = Searcher.open(str(index))
    query = unit(vec["c1"] + vec["c2"] + vec["c3"]).astype(np.float32)  # c1, c2, c3 on top, then c0, c4
    plain = searcher.search_vector(query, k=5)
    collapsed = searcher.search_vector(query, k=3, collapse_duplicates=True)
    name = [p.rsplit("/", 1)[1][:-4] for p in plain["path"]]
    assert set(name[:3]) == {"c1", "c2", "c3"}
    # one result per group: the group's best hit stands for it, then images of other groups or none
    assert [p.rsplit("/", 1)[1][:-4] for p in collapsed["path"]] == [name[0], *[n for n in name[3:] if n != "c5"]][:3]
    assert list(collapsed["rank"]) == [1, 2, 3]


@pytest.mark.connect_covered("test_dedup.py::test_dedup_groups_guard_incremental_and_index")
def test_a_run_that_finds_no_duplicates_is_remembered(spark, tmp_path):
    """Far-apart images give no pairs and no groups: the run's empty overwrite of the groups table is still
    its commit (Delta skips empty ones), so the next run on an unchanged table does nothing instead of
    searching the last change again."""
    rng = np.random.default_rng(5)
    items = {f"far{i}": (unit(rng.normal(size=DIM)), f"{i:064x}", 64, 1000) for i in range(4)}
    table, out = tmp_path / "table", tmp_path / "dups"
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    emb = EmbeddingsTable(spark, str(table))
    emb.upsert(spark.createDataFrame(rows(dict(list(items.items())[:3])), SCHEMA))
    conf = dedup_conf(table, out, "dedup.threshold=0.999")
    first = DedupJob(spark=spark, conf=conf, log=print).launch()
    assert (first.mode, first.groups) == ("full", 0)
    emb.upsert(spark.createDataFrame(rows(dict(list(items.items())[3:])), SCHEMA))
    added = DedupJob(spark=spark, conf=conf, log=print).launch()
    assert (added.mode, added.searched, added.groups) == ("incremental", 1, 0)
    again = DedupJob(spark=spark, conf=conf, log=print).launch()
    assert again.mode == "none", again.reason
