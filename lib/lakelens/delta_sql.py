"""Delta Lake through SQL and DataFrames only: what lakelens asks of a Delta table works on a classic session
and on Spark Connect alike, needing nothing but Delta's SQL extension on the server (Delta's Python table
API needs Delta's Connect plugin there). On a classic session the latest version, id and properties come
from Delta Kernel on the driver (no Spark job); elsewhere from DESCRIBE DETAIL / DESCRIBE HISTORY."""

from __future__ import annotations

import uuid

from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import DataFrame, Row, SparkSession

from lakelens import classic
from lakelens.errors import SparkSetupError

# Delta's conflict errors (a concurrent writer committed first); the losing commit is safe to retry. A classic
# session raises delta.exceptions' classes, Spark Connect a PySparkException with one of these conditions.
CONFLICT_CONDITIONS = ("DELTA_CONCURRENT_APPEND", "DELTA_CONCURRENT_DELETE_READ", "DELTA_CONCURRENT_DELETE_DELETE",
                       "DELTA_CONCURRENT_TRANSACTION", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
                       "DELTA_CONCURRENT_WRITE", "DELTA_CONCURRENT_MODIFICATION")
CONFLICT_NAMES = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
                  "ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException",
                  "ConcurrentWriteException", "DeltaConcurrentModificationException")


def table_ref(location: str) -> str:
    """`delta.`location`` for SQL, backticks in the path doubled."""
    return "delta.`" + location.replace("`", "``") + "`"


def sql_string(text: str) -> str:
    """A SQL string literal of `text` (Spark's rules: backslash escapes, single quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


NO_DELTA_SQL = ("the Spark Connect server does not understand Delta Lake's SQL (DESCRIBE DETAIL): start it with "
                "Delta's jars and --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension --conf "
                "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog (docs/spark-connect.md)")


def _without_delta_sql(exc: AnalysisException) -> bool:
    # Spark's own parser reads `DESCRIBE DETAIL x` as DESCRIBE TABLE `DETAIL` (column x): a session without
    # Delta's extension fails on a table named DETAIL, whichever location it was asked about
    return exc.getCondition() == "TABLE_OR_VIEW_NOT_FOUND" and "`DETAIL`" in str(exc)


def is_conflict(exc: BaseException) -> bool:
    if type(exc).__name__ in CONFLICT_NAMES:
        return True
    if isinstance(exc, PySparkException):
        condition = exc.getCondition() or ""
        if condition.startswith(CONFLICT_CONDITIONS):
            return True
    text = str(exc)
    return any(name in text for name in CONFLICT_NAMES)


def snapshot(spark: SparkSession, location: str) -> tuple[int, str, dict] | None:
    """(version, table id, properties) of the latest version, or None when `location` holds no Delta table."""
    if classic.is_classic(spark):
        snap = classic.delta_snapshot(spark, location)
        if snap is not None:
            return snap
    try:
        d = spark.sql(f"DESCRIBE DETAIL {table_ref(location)}").select("id", "properties", "format").first()
    except AnalysisException as e:
        if _without_delta_sql(e):
            raise SparkSetupError(NO_DELTA_SQL) from None
        return None
    if d is None or (d["format"] or "delta").lower() != "delta":
        return None
    h = history(spark, location, 1)
    return (int(h[0]["version"]) if h else 0), str(d["id"]), dict(d["properties"] or {})


# Delta records no commit for a write that adds and removes nothing; where a run's state rides in its
# commit's userMetadata (tag, caption and dedup runs), an empty result must still be a commit, or the next
# run does not know this one happened. Set to "false" around such writes.
SKIP_EMPTY_COMMITS = "spark.databricks.delta.skipRecordingEmptyCommits"


def is_delta(spark: SparkSession, location: str) -> bool:
    return snapshot(spark, location) is not None


def version(spark: SparkSession, location: str) -> int | None:
    snap = snapshot(spark, location)
    return None if snap is None else snap[0]


def history(spark: SparkSession, location: str, limit: int = 1) -> list[Row]:
    """The newest `limit` commits (version, operation, userMetadata), newest first."""
    return (spark.sql(f"DESCRIBE HISTORY {table_ref(location)} LIMIT {int(limit)}")
            .select("version", "operation", "userMetadata").collect())


def merge(spark: SparkSession, location: str, source: DataFrame, condition: str, clauses: str) -> None:
    """MERGE INTO the table (alias t) USING `source` (alias s) ON `condition` `clauses`, in one commit. The
    source is a temporary view of this session, dropped after."""
    view = f"lakelens_merge_{uuid.uuid4().hex[:12]}"
    source.createOrReplaceTempView(view)
    try:
        spark.sql(f"MERGE INTO {table_ref(location)} t USING {view} s ON {condition} {clauses}")
    finally:
        spark.catalog.dropTempView(view)


def ddl(schema) -> str:
    """Column definitions for CREATE TABLE from a StructType, with NOT NULL where a top-level field is not
    nullable (SQL cannot state element nullability: arrays and structs inside take Delta's default)."""
    return ", ".join(f"`{f.name}` {f.dataType.simpleString()}{'' if f.nullable else ' NOT NULL'}"
                     for f in schema.fields)


def create(spark: SparkSession, location: str, schema, properties: dict[str, str]) -> None:
    """CREATE TABLE at `location` with `schema` and table properties, in one commit (version 0)."""
    props = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in properties.items())
    spark.sql(f"CREATE TABLE {table_ref(location)} ({ddl(schema)}) USING DELTA"
              + (f" TBLPROPERTIES ({props})" if props else ""))


