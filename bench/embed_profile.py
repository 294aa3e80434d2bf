"""Issue #15: where an embed task's time goes, per stage, per image, in one run on one machine.

Part 1, the stages of one task, one after another on one core (as a Spark task with one core runs
them, minus the overlap of decode threads and model): read the file (page cache), decode (PIL, JPEG
draft mode), preprocess (the numpy copy of open_clip's transform), the model (the engine on batches of
8, one thread), and the Arrow hand-back (the UDF's rows -> an Arrow batch of the table's columns).
Part 2, the same files through the embed job (`lakelens embed`, local[2], chunks of `--chunk`): the
job's marginal rate (chunks 2.., embed + commit) and each chunk's commit seconds, against the same
engine's model-only rate on two cores. The gap between them is Spark's share: the scan of the files,
Arrow between the JVM and Python, the plan of new and changed files, and the Delta MERGE per chunk; and
where the command's core time went, by process (the JVM, the Python workers, the driver; sampled from
/proc, machine.ProcessTreeCPU), over the whole run and as cores kept busy from 40% to 90% of its wall
time (the later chunks).

Writes bench/results/embed_profile.json (or --out).

    .venv/bin/python bench/embed_profile.py [--model ViT-B-32] [--engine onnx-int8] [--images 1000] [--chunk 250] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from embed import lakelens_command, make_images, marginal_rate  # noqa: E402
from machine import describe  # noqa: E402

from lakelens import Embedder, ModelSpec  # noqa: E402
from lakelens.ingest import images  # noqa: E402


def stage_seconds(paths: list[Path], emb: Embedder, batch: int = 8) -> dict:
    """Seconds per image of each stage, measured one stage at a time over all the files."""
    t = {}
    t0 = time.perf_counter()
    contents = [p.read_bytes() for p in paths]
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [images.decode(c, emb.engine.image_size, draft=True) for c in contents]
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tensors = [emb.transform(d.image) for d in decoded]
    t["preprocess"] = time.perf_counter() - t0
    emb.embed_tensors(tensors[:batch])  # warm-up
    t0 = time.perf_counter()
    vectors = np.concatenate([emb.engine.encode_image(np.stack(tensors[i:i + batch]))
                              for i in range(0, len(tensors), batch)])
    t["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        rows = pd.DataFrame({"path": [str(p) for p in paths[i:i + batch]], "content_sha256": "0" * 64,
                             "size_bytes": [len(c) for c in contents[i:i + batch]], "modified": pd.Timestamp(0),
                             "width": [d.width for d in decoded[i:i + batch]],
                             "height": [d.height for d in decoded[i:i + batch]],
                             "embedding": list(vectors[i:i + batch]), "error": None})
        pa.RecordBatch.from_pandas(rows, preserve_index=False)
    t["arrow"] = time.perf_counter() - t0
    n = len(paths)
    return {k: round(v / n * 1000, 3) for k, v in t.items()}  # ms per image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--engine", default="onnx-int8")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "embed_profile.json"))
    args = ap.parse_args()
    machine = describe()
    print(json.dumps(machine), flush=True)
    result = {"machine": machine, "model": args.model, "engine": args.engine, "images": args.images}
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "img", args.images, 256, 256)
        cache = tmp / "onnx"
        ckpt = "none"
        one = Embedder(ModelSpec(args.model), batch_size=8, engine=args.engine, threads=1, onnx_cache=str(cache))
        per_image = stage_seconds(paths[:200], one)
        per_image["total"] = round(sum(per_image.values()), 3)
        result["stages_ms_per_image_one_core"] = per_image
        print("stages (ms per image, one core):", per_image, flush=True)
        tensors = [one.transform(images.decode(p.read_bytes(), one.engine.image_size).image) for p in paths[:64]]
        # two tasks of one core each, as local[2] runs them: the engine on one thread, twice at once
        with ThreadPoolExecutor(2) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda part: one.embed_tensors(part), [tensors[:32], tensors[32:]]))
            model_only = 64 / (time.perf_counter() - t0)
        result["model_only_images_per_s_two_cores"] = round(model_only, 2)
        run = lakelens_command(tmp / "img", tmp / "table", ckpt, args.model, args.engine, cache, args.chunk,
                               sample_cpu=True)
        marginal = marginal_rate(run["chunk_seconds"])
        later = run["chunk_seconds"][1:]
        result["job"] = {"whole_command_seconds": run["seconds"], "marginal_images_per_s": round(marginal, 2),
                         "share_of_model_only": round(marginal / model_only, 3),
                         "commit_ms_per_image": round(sum(c for _, _, c in later) / sum(n for n, *_ in later) * 1000, 3),
                         "embed_ms_per_image": round(sum(e for _, e, _ in later) / sum(n for n, *_ in later) * 1000, 3),
                         "phases": run["phases"], "chunk_seconds": run["chunk_seconds"], "cpu": run["cpu"]}
        print(json.dumps(result["job"], indent=1), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
