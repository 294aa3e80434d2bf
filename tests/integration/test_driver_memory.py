"""No step collects per-row data of the whole table on the driver: the index job and the embed job run as
separate processes with spark.driver.maxResultSize at 1 MiB, on tables and listings far larger than that."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from conftest import ROOT, encode, noise_image
from pyspark.sql import functions as F

from lakelens import index as ix
from lakelens import path_id
from lakelens.index.meta import read_meta
from lakelens.ingest import table as tables

DIM = 128
# Broadcast joins off: to broadcast a join's small side (up to spark.sql.autoBroadcastJoinThreshold, 10 MB by
# default) Spark collects it on the driver, a bounded collect that the 1 MiB limit would count against
# lakelens; with them off, any collect that remains is one lakelens asked for.
LIMIT = ["--set", "spark.extra={spark.driver.maxResultSize: 1m, spark.sql.autoBroadcastJoinThreshold: -1}"]
# The CLI's own entry point, with a look at the session it starts: the setting must be there, and a
# collect of ~4 MB must be refused by it (so the jobs' success below means something).
CHECKED_CLI = """
import sys
from lakelens import spark as lspark
from lakelens.cli import main

real = lspark.get_session

def checked(conf=None):
    session, owned = real(conf)
    limit = session.sparkContext.getConf().get("spark.driver.maxResultSize")
    try:
        # 40k rows of 192 hex digits: about 4 MB even after Spark compresses task results
        session.range(40000).selectExpr("concat(sha2(string(id), 256), sha2(string(-id), 256), "
                                        "sha2(string(id * 7), 256)) as p").collect()
        refused = False
    except Exception as e:
        refused = "maxResultSize" in str(e)
    print(f"session check: maxResultSize={limit} refused={refused}", file=sys.stderr, flush=True)
    return session, owned

lspark.get_session = checked
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, tmp_path):
    env = {**os.environ, "LAKELENS_LOCK_DIR": str(tmp_path / "locks"), "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, "-c", CHECKED_CLI, *args, "--conf", str(ROOT / "conf" / "local.yaml"),
                           *LIMIT, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "session check: maxResultSize=1m refused=True" in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def image_path(i: int) -> str:
    """Distinct paths that do not compress (Spark compresses task results): 40 hex digits each."""
    return f"file:/data/img-{i:05d}-{hashlib.sha256(str(i).encode()).hexdigest()[:40]}.jpg"  # as unit_vectors


def unit_vectors(dim: int):
    """A mapInPandas function over spark.range: each id's path and a `dim`-dim unit vector, made on the
    executors with numpy (Spark's interpreted array lambdas take minutes for this). Nested, so that it
    is pickled by value: the workers cannot import the test module."""

    def gen(batches):
        for pdf in batches:
            ids = pdf["id"].to_numpy()
            v = np.sin(ids[:, None] * dim + np.arange(dim)[None, :] + 1.0)
            paths = [f"file:/data/img-{i:05d}-{hashlib.sha256(str(i).encode()).hexdigest()[:40]}.jpg" for i in ids]
            yield pd.DataFrame({"path": paths,
                                "embedding": list((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))})

    return gen


def test_index_job_under_a_1m_result_limit(spark, tmp_path):
    n = 30_000
    table, index = tmp_path / "table", tmp_path / "index"
    df = (spark.range(n).mapInPandas(unit_vectors(DIM), "path string, embedding array<float>")
          .select(tables.path_id_col().alias("id"), "path", F.sha2("path", 256).alias("content_sha256"),
                  F.lit(1000).cast("long").alias("size_bytes"), F.current_timestamp().alias("modified"),
                  F.lit(64).alias("width"), F.lit(48).alias("height"), F.lit("lakelens-tiny@none").alias("model"),
                  "embedding", F.lit(None).cast("string").alias("error"), F.current_timestamp().alias("embedded_at")))
    tables.EmbeddingsTable(spark, str(table)).create_if_missing()  # the table's own schema and properties
    df.write.format("delta").mode("append").save(str(table))  # ~18 MB of rows
    got = spark.read.format("delta").load(str(table)).schema  # as CREATE TABLE declares it (no element nullability)
    assert [(f.name, f.dataType.simpleString(), f.nullable) for f in got] == [
        (f.name, f.dataType.simpleString(), f.nullable) for f in tables.TABLE_SCHEMA]

    result = run_cli(["index", "--table", str(table), "--index", str(index), "--shards", "3"], tmp_path)
    assert result["built"] and result["rows"] == n and result["shards"] == 3
    manifest = ix.read_manifest(index)
    assert manifest["rows"] == spark.read.format("delta").load(str(table)).count() == n
    version = index / manifest["version"]
    paths, ids = [], []
    for s, shard in enumerate(manifest["shards"]):
        assert shard["meta"] == f"meta-{s:04d}.arrow" and (version / shard["file"]).is_file()
        meta = read_meta(version / shard["meta"]).to_pandas()  # written by the executor that built the shard
        assert len(meta) == shard["count"] > 0
        assert (meta["id"] % 3 == s).all()  # pmod(id, shards)
        paths += list(meta["path"])
        ids += list(meta["id"])
    want = [image_path(i) for i in range(n)]
    assert sorted(paths) == want and sorted(ids) == sorted(path_id(p) for p in want)


def random_names(n: int, length: int, seed: int) -> list[str]:
    """n distinct file names of `length` random letters and digits: Spark compresses task results (lz4),
    and names that repeat themselves would shrink far below the limit."""
    chars = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    rng = np.random.default_rng(seed)
    return [f"{i:05d}-" + "".join(rng.choice(chars, length - 6)) for i in range(n)]


def test_embed_job_under_a_1m_result_limit(spark, tmp_path):
    """5k zero-length files (found by joining Spark's file index against its scan) and 5k tiny images to
    embed (their paths stream to the driver a partition at a time), 250 random characters a name: 1.25 MB
    of names each, a partition's about 0.45 MB."""
    img = tmp_path / "img"
    (img / "real").mkdir(parents=True)
    n_empty, n_real = 5_000, 5_000
    for name in random_names(n_empty, 250, seed=1):
        (img / name).write_bytes(b"")
    tiny = encode(noise_image(0, size=(8, 8)), "PNG")
    real = [img / "real" / f"{name}.png" for name in random_names(n_real, 246, seed=2)]
    for p in real:
        p.write_bytes(tiny)
    table = tmp_path / "table"

    stats = run_cli(["embed", "--images", str(img), "--table", str(table), "--model", "lakelens-tiny",
                     "--pretrained", "none", "--chunk-size", "1700", "--set", "embed.chunk_seconds=3600"],
                    tmp_path)
    assert (stats["new"], stats["embedded"], stats["failed"]) == (n_empty + n_real, n_real, n_empty)
    # the paths stream in partitions of a first chunk; chunks sized by time (3600 s: the 10x cap) take the
    # 3,300 left after the first 1,700 in one
    assert [files for files, *_ in stats["chunk_seconds"]] == [1700, 3300]
    rows = spark.read.format("delta").load(str(table))
    counts = {r["error"]: r["count"] for r in rows.groupBy("error").count().collect()}
    assert counts == {"empty file": n_empty, None: n_real}
    assert rows.select("path").distinct().count() == n_empty + n_real
    assert rows.where(F.col("id") != tables.path_id_col()).count() == 0
    embedded = rows.where("error is null").select("path")
    assert embedded.join(spark.createDataFrame([(f"file:{p}",) for p in real], "path string"), "path",
                         "left_anti").count() == 0
