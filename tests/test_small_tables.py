"""lakelens.ingest.small_tables: captions, labels and query tables told apart and read, CSV and Parquet
without Spark; a missing file or column is a DataError that names it."""

from __future__ import annotations

import pandas as pd
import pytest

from lakelens.errors import DataError
from lakelens.ingest.small_tables import read_small_table, table_format


def test_formats_by_content_for_tables_and_by_name_for_query_files(tmp_path):
    (tmp_path / "t" / "_delta_log").mkdir(parents=True)
    assert table_format(str(tmp_path / "t")) == "delta" and table_format("s3a://b/pairs") == "delta"
    assert table_format("s3a://b/pairs.csv") == "csv" and table_format(str(tmp_path / "p.parquet")) == "parquet"
    assert table_format(str(tmp_path / "folder")) == "parquet"  # a Parquet folder
    assert [table_format(p, lines=True) for p in ("q.txt", "q.CSV", "q.parquet", "s3a://b/q")] == \
        ["text", "csv", "parquet", "text"]


def test_csv_and_parquet_give_the_columns_asked_for_and_name_what_is_missing(tmp_path):
    frame = pd.DataFrame({"caption": ["a red circle"], "path": ["/x.jpg"], "label": ["red circle"], "extra": [1]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        got = read_small_table(str(tmp_path / name), ("path", "caption"), ("label", "lang"), what="captions table")
        assert got.to_dict("list") == {"path": ["/x.jpg"], "caption": ["a red circle"], "label": ["red circle"]}
    with pytest.raises(DataError, match=r"labels table .*c\.csv lacks column\(s\) tags \(needs path, tags;"):
        read_small_table(str(tmp_path / "c.csv"), ("path", "tags"), what="labels table")
    with pytest.raises(DataError, match="labels table not found: .*nope.csv"):
        read_small_table(str(tmp_path / "nope.csv"), ("path", "tags"), what="labels table")
