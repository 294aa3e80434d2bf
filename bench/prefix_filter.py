"""Benchmark: path-prefix filters. The Searcher's filter inside FAISS's scan (an IDSelector of the
matching ids) against the over-fetch loop it replaced (search k, drop non-matching rows, fetch 4x more
until k match or the whole index was fetched), and against a plain search without a filter, in one run
on one index. Writes bench/results/prefix_filter.json.

    .venv/bin/python bench/prefix_filter.py [--rows 300000] [--dim 512] [--queries 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from conftest import clustered  # noqa: E402  (the same generator the tests use)
from machine import SMOKE_HELP, describe, latencies, smoke  # noqa: E402

from lakelens import Choice, Searcher, build_local  # noqa: E402
from lakelens.index.factory import nlist_for  # noqa: E402
from lakelens.index.shards import load_shard, search_shards  # noqa: E402


class OverFetch:
    """The filter before: search max(4k, 100), keep rows whose path matches, search 4x more while fewer
    than k match, up to the whole index. Same shards, same id -> path table as the Searcher."""

    def __init__(self, s: Searcher):
        folder = s.index_dir / s.version
        self.shards = [load_shard(folder / f["file"], True)[0] for f in s.manifest["shards"]]
        self.nprobe = s.manifest["search_params"].get("nprobe")
        meta = s.id_paths()
        self.ids, self.paths, self.n = meta["id"].to_numpy(), meta["path"].to_numpy(), len(s)

    def __call__(self, q: np.ndarray, k: int, prefix: str) -> pd.DataFrame:
        fetch = min(self.n, max(4 * k, 100))
        while True:
            scores, ids = search_shards(self.shards, [None] * len(self.shards), q[None, :], fetch, self.nprobe)
            paths = self.paths[np.searchsorted(self.ids, ids[0])]
            hits = pd.DataFrame({"score": scores[0], "id": ids[0], "path": paths})
            hits = hits[hits["path"].str.startswith(prefix)].head(k)
            if len(hits) >= k or fetch >= self.n:
                return hits
            fetch = min(self.n, fetch * 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_filter.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, rows=3000, dim=16, queries=5)
    info = describe()
    print(f"[bench] {info}", flush=True)
    x = clustered(args.rows, args.dim, clusters=300, noise=0.4, seed=0, centres_seed=0)
    q = clustered(args.queries, args.dim, clusters=300, noise=0.4, seed=1, centres_seed=0)
    # 1 in 1000 images under 2024/, half under 2023/, none under 1999/
    folders = np.where(np.arange(args.rows) % 1000 == 0, "2024", np.where(np.arange(args.rows) % 2 == 0, "2023", "2022"))
    paths = [f"file:/photos/{f}/{i}.jpg" for i, f in enumerate(folders)]
    work = Path(tempfile.mkdtemp(prefix="lakelens-prefix-"))
    results = {"what": f"{args.rows} x {args.dim} clustered unit vectors, {args.queries} queries, k=10; "
                       "Searcher.search_vector latency (Python driver included)", "machine": info, "indexes": {}}
    try:
        for name, choice in (("flat", Choice("Flat", "exact", False)),
                             ("ivf", Choice(f"IVF{nlist_for(args.rows)},Flat", "ivf", True, {"nprobe": 32}))):
            t0 = time.perf_counter()
            build_local(work / name, np.arange(args.rows), x, paths, choice, model_key="lakelens-tiny@none")
            s = Searcher.open(work / name)
            before = OverFetch(s)
            row = {"build_s": round(time.perf_counter() - t0, 1), "plain": latencies(lambda v: s.search_vector(v, 10), q)}
            for label, prefix in (("no_match", "file:/photos/1999/"), ("match_0.1%", "file:/photos/2024/"),
                                  ("match_50%", "file:/photos/2023/")):
                s.search_vector(q[0], 10, path_prefix=prefix)  # the prefix's id set, computed once and kept
                new = latencies(lambda v, p=prefix: s.search_vector(v, 10, path_prefix=p), q)
                old = latencies(lambda v, p=prefix: before(v, 10, p), q[:10])
                row[label] = {"selector": new, "overfetch_before": old,
                              "speedup_p50": round(old["p50_ms"] / new["p50_ms"], 1),
                              "vs_plain_p50": round(new["p50_ms"] / row["plain"]["p50_ms"], 2)}
            results["indexes"][name] = row
            print(f"[bench] {name}: {json.dumps(row)}", flush=True)
            s = before = None  # release the index before its folder goes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
