"""Benchmark: images/s of the Spark embed job against a plain single-process open_clip loop, same images
and model, in one run, for small JPEGs and 12-megapixel JPEGs. Writes bench/results/embed.json.

    .venv/bin/python bench/embed.py [--model ViT-B-32] [--small 256] [--large 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def photo_like(seed: int, w: int, h: int) -> Image.Image:
    """Smooth gradients, shapes and grain: compresses like a photo (a 12 MP one to a few MB)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 40, w // 6))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, w // 800)))
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_images(folder: Path, n: int, w: int, h: int, quality: int = 90) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"photo{i:05d}.jpg"
        photo_like(i, w, h).save(p, quality=quality)
        paths.append(p)
    return paths


def plain_loop(paths: list[Path], model_name: str, batch: int = 32) -> dict:
    """The baseline: PIL open + open_clip preprocess + torch forward, one process, batch 32."""
    from lakelens import models

    oc = models._open_clip()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, _, preprocess = oc.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    load_s = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            v = model.encode_image(x)
            out.append((v / v.norm(dim=-1, keepdim=True)).numpy())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "model_load_s": load_s,
            "vectors": np.concatenate(out)}


def spark_job(spark, folder: Path, table: Path, model_name: str, batch: int = 32) -> dict:
    from lakelens import config
    from lakelens.embed_job import EmbedJob

    conf = config.load(ROOT / "conf" / "local.yaml", [f"embed.images={folder}", f"embed.table={table}",
                                                      f"model.name={model_name}", f"embed.batch_size={batch}"])
    t0 = time.perf_counter()
    stats = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    seconds = time.perf_counter() - t0
    rows = {r["path"]: np.array(r["embedding"], dtype=np.float32)
            for r in spark.read.format("delta").load(str(table)).select("path", "embedding").collect()}
    return {"seconds": seconds, "images_per_s": stats.embedded / seconds, "embedded": stats.embedded,
            "embed_phase_images_per_s": stats.embedded / stats.phases["embed"], "phases": stats.phases,
            "rows": rows}


def compare(plain_vectors: np.ndarray, paths: list[Path], rows: dict) -> dict:
    spark_vectors = np.stack([rows[f"file:{p}"] for p in paths])
    cos = (plain_vectors * spark_vectors).sum(1)
    return {"max_abs_diff": float(np.abs(plain_vectors - spark_vectors).max()), "min_cosine": float(cos.min())}


def run_set(name: str, paths: list[Path], folder: Path, spark, model_name: str, repeats: int, work: Path) -> dict:
    plain_runs, spark_runs = [], []
    for r in range(repeats):
        plain_runs.append(plain_loop(paths, model_name))
        table = work / f"table-{name}-{r}"
        spark_runs.append(spark_job(spark, folder, table, model_name))
        shutil.rmtree(table, ignore_errors=True)
        print(f"  {name} repeat {r + 1}: plain {plain_runs[-1]['images_per_s']:.2f} img/s, "
              f"spark job {spark_runs[-1]['images_per_s']:.2f} img/s", flush=True)
    plain_rate = statistics.median(x["images_per_s"] for x in plain_runs)
    spark_rate = statistics.median(x["images_per_s"] for x in spark_runs)
    return {
        "images": len(paths),
        "image_size": list(Image.open(paths[0]).size),
        "mean_file_bytes": int(np.mean([p.stat().st_size for p in paths])),
        "plain_loop_images_per_s": [round(x["images_per_s"], 3) for x in plain_runs],
        "spark_job_images_per_s": [round(x["images_per_s"], 3) for x in spark_runs],
        "spark_embed_phase_images_per_s": [round(x["embed_phase_images_per_s"], 3) for x in spark_runs],
        "spark_phases_s": [{k: round(v, 2) for k, v in x["phases"].items()} for x in spark_runs],
        "plain_loop_median": round(plain_rate, 3),
        "spark_job_median": round(spark_rate, 3),
        "spark_over_plain": round(spark_rate / plain_rate, 3),
        "spark_embed_phase_over_plain": round(
            statistics.median(x["embed_phase_images_per_s"] for x in spark_runs) / plain_rate, 3),
        "parity": compare(plain_runs[-1]["vectors"], paths, spark_runs[-1]["rows"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--small", type=int, default=512, help="number of 256x256 JPEGs")
    ap.add_argument("--large", type=int, default=32, help="number of 4000x3000 (12 MP) JPEGs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "embed.json"))
    args = ap.parse_args()

    from lakelens import config
    from lakelens.spark import get_session

    work = Path(tempfile.mkdtemp(prefix="lakelens-bench-"))
    try:
        print(f"[bench] generating images in {work}", flush=True)
        small = make_images(work / "small", args.small, 256, 256)
        large = make_images(work / "large", args.large, 4000, 3000)
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        spark, _ = get_session(config.load(ROOT / "conf" / "local.yaml").spark)
        spark.sparkContext.setLogLevel("ERROR")
        session_s = time.perf_counter() - t0
        results = {
            "what": "Spark embed job (local[2], whole job incl. listing, model load in workers, Delta commits) "
                    "vs plain single-process open_clip loop (PIL + preprocess + forward, batch 32, "
                    f"torch threads={torch.get_num_threads()}); random-init {args.model}; medians of "
                    f"{args.repeats} runs; Spark session start measured apart",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                        "torch": torch.__version__},
            "model": args.model,
            "spark_session_start_s": round(session_s, 2),
        }
        print("[bench] small images", flush=True)
        results["small_256px"] = run_set("small", small, work / "small", spark, args.model, args.repeats, work)
        print("[bench] 12-megapixel JPEGs", flush=True)
        results["large_12mp"] = run_set("large", large, work / "large", spark, args.model, args.repeats, work)
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
