"""SparkSession builder (Delta jars, Arrow, small batches) and the Job base; never stops a session it did not start."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import sys
from contextlib import contextmanager

from pyspark.sql import SparkSession

from lakelens import classic, jvm
from lakelens.config import Config, SparkConfig
from lakelens.errors import ConfigError, SparkSetupError
from lakelens.jars import S3_JARS_SUBDIR, checkout_root, find_jars, find_s3_jars, jars_folder  # noqa: F401

log = logging.getLogger(__name__)


def _spark_release() -> str:
    """pyspark's major.minor: Delta publishes one jar per Spark release (delta-spark_4.2_2.13)."""
    import pyspark

    return ".".join(pyspark.__version__.split(".")[:2])


def _hadoop_release() -> str:
    """The Hadoop release of pyspark's own client jars; hadoop-aws must be the same one."""
    import pyspark

    found = glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "jars", "hadoop-client-api-*.jar"))
    return os.path.basename(found[0])[len("hadoop-client-api-"):-len(".jar")] if found else "3.5.0"


def _delta_release() -> str:
    """The installed delta-spark's release: its jar must be the same one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("delta-spark")
    except PackageNotFoundError:
        return "4.4.0"


# Maven coordinates for spark.jars.packages, used where no jars folder is found (clusters): the jar of the
# installed delta-spark built for the installed pyspark, and the s3a file system of pyspark's Hadoop.
DELTA_PACKAGE = f"io.delta:delta-spark_{_spark_release()}_2.13:{_delta_release()}"
HADOOP_AWS_PACKAGE = f"org.apache.hadoop:hadoop-aws:{_hadoop_release()}"
HADOOP_PREFIX = "spark.hadoop."
# Tasks per job stage under Spark Connect when the server does not say (spark.default.parallelism).
CONNECT_DEFAULT_PARALLELISM = 8
CONNECT_DEFAULT_PORT = 15002  # pyspark's, for an sc:// URL without one


def uses_s3a(conf: Config | SparkConfig | None) -> bool:
    """True when a session for `conf` needs the s3a file system: `spark.extra` has fs.s3a settings, or (for
    a whole Config) a table, image folder or pairs path is an s3a:// URI."""
    if conf is None:
        return False
    spark_conf = conf.spark if isinstance(conf, Config) else conf
    if any(".fs.s3a." in f".{key}" for key in spark_conf.extra):
        return True
    if isinstance(conf, Config):
        paths = (conf.embed.images, conf.embed.table, conf.index.table, conf.finetune.pairs)
        return any(p.startswith("s3a://") for p in paths)
    return False


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway already open
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _submit_conf() -> dict[str, str]:
    """The Spark settings spark-submit gave a Python driver it started in Spark Connect mode (`--remote`, or
    `--conf spark.api.mode=connect`): spark-submit passes them as PYSPARK_REMOTE_INIT_CONF_<i> JSON, not as
    SPARK_REMOTE."""
    out: dict[str, str] = {}
    for i in range(int(os.environ.get("PYSPARK_REMOTE_INIT_CONF_LEN", "0") or 0)):
        try:
            out.update(json.loads(os.environ.get(f"PYSPARK_REMOTE_INIT_CONF_{i}", "{}")))
        except ValueError:
            pass
    return out


def remote_url(conf: SparkConfig) -> str:
    """The Spark Connect URL this process should use: the config's `spark.remote`, else pyspark's own
    SPARK_REMOTE variable, else spark-submit's `--remote`; "" for a classic session. A master and a remote in
    one config are refused; so is spark-submit's connect mode without a server to connect to."""
    if conf.remote and conf.master:
        raise ConfigError("spark.master and spark.remote are both set: a session is either classic (master) "
                          "or Spark Connect (remote); set one")
    url = conf.remote or os.environ.get("SPARK_REMOTE", "")
    if url or not _launched_by_spark_submit():
        return url
    submitted = _submit_conf()
    if submitted.get("spark.remote"):
        return submitted["spark.remote"]
    if submitted.get("spark.api.mode", "").lower() == "connect":
        # spark-submit leaves Spark SQL off this driver's classpath in connect mode, so no local Connect server
        # can start inside it (pyspark fails the same way for any Python application)
        raise SparkSetupError("spark-submit --conf spark.api.mode=connect: Spark SQL is not on this driver's "
                              "classpath, so no Connect server can start here; start one (start-connect-server.sh) "
                              "and pass spark-submit --remote sc://HOST:15002 instead")
    return ""


def _check_connect_client() -> None:
    try:
        import google.rpc  # noqa: F401
        import grpc  # noqa: F401
        import grpc_status  # noqa: F401
        import zstandard  # noqa: F401
    except ImportError:
        raise SparkSetupError("Spark Connect needs its client packages (grpcio, grpcio-status, googleapis-common-protos, "
                              "zstandard): pip install 'lakelens[connect]'") from None


