"""Choosing the session: classic or Spark Connect, from the config, SPARK_REMOTE or --remote; clear one-line
errors for a master and a remote together and for a missing Connect client. No JVM is started here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from lakelens import config
from lakelens.errors import ConfigError
from lakelens.spark import get_session, remote_url

NO_GRPC = """
import sys
sys.modules["grpc"] = None  # as if pyspark's Connect client packages were not installed
from lakelens.cli import main
sys.exit(main(sys.argv[1:]))
"""
CLI = "import sys\nfrom lakelens.cli import main\nsys.exit(main(sys.argv[1:]))"


def test_a_master_and_a_remote_in_one_config_are_refused_naming_both_keys():
    conf = config.load(None, ["spark.master=local[2]", "spark.remote=sc://127.0.0.1:15002"])
    with pytest.raises(ConfigError, match=r"spark\.master and spark\.remote"):
        get_session(conf)


def test_spark_remote_wins_over_a_master_from_the_config_file(monkeypatch):
    conf = config.load(ROOT / "conf" / "local.yaml").spark
    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    assert conf.master == "local[2]" and remote_url(conf) == ""
    monkeypatch.setenv("SPARK_REMOTE", "sc://127.0.0.1:15002")
    assert remote_url(conf) == "sc://127.0.0.1:15002"
    assert remote_url(config.load(None, ["spark.remote=sc://h:1"]).spark) == "sc://h:1"


def _cli(script: str, *argv: str, tmp_path, timeout: float = 300, **extra_env) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if os.environ.get("PYTHONPATH"):  # the lakelens under test where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if "SPARK_REMOTE" in extra_env:
        env["SPARK_REMOTE"] = extra_env["SPARK_REMOTE"]
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


def test_without_the_connect_client_a_remote_command_says_which_extra_to_install(tmp_path):
    run = _cli(NO_GRPC, "index", "--remote", "sc://127.0.0.1:9", "--table", "t", "--index", "i", tmp_path=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "lakelens index: error: Spark Connect needs its client packages (grpcio, grpcio-status, "
        "googleapis-common-protos, zstandard): pip install 'lakelens[connect]'"]


def test_master_and_remote_flags_together_are_one_line(tmp_path):
    run = _cli(CLI, "embed", "--master", "local[1]", "--remote", "sc://127.0.0.1:9", "--images", "a",
               "--table", "t", tmp_path=tmp_path)
    assert run.returncode == 2 and "--master and --remote" in run.stderr and "Traceback" not in run.stderr


def test_an_unreachable_connect_server_is_one_line(tmp_path):
    run = _cli(CLI, "index", "--remote", "sc://127.0.0.1:9", "--table", "t", "--index", "i", tmp_path=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "lakelens index: error:" in run.stderr



@pytest.mark.slow  # waits out the 10 s the command gives a port to answer in gRPC
def test_a_port_that_is_not_a_connect_server_is_one_line(tmp_path):
    """sc://HOST:PORT naming a port where something else listens (the Spark UI's 4040, a master's 7077, a
    socket that never answers): one line in seconds, not pyspark's gRPC retries for minutes. The bound of the
    run is there so that the retries fail the test rather than stall it."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(8)  # the kernel accepts connections; nothing ever answers them
        port = other.getsockname()[1]
        try:
            run = _cli(CLI, "index", "--remote", f"sc://127.0.0.1:{port}", "--table", "t", "--index", "i",
                       tmp_path=tmp_path, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("lakelens was still waiting for the port's answer after 120 s")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"lakelens index: error: 127.0.0.1:{port} does not answer as a Spark Connect server (no gRPC reply in 10 s); "
        "is it the server's Connect port (15002 unless spark.connect.grpc.binding.port says otherwise)? "
        "(spark.remote / SPARK_REMOTE / --remote)"]


def test_master_flag_with_spark_remote_in_the_environment_is_one_line(tmp_path):
    """pyspark refuses a master with SPARK_REMOTE set; a --master on the command line is not silently dropped
    for the environment's server either."""
    run = _cli(CLI, "embed", "--master", "local[1]", "--images", "a", "--table", "t", tmp_path=tmp_path,
               SPARK_REMOTE="sc://127.0.0.1:9")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "lakelens embed: error: --master and SPARK_REMOTE: a session is either classic (master) or Spark Connect "
        "(remote); unset SPARK_REMOTE or leave out --master"]
