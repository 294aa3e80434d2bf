"""SparkSession builder (Delta jars, Arrow, small batches) and the Job base; never stops a session it did not start."""

from __future__ import annotations

import glob
import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from lakelens.config import Config, SparkConfig
from lakelens.errors import ConfigError, SparkSetupError

log = logging.getLogger(__name__)

# Coordinates of the Delta jar matching the pinned pyspark / delta-spark pair (see pom.xml).
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
REPO_JARS = Path(__file__).resolve().parents[2] / "build" / "jars"


def find_jars(jars_dir: str = "") -> list[str]:
    """Delta jars from the configured folder, $LAKELENS_JARS_DIR, or this checkout's build/jars."""
    for folder in (jars_dir, os.environ.get("LAKELENS_JARS_DIR", ""), str(REPO_JARS)):
        if folder:
            jars = sorted(glob.glob(os.path.join(folder, "*.jar")))
            if any("delta-spark" in os.path.basename(j) for j in jars):
                return jars
            if folder == jars_dir:
                raise ConfigError(f"spark.jars_dir: no delta-spark jar in {jars_dir}")
    return []


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway already open
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_session(conf: SparkConfig | None = None) -> tuple[SparkSession, bool]:
    """(session, owned): the active session if there is one (owned=False), else a new one built from `conf`."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    conf = conf or SparkConfig()
    # Python workers run this interpreter (the project's venv) unless the user chose another.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    b = SparkSession.builder.appName(conf.app_name)
    if conf.master and not _launched_by_spark_submit():
        b = b.master(conf.master)
    elif not _launched_by_spark_submit():
        b = b.master("local[*]")
    jars = find_jars(conf.jars_dir)
    if jars:
        b = b.config("spark.jars", ",".join(jars))
    else:
        b = b.config("spark.jars.packages", conf.packages or DELTA_PACKAGE)
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(conf.shuffle_partitions),
        "spark.databricks.delta.snapshotPartitions": str(conf.shuffle_partitions),
        "spark.ui.showConsoleProgress": "true",
        "spark.python.worker.reuse": "true",  # keeps the cached model alive between tasks
    }
    settings.update(conf.extra)
    for key, value in settings.items():
        b = b.config(key, value)
    spark = b.getOrCreate()
    _check_delta_on_classpath(spark)
    return spark, True


def submit_jars_arg(jars_dir: str = "") -> list[str]:
    """spark-submit arguments that put Delta on the driver's classpath: --jars or --packages."""
    jars = find_jars(jars_dir)
    return ["--jars", ",".join(jars)] if jars else ["--packages", DELTA_PACKAGE]


def _check_delta_on_classpath(spark: SparkSession) -> None:
    # Under spark-submit the driver JVM is already running: spark.jars set now reaches executors only.
    if spark._jvm.org.apache.spark.util.Utils.classIsLoadable("io.delta.tables.DeltaTable"):
        return
    raise SparkSetupError("Delta Lake classes are not on the Spark driver's classpath. Pass them to spark-submit: "
                       f"{' '.join(submit_jars_arg())} (printed by `lakelens jars`).")


class Job:
    """Base of the Spark jobs: `Job(spark=None, conf=None).launch()`; uses the active session if any."""

    def __init__(self, spark: SparkSession | None = None, conf: Config | None = None):
        self.conf = conf or Config()
        self._spark = spark
        self._owned = False

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            self._spark, self._owned = get_session(self.conf.spark)
        return self._spark

    def run(self):
        raise NotImplementedError

    def launch(self):
        try:
            return self.run()
        finally:
            if self._owned and self._spark is not None:
                self._spark.stop()
                self._spark, self._owned = None, False