def get_session(conf: Config | SparkConfig | None = None, s3: bool | None = None) -> tuple[SparkSession, bool]:
    """(session, owned): the active session if there is one, classic or Spark Connect (owned=False), else a
    new one built from `conf` (a whole Config or its `spark` section): a Spark Connect session when
    `spark.remote` or SPARK_REMOTE names a server, else a classic one. `s3`: put the s3a jars on a new
    classic session's classpath; None decides from `conf` (`uses_s3a`)."""
    want_s3 = uses_s3a(conf) if s3 is None else s3
    conf = (conf.spark if isinstance(conf, Config) else conf) or SparkConfig()
    remote = remote_url(conf)  # a master and a remote in one config are refused, an active session or not
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    if remote:
        return _connect_session(conf, remote), True
    # Python workers run this interpreter (the project's venv) unless the user chose another.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    b = SparkSession.builder.appName(conf.app_name)
    if conf.master and not _launched_by_spark_submit():
        b = b.master(conf.master)
    elif not _launched_by_spark_submit():
        b = b.master("local[*]")
    jars = find_jars(conf.jars_dir)
    s3_jars = find_s3_jars(conf.jars_dir) if want_s3 else []
    if jars:
        b = b.config("spark.jars", ",".join(jars + s3_jars))
    else:
        packages = conf.packages or DELTA_PACKAGE
        if want_s3 and "hadoop-aws" not in packages:
            packages += "," + HADOOP_AWS_PACKAGE
        b = b.config("spark.jars.packages", packages)
    if want_s3 and jars and not s3_jars:
        log.warning("the config uses s3a:// but there are no s3a jars in build/jars/s3 (make setup fetches them); "
                    "relying on hadoop-aws being on Spark's classpath already")
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        **_session_settings(conf),
        "spark.ui.showConsoleProgress": "true",
        "spark.python.worker.reuse": "true",  # keeps the cached model alive between tasks
    }
    settings.update(conf.extra)
    for key, value in settings.items():
        b = b.config(key, value)
    with _class_archive():
        spark = b.getOrCreate()
    if not classic.is_classic(spark):  # spark.api.mode=connect (spark-submit --conf, SPARK_API_MODE)
        return spark, True
    _check_delta_on_classpath(spark)
    if want_s3:
        _check_s3a_on_classpath(spark)
    return spark, True


def _session_settings(conf: SparkConfig) -> dict[str, str]:
    """The SQL settings lakelens sets on a session it starts, classic or Connect."""
    return {"spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.shuffle.partitions": str(conf.shuffle_partitions),
            # Delta rebuilds a table's state in this many tasks at each commit (50 by default): seconds a
            # MERGE on a small machine (a 100-row insert: 8-13 s under Connect with 50, 3 s with 2)
            "spark.databricks.delta.snapshotPartitions": str(conf.shuffle_partitions)}


