"""Benchmark: `lakelens serve` under 20 concurrent HTTP clients on /api/search, against Searcher.search_text
called in-process on the same index and queries, in one run: errors, throughput, p50/p99 latency.
Writes bench/results/serve.json.

    .venv/bin/python bench/serve.py [--rows 100000] [--clients 20] [--requests 25] [--threads 8]

With --knn: clip-retrieval's API (/knn-service, as ClipClient posts it) against /api/search on the same index
and text queries, and against clip-retrieval's own back end (`clip-retrieval back`, from bench/.venv-clipret)
serving the same vectors (the same HNSW graph, taken out of lakelens's shard) for the same embedding queries,
in one run (bench/knn.py). Writes bench/results/serve-knn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import clustered  # noqa: E402  (the same generator the tests use)
from machine import SMOKE_HELP, smoke  # noqa: E402  (bench/ is on the path: this script's folder)

from lakelens import Searcher  # noqa: E402
from lakelens import index as ix  # noqa: E402
from lakelens.config import parse_size  # noqa: E402
from lakelens.train import synth  # noqa: E402

MODEL_KEY = "lakelens-tiny@none"  # random-init tiny CLIP: real text embedding per query, 128-d


def stats(ms: list[float]) -> dict:
    t = np.array(ms)
    return {"n": len(t), "p50_ms": round(float(np.percentile(t, 50)), 2),
            "p99_ms": round(float(np.percentile(t, 99)), 2), "mean_ms": round(float(t.mean()), 2)}


def in_process(searcher: Searcher, queries: list[str], k: int) -> tuple[list[float], float]:
    times = []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        searcher.search_text(q, k)
        times.append((time.perf_counter() - t) * 1000)
    return times, time.perf_counter() - t0


def http_clients(base: str, queries: list, clients: int, per_client: int, k: int, send=None) -> dict:
    """`clients` threads, each with its own keep-alive session, `per_client` requests each, all started together.
    `send(session, query) -> error or None`; default: /api/search?q=query&k=k."""
    times, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def api_search(session, q):
        r = session.get(f"{base}/api/search", params={"q": q, "k": k}, timeout=120)
        return None if r.status_code == 200 and len(r.json()["results"]) == k else f"{r.status_code}: {r.text[:200]}"

    send = send or api_search

    def client(c: int):
        session = requests.Session()
        start.wait()
        for i in range(per_client):
            q = queries[(c * per_client + i) % len(queries)]
            t = time.perf_counter()
            try:
                err = send(session, q)
            except Exception as e:  # counted, not raised: the run reports every failure
                err = f"{type(e).__name__}: {e}"
            with lock:
                times.append((time.perf_counter() - t) * 1000)
                if err:
                    errors.append(err)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests_per_client": per_client, **stats(times), "times": times,
            "req_per_s": round(len(times) / wall, 1), "wall_s": round(wall, 2), "errors": len(errors),
            "error_samples": errors[:5]}


def start_server(index_dir: Path, threads: int, log_path: Path, *more: str):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lakelens.cli", "serve", "--index", str(index_dir),
                             "--port", "0", "--threads", str(threads), *more], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}\n{log_path.read_text()}")
    return proc, m.group(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--threads", type=int, default=8, help="server request threads")
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks of 50 for the 1-client comparison")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    ap.add_argument("--knn", action="store_true", help="clip-retrieval's API: bench/knn.py, serve-knn.json")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # one round of 50 queries for the 1-client comparison; --knn: two rounds of 12 requests a client
    smoke(args, rows=2000, clients=2, requests=25 if not args.knn else 24, threads=2,
          rounds=1 if not args.knn else 2)
    if args.knn:
        from knn import knn_main

        return knn_main(args, Path(args.out).with_name("serve-knn.json") if args.out.endswith("/serve.json")
                        else Path(args.out))

    work = Path(tempfile.mkdtemp(prefix="lakelens-serve-"))
    proc = None
    try:
        t0 = time.perf_counter()
        x = clustered(args.rows, 128, clusters=500, noise=0.4, seed=0)
        ids = np.arange(args.rows, dtype=np.int64) * 7919 - 10**12
        paths = [f"file:/lake/photos/{i // 1000:04d}/img{i:07d}.jpg" for i in range(args.rows)]
        choice = ix.choose_factory(args.rows, 128, parse_size("4G"))
        ix.build_local(work / "index", ids, x, paths, choice, model_key=MODEL_KEY)
        print(f"[bench] index of {args.rows} x 128 ({choice.factory}) built in {time.perf_counter() - t0:.0f} s",
              flush=True)
        # varied text queries: every request embeds a different caption
        queries = [s.caption for s in synth.samples(args.clients * args.requests, seed=3)]

        searcher = Searcher.open(work / "index")
        in_process(searcher, queries[:20], args.k)  # warm-up: model built, pages mapped
        proc, base = start_server(work / "index", args.threads, work / "server.log")
        health = requests.get(f"{base}/api/health", timeout=60).json()
        http_clients(base, queries[:20], 1, 20, args.k)  # warm-up
        # the baseline and one HTTP client alternate in blocks, so a change in machine load (the cores
        # are shared) falls on both alike
        load = [os.getloadavg()[0]]
        local, local_wall, remote, remote_wall = [], 0.0, [], 0.0
        for r in range(args.rounds):
            block = queries[r * 50:(r + 1) * 50]
            times, wall = in_process(searcher, block, args.k)
            local, local_wall = local + times, local_wall + wall
            one = http_clients(base, block, 1, len(block), args.k)
            remote, remote_wall = remote + one.pop("times"), remote_wall + one["wall_s"]
            assert one["errors"] == 0, one
        base_1 = {**stats(local), "req_per_s": round(len(local) / local_wall, 1)}
        single = {**stats(remote), "req_per_s": round(len(remote) / remote_wall, 1), "errors": 0}
        print(f"[bench] in-process search_text: {base_1}\n[bench] HTTP, 1 client: {single}", flush=True)
        many = http_clients(base, queries, args.clients, args.requests, args.k)
        many.pop("times")
        load.append(os.getloadavg()[0])
        print(f"[bench] HTTP, {args.clients} clients: {many}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "what": f"/api/search?q=<caption>&k={args.k} on {args.rows} x 128 clustered unit vectors ({choice.factory}, "
                f"auto choice) with model {MODEL_KEY}: each request embeds its text with the model, searches and "
                f"returns JSON; {args.clients} client threads x {args.requests} requests on loopback against "
                f"`lakelens serve` (waitress, {args.threads} threads) in a separate process; baseline: "
                f"Searcher.search_text in-process on the same index and queries, sequential, alternating in "
                f"blocks of 50 with one sequential HTTP client",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min_start_end": [round(x, 2) for x in load]},
        "date": time.strftime("%Y-%m-%d"),
        "server": {"wsgi": "waitress", "threads": args.threads, "index_version": health["index_version"],
                   "count": health["count"], "factory": health["factory"]},
        "in_process": base_1,
        "http_1_client": single,
        "http_concurrent": many,
        "ratios": {
            "http_overhead_p50": round(single["p50_ms"] / base_1["p50_ms"], 2),
            "http_overhead_ms_p50": round(single["p50_ms"] - base_1["p50_ms"], 2),
            "concurrent_throughput_vs_in_process": round(many["req_per_s"] / base_1["req_per_s"], 2),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0 if many["errors"] == 0 and single["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