def plain_types(df: DataFrame) -> DataFrame:
    """`df` with every column holding strings cast to its type's SQL text, before a Delta write. Under Spark
    Connect a string type that comes from the client (a cast to StringType(), a UDF's output schema) is an
    explicit UTF8_BINARY collation, which Delta stores as the type "string collate UTF8_BINARY": other Delta
    readers (delta-rs) refuse the table. The type's text names plain `string`; on a classic session the cast
    changes nothing."""
    return _as_sql_text(df, lambda f: "string" in f.dataType.simpleString())


def _as_sql_text(df: DataFrame, which) -> DataFrame:
    """`df` with the columns `which(field)` picks cast to their type's SQL text (the same type, as SQL states
    it: plain strings, nullable array elements); the other columns as they are."""
    return df.select(*[df[f"`{f.name}`"].cast(f.dataType.simpleString()).alias(f.name) if which(f)
                       else df[f"`{f.name}`"] for f in df.schema.fields])


def has_non_null_elements(data_type) -> bool:
    """Whether a type declares array elements (or map values) that are never null, anywhere inside it."""
    from pyspark.sql import types as T

    if isinstance(data_type, T.ArrayType):
        return not data_type.containsNull or has_non_null_elements(data_type.elementType)
    if isinstance(data_type, T.MapType):
        return not data_type.valueContainsNull or has_non_null_elements(data_type.valueType)
    if isinstance(data_type, T.StructType):
        return any(has_non_null_elements(f.dataType) for f in data_type.fields)
    return False


def rewrite_with_nullable_elements(spark: SparkSession, location: str) -> bool:
    """Rewrite a table whose schema declares non-null array elements with nullable ones, in one overwrite;
    False when it declares none. Spark's change-feed files hold nullable elements whatever the table says,
    and readers that check (delta-rs) refuse the mismatch; SQL cannot relax an element's nullability in
    place, and Delta refuses a schema change without rewriting. A DataFrame write declares every column
    nullable and Spark cannot make one NOT NULL again: its NOT NULL columns become CHECK constraints."""
    df = spark.read.format("delta").load(location)
    wide = [f for f in df.schema.fields if has_non_null_elements(f.dataType)]
    if not wide:
        return False
    not_null = [f.name for f in df.schema.fields if not f.nullable]
    # a cast to the type's SQL text is the same type with every element nullable (SQL cannot say otherwise)
    df = _as_sql_text(df, lambda f: f in wide)
    df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(location)
    for name in not_null:
        spark.sql(f"ALTER TABLE {table_ref(location)} ADD CONSTRAINT `{name}_not_null` CHECK (`{name}` IS NOT NULL)")
    return True
