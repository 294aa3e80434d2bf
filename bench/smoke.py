"""`make bench-smoke`: every benchmark behind a claim, with --smoke (a tiny size that runs its code end to
end), writing into a temp folder (never bench/results). A benchmark that fails fails the lane, so none can
rot unseen. Two run at a time by default (most of a smoke run is one core's work: a JVM starting, a
tiny model); each prints its wall seconds and its process tree's CPU seconds (user + system, JVMs
included, sampled from /proc), which the machine's other load moves less.

    .venv/bin/python bench/smoke.py [--only NAME,...] [--jobs 2] [--keep]

Every script in bench/ is either run here or named in HELPERS: a new benchmark must join the lane.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import SMOKE, ProcessTreeCPU  # bench/ is on the path: this script's folder

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HELPERS = {"machine.py", "knn.py", "smoke.py"}  # shared code (knn.py is serve.py --knn), not benchmarks
CLIPRET = BENCH / ".venv-clipret"


def lane(tmp: Path) -> list[list[tuple[str, list[str]]]]:
    """Chains of (name, arguments after the script), the longest first: a chain's runs go one after
    another (engines_eval reads the demo finetune.py makes), chains side by side."""
    one = lambda name, *argv: [(name, list(argv))]  # noqa: E731
    return [
        [("finetune", ["finetune.py", "--work", f"{tmp}/finetune", "--out", f"{tmp}/finetune.json"]),
         ("engines_eval", ["engines_eval.py", "--demo", f"{tmp}/finetune/bench-shapes",
                           "--out", f"{tmp}/engines_eval.json"])],
        one("connect", "connect.py", "--out", f"{tmp}/connect.json"),
        one("embed", "embed.py", "--out", f"{tmp}/embed.json"),
        one("shards", "shards.py", "--out", f"{tmp}/shards.json"),
        one("hybrid", "hybrid.py", "--out", f"{tmp}/hybrid.json"),
        one("tags", "tags.py", "--work", f"{tmp}/tags", "--out", f"{tmp}/tags.json"),
        one("dedup", "dedup.py", "--out", f"{tmp}/dedup.json"),
        one("reindex", "reindex.py", "--out", f"{tmp}/reindex.json"),
        one("captions", "captions.py", "--work", f"{tmp}/captions", "--out", f"{tmp}/captions.json"),
        one("search --job", "search.py", "--job", "--out-job", f"{tmp}/search_job.json"),
        one("serve", "serve.py", "--out", f"{tmp}/serve.json"),
        one("multilingual", "multilingual.py", "--work", f"{tmp}/multilingual", "--out", f"{tmp}/multilingual.json"),
        one("serve --knn", "serve.py", "--knn", "--out", f"{tmp}/serve-knn.json"),
        one("regions", "regions.py", "--out", f"{tmp}/regions.json"),
        one("prefix_filter", "prefix_filter.py", "--out", f"{tmp}/prefix_filter.json"),
        one("search", "search.py", "--out", f"{tmp}/search.json"),
        one("embed_gpu", "embed_gpu.py", "--out", f"{tmp}/embed_gpu.json"),
    ]


class Lane:
    def __init__(self, tmp: Path):
        self.tmp, self.lock = tmp, threading.Lock()
        self.times: list[tuple[str, float, float]] = []
        self.failed: list[str] = []
        # SMOKE: the machine's rates taken in a blink, also by a script with a --smoke of its own
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", SMOKE: "1"}

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[smoke] {text}", flush=True)

    def run(self, name: str, argv: list[str]) -> bool:
        self.say(f"{name}: bench/{' '.join(argv)} --smoke")
        log = self.tmp / f"{name.replace(' --', '-')}.log"
        t0 = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(BENCH / argv[0]), *argv[1:], "--smoke"], cwd=ROOT,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT)
            sampler = ProcessTreeCPU(proc.pid)
            rc = proc.wait()
        seconds, cpu = time.perf_counter() - t0, sum(sampler.stop()["cpu_seconds"].values())
        with self.lock:
            self.times.append((name, seconds, cpu))
            if rc:
                self.failed.append(name)
        if rc:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            self.say(f"{name} FAILED (exit {rc}) after {seconds:.0f} s; the end of its output:\n{tail}")
        else:
            self.say(f"{name}: ok, {seconds:.0f} s ({cpu:.0f} CPU-s)")
        return rc == 0

    def chain(self, runs: list[tuple[str, list[str]]]) -> None:
        for name, argv in runs:
            if not self.run(name, argv):
                for later, _ in runs[runs.index((name, argv)) + 1:]:
                    self.say(f"{later}: not run ({name} failed)")
                    with self.lock:
                        self.failed.append(later)
                return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run these lane names only (comma-separated)")
    ap.add_argument("--jobs", type=int, default=2, help="benchmarks run side by side")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lakelens-bench-smoke-"))
    chains = lane(tmp)
    names = [name for chain in chains for name, _ in chain]
    covered = {argv[0] for chain in chains for _, argv in chain} | HELPERS
    missing = sorted(p.name for p in BENCH.glob("*.py") if p.name not in covered)
    if missing:
        print(f"[smoke] bench/ scripts not in the lane: {', '.join(missing)} (bench/smoke.py)", flush=True)
        return 1
    only = set(filter(None, args.only.split(",")))
    if only - set(names):
        print(f"[smoke] --only: no such lane name: {', '.join(sorted(only - set(names)))}")
        return 2
    if only:
        chains = [c for c in ([r for r in chain if r[0] in only] for chain in chains) if c]
    if not (CLIPRET / "bin" / "clip-retrieval").is_file():
        print(f"[smoke] serve --knn: {CLIPRET.relative_to(ROOT)} is missing, so clip-retrieval's back end is "
              "left out; lakelens's side runs", flush=True)
    lane_ = Lane(tmp)
    t_all = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lane_.chain, chains))
    finally:
        if args.keep or lane_.failed:
            print(f"[smoke] outputs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    times = sorted(lane_.times, key=lambda t: names.index(t[0]))
    print("[smoke] " + ", ".join(f"{n} {s:.0f} s ({c:.0f})" for n, s, c in times))
    planned = sum(len(chain) for chain in chains)
    print(f"[smoke] {planned - len(lane_.failed)} of {planned} ok, {args.jobs} at a time: {total:.0f} s in all, "
          f"{sum(c for _, _, c in times):.0f} CPU-s; load average {os.getloadavg()[0]:.1f}"
          + (f"; failed: {', '.join(lane_.failed)}" if lane_.failed else ""))
    return 1 if lane_.failed else 0


if __name__ == "__main__":
    sys.exit(main())
