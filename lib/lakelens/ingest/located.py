"""The bytes of images that live inside shards or tables, read on the executors by their locator (the index
meta's and `with_source_columns`' JSON): for jobs after the embed job that need the pictures again (CoCa
captions), beside Spark's binaryFile reads of plain files."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from lakelens.ingest.storage import StorageError, read_located

CONTENT_SCHEMA = "path string, content binary"


def located_contents(spark: SparkSession, rows: list[tuple[str, str]], partitions: int, max_bytes: int,
                     s3=None) -> DataFrame:
    """(path, content) of `rows` ((path, locator) pairs) in `partitions` partitions; an image that cannot be
    read has empty content (the reader then reports it as a failed image, as an empty file)."""
    n = max(1, min(partitions, len(rows)))
    slices = [rows[i * len(rows) // n:(i + 1) * len(rows) // n] for i in range(n)]

    def read(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            for i in pdf["id"]:
                part = slices[int(i)]
                contents = []
                for path, locator in part:
                    try:
                        contents.append(read_located(path, locator, max_bytes, None, s3))
                    except StorageError:
                        contents.append(b"")
                yield pd.DataFrame({"path": pd.Series([p for p, _ in part], dtype=object), "content": contents})

    return spark.range(0, n, 1, n).mapInPandas(read, CONTENT_SCHEMA)
