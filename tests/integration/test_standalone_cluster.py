"""The embed job under spark-submit against a Spark standalone cluster (one master, two workers) on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyspark
import pytest
from conftest import ROOT, write_images

from lakelens import EmbedJob
from lakelens.spark import submit_jars_arg

SPARK_HOME = Path(pyspark.__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_WORKER_DIR=str(tmp / "work"),
               SPARK_LOG_DIR=str(tmp / "logs"))
    # the master and workers map the suite's JVM class archive too (conftest.jvm_start), as spark-submit does
    if "SharedArchiveFile" in env.get("SPARK_SUBMIT_OPTS", ""):
        env["SPARK_DAEMON_JAVA_OPTS"] = " ".join(filter(None, [env.get("SPARK_DAEMON_JAVA_OPTS"),
                                                               env["SPARK_SUBMIT_OPTS"]]))
    return env


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    env = cluster_env(tmp)
    port, ui = free_port(), free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    procs = []

    def start(args, name):
        log = open(tmp / f"{name}.log", "w")
        procs.append(subprocess.Popen([spark_class, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
           "--webui-port", str(ui)], "master")
    for i in range(2):
        start(["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1", "--memory", "2g",
               "--webui-port", str(free_port()), f"spark://127.0.0.1:{port}"], f"worker{i}")
    try:
        deadline = time.time() + 120
        while True:
            try:
                if len([w for w in master_state(ui)["workers"] if w["state"] == "ALIVE"]) == 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                logs = "\n".join((tmp / f"{n}.log").read_text()[-2000:] for n in ("master", "worker0", "worker1"))
                raise RuntimeError(f"standalone cluster did not come up:\n{logs}")
            time.sleep(0.2)
        yield {"url": f"spark://127.0.0.1:{port}", "ui": ui, "env": env, "tmp": tmp}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_spark_submit_on_a_standalone_cluster_matches_local_mode(standalone, spark, tmp_path, local_conf):
    img = tmp_path / "img"
    write_images(img, 16)
    (img / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    table = tmp_path / "cluster_table"
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), *submit_jars_arg(), "--master", standalone["url"],
           "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1",
           str(ROOT / "jobs" / "embed_images.py"), "--conf", str(ROOT / "conf" / "local.yaml"),
           "--images", str(img), "--table", str(table), "--json", "--set", "embed.chunk_size=10"]
    out = subprocess.run(cmd, env=standalone["env"], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert (stats["embedded"], stats["failed"], stats["chunks"]) == (16, 1, 2)

    apps = master_state(standalone["ui"])["completedapps"]
    assert any(a["name"] == "lakelens" for a in apps)  # it ran on the cluster, not in local mode
    executors = list((standalone["tmp"] / "work").glob("app-*/*"))
    assert len(executors) >= 2  # both workers launched an executor for it

    EmbedJob(spark=spark, conf=local_conf(img, tmp_path / "local_table"), log=lambda *_: None).launch()
    read = lambda t: {r["path"]: r for r in spark.read.format("delta").load(str(t)).collect()}
    cluster, local = read(table), read(tmp_path / "local_table")
    assert cluster.keys() == local.keys() and len(cluster) == 17
    for path, row in cluster.items():
        assert row["error"] == local[path]["error"]
        if row["embedding"] is not None:
            assert np.abs(np.array(row["embedding"]) - np.array(local[path]["embedding"])).max() < 1e-5
