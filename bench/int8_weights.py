"""Issue #15 experiment: the engine's int8 image tower with 7-bit weights (`reduce_range`, safe without
VNNI) against 8-bit weights (what the engine now exports where the CPU has VNNI), fp32 beside them,
model only, in one run.

Each int8 graph runs as the engine runs it: one image per call (activation scales are per call),
`threads` single-thread calls at once; fp32 runs the batch as one call on `threads` threads. Timing:
rounds alternate between the graphs (a slow spell of this shared machine hits all of them), one pass
over a batch of `--batch` held-out images each; the median round per graph, and every round's rate.
Accuracy: the per-image cosine to fp32 over `--images` held-out images (not the engine's probe images).
Writes bench/results/int8_weights.json.

    .venv/bin/python bench/int8_weights.py [--model ViT-B-32] [--batch 32] [--images 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from int8_static import cosine_to, held_out, per_image, round_rates  # noqa: E402
from machine import describe  # noqa: E402

from lakelens import ModelSpec  # noqa: E402
from lakelens.models import engines, registry  # noqa: E402


def weight_range(path: Path) -> dict:
    """The largest |value| among the graph's int8 weight initialisers, and how many weights exceed 64
    (the 7-bit bound): the bits the graph really holds."""
    import onnx
    from onnx import numpy_helper

    top, beyond, total = 0, 0, 0
    for init in onnx.load(str(path)).graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            w = np.abs(numpy_helper.to_array(init).astype(np.int16))
            top, beyond, total = max(top, int(w.max())), beyond + int((w > 64).sum()), total + w.size
    return {"max_abs": top, "share_beyond_64": round(beyond / max(total, 1), 4), "weights": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    machine = describe()
    print(json.dumps(machine), flush=True)
    spec = ModelSpec(args.model)
    loaded = registry.load(spec)
    threads = machine["cores"]
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = engines.onnx_graphs(spec, False, tmp)
        graphs, checks = {}, {}
        for bits in (7, 8):
            t0 = time.perf_counter()
            folder = engines.onnx_graphs(spec, True, tmp, weight_bits=bits)
            checks[bits] = {**json.loads((folder / "meta.json").read_text()),
                            "export_and_check_s": round(time.perf_counter() - t0, 1),
                            "weight_range": weight_range(folder / "image.onnx")}
            graphs[bits] = engines._session(folder / "image.onnx", 1)
        fp32 = engines._session(fp32_dir / "image.onnx", threads)
        pool = ThreadPoolExecutor(threads)

        run = {"int8, 7-bit weights": per_image(graphs[7], pool, loaded.transform),
               "int8, 8-bit weights": per_image(graphs[8], pool, loaded.transform),
               "fp32": lambda b: fp32.run(None, {"image": b})[0]}
        x = held_out(loaded, max(args.images, args.batch))
        ref = run["fp32"](x)
        result = {"machine": machine, "model": spec.key, "batch": args.batch, "threads": threads,
                  "accuracy_images": len(x), "rounds": args.rounds,
                  "engine_choice_here": dict(zip(("weight_bits", "why"), engines.machine_int8_weight_bits())),
                  "graphs": {}}
        accuracy = {}
        for name, fn in run.items():
            got = fn(x)
            cos = cosine_to(ref, got)
            accuracy[name] = {"min_cosine_to_fp32": round(float(cos.min()), 5),
                              "mean_cosine_to_fp32": round(float(cos.mean()), 5)}
        load_before = [round(v, 2) for v in os.getloadavg()]
        per_round = round_rates(run, x[:args.batch], args.rounds)
        result["loadavg_before_timing"] = load_before
        result["loadavg_after_timing"] = [round(v, 2) for v in os.getloadavg()]
        for bits, name in ((7, "int8, 7-bit weights"), (8, "int8, 8-bit weights"), (None, "fp32")):
            entry = {"images_per_s": round(float(np.median(per_round[name])), 2),
                     "images_per_s_rounds": per_round[name], **accuracy[name]}
            if bits:
                c = checks[bits]
                entry.update(probe_min_cosine=c["probe_min_cosine"], probe_accepted=c["accepted"],
                             export_and_check_s=c["export_and_check_s"], weight_range=c["weight_range"])
            result["graphs"][name] = entry
            print(name, {k: v for k, v in entry.items() if k != "images_per_s_rounds"}, flush=True)
        # the ratio of each round's two int8 rates, so a round's load cancels out of it
        ratios = [b / a for a, b in zip(per_round["int8, 7-bit weights"], per_round["int8, 8-bit weights"])]
        result["w8_over_w7_median_of_round_ratios"] = round(float(np.median(ratios)), 3)
        result["w8_over_w7_round_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    out = ROOT / "bench" / "results" / "int8_weights.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "graphs")}, indent=1))


if __name__ == "__main__":
    main()
