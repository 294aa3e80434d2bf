"""Benchmark: re-indexing at a cost proportional to the change, in one run on one machine.

A Delta table of clustered synthetic unit vectors (written directly, not embedded; Change Data Feed
on), a full build by the index job, then 1% of the rows changed (0.5% added, 0.25% new vectors at
existing paths, 0.25% deleted) and an incremental build, then a compaction. Wall time of each build,
recall@10 against exact search (numpy) after each, and single-query p50/p99 with deltas and
tombstones against after compaction. Writes bench/results/reindex.json.

    .venv/bin/python bench/reindex.py [--rows 1000000] [--dim 512] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from conftest import clustered, exact_topk, recall_at  # noqa: E402  (the same generator the tests use)
from machine import SMOKE_HELP, describe, latencies, smoke  # noqa: E402

from lakelens import IndexJob, Searcher, config, get_session, path_id  # noqa: E402
from lakelens import index as ix  # noqa: E402
from lakelens.ingest.table import SCHEMA, EmbeddingsTable  # noqa: E402

CLUSTERS, NOISE = 1000, 0.4


def frame(start, x: np.ndarray, model: str = "lakelens-tiny@none") -> pd.DataFrame:
    """Rows for vectors x at images start.. (an int) or at the given image numbers (an array)."""
    numbers = range(start, start + len(x)) if isinstance(start, int) else start
    paths = [f"file:/photos/img-{i:08d}.jpg" for i in numbers]
    now = datetime(2026, 1, 1)
    return pd.DataFrame({"id": [path_id(p) for p in paths], "path": paths, "content_sha256": "0" * 64,
                         "size_bytes": 100_000, "modified": now, "width": 640, "height": 480, "model": model,
                         "embedding": list(x), "error": None, "embedded_at": now, "regions": None})


def quality(index_dir: Path, q: np.ndarray, ids: np.ndarray, vecs: np.ndarray) -> dict:
    s = Searcher.open(index_dir)
    truth = np.concatenate([exact_topk(q[i:i + 50], vecs, ids, 10)[1] for i in range(0, len(q), 50)])
    found = [f["id"].to_numpy() for f in s.search_vectors(q, k=10)]
    search = lambda v: s.search_vector(v, k=10)  # noqa: E731
    latencies(search, q[:20])  # warm the memory maps
    return {"rows": len(s), "recall@10": round(recall_at(found, truth), 4), **latencies(search, q)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reindex.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, rows=4000, dim=16, queries=20)
    results = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "machine": describe(),
               "rows": args.rows, "dim": args.dim}
    print(f"[bench] {results['machine']}", flush=True)
    conf = config.load(ROOT / "conf" / "local.yaml", ["spark.extra={spark.driver.memory: 8g}"])
    spark, _ = get_session(conf.spark)
    spark.sparkContext.setLogLevel("ERROR")
    work = Path(tempfile.mkdtemp(prefix="lakelens-reindex-"))
    table, index = work / "table", work / "index"
    try:
        x = clustered(args.rows, args.dim, clusters=CLUSTERS, noise=NOISE, seed=0, centres_seed=0)
        q = clustered(args.queries, args.dim, clusters=CLUSTERS, noise=NOISE, seed=1, centres_seed=0)
        t0 = time.perf_counter()
        from delta.tables import DeltaTable

        DeltaTable.createIfNotExists(spark).location(str(table)).addColumns(SCHEMA) \
            .property("delta.enableChangeDataFeed", "true").execute()
        step = 100_000
        for start in range(0, args.rows, step):
            spark.createDataFrame(frame(start, x[start:start + step]), SCHEMA).write.format("delta") \
                .mode("append").save(str(table))
        results["write_table_s"] = round(time.perf_counter() - t0, 1)
        print(f"[bench] table written in {results['write_table_s']} s", flush=True)
        ids = np.array([path_id(f"file:/photos/img-{i:08d}.jpg") for i in range(args.rows)], dtype=np.int64)

        def build(*overrides):
            c = config.load(ROOT / "conf" / "local.yaml", [f"index.table={table}", f"index.index={index}", *overrides])
            t = time.perf_counter()
            r = IndexJob(spark=spark, conf=c, log=lambda m: print(m, flush=True)).launch()
            return r, round(time.perf_counter() - t, 1)

        full, results["full_build_s"] = build()
        results["full"] = {"factory": full.factory, "build": full.build, **quality(index, q, ids, x)}
        print(f"[bench] full: {results['full']} in {results['full_build_s']} s", flush=True)

        # 1% changed, as the embed job writes it: MERGE upserts, then a delete
        k = args.rows // 400
        rng = np.random.default_rng(7)
        added = clustered(2 * k, args.dim, clusters=CLUSTERS, noise=NOISE, seed=2, centres_seed=0)
        changed_at = rng.choice(args.rows, k, replace=False)
        changed = clustered(k, args.dim, clusters=CLUSTERS, noise=NOISE, seed=3, centres_seed=0)
        deleted_at = rng.choice(np.setdiff1d(np.arange(args.rows), changed_at), k, replace=False)
        t = EmbeddingsTable(spark, str(table))
        upserts = pd.concat([frame(args.rows, added), frame(changed_at, changed)], ignore_index=True)
        t0 = time.perf_counter()
        t.upsert(spark.createDataFrame(upserts, SCHEMA))
        DeltaTable.forPath(spark, str(table)).delete(
            f"id IN ({','.join(str(int(ids[i])) for i in deleted_at)})")
        results["change_s"] = round(time.perf_counter() - t0, 1)
        x[changed_at] = changed
        keep = np.ones(args.rows, bool)
        keep[deleted_at] = False
        new_ids = np.array([path_id(f"file:/photos/img-{i:08d}.jpg") for i in range(args.rows, args.rows + 2 * k)])
        ids2, x2 = np.concatenate([ids[keep], new_ids]), np.concatenate([x[keep], added])
        results["change"] = {"added": 2 * k, "changed": k, "deleted": k}

        inc, results["incremental_build_s"] = build()
        results["incremental"] = {"build": inc.build, "reason": inc.build_reason, "deltas": inc.deltas,
                                  "tombstones": inc.tombstones, **quality(index, q, ids2, x2)}
        print(f"[bench] incremental: {results['incremental']} in {results['incremental_build_s']} s", flush=True)

        # a compaction of the same contents (one more row, tombstone share forced over the threshold)
        t.upsert(spark.createDataFrame(frame(args.rows + 2 * k, added[:1]), SCHEMA))
        ids3, x3 = np.concatenate([ids2, [path_id(f"file:/photos/img-{args.rows + 2 * k:08d}.jpg")]]), \
            np.concatenate([x2, added[:1]])
        comp, results["compaction_build_s"] = build("index.max_deleted_fraction=0.0")
        results["compaction"] = {"build": comp.build, "reason": comp.build_reason, **quality(index, q, ids3, x3)}
        print(f"[bench] compaction: {results['compaction']} in {results['compaction_build_s']} s", flush=True)
        m = ix.read_manifest(index)
        results["ratios"] = {
            "incremental_over_full_time": round(results["incremental_build_s"] / results["full_build_s"], 4),
            "recall_incremental_minus_full": round(results["incremental"]["recall@10"] - results["full"]["recall@10"], 4),
            "p50_with_deltas_over_compacted": round(results["incremental"]["p50_ms"] / results["compaction"]["p50_ms"], 3),
        }
        results["final_manifest"] = {k: m[k] for k in ("factory", "build", "build_reason", "rows", "search_params")}
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
