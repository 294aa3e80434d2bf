"""A local Spark Connect server: pyspark's own SparkConnectServer class under spark-submit, with Delta's SQL
extension and lakelens's Delta (and s3a) jars, on a loopback port. For trying lakelens's Connect path on one
machine, its tests (one server per test run) and bench/connect.py; clusters run their own server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectServer:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"sc://127.0.0.1:{port}"

    @classmethod
    def start(cls, log: Path, master: str = "local[2]", port: int = 0, timeout: float = 180,
              wrapper: tuple[str, ...] = (), delta: bool = True) -> ConnectServer:
        """Start a server and wait until it listens; its output goes to `log`. `wrapper`: a command the server
        runs under (its last argument is followed by spark-submit's). `delta=False`: without Delta's SQL
        extension and catalog (the jars stay), as a server set up for Spark alone."""
        from lakelens.jars import find_jars, find_s3_jars

        port = port or free_port()
        jars = find_jars() + find_s3_jars()
        submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
        cmd = [str(submit), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
               "--master", master, "--jars", ",".join(jars),
               *(["--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
                  "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog"]
                 if delta else []),
               "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
               "--conf", f"spark.connect.grpc.binding.port={port}",
               "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=2g",
               "--conf", "spark.sql.execution.arrow.pyspark.enabled=true",
               "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
               "--conf", "spark.python.worker.reuse=true", "--conf", "spark.sql.shuffle.partitions=2",
               "--conf", "spark.databricks.delta.snapshotPartitions=2"]
        env = {**os.environ, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
               "SPARK_LOCAL_IP": "127.0.0.1"}
        env.pop("SPARK_REMOTE", None)
        from lakelens import jvm

        opts = env.get("SPARK_SUBMIT_OPTS", "")
        if "SharedArchiveFile" not in opts:  # the class archive `make setup` built: seconds off the start
            env["SPARK_SUBMIT_OPTS"] = " ".join(filter(None, [opts, jvm.java_options()]))
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "wb")
        proc = subprocess.Popen([*wrapper, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = cls(proc, port, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the Spark Connect server exited ({proc.returncode}); see {log}")
            if b"Spark Connect server started" in log.read_bytes():
                return server
            time.sleep(0.5)
        server.stop()
        raise RuntimeError(f"the Spark Connect server did not start in {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
