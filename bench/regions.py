"""Regions (embed.regions): does a crop's own vector find an object that is a small part of an image?
Recall@K of text queries with and without region entries, and the embed cost of regions, in one run.

Scenes: 2x2 mosaics of four generated shape images (lakelens.train.synth, held-out seed), so each object
fills a quarter of its scene, as several objects share a photo. Each scene's query is the caption of one
of its four tiles (chosen by a seeded draw); the scene is the target. The model is lakelens-tiny
fine-tuned on single shapes (the demo's checkpoint with --checkpoint, else trained here on the demo's
recipe). Scenes are embedded by the Embedder the embed job runs (engine torch), once with regions off
and once with region_grid 2 (the grid's cells and the centre); search is exact, an image's score the
best of its entries, as the Searcher ranks them (a region hit is its image). The embed cost per image
with and without regions is the best of interleaved rounds (torch, all cores). Writes bench/results/regions.json.

    .venv/bin/python bench/regions.py [--scenes 400] [--checkpoint build/demo/model/final.pt]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import SMOKE_HELP, SMOKE_PAIRS, describe, smoke  # noqa: E402

from lakelens import Embedder, ModelSpec, config  # noqa: E402
from lakelens.train import synth  # noqa: E402
from lakelens.train.eval_run import read_captions  # noqa: E402
from lakelens.train.finetune import finetune  # noqa: E402

KS = (1, 5, 10)
ENGINE = "torch"
TILE = 96


def scenes(n: int, seed: int) -> tuple[list[bytes], list[list[str]]]:
    """n PNG mosaics of 2x2 tiles, and each one's four tile captions (row by row)."""
    tiles = synth.samples(4 * n, seed)
    out, captions = [], []
    for i in range(n):
        canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
        for j in range(4):
            s = tiles[4 * i + j]
            canvas.paste(synth.render(s, TILE, seed=seed * 1_000_003 + 4 * i + j), ((j % 2) * TILE, (j // 2) * TILE))
        buf = io.BytesIO()
        canvas.save(buf, "PNG")
        out.append(buf.getvalue())
        captions.append([tiles[4 * i + j].caption for j in range(4)])
    return out, captions


def ranks_of(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each query's target among the images (scores: queries x images)."""
    return 1 + np.sum(scores > scores[np.arange(len(targets)), targets][:, None], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--checkpoint", default=str(ROOT / "build" / "demo" / "model" / "final.pt"))
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--timing-scenes", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "regions.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # no checkpoint: the demo's recipe trains one here, at the smoke's size
    smoke(args, scenes=8, checkpoint="", train=SMOKE_PAIRS, epochs=1, timing_scenes=8, rounds=1)
    shown = {k: (str(Path(v).relative_to(ROOT)) if isinstance(v, str) and v.startswith(str(ROOT)) else v)
             for k, v in vars(args).items()}  # paths in the repo, as the repo names them
    result = {"machine": describe(), "settings": shown}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if not Path(checkpoint).is_file():  # the demo's recipe: fine-tune on single shapes
            pairs = synth.write_dataset(Path(tmp) / "train", args.train, seed=1)
            conf = config.load(ROOT / "conf" / "local.yaml", [f"finetune.out={Path(tmp) / 'model'}",
                                                              f"finetune.epochs={args.epochs}"])
            checkpoint = finetune(read_captions(str(pairs)), ModelSpec("lakelens-tiny"), conf.finetune).final_checkpoint
        result["checkpoint"] = shown["checkpoint"] if checkpoint == args.checkpoint else "trained here (demo recipe)"
        spec = ModelSpec.from_config(config.ModelConfig("lakelens-tiny", checkpoint))
        data, captions = scenes(args.scenes, seed=7)
        rng = random.Random(0)
        pick = [rng.randrange(4) for _ in data]
        queries = [c[j] for c, j in zip(captions, pick)]

        plain, regional = Embedder(spec, engine=ENGINE), Embedder(spec, engine=ENGINE, region_grid=2)
        done = {"whole": plain(data), "regions": regional(data)}
        # cost: the best of interleaved rounds over a subset (other work on the machine moves single timings)
        timed = {"whole": [], "regions": []}
        subset = data[:args.timing_scenes]
        for _ in range(args.rounds):
            for name, emb in (("whole", plain), ("regions", regional)):
                t0 = time.perf_counter()
                for i in range(0, len(subset), 32):
                    emb(subset[i:i + 32])
                timed[name].append(time.perf_counter() - t0)
        whole = np.stack([r.embedding for r in done["whole"]])
        crops = np.stack([np.stack([v for _, v in r.regions]) for r in done["regions"]])  # scenes x 5 x dim
        text = plain.embed_texts(queries)
        targets = np.arange(len(data))

        s_whole = text @ whole.T
        s_regions = np.maximum(s_whole, np.einsum("qd,ird->qir", text, crops).max(axis=2))
        out = {}
        for name, scores in (("whole image only", s_whole), ("whole image + regions", s_regions)):
            r = ranks_of(scores, targets)
            out[name] = {f"recall@{k}": round(float(np.mean(r <= k)), 4) for k in KS}
        # which entry won for each query's target: its own tile's cell is the right answer
        cell = np.einsum("qd,qrd->qr", text, crops[targets]).argmax(axis=1)
        out["target's best region is the query's tile"] = round(float(np.mean(cell == np.asarray(pick))), 4)
        result["recall"] = out
        per_image = {k: round(1000 * min(v) / len(subset), 2) for k, v in timed.items()}
        result["embed_ms_per_image"] = per_image
        result["embed_cost_ratio_regions_over_whole"] = round(per_image["regions"] / per_image["whole"], 2)
        result["entries_per_image"] = 1 + crops.shape[1]
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
