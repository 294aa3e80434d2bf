"""Issue #15: the int8 image tower with its batch fixed at 1 (what the engine now exports: it runs int8 one
image per call) against the same quantisation of the dynamic-batch graph (the previous export), fp32 beside
them, model only, in one run; and the engine's int8 rate against the int8 bound from the measured int8
matmul rate.

Both int8 graphs are quantised by the engine's options and weight bits for this CPU; each runs as the engine
runs it: one image per call, `cores` single-thread calls at once. Rounds alternate between the graphs (a slow
spell of a shared machine hits all of them); the median round per graph and the median of the per-round
ratio. Cosine to fp32 over `--images` held-out images. Writes bench/results/int8_static_batch.json.

    .venv/bin/python bench/int8_static_batch.py [--model ViT-B-32] [--batch 32] [--images 64] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from embed import compute_bounds  # noqa: E402
from int8_static import cosine_to, held_out, per_image, round_rates  # noqa: E402
from machine import describe  # noqa: E402

from lakelens import ModelSpec  # noqa: E402
from lakelens.models import engines, registry  # noqa: E402


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    machine = describe()
    print(json.dumps(machine), flush=True)
    spec = ModelSpec(args.model)
    loaded = registry.load(spec)
    bounds = compute_bounds(args.model)
    threads = machine["cores"]
    bits, why = engines.machine_int8_weight_bits()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = engines.onnx_graphs(spec, False, tmp)
        static_dir = engines.onnx_graphs(spec, True, tmp)  # the engine's export: batch fixed at 1
        dynamic = Path(tmp) / "dynamic-int8.onnx"  # the previous export: the fp32 graph's dynamic batch
        quantize_dynamic(str(fp32_dir / "image.onnx"), str(dynamic), weight_type=QuantType.QInt8,
                         per_channel=engines.INT8_OPTIONS["per_channel"], reduce_range=bits == 7,
                         op_types_to_quantize=engines.INT8_OPTIONS["op_types"])
        pool = ThreadPoolExecutor(threads)
        sessions = {"int8, dynamic batch (previous export)": engines._session(dynamic, 1),
                    "int8, batch fixed at 1 (engine's export)": engines._session(static_dir / "image.onnx", 1)}
        fp32 = engines._session(fp32_dir / "image.onnx", threads)
        run = {name: per_image(s, pool) for name, s in sessions.items()}
        run["fp32"] = lambda b: fp32.run(None, {"image": b})[0]
        x = held_out(loaded, max(args.images, args.batch))
        ref = run["fp32"](x)
        result = {"machine": machine, "model": spec.key, "weight_bits": bits, "weight_bits_why": why,
                  "batch": args.batch, "threads": threads, "rounds": args.rounds, "compute": bounds, "graphs": {}}
        load_before = [round(v, 2) for v in os.getloadavg()]
        per_round = round_rates(run, x[:args.batch], args.rounds)
        result["loadavg"] = [load_before, [round(v, 2) for v in os.getloadavg()]]
        int8_bound = bounds["matmul_int8_gops"] / bounds["gflop_per_image"] if bounds.get("matmul_int8_gops") else None
        for name, fn in run.items():
            got = fn(x)
            cos = cosine_to(ref, got)
            rate = float(np.median(per_round[name]))
            entry = {"images_per_s": round(rate, 2), "images_per_s_rounds": per_round[name],
                     "min_cosine_to_fp32": round(float(cos.min()), 6)}
            if name != "fp32" and int8_bound:
                entry["share_of_int8_bound"] = round(rate / int8_bound, 3)
            result["graphs"][name] = entry
            print(name, {k: v for k, v in entry.items() if k != "images_per_s_rounds"}, flush=True)
        a, b = (per_round[n] for n in sessions)
        ratios = [y / x_ for x_, y in zip(a, b)]
        result["int8_bound_images_per_s"] = round(int8_bound, 2) if int8_bound else None
        result["static_over_dynamic_median_of_round_ratios"] = round(float(np.median(ratios)), 3)
        result["static_over_dynamic_round_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    out = ROOT / "bench" / "results" / "int8_static_batch.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "graphs")}, indent=1))


if __name__ == "__main__":
    main()
