"""Shared fixtures: one Spark session (local[2], real Delta) per test run, and image factories."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


# --- JVM start-up: a class-data-sharing archive for every Spark JVM the tests start ---------------------
# The suite starts about 15 Spark JVMs (the shared session, and the fresh processes of the CLI, refresh,
# lock, driver-memory and spark-submit tests). On 2 cores each spends seconds loading and verifying the
# same ~15k Spark and Scala classes; a dynamic CDS archive of them (JDK 13+) cuts a fresh session's start
# by about 3 s. The archive is built once per JDK and pyspark install (build/cds, ~170 MB; a short Spark
# + Delta run that dumps its loaded classes at exit) and given to every spark-submit JVM through
# SPARK_SUBMIT_OPTS, which subprocesses inherit. It changes no output: a stale or mismatched archive is
# ignored by the JVM without a word (-Xlog:cds*=off keeps its notes off stdout), and
# LAKELENS_TEST_CDS=0 turns it off.
CDS_DIR = ROOT / "build" / "cds"
CDS_PROBE = """
import sys
from pyspark import SparkContext
from lakelens import config
from lakelens.spark import get_session
spark, _ = get_session(config.load(sys.argv[1]).spark)
t = sys.argv[2]
spark.range(20).selectExpr("id", "cast(id as string) as s").write.format("delta") \
    .option("delta.enableChangeDataFeed", "true").save(t)
from delta.tables import DeltaTable
src = spark.range(10, 30).selectExpr("id", "cast(id * 2 as string) as s")
DeltaTable.forPath(spark, t).alias("a").merge(src.alias("b"), "a.id = b.id").whenMatchedUpdateAll() \
    .whenNotMatchedInsertAll().whenNotMatchedBySourceDelete().execute()
DeltaTable.forPath(spark, t).delete("id = 12")
spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 1).load(t) \
    .groupBy("_change_type").count().collect()
spark.read.format("delta").load(t).mapInPandas(lambda it: it, "id long, s string").toPandas()
spark.stop()
gateway = SparkContext._gateway
if gateway is not None and getattr(gateway, "proc", None) is not None:
    gateway.proc.stdin.close()  # the JVM exits on this and writes the archive; wait for it
    gateway.proc.wait(300)
"""


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.exists(java) else None


def jvm_class_archive() -> Path | None:
    """The CDS archive for this JDK and pyspark install, built on first use; None where it cannot be."""
    import pyspark

    java = _java()
    if os.environ.get("LAKELENS_TEST_CDS", "1") == "0" or java is None:
        return None
    jars = Path(pyspark.__file__).parent / "jars"
    stamp = [java, os.stat(java).st_mtime_ns, pyspark.__version__,
             sorted((j.name, j.stat().st_size, j.stat().st_mtime_ns) for j in jars.glob("*.jar"))]
    archive = CDS_DIR / f"spark-{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}.jsa"
    if archive.is_file():
        return archive
    CDS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        part = CDS_DIR / f".{archive.name}.{os.getpid()}.part"
        env = {**os.environ, "SPARK_SUBMIT_OPTS": f"-XX:ArchiveClassesAtExit={part} -Xlog:cds*=off",
               "PYSPARK_PYTHON": sys.executable}
        try:
            subprocess.run([sys.executable, "-c", CDS_PROBE, str(ROOT / "conf" / "local.yaml"), f"{tmp}/t"],
                           env=env, cwd=tmp, capture_output=True, timeout=300)
        except subprocess.TimeoutExpired:
            pass
        if not part.is_file() or part.stat().st_size == 0:
            part.unlink(missing_ok=True)
            return None
        for old in CDS_DIR.glob("spark-*.jsa"):  # archives of an older JDK or pyspark
            old.unlink(missing_ok=True)
        os.replace(part, archive)
    return archive


@pytest.fixture(scope="session", autouse=True)
def jvm_start():
    """Every Spark JVM started from here on (this run's session, and subprocesses) maps the archive."""
    archive = jvm_class_archive()
    if archive is None:
        yield None
        return
    before = os.environ.get("SPARK_SUBMIT_OPTS")
    os.environ["SPARK_SUBMIT_OPTS"] = " ".join(
        filter(None, [before, f"-XX:SharedArchiveFile={archive}", "-Xlog:cds*=off"]))
    yield archive
    if before is None:
        os.environ.pop("SPARK_SUBMIT_OPTS", None)
    else:
        os.environ["SPARK_SUBMIT_OPTS"] = before


@pytest.fixture(scope="session")
def spark(jvm_start):
    from lakelens import config
    from lakelens.spark import find_s3_jars, get_session

    conf = config.load(ROOT / "conf" / "local.yaml")
    # the s3a jars join the classpath when the JVM starts, so the one shared session carries them for the
    # object storage tests (tests/integration/test_s3.py); they set the fs.s3a keys on it at run time
    session, owned = get_session(conf.spark, s3=bool(find_s3_jars()))
    session.sparkContext.setLogLevel("ERROR")
    yield session
    if owned:
        session.stop()


def local_config(images, table, *overrides, **sections):
    """Config for jobs run inside the shared session (also for module-scoped fixtures)."""
    from lakelens import config

    return config.load(ROOT / "conf" / "local.yaml",
                       [f"embed.images={images}", f"embed.table={table}", *overrides], **sections)


@pytest.fixture
def local_conf():
    """Config for jobs run inside the shared session."""
    return local_config


def noise_image(seed: int, size=(80, 60), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        p = folder / f"im{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        p.write_bytes(encode(noise_image(seed * 10_000 + i, size=(60 + i % 7 * 5, 50 + i % 5 * 4)), fmt))
        out.append(p)
    return out


def clustered(n: int, dim: int, clusters: int = 100, noise: float = 0.3, seed: int = 0,
              centres_seed: int | None = None) -> np.ndarray:
    """Unit vectors drawn around random centres: the shape of real embedding sets, for ANN checks.
    Queries from the same mixture share `centres_seed` with the data and differ in `seed`."""
    centres = np.random.default_rng(seed if centres_seed is None else centres_seed).normal(
        size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 7919)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def recall_at(found_ids, true_ids) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_ids, true_ids)]))
