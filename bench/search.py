"""Benchmark: FAISS index build and query on clustered synthetic vectors.

Up to 2M rows (default 1M x 512): exact Flat vs the `auto` choice built in memory (build_local), in one
run: build time, index size, latency p50/p99 (single queries and batches), recall@10 against exact
search. Writes bench/results/search.json.

With --job, or above 2M rows: the scale run. A Delta table of the vectors written by Spark (generated on
the executors), the index job with the memory budget, then the Searcher in a fresh process: build time,
index size, resident memory (anonymous and file-backed pages), single-query p50/p99 and recall@10 against
exact search (numpy, over regenerated vectors) on a sample of queries. When the disk cannot hold the
asked rows (table, the job's checkpoint and shuffle, raw vectors, scratch copies and codes: about 5.5x
the vectors, with 15% of the free space spare), the most it holds, at least 5M, is
run and said. Writes bench/results/search_job.json.

    .venv/bin/python bench/search.py [--rows 1000000] [--dim 512] [--queries 300]
    .venv/bin/python bench/search.py --rows 10000000 [--budget 4G]
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

sys.path.insert(0, str(ROOT / "bench"))

from conftest import clustered, exact_topk, recall_at  # noqa: E402  (the same generator the tests use)
from machine import SMOKE_HELP, describe, latencies, smoke  # noqa: E402

from lakelens import Searcher  # noqa: E402
from lakelens import index as ix  # noqa: E402
from lakelens.config import parse_size  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


CHUNK = 50_000  # rows per generated chunk: chunk c is clustered(CHUNK, dim, seed=1000 + c), on any machine


def chunk_vectors(c: int, rows: int, dim: int, tests: str = str(ROOT / "tests")) -> np.ndarray:
    if tests not in sys.path:  # on an executor too: Spark ships this function, not the tests folder
        sys.path.insert(0, tests)
    from conftest import clustered as mixture

    return mixture(min(CHUNK, rows - c * CHUNK), dim, clusters=1000, noise=0.4, seed=1000 + c, centres_seed=0)


def chunk_path(i: int) -> str:
    return f"file:/bench/img-{i:09d}.jpg"


def write_table(spark, table: Path, rows: int, dim: int) -> None:
    """The vectors as an embeddings table, generated and written on the executors as Arrow batches
    (nothing per row passes through the driver or through pandas objects)."""
    import pyarrow as pa

    from lakelens import path_id
    from lakelens.ingest.table import SCHEMA

    def gen(batches):
        from datetime import datetime

        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(SCHEMA, timezone="UTC")
        now = pa.scalar(datetime(2026, 1, 1), schema.field("modified").type)
        for batch in batches:
            for c in batch.column("id").to_pylist():
                x = chunk_vectors(int(c), rows, dim)
                n = len(x)
                paths = [chunk_path(int(c) * CHUNK + i) for i in range(n)]
                embedding = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * dim),
                                                     pa.array(x.reshape(-1)))
                columns = {"id": pa.array([path_id(p) for p in paths], pa.int64()), "path": pa.array(paths),
                           "content_sha256": pa.array(["0" * 64] * n), "size_bytes": pa.array([100_000] * n, pa.int64()),
                           "modified": pa.array([now] * n, now.type), "width": pa.array([640] * n, pa.int32()),
                           "height": pa.array([480] * n, pa.int32()), "model": pa.array(["lakelens-tiny@none"] * n),
                           "embedding": embedding, "error": pa.nulls(n, pa.string()),
                           "embedded_at": pa.array([now] * n, now.type), "regions": pa.nulls(n)}
                yield pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)

    chunks = -(-rows // CHUNK)
    spark.range(chunks, numPartitions=chunks).mapInArrow(gen, SCHEMA).write.format("delta").save(str(table))


def truth(q: np.ndarray, rows: int, dim: int, k: int = 10) -> np.ndarray:
    """Exact top-k ids over every vector, regenerated chunk by chunk (numpy)."""
    from lakelens import path_id
    from lakelens.index.shards import top_rows

    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_r = np.full((len(q), k), -1, np.int64)
    for c in tqdm(range(-(-rows // CHUNK)), desc="exact top-10", leave=False):
        s, cols = top_rows(q @ chunk_vectors(c, rows, dim).T, k)
        cand_s, cand_r = np.concatenate([best_s, s], 1), np.concatenate([best_r, cols + c * CHUNK], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_r, order, 1)
    return np.vectorize(lambda r: path_id(chunk_path(int(r))), otypes=[np.int64])(best_r)


def memory() -> dict:
    """This process's resident memory (kB -> MiB): anonymous (heap, FAISS codes) and file-backed (mapped
    files' pages, which the kernel can drop), now and at the peak."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS"), "anon_mib": fields.get("RssAnon"), "file_mib": fields.get("RssFile"),
            "peak_rss_mib": fields.get("VmHWM")}


