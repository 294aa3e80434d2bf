"""Batch queries as a Spark job (local[2], real Delta output) against single queries of the Searcher on
the same index: the same ids, ranks and scores; bad queries become rows with an error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import webindex

from lakelens import Searcher
from lakelens.cli import main
from lakelens.search.batch import run_batch

QUERIES = ["a red circle", "a small blue square on the left", "a green triangle + at the top - red", "yellow"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return webindex.build(tmp_path_factory.mktemp("batch"))


def test_batch_queries_equal_single_queries(spark, site, tmp_path):
    lines = tmp_path / "queries.txt"
    lines.write_text("\n".join([*QUERIES[:2], "", *QUERIES[2:]]) + "\n")  # an empty line: an error row
    stats = run_batch(spark, str(site.index), str(lines), str(tmp_path / "out"), k=7)
    assert stats["queries"] == 5 and stats["failed"] == 1 and stats["index_version"] == "v0001"
    out = spark.read.format("delta").load(str(tmp_path / "out"))
    bad = out.where("error IS NOT NULL").toPandas()
    assert list(bad["query_id"]) == [2] and "empty query" in bad["error"].iloc[0] and bad["id"].isna().all()
    rows = out.where("error IS NULL").toPandas()  # 64-bit ids stay integers (no NaN among them)
    s = Searcher.open(site.index)
    for query_id, text in zip([0, 1, 3, 4], QUERIES):
        got = rows[rows["query_id"] == query_id].sort_values("rank")
        want = s.search_text(text, k=7)
        assert list(got["rank"]) == list(range(1, 8)) and set(got["query"]) == {text}
        assert list(got["id"]) == list(want["id"]) and list(got["path"]) == list(want["path"])
        assert np.allclose(got["score"], want["score"], atol=1e-5)


def test_batch_command_reads_csv_and_writes_parquet(spark, site, tmp_path, capsys):
    pd.DataFrame({"query_id": [10, 20], "query": QUERIES[:2]}).to_csv(tmp_path / "q.csv", index=False)
    assert main(["search", "--index", str(site.index), "--queries", str(tmp_path / "q.csv"), "--out",
                 str(tmp_path / "res"), "--out-format", "parquet", "-k", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["queries"] == 2 and stats["failed"] == 0
    rows = pd.read_parquet(tmp_path / "res")
    assert sorted(rows["query_id"].unique()) == [10, 20] and len(rows) == 6
    top = rows[(rows["query_id"] == 20) & (rows["rank"] == 1)]
    assert top["id"].iloc[0] == Searcher.open(site.index).search_text(QUERIES[1], k=1)["id"][0]
    assert main(["search", "--index", str(site.index), "--queries", str(tmp_path / "q.csv")]) == 2
    assert "--out" in capsys.readouterr().err
