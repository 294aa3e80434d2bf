"""The int8 image tower with static activation scales, run INT8_BATCH images per call (export format 8,
what the engine runs now), against the same graph with its scales computed per call, run one image per
call (export format 7's way), in one run on one machine (issue #15):

- model only: the engine itself (`OnnxEngine`, one thread per call, a call per core at once) on the same
  preprocessed 8-bit pixels of `--images` held-out probe images, rounds alternating between the two;
- per-image cosine to the fp32 graph on those images, and whether a vector depends on its batch (each
  image alone against inside the batch).

Both graphs come from the engine's own export: the static one as it is published; the dynamic one is
what the engine publishes when static scales fail their probe check, obtained here by calibrating with
ranges narrowed to nothing (CALIBRATION_MARGIN = 0), which always fails it.

    .venv/bin/python bench/int8_batch.py [--model ViT-B-32] [--images 64] [--rounds 5] [--out ...]
    bench/avx2/run --view vnni .venv/bin/python bench/int8_batch.py --out bench/results/int8_batch-vnniview.json

Writes bench/results/int8_batch.json (or --out).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import probe_run  # bench/ is on the path: this script's folder

from lakelens import ModelSpec
from lakelens.models import engines
from lakelens.models import registry as models


def main() -> int:
    args, machine = probe_run("int8_batch")
    spec = ModelSpec(args.model)
    loaded = models.load(spec)
    threads = machine["cores"]
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for name, margin in (("static, batches", engines.CALIBRATION_MARGIN), ("dynamic, one image per call", 0.0)):
            engines.CALIBRATION_MARGIN = margin
            t0 = time.perf_counter()
            engine = engines.OnnxEngine(spec, quantized=True, threads=threads, cache_dir=f"{tmp}/{len(built)}")
            meta = json.loads((engine.folder / "meta.json").read_text())
            built[name] = (engine, meta, round(time.perf_counter() - t0, 1))
        fp32 = engines.OnnxEngine(spec, quantized=False, threads=threads, cache_dir=f"{tmp}/0")
        x = engines.probe_images(loaded, args.images, seed=23)  # neither the check's nor the calibration's
        pixels = loaded.transform.to_pixels(x)
        ref = fp32.encode_image(x)
        result = {"machine": machine, "model": spec.key, "images": args.images, "threads": threads,
                  "rounds": args.rounds, "graphs": {}}
        for name, (engine, meta, seconds) in built.items():
            got = engine.encode_image(pixels)
            alone = np.concatenate([engine.encode_image(pixels[i:i + 1]) for i in range(len(pixels))])
            cos = (ref * got).sum(1)
            result["graphs"][name] = {
                "activation_scales": meta["activation_scales"], "images_per_call": engine.per_call,
                "weight_bits": engine.weight_bits, "export_and_check_s": seconds,
                "probe_min_cosine": meta["probe_min_cosine"], "min_cosine_to_fp32": round(float(cos.min()), 6),
                "mean_cosine_to_fp32": round(float(cos.mean()), 6),
                "alone_vs_batch_max_abs_diff": float(np.abs(alone - got).max()), "passes_images_per_s": []}
        for _ in range(args.rounds):  # alternating: a slow spell of the machine hits both
            for name, (engine, _, _) in built.items():
                t0 = time.perf_counter()
                engine.encode_image(pixels)
                result["graphs"][name]["passes_images_per_s"].append(round(len(pixels) / (time.perf_counter() - t0), 2))
        for name, graph in result["graphs"].items():
            graph["images_per_s"] = round(float(np.median(graph["passes_images_per_s"])), 2)
            print(name, {k: v for k, v in graph.items() if k != "passes_images_per_s"}, flush=True)
        static, dynamic = (result["graphs"][n]["images_per_s"] for n in built)
        result["static_over_dynamic"] = round(static / dynamic, 3)
        result["per_round_static_over_dynamic"] = [
            round(a / b, 3) for a, b in zip(*(result["graphs"][n]["passes_images_per_s"] for n in built))]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "graphs")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
