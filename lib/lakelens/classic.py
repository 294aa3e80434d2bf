"""What only a classic Spark session offers: its SparkContext and the JVM behind py4j.

Spark Connect (Databricks serverless and standard access mode, Databricks Connect, `spark.api.mode=connect`)
has no `sparkContext`, no `_jvm` and no RDDs. Every job runs on DataFrames and SQL alone; the few places
where a classic session allows something faster or exact ask `is_classic(spark)` and call in here. This is
the one module of lakelens that touches those APIs (tests/test_connect_only.py checks it).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession


def is_classic(spark: SparkSession) -> bool:
    """True for a session with a SparkContext in this process (py4j), False for a Spark Connect client."""
    return not type(spark).__module__.startswith("pyspark.sql.connect")


def jvm_running() -> bool:
    """True once this process has started (or joined) a Spark JVM through py4j."""
    from pyspark import SparkContext

    return SparkContext._gateway is not None


def end_jvm(timeout: float = 300) -> None:
    """Close the JVM this process launched (after `spark.stop()`) and wait until it has exited."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None and getattr(gateway, "proc", None) is not None:
        gateway.proc.stdin.close()  # the JVM exits on this
        gateway.proc.wait(timeout)


def default_parallelism(spark: SparkSession) -> int:
    return int(spark.sparkContext.defaultParallelism)


def class_loadable(spark: SparkSession, name: str) -> bool:
    return bool(spark._jvm.org.apache.spark.util.Utils.classIsLoadable(name))


def delta_snapshot(spark: SparkSession, location: str) -> tuple[int, str, dict] | None:
    """(version, table id, properties) of the latest Delta version, read from the log by Delta Kernel
    (shipped with delta-spark) on the driver: no Spark job, which DESCRIBE HISTORY and DESCRIBE DETAIL
    each cost. None where Kernel cannot read it; callers then ask Spark."""
    jvm = spark._jvm
    try:
        engine = jvm.io.delta.kernel.defaults.engine.DefaultEngine.create(spark._jsc.hadoopConfiguration())
        snap = jvm.io.delta.kernel.Table.forPath(engine, location).getLatestSnapshot(engine)
        meta = snap.getMetadata()
        return int(snap.getVersion()), str(meta.getId()), dict(meta.getConfiguration())
    except Exception:  # an older Kernel API, or a table feature Kernel cannot read: Spark's way
        return None


class HadoopFiles:
    """The Hadoop FileSystem of one path, through the driver's JVM (exists, rename, delete)."""

    def __init__(self, spark: SparkSession, location: str):
        self._jvm = spark._jvm
        self.path = self._jvm.org.apache.hadoop.fs.Path(location)
        self.fs = self.path.getFileSystem(spark._jsc.hadoopConfiguration())

    def sibling(self, name: str):
        return self._jvm.org.apache.hadoop.fs.Path(name)

    def exists(self, path=None) -> bool:
        return bool(self.fs.exists(path or self.path))

    def rename(self, src, dst) -> bool:
        return bool(self.fs.rename(src, dst))

    def delete(self, path) -> None:
        self.fs.delete(path, True)


def index_uris(spark: SparkSession, files: DataFrame) -> tuple[int, DataFrame]:
    """(count, DataFrame of `uri`) of the files of a file-source DataFrame's index. The URIs stay in the JVM:
    a Dataset made there never passes through the Python driver."""
    indexed = files._jdf.inputFiles()  # a JVM array: its length is one call
    jvm = spark._jvm
    seq = jvm.scala.collection.immutable.ArraySeq.unsafeWrapArray(indexed)
    df = DataFrame(spark._jsparkSession.createDataset(seq, jvm.org.apache.spark.sql.Encoders.STRING()).toDF(), spark)
    return len(indexed), df.withColumnRenamed("value", "uri")
