"""Shared fixtures: one Spark session (local[2], real Delta) per test run, and image factories."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


# --- JVM start-up: the class-data-sharing archive for every Spark JVM the tests start -------------------
# The suite starts about 15 Spark JVMs (the shared session, and the fresh processes of the CLI, refresh,
# lock, driver-memory and spark-submit tests). lakelens.jvm's archive (built by `make setup`, or here on
# first use) cuts each one's class loading by seconds; get_session maps it by itself, and SPARK_SUBMIT_OPTS
# gives it to the JVMs that tests start with spark-submit or a standalone cluster. It changes no output;
# LAKELENS_CDS=0 turns it off.
def jvm_class_archive() -> Path | None:
    from lakelens import jvm

    return jvm.build()


@pytest.fixture(scope="session", autouse=True)
def jvm_start(request):
    """Every Spark JVM started from here on (this run's session, and subprocesses) maps the archive. A run
    without `spark` tests (make test-fast) starts no JVM, not even to build the archive."""
    if not any(item.get_closest_marker("spark") for item in request.session.items):
        yield None
        return
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


# --- which Spark: the suite runs twice in CI (.ci/run) ------------------------------------------------------
# LAKELENS_TEST_SPARK=classic (default): one local[2] session in this process. =connect: the job tests
# (CONNECT_MODULES) run again through a Spark Connect server this test run starts on loopback, as
# Databricks serverless and standard access mode run them; every other test is deselected there. pyspark
# picks classic or Connect functions per process, so the two halves are two pytest runs.
SPARK_MODE = os.environ.get("LAKELENS_TEST_SPARK", "classic")
CONNECT_MODULES = {
    "test_embed_job.py", "test_names.py", "test_index_job.py", "test_reindex.py", "test_refresh.py",
    "test_keyword_index.py", "test_tags_job.py", "test_region_tags.py", "test_regions.py", "test_caption_job.py",
    "test_dedup.py", "test_batch_search.py", "test_pairs_delta.py", "test_s3.py", "test_connect.py",
    "test_delta_readers.py", "test_shards.py",
}


# --- lanes: every test carries one of the markers unit, spark, browser (given here), and `slow` by hand ------
# spark: needs a JVM: everything under tests/integration, every test that takes the `spark` or
#   `connect_server` fixture, and tests marked `spark` by hand (a JVM started in a subprocess).
# browser: takes the `browser` fixture (tests/webindex.headless_chromium, Debian's headless Chromium).
# unit: neither. slow: marked by hand; still in `make test`, left out of `make test-fast`.
# `make test-fast` is `-m "not spark and not browser and not slow"`; LAKELENS_TEST_SPARK=fast still
# deselects the spark and browser tests by itself.
JVM_FIXTURES = {"spark", "connect_server"}


def lane_markers(item) -> list[str]:
    fixtures = set(getattr(item, "fixturenames", ()))
    jvm = ("integration" in item.path.parts or fixtures & JVM_FIXTURES
           or item.get_closest_marker("spark") or item.get_closest_marker("connect_only"))
    lanes = ["spark"] if jvm else []
    if "browser" in fixtures:
        lanes.append("browser")
    return lanes or ["unit"]


def check_connect_cover(items, kept) -> None:
    """`connect_covered("module.py::test[param]")`: the test that runs the same Spark path through Connect
    must be one the Connect half runs (checked when its module is collected, so a claim cannot go stale)."""
    collected = {i.path.name for i in items}
    running = {f"{i.path.name}::{i.name}" for i in kept}
    for item in items:
        mark = item.get_closest_marker("connect_covered")
        if mark is None:
            continue
        (by,) = mark.args
        if by.split("::")[0] in collected and by not in running:
            raise pytest.UsageError(f"{item.nodeid}: connect_covered names {by}, which the Connect half does not run")


@pytest.hookimpl(tryfirst=True)  # the markers first: -m selects on them after this
def pytest_collection_modifyitems(config, items):
    for item in items:
        for lane in lane_markers(item):
            if not item.get_closest_marker(lane):
                item.add_marker(lane)
    if SPARK_MODE == "fast":  # the quick lane: nothing that starts a JVM or a browser
        keep = [i for i in items if not i.get_closest_marker("spark") and not i.get_closest_marker("browser")]
    elif SPARK_MODE != "connect":
        keep = [i for i in items if "connect_only" not in i.keywords]
    else:
        keep = [i for i in items if i.path.name in CONNECT_MODULES and "classic_only" not in i.keywords
                and not i.get_closest_marker("connect_covered")]
        check_connect_cover(items, keep)
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def connect_server(jvm_start):
    """A Spark Connect server (pyspark's own SparkConnectServer class, local[2], Delta's SQL extension, the
    Delta and s3a jars) on a free loopback port, for the whole test run; SPARK_REMOTE points at it, so
    `lakelens` commands the tests start use it too."""
    from lakelens.connect_server import ConnectServer

    server = ConnectServer.start(ROOT / "build" / "connect-server.log")
    before = os.environ.get("SPARK_REMOTE")
    os.environ["SPARK_REMOTE"] = server.url
    yield server
    server.stop()
    if before is None:
        os.environ.pop("SPARK_REMOTE", None)
    else:
        os.environ["SPARK_REMOTE"] = before


def suite_jit(conf) -> None:
    """The shared session lives for the whole run: it gets the JVM's full JIT (C1 and C2), as the Connect
    server does, not conf/local.yaml's C1 alone, which suits short runs (the demo, one job). Job and
    caption tests (31), two rounds on the 2-core EPYC: 345 and 372 s with C1 alone, 289 and 321 s with both
    (docs/decisions/test-suite-time.md)."""
    key = "spark.driver.extraJavaOptions"
    if key in conf.spark.extra:
        conf.spark.extra[key] = " ".join(o for o in conf.spark.extra[key].split()
                                         if not o.startswith("-XX:TieredStopAtLevel="))


@pytest.fixture(scope="session")
def spark(jvm_start, request):
    from lakelens import config
    from lakelens.spark import find_s3_jars, get_session, is_connect

    conf = config.load(ROOT / "conf" / "local.yaml")
    suite_jit(conf)
    if SPARK_MODE == "connect":
        request.getfixturevalue("connect_server")
        session, owned = get_session(conf.spark)
        assert is_connect(session)
    else:
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


def forge_kept_rows(spark, table, row_id: int, paths: list[str]) -> None:
    """Append to the embeddings table at `table` copies of one of its rows, each with id `row_id` and one of
    `paths`: what a 64-bit hash collision (or a row whose id is not its path's) looks like to the id check."""
    from lakelens.ingest.table import COLUMNS

    kept = spark.read.format("delta").load(str(table)).limit(1).drop("id", "path")
    forged = kept.crossJoin(spark.createDataFrame([(p,) for p in paths], "path string"))
    forged.selectExpr(f"{row_id} as id", "*").select(COLUMNS).write.format("delta").mode("append").save(str(table))


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
