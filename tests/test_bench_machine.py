"""bench/machine.py's ProcessTreeCPU: the CPU-seconds of a command and its descendants, by kind, read from
/proc while it runs (bench/embed.py's split of a Spark command between its JVM and workers)."""

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
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
