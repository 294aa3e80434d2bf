"""bench/machine.py: ProcessTreeCPU, the CPU-seconds of a command and its descendants, by kind, read from
/proc while it runs (bench/embed.py's split of a Spark command between its JVM and workers); and the --smoke
switch every benchmark takes (make bench-smoke)."""

import argparse
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import machine  # noqa: E402
from machine import ProcessTreeCPU  # noqa: E402

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_counts_a_child_process_cpu_under_its_parent():
    # the parent burns 0.3 s itself, then waits on a child that burns 1.2 s: both land in the totals
    script = BURN.format(s=0.3) + f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN.format(s=1.2)!r}])\n"
    proc = subprocess.Popen([sys.executable, "-c", script])
    sampler = ProcessTreeCPU(proc.pid, every=0.1)
    assert proc.wait() == 0
    got = sampler.stop()
    seconds = got["cpu_seconds"]
    assert 0.25 <= seconds["python_driver"] <= 1.0, got  # the root process
    assert 1.0 <= seconds["other"] <= 2.0, got  # its child, whatever else it is
    assert got["wall_s"] >= 1.2
    busy = got["cores_busy_40_to_90_percent_of_run"]
    assert 0.2 <= busy["other"] <= 1.2, got  # the child, one thread, was running in mid-run


def test_smoke_shrinks_the_run_and_never_writes_into_bench_results(monkeypatch):
    monkeypatch.setenv(machine.SMOKE, "")  # restored after the test: smoke() sets it for child processes
    real = argparse.Namespace(smoke=False, rows=1000, out=str(machine.RESULTS / "search.json"))
    assert not machine.smoke(real, rows=10) and real.rows == 1000 and machine.side(2048) == 2048
    args = argparse.Namespace(smoke=True, rows=1000, out=str(machine.RESULTS / "search.json"),
                              work=str(ROOT / "build" / "bench-tags"), demo="/elsewhere/demo")
    assert machine.smoke(args, rows=10)
    assert args.rows == 10 and args.demo == "/elsewhere/demo"  # a path outside results and build/ stays
    for path in (args.out, args.work):
        assert not path.startswith((str(ROOT / "bench"), str(ROOT / "build"))) and os.path.isdir(os.path.dirname(path))
    assert args.out.endswith("search.json") and args.work.endswith("bench-tags")
    assert os.environ[machine.SMOKE] == "1" and machine.in_smoke() and machine.side(2048) == 256
