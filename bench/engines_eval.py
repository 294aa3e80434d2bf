"""Benchmark: does an inference engine change search quality? Text->image Recall@10 of the demo's fine-tuned
model on its held-out images, per engine (torch fp32 as the baseline, onnx, onnx-int8, bf16 with its weights cast once), plus
per-image cosine to torch fp32. Needs a finished demo folder (bench/finetune.py or `lakelens demo`).
Writes bench/results/engines_eval.json.

    .venv/bin/python bench/engines_eval.py [--demo build/bench-shapes]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

from machine import SMOKE_HELP, describe, smoke  # noqa: E402  (bench/ is on the path: this script's folder)

from lakelens.ingest import images  # noqa: E402
from lakelens.models import engines  # noqa: E402
from lakelens.models import registry as models  # noqa: E402
from lakelens.train import metrics as ev  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default=str(ROOT / "build" / "bench-shapes"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engines_eval.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP + "; --demo: bench/finetune.py --smoke's")
    args = ap.parse_args()
    smoke(args)
    demo = Path(args.demo)
    if not (demo / "images.captions.csv").is_file():
        raise SystemExit(f"bench/engines_eval.py: {demo} holds no finished demo (make demo, or bench/finetune.py)")
    captions = pd.read_csv(demo / "images.captions.csv")
    spec = models.ModelSpec("lakelens-tiny", str(demo / "model" / "final.pt"))
    loaded = models.load(spec)
    batch = torch.stack([loaded.preprocess(images.decode(Path(p).read_bytes(), loaded.image_size).image)
                         for p in captions["path"]])
    tokens = loaded.tokenizer(captions["caption"].tolist())
    runs = {"torch": engines.TorchEngine(loaded),
            # forced: where the probe finds fp32 faster (or no native bf16), torch-bf16 would run fp32 instead
            "bf16": engines.TorchEngine(loaded, dtype=torch.bfloat16, name="torch-bf16"),
            "onnx": engines.OnnxEngine(spec, quantized=False, threads=2, cache_dir=str(demo / "onnx-cache")),
            "onnx-int8": engines.OnnxEngine(spec, quantized=True, threads=2, cache_dir=str(demo / "onnx-cache"))}
    out = {"machine": describe(), "demo": str(demo), "model": spec.key, "images": len(captions), "engines": {}}
    ref = None
    for name, eng in runs.items():
        t0 = time.perf_counter()
        img = np.concatenate([eng.encode_image(batch[i:i + 64].numpy()) for i in range(0, len(batch), 64)])
        txt = np.concatenate([eng.encode_text(tokens[i:i + 64].numpy()) for i in range(0, len(tokens), 64)])
        seconds = time.perf_counter() - t0
        ranks = ev.ranks_of_targets(txt @ img.T, np.arange(len(captions)))
        recall = ev.recall_at_k(ranks, (1, 10))
        if ref is None:
            ref = (img, txt)
        cos_img = float(np.min(np.sum(img * ref[0], 1)))
        cos_txt = float(np.min(np.sum(txt * ref[1], 1)))
        out["engines"][name] = {"precision": eng.precision, "t2i_recall@1": recall[1], "t2i_recall@10": recall[10],
                                "min_cosine_images_vs_torch": round(cos_img, 6),
                                "min_cosine_texts_vs_torch": round(cos_txt, 6), "seconds": round(seconds, 2)}
        if eng.precision == "int8":
            out["engines"][name]["weight_bits"] = eng.weight_bits
        print(name, out["engines"][name], flush=True)
    base = out["engines"]["torch"]["t2i_recall@10"]
    for v in out["engines"].values():
        v["recall@10_points_vs_torch"] = round(100 * (v["t2i_recall@10"] - base), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