def measure_searcher(index_dir: str, data: str, out: str) -> None:
    """Run in a fresh process: open the Searcher, recall@10 on the sampled queries, single-query latency."""
    with np.load(data) as f:
        q, true_ids = f["q"], f["truth"]
    import gc

    gc.collect()
    base = memory()
    t0 = time.perf_counter()
    s = Searcher.open(index_dir)
    opened = {"open_s": round(time.perf_counter() - t0, 2), **memory()}
    found = [f["id"].to_numpy() for f in s.search_vectors(q, k=10)]
    latencies(lambda v: s.search_vector(v, k=10), q[:50], "warm-up")
    result = {"before_open": base, "after_open": opened, "rows": len(s), "search_params": s.manifest["search_params"],
              "recall@10": round(recall_at(found, true_ids), 4),
              "single_query": latencies(lambda v: s.search_vector(v, k=10), q, "single")}
    result["after_queries"] = memory()
    Path(out).write_text(json.dumps(result))


def run_job(args) -> int:
    import subprocess

    from lakelens import IndexJob, config, get_session

    work = Path(tempfile.mkdtemp(prefix="lakelens-search-job-"))
    free = shutil.disk_usage(work).free
    # at the peak: the table, the job's checkpoint and shuffle, the raw vectors for re-ranking, the
    # shards' scratch copies and codes: about 5.5x the vectors; 15% of the free space is left spare
    need = lambda n: int(n * args.dim * 4 * 5.5 / 0.85)  # noqa: E731
    rows = args.rows
    if need(rows) > free:
        rows = max(5_000_000, int(free * 0.85 / (args.dim * 4 * 5.5)) // 1_000_000 * 1_000_000)
    results = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "machine": describe(),
               "rows_asked": args.rows, "rows": rows, "dim": args.dim, "queries": args.queries,
               "memory_budget": args.budget,
               "disk_free_gb": round(free / 1e9, 1)}
    if rows != args.rows:
        results["rows_note"] = (f"{args.rows} rows need about {need(args.rows) / 1e9:.0f} GB of disk (table, "
                                f"checkpoint, shuffle, raw vectors, scratch, codes; 15% spare); {free / 1e9:.0f} GB "
                                f"free: ran {rows}")
    print(f"[bench] {results['machine']}\n[bench] {rows} x {args.dim} ({results.get('rows_note', 'as asked')})",
          flush=True)
    conf = config.load(ROOT / "conf" / "local.yaml", ["spark.extra={spark.driver.memory: 6g, "
                                                       "spark.driver.maxResultSize: 2g}"])
    spark, _ = get_session(conf.spark)
    spark.sparkContext.setLogLevel("ERROR")
    table, index = work / "table", work / "index"
    try:
        t0 = time.perf_counter()
        write_table(spark, table, rows, args.dim)
        results["write_table_s"] = round(time.perf_counter() - t0, 1)
        print(f"[bench] table written in {results['write_table_s']} s", flush=True)
        c = config.load(ROOT / "conf" / "local.yaml", [f"index.table={table}", f"index.index={index}",
                                                       f"index.memory_budget={args.budget}"])
        t0 = time.perf_counter()
        r = IndexJob(spark=spark, conf=c, log=lambda m: print(m, flush=True)).launch()
        results["build_s"] = round(time.perf_counter() - t0, 1)
        spark.stop()
        m = ix.read_manifest(index)
        folder = index / m["version"]
        results["index"] = {"factory": r.factory, "reason": r.reason, "shards": r.shards,
                            "search_params": m["search_params"], "rerank": m["rerank"],
                            "bytes": folder_bytes(folder),
                            "codes_bytes": sum(f.stat().st_size for f in folder.glob("*.faiss")),
                            "raw_vector_bytes": sum(f.stat().st_size for f in folder.glob("*.vectors.npy")),
                            "metadata_bytes": sum(f.stat().st_size for f in folder.glob("meta-*.arrow"))}
        print(f"[bench] built in {results['build_s']} s: {results['index']}", flush=True)
        q = clustered(args.queries, args.dim, clusters=1000, noise=0.4, seed=1, centres_seed=0)
        t0 = time.perf_counter()
        np.savez(work / "queries.npz", q=q, truth=truth(q, rows, args.dim))
        results["exact_s"] = round(time.perf_counter() - t0, 1)
        out = work / "searcher.json"
        subprocess.run([sys.executable, __file__, "--measure", str(index), str(work / "queries.npz"), str(out)],
                       check=True)
        results["searcher"] = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = results["searcher"]
    results["targets"] = {"resident_mib_after_queries": s["after_queries"]["rss_mib"], "resident_target_mib": 4096,
                          "p50_ms": s["single_query"]["p50_ms"], "p50_target_ms": 10,
                          "recall@10": s["recall@10"], "recall_target": 0.95}
    results["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.out_job).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        measure_searcher(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", default="4G")
    ap.add_argument("--job", action="store_true", help="the scale run: a Delta table and the index job")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search.json"))
    ap.add_argument("--out-job", default=str(ROOT / "bench" / "results" / "search_job.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # a budget the raw vectors exceed: IVF with 8-bit codes, re-ranked (the 5M run's kind of index)
    smoke(args, rows=3000, dim=32, queries=20, batch=4, budget="200K")
    if args.job or args.rows > 2_000_000:
        return run_job(args)

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
        auto = ix.choose_factory(args.rows, args.dim, parse_size(args.budget))
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
