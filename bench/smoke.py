"""`make bench-smoke`: every benchmark behind a claim, with --smoke (a tiny size that runs its code end to
end), one after another, writing into a temp folder (never bench/results). A benchmark that fails fails
the lane, so none can rot unseen. Prints each one's seconds and the total.

    .venv/bin/python bench/smoke.py [--only NAME,...] [--keep]

Every script in bench/ is either run here or named in HELPERS: a new benchmark must join the lane.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HELPERS = {"machine.py", "knn.py", "smoke.py"}  # shared code (knn.py is serve.py --knn), not benchmarks
CLIPRET = BENCH / ".venv-clipret"


def lane(tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments after the script) in order: engines_eval reads the demo finetune.py makes."""
    return [
        ("connect", ["connect.py", "--out", f"{tmp}/connect.json"]),
        ("embed", ["embed.py", "--out", f"{tmp}/embed.json"]),
        ("finetune", ["finetune.py", "--work", f"{tmp}/finetune", "--out", f"{tmp}/finetune.json"]),
        ("engines_eval", ["engines_eval.py", "--demo", f"{tmp}/finetune/bench-shapes", "--out", f"{tmp}/engines_eval.json"]),
        ("search", ["search.py", "--out", f"{tmp}/search.json"]),
        ("search --job", ["search.py", "--job", "--out-job", f"{tmp}/search_job.json"]),
        ("reindex", ["reindex.py", "--out", f"{tmp}/reindex.json"]),
        ("serve", ["serve.py", "--out", f"{tmp}/serve.json"]),
        ("serve --knn", ["serve.py", "--knn", "--out", f"{tmp}/serve-knn.json"]),
        ("prefix_filter", ["prefix_filter.py", "--out", f"{tmp}/prefix_filter.json"]),
        ("multilingual", ["multilingual.py", "--work", f"{tmp}/multilingual", "--out", f"{tmp}/multilingual.json"]),
        ("dedup", ["dedup.py", "--out", f"{tmp}/dedup.json"]),
        ("tags", ["tags.py", "--work", f"{tmp}/tags", "--out", f"{tmp}/tags.json"]),
        ("captions", ["captions.py", "--work", f"{tmp}/captions", "--out", f"{tmp}/captions.json"]),
        ("hybrid", ["hybrid.py", "--out", f"{tmp}/hybrid.json"]),
        ("regions", ["regions.py", "--out", f"{tmp}/regions.json"]),
        ("embed_gpu", ["embed_gpu.py", "--out", f"{tmp}/embed_gpu.json"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run these lane names only (comma-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lakelens-bench-smoke-"))
    runs = lane(tmp)
    covered = {argv[0] for _, argv in runs} | HELPERS
    missing = sorted(p.name for p in BENCH.glob("*.py") if p.name not in covered)
    if missing:
        print(f"[smoke] bench/ scripts not in the lane: {', '.join(missing)} (bench/smoke.py)", flush=True)
        return 1
    only = set(filter(None, args.only.split(",")))
    if only - {name for name, _ in runs}:
        print(f"[smoke] --only: no such lane name: {', '.join(sorted(only - {n for n, _ in runs}))}")
        return 2
    if not (CLIPRET / "bin" / "clip-retrieval").is_file():
        print(f"[smoke] serve --knn: {CLIPRET.relative_to(ROOT)} is missing, so clip-retrieval's back end is "
              "left out; lakelens's side runs", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    times, failed, t_all = [], [], time.perf_counter()
    try:
        for name, argv in runs:
            if only and name not in only:
                continue
            print(f"[smoke] {name}: bench/{' '.join(argv)} --smoke", flush=True)
            t0 = time.perf_counter()
            log = tmp / f"{name.replace(' --', '-')}.log"
            with open(log, "w") as out:
                rc = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:], "--smoke"], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT).returncode
            seconds = time.perf_counter() - t0
            times.append((name, seconds, rc))
            if rc:
                failed.append(name)
                print(f"[smoke] {name} FAILED (exit {rc}) after {seconds:.0f} s; the end of its output:\n"
                      + "\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)
            else:
                print(f"[smoke] {name}: ok, {seconds:.0f} s", flush=True)
    finally:
        if args.keep or failed:
            print(f"[smoke] outputs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    print("[smoke] " + ", ".join(f"{n} {s:.0f} s" for n, s, _ in times))
    print(f"[smoke] {len(times) - len(failed)} of {len(times)} ran, {total:.0f} s in all"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