def _connect_session(conf: SparkConfig, remote: str) -> SparkSession:
    """A Spark Connect session on `remote` (sc://host:port, or local[N] for a server in this process). The
    server owns its jars and static settings (Delta's SQL extension among them): of `spark.extra` only SQL
    and Delta settings are sent, and Hadoop's (`spark.hadoop.fs.s3a.*`) as session settings without the
    prefix, which Spark hands to the file systems of that session's reads and writes. pyspark drops those
    the server refuses to change."""
    _check_connect_client()
    settings = _session_settings(conf)
    for key, value in conf.extra.items():
        if key.startswith(HADOOP_PREFIX):
            settings[key[len(HADOOP_PREFIX):]] = str(value)
        elif key.startswith("spark.sql.") or ".delta." in key:
            settings[key] = str(value)
    _check_reachable(remote)
    _quiet_query_context_logs()
    b = SparkSession.builder.remote(remote)
    for key, value in settings.items():
        b = b.config(key, value)
    try:
        return b.getOrCreate()
    except Exception as e:  # the server is not there, or refused us: one line, not a gRPC trace
        if isinstance(e, (ConfigError, SparkSetupError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparkSetupError(f"cannot open a Spark Connect session on {remote}: {first}") from None


def _quiet_query_context_logs() -> None:
    """pyspark's Connect client logs every failed SQL statement with its JVM trace to stderr as it raises it,
    also the ones lakelens expects and answers in one line (a table that is not there yet); the exception
    itself still carries the message. Only on sessions lakelens opens: a notebook's session keeps its logs."""
    from pyspark.logger import PySparkLogger

    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.CRITICAL)


def _check_reachable(remote: str, timeout: float = 10.0) -> None:
    """A server that is not there, or a port where no Connect server listens, fails in seconds with its address,
    rather than after pyspark's gRPC retries (minutes) with a trace."""
    m = re.fullmatch(r"sc://\[?([^/\]]+?)\]?(?::(\d+))?(?:/.*)?", remote.strip())
    if not m:
        return  # local[N] (a server in this process) or a form pyspark will judge itself
    host, port = m.group(1), int(m.group(2) or CONNECT_DEFAULT_PORT)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise SparkSetupError(f"cannot reach the Spark Connect server at {host}:{port} ({e.strerror or e}); "
                              "is it running? (spark.remote / SPARK_REMOTE / --remote)") from None
    # Something listens there; whether it speaks gRPC only a channel tells. The Spark UI's port, a master's
    # 7077 or any other service would leave pyspark retrying its first call for about ten minutes.
    import grpc
    from pyspark.sql.connect.client.core import DefaultChannelBuilder

    channel = DefaultChannelBuilder(remote).toChannel()
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise SparkSetupError(f"{host}:{port} does not answer as a Spark Connect server (no gRPC reply in "
                              f"{timeout:.0f} s); is it the server's Connect port (15002 unless "
                              "spark.connect.grpc.binding.port says otherwise)? (spark.remote / SPARK_REMOTE / "
                              "--remote)") from None
    finally:
        channel.close()


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session (no Spark context, no JVM in this process, no RDDs)."""
    return not classic.is_classic(spark)


def parallelism(spark: SparkSession) -> int:
    """How many tasks keep the cluster's cores busy: Spark's default parallelism on a classic session; under
    Spark Connect, `spark.default.parallelism` where the server sets it, else the N of a local[N] master,
    else 8 (set spark.default.parallelism in `spark.extra` of a Connect cluster to say more)."""
    if classic.is_classic(spark):
        return classic.default_parallelism(spark)
    for key in ("spark.default.parallelism", "spark.master"):
        try:
            value = spark.conf.get(key, None)
        except Exception:  # a key the server does not let clients read
            value = None
        if not value:
            continue
        if key == "spark.master":
            m = re.fullmatch(r"local\[(\d+)(?:,\d+)?\]", value.strip())
            if m:
                return int(m.group(1))
            continue
        try:
            return max(1, int(value))
        except ValueError:
            continue
    return CONNECT_DEFAULT_PARALLELISM


@contextmanager
def _class_archive():
    """While a JVM is launched here (not under spark-submit, none running yet), SPARK_SUBMIT_OPTS maps the
    JVM class archive that `make setup` built (lakelens.jvm), when there is one."""
    before = os.environ.get("SPARK_SUBMIT_OPTS")
    options = "" if _launched_by_spark_submit() or classic.jvm_running() else jvm.java_options()
    if not options or "SharedArchiveFile" in (before or "") or "ArchiveClassesAtExit" in (before or ""):
        yield
        return
    os.environ["SPARK_SUBMIT_OPTS"] = " ".join(filter(None, [before, options]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SPARK_SUBMIT_OPTS", None)
        else:
            os.environ["SPARK_SUBMIT_OPTS"] = before


def submit_jars_arg(jars_dir: str = "", s3: bool = False) -> list[str]:
    """spark-submit arguments that put Delta (and with `s3`, the s3a file system) on the driver's
    classpath: --jars or --packages."""
    jars = find_jars(jars_dir)
    if jars:
        return ["--jars", ",".join(jars + (find_s3_jars(jars_dir) if s3 else []))]
    return ["--packages", DELTA_PACKAGE + ("," + HADOOP_AWS_PACKAGE if s3 else "")]


def _check_delta_on_classpath(spark: SparkSession) -> None:
    # Under spark-submit the driver JVM is already running: spark.jars set now reaches executors only.
    if classic.class_loadable(spark, "io.delta.sql.DeltaSparkSessionExtension"):
        return
    raise SparkSetupError("Delta Lake classes are not on the Spark driver's classpath. Pass them to spark-submit: "
                       f"{' '.join(submit_jars_arg())} (printed by `lakelens jars`).")


def _check_s3a_on_classpath(spark: SparkSession) -> None:
    if classic.class_loadable(spark, "org.apache.hadoop.fs.s3a.S3AFileSystem"):
        return
    raise SparkSetupError("the config uses s3a:// but hadoop-aws is not on the Spark driver's classpath: run "
                          "`make setup` (it fetches build/jars/s3) and start a new session, or pass "
                          f"{' '.join(submit_jars_arg(s3=True))} to spark-submit.")


@contextmanager
def session_settings(spark: SparkSession, settings: dict[str, str]):
    """Inside this block the session has these SQL settings; after it (also after an error) each has
    the value it had before, or none."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


@contextmanager
def owned_session(conf: Config | SparkConfig | None = None, settings: dict[str, str] | None = None,
                  s3: bool | None = None):
    """`with owned_session(conf) as spark:` the active session, or a new one (`get_session`) that is stopped
    when the block ends, also after an error; a session it did not start is never stopped. `settings`: SQL
    settings for the block, each back to its value before after it (`session_settings`)."""
    spark, owned = get_session(conf, s3)
    try:
        with session_settings(spark, settings or {}):
            yield spark
    finally:
        if owned:
            spark.stop()


class Job:
    """Base of the Spark jobs: `Job(spark=None, conf=None).launch()`; uses the active session if any."""

    def __init__(self, spark: SparkSession | None = None, conf: Config | None = None):
        self.conf = conf or Config()
        self._spark = spark
        self._owned = False

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            self._spark, self._owned = get_session(self.conf)
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
