"""Small tables that users hand lakelens beside the images (captions and fine-tuning pairs, labels, queries):
how one is told apart (Delta, CSV, Parquet, a text file of lines) and read, with a DataError that names a
missing file or column. Spark only for Delta tables (and for query files, which a Spark job reads): a CSV or
Parquet table is read here, without a JVM."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from lakelens.errors import DataError
from lakelens.ingest.paths import to_local, to_stored


def is_delta_path(path: str) -> bool:
    """A local folder with a _delta_log, or a remote URI (s3a://, abfss://, ...) that names no CSV or
    Parquet file: only Spark reads those."""
    if "://" in path and not path.startswith("file:"):
        return not path.lower().endswith((".csv", ".parquet"))
    return (to_local(to_stored(path)) / "_delta_log").is_dir()


def table_format(path: str, lines: bool = False) -> str:
    """How the table at `path` is read: "delta", "csv" or "parquet" (a name ending in neither .csv nor a
    Delta table). `lines` (query files): never Delta, and "text", one value a line, for a name that ends in
    neither .csv nor .parquet."""
    if not lines and is_delta_path(str(path)):
        return "delta"
    suffix = Path(str(path)).suffix.lower()
    if suffix == ".csv":
        return "csv"
    return "text" if lines and suffix != ".parquet" else "parquet"


def check_columns(have: Sequence[str], columns: Sequence[str], path, what: str) -> None:
    """DataError naming the table and each column of `columns` it lacks."""
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{what} {path} lacks column(s) {', '.join(missing)} (needs {', '.join(columns)}; it has "
                        f"{', '.join(have) or 'none'})")


def spark_table(spark, path: str, fmt: str, version: int | None = None):
    """The table as a Spark DataFrame: Delta at `version` (None: the latest), CSV with a header row,
    Parquet, or a text file's lines (column `value`)."""
    if fmt == "delta":
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(path)
    if fmt == "csv":
        return spark.read.option("header", True).csv(path)
    if fmt == "parquet":
        return spark.read.parquet(path)
    return spark.read.text(path)


def read_small_table(path: str, columns: Sequence[str], optional: Sequence[str] = (), *, what: str = "table",
                     version: int | None = None, spark=None, spark_conf=None, csv_dtype: dict | None = None):
    """A small table as pandas with `columns` and those of `optional` it has, in that order: a Delta table
    (at `version`, None for the latest) read with `spark`, else with a session of `spark_conf` that is stopped
    after if this call started it; a CSV or Parquet file or folder read here. DataError for a table that is
    not there or lacks one of `columns`; `what` names the table in it ("captions table")."""
    import pandas as pd

    fmt = table_format(path)
    if fmt == "delta":
        from lakelens.spark import owned_session

        with nullcontext(spark) if spark is not None else owned_session(spark_conf) as session:
            df = spark_table(session, path, fmt, version)
            check_columns(df.columns, columns, path, what)
            return df.select(*columns, *[c for c in optional if c in df.columns]).toPandas()
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {path}")
    df = pd.read_csv(p, dtype=csv_dtype) if fmt == "csv" else pd.read_parquet(p)
    check_columns(list(df.columns), columns, path, what)
    return df[[*columns, *[c for c in optional if c in df.columns]]].copy()  # a table of its own, not a slice
