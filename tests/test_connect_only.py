"""lib/ runs on Spark Connect: no SparkContext, JVM, RDD, broadcast or Python DeltaTable API outside the one
classic-only module (lakelens/classic.py), where a classic session's faster or exact ways live."""

from __future__ import annotations

import re
from pathlib import Path

import lakelens

LIB = Path(lakelens.__file__).parent
ALLOWED = {LIB / "classic.py"}
# what Spark Connect sessions lack; `np.broadcast_to` is numpy's, not Spark's
FORBIDDEN = re.compile(r"\.sparkContext\b|\b_jvm\b|\b_jsc\b|\b_jdf\b|\b_jsparkSession\b|\.rdd\b|(?<!np\.)\bbroadcast\("
                       r"|\bfrom delta\.tables\b|\bimport delta\.tables\b|\bDeltaTable\b|\bSparkContext\b")


def offending_lines(root: Path = LIB, allowed=frozenset(ALLOWED)) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code):
                found.append(f"{path.relative_to(root.parent)}:{n}: {line.strip()}")
    return found


def test_lib_uses_no_classic_only_spark_api_outside_the_classic_module():
    assert offending_lines() == []


def test_the_check_finds_each_classic_only_api(tmp_path):
    bad = ["n = spark.sparkContext.defaultParallelism", "fs = spark._jvm.org.apache.hadoop.fs.Path(p)",
           "rows = df.rdd.map(f)", "bc = sc.broadcast(x)", "from delta.tables import DeltaTable",
           "hconf = spark._jsc.hadoopConfiguration()", "files._jdf.inputFiles()"]
    for i, line in enumerate(bad):
        (tmp_path / f"m{i}.py").write_text(line + "\n")
    (tmp_path / "ok.py").write_text("x = np.broadcast_to(a, (2, 3))  # numpy\nparts = 'rdd'\n# spark.sparkContext in a comment\n")
    assert len(offending_lines(tmp_path)) == len(bad)
