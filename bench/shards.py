"""Benchmark: images inside WebDataset shards against the same images as files, and against clip-retrieval's own
WebDataset inference, in one run on one machine. Writes bench/results/shards.json.

The same N photo-like 256-px JPEGs (random-init ViT-B-32 from one checkpoint file, engine onnx-int8) are
written twice: as files in a folder, and as img2dataset-style shards of 1,000 samples (KEY.jpg, KEY.txt,
KEY.json). Rounds alternate the two `lakelens embed` commands (each in a fresh process, Spark start and
Delta commits included, into a new table), then `clip-retrieval inference --input_format webdataset` runs
on the same shards. The ratios are of whole-command seconds.

    .venv/bin/python bench/shards.py [--images 5000] [--rounds 2] [--model ViT-B-32] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from embed import clip_retrieval, loadavg, make_images  # bench/ is on the path: this script's folder
from machine import describe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def write_shards(paths: list[Path], folder: Path, per_shard: int = 1000) -> list[Path]:
    """The images as img2dataset writes them: NNNNN.tar with KEY.jpg, KEY.txt and KEY.json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(paths), per_shard):
        shard = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, p in enumerate(paths[s:s + per_shard], start=s):
                key = f"{s // per_shard:05d}{i % per_shard:04d}"
                for ext, data in (("jpg", p.read_bytes()), ("txt", f"photo {i}".encode()),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


def lakelens_embed(images: Path, table: Path, ckpt: Path, model: str, cache: Path, source: str) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "lakelens"), "embed", "--images", str(images), "--table", str(table),
           "--model", model, "--pretrained", str(ckpt), "--engine", "onnx-int8", "--source", source,
           "--conf", str(ROOT / "conf" / "local.yaml"), "--set", f"embed.onnx_cache={cache}", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"lakelens embed --source {source} failed: {proc.stderr[-2000:]}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "embedded": stats["embedded"], "failed": stats["failed"],
            "phases": {k: round(v, 2) for k, v in stats["phases"].items()}, "chunk_seconds": stats["chunk_seconds"]}


def clip_retrieval_wds(shards: list[Path], out: Path, ckpt: Path, model: str, n: int) -> dict:
    """clip-retrieval's own WebDataset inference over the same shards, the same weights."""
    last = len(shards) - 1
    pattern = str(shards[0].parent / f"{{00000..{last:05d}}}.tar") if last else str(shards[0])
    return clip_retrieval(pattern, out, ckpt, model, n, ("--input_format", "webdataset", "--enable_metadata", "True",
                                                         "--wds_caption_key", "txt", "--wds_image_key", "jpg"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--no-clip-retrieval", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny run end to end into a temporary folder")
    ap.add_argument("--out", default=str(RESULTS / "shards.json"))
    args = ap.parse_args()
    if args.smoke:
        args.images, args.rounds, args.model, args.no_clip_retrieval = 40, 1, "lakelens-tiny", True
        args.out = str(Path(tempfile.mkdtemp(prefix="lakelens-smoke-")) / "shards.json")

    import torch

    from lakelens.models import registry as models

    work = Path(tempfile.mkdtemp(prefix="lakelens-bench-shards-"))
    results = {"what": "lakelens embed over the same 256-px JPEGs as files and as WebDataset shards (1,000 a shard), "
                       "whole commands in fresh processes, alternating rounds, engine onnx-int8; then clip-retrieval "
                       f"inference --input_format webdataset on the shards; random-init {args.model}",
               "machine": describe(), "loadavg_before": loadavg(), "args": vars(args)}
    print(f"[bench] machine: {json.dumps(results['machine'])}", flush=True)
    try:
        paths = make_images(work / "files", args.images, 256, 256)
        shards = write_shards(paths, work / "shards", 1000 if not args.smoke else 16)
        results["bytes"] = {"files": sum(p.stat().st_size for p in paths), "shards": sum(s.stat().st_size for s in shards)}
        ckpt = work / f"{args.model}-random-seed0.pt"
        torch.save(models.load(models.ModelSpec(args.model)).model.state_dict(), ckpt)
        cache = work / "onnx-cache"
        # one warm-up run of each kind (ONNX export and int8 calibration, page cache), not timed
        for source, folder in (() if args.smoke else (("files", work / "files"), ("webdataset", work / "shards"))):
            lakelens_embed(folder, work / f"warm-{source}", ckpt, args.model, cache, source)
        rounds = []
        for r in range(args.rounds):
            order = (("files", work / "files"), ("webdataset", work / "shards"))
            one = {}
            for source, folder in (order if r % 2 == 0 else order[::-1]):
                one[source] = lakelens_embed(folder, work / f"t-{source}-{r}", ckpt, args.model, cache, source)
                print(f"[bench] round {r + 1} {source}: {one[source]['seconds']} s", flush=True)
                assert one[source]["embedded"] == args.images, one[source]
            rounds.append(one)
        results["rounds"] = rounds
        files_s = sum(r["files"]["seconds"] for r in rounds)
        shards_s = sum(r["webdataset"]["seconds"] for r in rounds)
        results["files_over_shards_time"] = round(files_s / shards_s, 3)  # >= 1: shards at least as fast
        results["per_round_files_over_shards"] = [round(r["files"]["seconds"] / r["webdataset"]["seconds"], 3)
                                                  for r in rounds]
        if not args.no_clip_retrieval:
            cr = clip_retrieval_wds(shards, work / "cr", ckpt, args.model, args.images)
            results["clip_retrieval"] = cr
            if "seconds" in cr:
                results["lakelens_shards_over_clip_retrieval_time"] = round(shards_s / len(rounds) / cr["seconds"], 3)
        results["loadavg_after"] = loadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("rounds", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
