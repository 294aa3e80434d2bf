"""Batch queries as a Spark job (local[2], real Delta output) against single queries of the Searcher on
the same index: the same ids, ranks and scores; bad queries become rows with an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webindex

from lakelens import DataError, QueryError, Searcher
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


def batch_rows(spark, site, tmp_path, lines, k, name="queries.txt"):
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    stats = run_batch(spark, str(site.index), str(tmp_path / name), str(tmp_path / "out"), k=k)
    return stats, spark.read.format("delta").load(str(tmp_path / "out"))


def hits_and_errors(out):
    """The hit rows (64-bit ids stay integers: no NaN among them) and the other rows."""
    return out.where("id IS NOT NULL").toPandas(), out.where("id IS NULL").toPandas()


def assert_same_as_single(rows, query_id, want):
    got = rows[rows["query_id"] == query_id].sort_values("rank")
    assert got["error"].isna().all()
    assert list(got["rank"]) == list(range(1, len(want) + 1))
    assert list(got["id"]) == list(want["id"]) and list(got["path"]) == list(want["path"])
    assert np.allclose(got["score"].astype(float), want["score"].astype(float), atol=1e-5)


def single_error(s, text):
    with pytest.raises(QueryError) as e:
        s.search_text(text, k=5)
    return str(e.value)


def single_is_empty(site, text):
    return Searcher.open(site.index).search_text(text, k=5).empty


@pytest.mark.connect_covered("test_batch_search.py::test_batch_queries_equal_single_queries")
def test_batch_query_ids_missing_or_repeated(spark, site, tmp_path):
    """Each query is searched on its own: a missing query_id is the query's row number in the file (from 0),
    a query_id given twice is an error row for each of them, one that is not an integer an error row."""
    (tmp_path / "q.csv").write_text("query_id,query\n1,red circle\n1,blue square\n,green\n,yellow star\n"
                                    "x7,a small square\n")
    stats = run_batch(spark, str(site.index), str(tmp_path / "q.csv"), str(tmp_path / "out"), k=5)
    assert stats["queries"] == 5 and stats["failed"] == 3
    rows, bad = hits_and_errors(spark.read.format("delta").load(str(tmp_path / "out")))
    bad = bad.sort_values("query")
    assert list(bad["query"]) == ["a small square", "blue square", "red circle"] and bad["id"].isna().all()
    assert all("query_id 1 is given twice" in e for e in bad["error"].iloc[1:])
    assert "not an integer" in bad["error"].iloc[0] and pd.isna(bad["query_id"].iloc[0])
    s = Searcher.open(site.index)
    assert_same_as_single(rows, 2, s.search_text("green", k=5))
    assert_same_as_single(rows, 3, s.search_text("yellow star", k=5))
    assert set(rows[rows["query_id"] == 2]["query"]) == {"green"}


def test_batch_parses_queries_as_single_queries_do(spark, site, tmp_path):
    """Filters, quoted phrases and query arithmetic as single queries read them; a query a single search
    refuses is an error row with the same message."""
    good = ["a red circle path:img00001", '"red circle"', "a green triangle + at the top - red",
            "blue -path:img00000 -path:img00001", "path:img00002"]
    bad = ['"red', "tag:circle", "red tag:", "   "]
    nothing = "red path:no-such-folder/"  # a query that matches no image: one row, no rank, no error
    stats, out = batch_rows(spark, site, tmp_path, good + bad + [nothing], k=5)
    assert stats["queries"] == len(good) + len(bad) + 1 and stats["failed"] == len(bad)
    assert stats["unmatched"] == 1
    rows, errors = hits_and_errors(out)
    empty = errors[errors["error"].isna()]
    assert list(empty["query"]) == [nothing] and empty["rank"].isna().all() and single_is_empty(site, nothing)
    s = Searcher.open(site.index)
    for i, text in enumerate(good):
        assert_same_as_single(rows, i, s.search_text(text, k=5))
    errors = errors.dropna(subset=["error"]).set_index("query_id")["error"]
    assert sorted(errors.index) == list(range(len(good), len(good) + len(bad)))
    for i, text in enumerate(bad, start=len(good)):
        assert errors[i] == single_error(s, text)


def test_batch_tag_filters_and_ties_as_single_queries(spark, tmp_path):
    """On an index with tags: tag: filters and browsing by tag; and identical images (equal scores) come
    out in the order single queries give them."""
    paths = webindex.make_images(tmp_path, n=12)
    table = tmp_path / "img.captions.csv"  # the copies keep the original's caption (keyword_docs' tags)
    captions = pd.read_csv(table)
    for j in range(4):  # copies of one picture: equal scores for every query
        copy = tmp_path / "img" / f"copy{j}.png"
        copy.write_bytes(Path(paths[0]).read_bytes())
        paths.append(str(copy))
        captions.loc[len(captions)] = {**captions.iloc[0].to_dict(), "path": str(copy)}
    captions.to_csv(table, index=False)
    site = webindex.publish(tmp_path / "index", paths, keywords=True)
    queries = ["a red circle", "a blue square tag:circle", "tag:red", "circle -tag:blue", "path:copy"]
    rows, _ = hits_and_errors(batch_rows(spark, site, tmp_path, queries, k=len(paths))[1])
    s = Searcher.open(site.index)
    for i, text in enumerate(queries):
        want = s.search_text(text, k=len(paths))
        assert len(want) > 1
        assert_same_as_single(rows, i, want)


def test_batch_missing_queries_file_is_one_line(spark, site, tmp_path, capsys):
    with pytest.raises(DataError, match="queries"):
        run_batch(spark, str(site.index), str(tmp_path / "nope.txt"), str(tmp_path / "out"))
    assert main(["search", "--index", str(site.index), "--queries", str(tmp_path / "nope.csv"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope.csv" in err and "Traceback" not in err
