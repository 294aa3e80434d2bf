"""A class-data-sharing (CDS) archive for the Spark JVMs that lakelens starts itself.

Every fresh Spark JVM loads and verifies the same ~15k Spark, Scala and Delta classes; on 2 cores that is
seconds of each `lakelens embed` (BENCHMARKS.md: about 5 s of a 2,000-image run). A dynamic CDS archive
(JDK 13+) of those classes, dumped at the exit of one short Spark + Delta run, lets later JVMs map them
instead. `make setup` builds it once per JDK, pyspark and Delta jars (`python -m lakelens.jvm`, about
40 s on 2 cores, ~200 MB in the cds/ folder beside the jars folder: a checkout's build/cds); `get_session` hands
it to the JVM it launches through SPARK_SUBMIT_OPTS.

It changes no output: a JVM ignores an archive of another JDK or class path without a word
(-Xlog:cds*=off keeps the JVM's notes off stdout). LAKELENS_CDS=0 turns it off; a driver started by
spark-submit gets it only from the user (`--driver-java-options "$(lakelens jvm-options)"`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lakelens.files import replacing
from lakelens.jars import checkout_root, find_jars, jars_folder

# The training run: session start, a binaryFile listing, a Delta create / MERGE / delete / change feed,
# mapInPandas and a local checkpoint, the classes that `lakelens embed` and the index job load.
PROBE = """
import sys
from pyspark.sql import functions as F
from lakelens import config
from lakelens.spark import get_session
spark, _ = get_session(config.load(sys.argv[1] or None).spark)
t, files = sys.argv[2], sys.argv[3]
listed = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(files) \
    .select("path", F.col("length").alias("size_bytes")).localCheckpoint()
listed.groupBy(F.col("path").rlike("/[_.]")).count().collect()
listed.join(listed.hint("merge"), "path", "left_anti").count()
spark.read.format("binaryFile").load(files).mapInPandas(lambda it: it, "path string, modificationTime timestamp, "
                                                         "length long, content binary").count()
spark.range(20).selectExpr("id", "cast(id as string) as s").write.format("delta") \
    .option("delta.enableChangeDataFeed", "true").save(t)
from lakelens import classic, delta_sql
src = spark.range(10, 30).selectExpr("id", "cast(id * 2 as string) as s")
delta_sql.merge(spark, t, src, "t.id = s.id", "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT * "
                "WHEN NOT MATCHED BY SOURCE THEN DELETE")
spark.sql(f"DELETE FROM {delta_sql.table_ref(t)} WHERE id = 12")
delta_sql.snapshot(spark, t), delta_sql.history(spark, t, 5)
spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 1).load(t) \
    .groupBy("_change_type").count().collect()
spark.read.format("delta").load(t).mapInPandas(lambda it: it, "id long, s string").toPandas()
spark.stop()
classic.end_jvm()  # the JVM writes the archive as it exits
"""


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.exists(java) else None


def cds_dir() -> Path:
    """The cds/ folder beside the Delta jars folder found (a checkout's build/cds), where it can be written;
    else $LAKELENS_CACHE_DIR/cds (~/.cache/lakelens/cds), e.g. for jars from Maven or a read-only folder."""
    folder = jars_folder()
    if folder:
        beside = Path(folder).resolve().parent / "cds"
        if beside.is_dir() or os.access(beside.parent, os.W_OK):
            return beside
    return Path(os.environ.get("LAKELENS_CACHE_DIR") or Path.home() / ".cache" / "lakelens", "cds")


def archive_path() -> Path | None:
    """Where the archive for this JDK, pyspark install and Delta jars lives (built or not); None without
    a java."""
    import pyspark

    java = _java()
    if java is None:
        return None
    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("*.jar")) + [Path(j) for j in find_jars()]
    stamp = [java, os.stat(java).st_mtime_ns, pyspark.__version__,
             [(j.name, j.stat().st_size, j.stat().st_mtime_ns) for j in jars]]
    return cds_dir() / f"spark-{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}.jsa"


def enabled() -> bool:
    return os.environ.get("LAKELENS_CDS", "1") != "0"


def java_options() -> str:
    """The JVM options that map the archive, or "" when it is off or not built."""
    archive = archive_path() if enabled() else None
    if archive is None or not archive.is_file():
        return ""
    return f"-XX:SharedArchiveFile={archive} -Xlog:cds*=off"


def build(conf_path: str | os.PathLike | None = None, timeout: float = 300) -> Path | None:
    """Build the archive if it is missing (a short Spark + Delta run that dumps its classes at exit);
    the archive, or None where this JVM cannot make one."""
    archive = archive_path() if enabled() else None
    if archive is None or archive.is_file():
        return archive
    if conf_path is None:  # a checkout's one-machine settings, else the defaults
        root = checkout_root()
        conf_path = root / "conf" / "local.yaml" if root and (root / "conf" / "local.yaml").is_file() else ""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with replacing(archive) as part, tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp, "files")
        files.mkdir()
        for i in range(3):
            Path(files, f"{i}.bin").write_bytes(bytes([i]) * 16)
        env = {**os.environ, "SPARK_SUBMIT_OPTS": f"-XX:ArchiveClassesAtExit={part} -Xlog:cds*=off",
               "PYSPARK_PYTHON": sys.executable, "LAKELENS_CDS": "0"}
        try:
            subprocess.run([sys.executable, "-c", PROBE, str(conf_path), f"{tmp}/t", str(files)],
                           env=env, cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if not part.is_file() or part.stat().st_size == 0:
            part.unlink(missing_ok=True)  # nothing replaces the archive
            return None
        for old in archive.parent.glob("spark-*.jsa"):  # archives of an older JDK, pyspark or Delta
            old.unlink(missing_ok=True)
    return archive


def main() -> int:
    archive = build()
    if archive is None:
        print("[setup] no JVM class archive: " + ("turned off (LAKELENS_CDS=0)" if not enabled() else
                                                  "this JVM could not write one"))
        return 0
    print(f"[setup] JVM class archive: {archive} ({archive.stat().st_size >> 20} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
