"""The JVM class archive (lakelens.jvm): a Spark JVM that lakelens launches maps it, unless turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lakelens import jvm

PROBE = """
import json, sys
from lakelens import config
from lakelens.spark import get_session
spark, _ = get_session(config.load(sys.argv[1]).spark)
args = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
print(json.dumps({"args": args, "rows": spark.range(3).count()}))
spark.stop()
"""


@pytest.mark.parametrize("cds", ["1", "0"])
def test_a_session_lakelens_starts_maps_the_class_archive_unless_turned_off(jvm_start, tmp_path, cds):
    from conftest import ROOT

    archive = jvm.build()
    if archive is None:
        pytest.fail("this JDK wrote no class archive")
    env = {k: v for k, v in os.environ.items() if k != "SPARK_SUBMIT_OPTS"}  # not the suite's own option
    env["LAKELENS_CDS"] = cds
    res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "conf" / "local.yaml")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == 3
    mapped = [a for a in out["args"] if a.startswith("-XX:SharedArchiveFile=")]
    assert mapped == ([f"-XX:SharedArchiveFile={archive}"] if cds == "1" else [])
    assert "SPARK_SUBMIT_OPTS" not in env
    cli = subprocess.run([sys.executable, "-m", "lakelens.cli", "jvm-options"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0
    assert cli.stdout.strip() == (f"-XX:SharedArchiveFile={archive} -Xlog:cds*=off" if cds == "1" else "")
