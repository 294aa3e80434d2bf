"""Images stored in a table (`embed.source: table`): a Parquet dataset (img2dataset's Parquet output, a Hugging
Face `datasets` export) or a Delta table, its image bytes in a binary column (`jpg`, `png`, `webp`, `image`,
`content`) or a Hugging Face Image struct (`struct<bytes: binary, path: string>`), read in place by Spark.

A row's path is the table's stored path, '/', and its key (`key`, else the Image struct's `path`; a
Parquet table without either uses the data file's name and the row's index in it). The table's data
files are the containers: a data file of the same size and modification time is not read again, a new
one embeds its rows, a removed one takes its rows along. A Delta source is read at its latest version
(`embed.source_version` picks another), deletion vectors and all."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lakelens import delta_sql
from lakelens.errors import ConfigError, DataError
from lakelens.ingest.paths import from_uri, glob_escape, to_stored
from lakelens.ingest.shard_job import ContainerSource
from lakelens.ingest.table import SOURCE_UDF_SCHEMA

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "content")
CAPTION_COLUMNS = ("caption", "txt", "text")
KEY_COLUMNS = ("key",)
KEY_TYPES = (T.StringType, T.IntegralType)


def _is_image_struct(data_type) -> bool:
    return (isinstance(data_type, T.StructType) and "bytes" in data_type.fieldNames()
            and isinstance(data_type["bytes"].dataType, T.BinaryType))


def image_column(schema: T.StructType, wanted: str = "") -> str:
    """The image column: `wanted`, else the one binary column named like an image format (or `image`,
    `content`), else the one Hugging Face Image struct; `name.bytes` for a struct. A ConfigError names the
    columns there are when none (or not one) fits."""
    fields = {f.name: f.dataType for f in schema.fields}
    listing = ", ".join(f"{n} ({t.simpleString()})" for n, t in fields.items())
    if wanted:
        top = wanted.split(".", 1)[0]
        if top not in fields:
            raise ConfigError(f"embed.image_column: no column {wanted!r}; the table has {listing}")
        data_type = fields[top]
        if isinstance(data_type, T.BinaryType) and top == wanted:
            return wanted
        if _is_image_struct(data_type) and wanted in (top, f"{top}.bytes"):
            return f"{top}.bytes"
        raise ConfigError(f"embed.image_column: {wanted!r} is {data_type.simpleString()}, not image bytes "
                          f"(binary, or a struct with a binary `bytes` field); the table has {listing}")
    binary = [n for n in IMAGE_COLUMNS if isinstance(fields.get(n), T.BinaryType)]
    structs = [n for n, t in fields.items() if _is_image_struct(t)]
    found = binary or [f"{n}.bytes" for n in structs]
    if len(found) != 1:
        why = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise ConfigError(f"embed.image_column: {why} image columns found (a binary column named "
                          f"{', '.join(IMAGE_COLUMNS)}, or an Image struct); name one; the table has {listing}")
    return found[0]


def pick_column(schema: T.StructType, wanted: str, defaults: tuple, key: str,
                types: tuple = (T.StringType,)) -> str | None:
    """A column: `wanted` (a ConfigError under `key` when the table lacks it), else the first of `defaults`
    the table has with one of `types`, else None."""
    names = {f.name: f.dataType for f in schema.fields}
    if wanted:
        if wanted not in names:
            raise ConfigError(f"{key}: no column {wanted!r}; the table has {', '.join(names)}")
        return wanted
    return next((n for n in defaults if isinstance(names.get(n), types)), None)


def read_source(spark: SparkSession, location: str) -> tuple[DataFrame, str]:
    """(DataFrame of the table, "delta" or "parquet"): a Delta table at its latest version, or every
    `*.parquet` file below a folder."""
    if delta_sql.is_delta(spark, location):
        detail = spark.sql(f"DESCRIBE DETAIL {delta_sql.table_ref(location)}").select("properties").first()
        mode = (detail["properties"] or {}).get("delta.columnMapping.mode", "none")
        if mode != "none":
            raise ConfigError(f"embed.images: the Delta table {location} maps column names "
                              f"(delta.columnMapping.mode = {mode}); lakelens reads its data files by their own "
                              f"column names and does not read such tables yet")
        return spark.read.format("delta").load(location), "delta"
    reader = spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.parquet")
    return reader.parquet(glob_escape(location)), "parquet"


def table_embedder(build: Callable, max_bytes: int, root: str, column: str):
    """The mapInPandas function: rows (uri, file_size, millis, rows, row, key, key_column, caption, image) ->
    rows of SOURCE_UDF_SCHEMA."""

    def embed_rows(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        embedder = build()

        def tagged():
            for pdf in batches:
                images = [b if isinstance(b, (bytes, bytearray)) else b"" for b in pdf["image"]]
                errors = ["no image" if not b else "too large" if len(b) > max_bytes else None for b in images]
                yield (pdf, errors, [len(b) for b in images]), [b"" if e else b for b, e in zip(images, errors)]

        for (pdf, errors, sizes), results in embedder.stream(tagged()):
            files = [to_stored(from_uri(u)) for u in pdf["uri"]]
            when = pd.to_datetime(pdf["millis"], unit="ms", utc=True)
            contents = pdf["image"].tolist()
            yield pd.DataFrame({
                "path": [f"{root}{k}" for k in pdf["key"]],
                "content_sha256": [hashlib.sha256(c).hexdigest() if e is None else None
                                   for c, e in zip(contents, errors)],
                "size_bytes": pd.Series(sizes, dtype="int64"),
                "modified": when.reset_index(drop=True),
                "width": pd.array([None if e else r.width for r, e in zip(results, errors)], dtype="Int32"),
                "height": pd.array([None if e else r.height for r, e in zip(results, errors)], dtype="Int32"),
                "embedding": [None if e else r.embedding for r, e in zip(results, errors)],
                "error": [e or r.error for r, e in zip(results, errors)],
                "regions": [None if e or r.regions is None else
                            [{"box": list(box), "embedding": vec} for box, vec in r.regions]
                            for r, e in zip(results, errors)],
                "caption": pdf["caption"].tolist(),
                "container": [{"path": f, "size_bytes": int(s), "modified": t.to_pydatetime(),
                               "offset": None if pd.isna(o) else int(o), "column": column,
                               "key_column": kc, "key": None if kc is None else k, "rows": int(n)}
                              for f, s, t, o, kc, k, n in zip(files, pdf["file_size"], when, pdf["row"],
                                                             pdf["key_column"], pdf["key"], pdf["rows"])],
            })

    return embed_rows


def table_source(job, build: Callable) -> ContainerSource:
    """The images of the table at embed.images, its data files as containers."""
    c, spark = job.conf.embed, job.spark
    location = c.images.rstrip("/")
    df, kind = read_source(spark, location)
    column = image_column(df.schema, c.image_column)
    caption = pick_column(df.schema, c.caption_column, CAPTION_COLUMNS, "embed.caption_column")
    # keys are often numbers (a Delta table's id): they are compared as their text
    key = pick_column(df.schema, c.key_column, KEY_COLUMNS, "embed.key_column", KEY_TYPES)
    struct_path = (column.endswith(".bytes") and "path" in df.schema[column.split(".")[0]].dataType.fieldNames()
                   and not key)
    if kind == "delta" and not key and not struct_path:
        raise ConfigError(f"embed.key_column: the Delta table {location} has no `key` column; name the column "
                          f"that identifies a row (its rows move between data files as the table changes)")
    root = to_stored(location) + "/"
    meta = F.col("_metadata")
    with_files = df.select("*", meta.file_path.alias("_uri"), meta.file_size.alias("_file_size"),
                           F.unix_millis(meta.file_modification_time).alias("_millis"))
    listing = (with_files.groupBy("_uri", "_file_size", "_millis").count()
               .select(F.col("_uri").alias("uri"), F.col("_file_size").alias("size_bytes"),
                       F.col("_millis").alias("millis"), F.col("count").alias("rows"))
               .localCheckpoint())
    files = listing.mapInPandas(_stored_files, "path string, size_bytes long, modified timestamp, uri string, "
                                               "rows long").localCheckpoint()
    row_index = meta.row_index if kind == "parquet" else F.lit(None).cast("long")
    by_place = F.concat(meta.file_name, F.lit("#"), row_index.cast("string"))
    if key or struct_path:
        name = key or f"{column.split('.')[0]}.path"
        own = F.col(key).cast("string") if key else F.col(name)
        if kind == "parquet":  # a row without a key (an Image made from bytes has no path) is named by its place
            key_col = F.coalesce(own, by_place)
            key_name = F.when(own.isNull(), F.lit(None).cast("string")).otherwise(F.lit(name))
        else:
            key_col, key_name = own, F.lit(name)
    else:
        key_col, key_name = by_place, F.lit(None).cast("string")
    checked = []

    def rows(chunk: pd.DataFrame) -> DataFrame:
        if not checked:  # once a run has something to read: a row's path must name one row
            check_keys(df.select(key_col.alias("key")), location, key or (name if struct_path else None))
            checked.append(True)
        wanted = files.where(F.col("path").isin(list(chunk["path"]))).select("uri", "rows").collect()
        uris = spark.createDataFrame([(r["uri"], r["rows"]) for r in wanted], "uri string, rows long")
        # a filter on the file's own name lets Spark skip the other data files
        picked = df.where(meta.file_path.isin([r["uri"] for r in wanted])).select(
            meta.file_path.alias("uri"), meta.file_size.alias("file_size"),
            F.unix_millis(meta.file_modification_time).alias("millis"), row_index.alias("row"),
            key_col.alias("key"), key_name.alias("key_column"),
            (F.col(caption).cast("string") if caption else F.lit(None).cast("string")).alias("caption"),
            F.col(column).alias("image"))
        return (picked.join(uris.hint("broadcast"), "uri")
                .mapInPandas(table_embedder(build, c.max_file_bytes, root, column), SOURCE_UDF_SCHEMA))

    return ContainerSource(f"the {kind} table {location}", root, files.select("path", "size_bytes", "modified", "rows"),
                           rows,
                           merge_all=True)


def check_keys(keys: DataFrame, location: str, column: str | None) -> None:
    """Raise DataError naming keys that more than one row of the table has, or rows without a key: their rows
    would share one path and one id (one key column read, nothing written yet)."""
    missing = keys.where(F.col("key").isNull()).count()
    if missing:
        raise DataError(f"embed.key_column: {missing} rows of {location} have no {column or 'key'}; every row needs "
                        f"one (name the column that identifies a row with --key-column)")
    twice = keys.groupBy("key").count().where(F.col("count") > 1).limit(3).collect()
    if twice:
        which = "; ".join(f"key {r['key']!r} is in {r['count']} rows" for r in twice)
        raise DataError(f"embed.key_column: keys of {location} are not unique ({which}): each row needs its own "
                        f"key (name another column with --key-column); nothing was written")


def _stored_files(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for pdf in batches:
        yield pd.DataFrame({"path": [to_stored(from_uri(u)) for u in pdf["uri"]], "size_bytes": pdf["size_bytes"],
                            "modified": pd.to_datetime(pdf["millis"], unit="ms", utc=True), "uri": pdf["uri"],
                            "rows": pdf["rows"]})
