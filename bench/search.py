"""Benchmark: FAISS index build and query on 1M x 512 clustered synthetic vectors, exact Flat vs the
`auto` choice, in one run: build time, index size, latency p50/p99 (single queries and batches) and
recall@10 against exact search. Writes bench/results/search.json.

    .venv/bin/python bench/search.py [--rows 1000000] [--dim 512] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import clustered, exact_topk, recall_at  # noqa: E402  (the same generator the tests use)

from lakelens import Searcher  # noqa: E402
from lakelens import index as ix  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latencies(fn, queries: np.ndarray, label: str) -> dict:
    times = []
    for q in tqdm(queries, desc=label, leave=False):
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
            "mean_ms": round(float(t.mean()), 3)}


def measure(name: str, choice: ix.Choice, ids, x, q, true_ids, work: Path, batch: int, nprobes=()) -> dict:
    index_dir = work / name
    t0 = time.perf_counter()
    ix.build_local(index_dir, ids, x, [f"file:/img/{i}.jpg" for i in range(len(ids))], choice)
    build_s = time.perf_counter() - t0
    s = Searcher.open(index_dir)
    found = [f["id"].to_numpy() for f in s.search_vectors(q, k=10)]
    out = {
        "factory": choice.factory, "reason": choice.reason, "search_params": s.manifest["search_params"],
        "build_s": round(build_s, 1), "index_bytes": folder_bytes(index_dir / s.version),
        "recall@10": round(recall_at(found, true_ids), 4),
        "single_query": latencies(lambda v: s.search_vector(v, k=10), q, f"{name} single"),
        "batch": {"size": batch, **latencies(lambda b: s.search_vectors(b, k=10),
                                             q[: (len(q) // batch) * batch].reshape(-1, batch, q.shape[1]),
                                             f"{name} batch")},
    }
    out["batch"]["per_query_ms"] = round(out["batch"]["p50_ms"] / batch, 3)
    sweep = []
    for nprobe in nprobes:
        found = [f["id"].to_numpy() for f in s.search_vectors(q, k=10, nprobe=nprobe)]
        lat = latencies(lambda v: s.search_vector(v, k=10, nprobe=nprobe), q[:100], f"nprobe {nprobe}")
        sweep.append({"nprobe": nprobe, "recall@10": round(recall_at(found, true_ids), 4), **lat})
    if sweep:
        out["nprobe_sweep"] = sweep
    s = None  # drop the index (and its memory maps) before deleting its files
    shutil.rmtree(index_dir, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", default="4G")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    x = clustered(args.rows, args.dim, clusters=1000, noise=0.4, seed=0, centres_seed=0)
    q = clustered(args.queries, args.dim, clusters=1000, noise=0.4, seed=1, centres_seed=0)  # same mixture
    ids = np.arange(args.rows, dtype=np.int64) * 7919 - 10**12  # distinct, signed, not sequential
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    true_ids = np.concatenate([exact_topk(q[i:i + 50], x, ids, 10)[1] for i in range(0, len(q), 50)])
    t_exact = time.perf_counter() - t0
    print(f"[bench] {args.rows} x {args.dim} generated in {t_gen:.0f} s; exact top-10 of {len(q)} queries "
          f"(numpy) in {t_exact:.0f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="lakelens-search-"))
    try:
        auto = ix.choose_factory(args.rows, args.dim, ix.parse_size(args.budget))
        results = {
            "what": f"{args.rows} x {args.dim} unit vectors around 1000 random centres (noise 0.4); "
                    f"{len(q)} held-out queries from the same mixture; one shard; Searcher.search_vector "
                    f"latencies (Python driver included); recall@10 against exact top-10",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "memory_budget": args.budget,
            "flat": measure("flat", ix.Choice("Flat", "exact baseline", False), ids, x, q, true_ids, work,
                            args.batch),
            "auto": measure("auto", auto, ids, x, q, true_ids, work, args.batch,
                            nprobes=(16, 32, 64, 128) if "IVF" in auto.factory else ()),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f, a = results["flat"], results["auto"]
    results["auto_vs_flat"] = {"single_p50_speedup": round(f["single_query"]["p50_ms"] / a["single_query"]["p50_ms"], 1),
                               "index_size_ratio": round(a["index_bytes"] / f["index_bytes"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
