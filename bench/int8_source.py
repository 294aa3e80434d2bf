"""Issue #15: the int8 image tower's source graph. Three quantisations of the same model, model only, in one
run: the fp32 graph as exported (dynamic batch), that graph with its batch fixed at 1, and the engine's
export (models.int8_source: the patch embedding as an int8 product over the image's 8-bit pixels,
self-attention as ONNX Runtime's fused Attention, quantised to QAttention; since export format 8 also
static activation scales and a dynamic batch); fp32 beside them;
and the engine's int8 rate against the int8 bound from the measured int8 matmul rate.

All int8 graphs are quantised by the engine's options and weight bits for this CPU; each runs one image per
call, `cores` single-thread calls at once (as the engine ran int8 up to export format 7; the engine's
batches of 8 are bench/int8_batch.py's subject). Rounds alternate between the graphs (a slow
spell of a shared machine hits all of them); the median round per graph and the median of the per-round
ratio to the engine's graph. Cosine to fp32 over `--images` held-out images; ONNX Runtime's per-operator
profile of one image (one thread) per int8 graph. Writes bench/results/int8_source.json.

    .venv/bin/python bench/int8_source.py [--model ViT-B-32] [--batch 32] [--images 64] [--rounds 15]
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


def op_profile(path: Path, image: np.ndarray, transform, runs: int = 20) -> dict:
    """Milliseconds per image by operator type: ONNX Runtime's profiler over `runs` one-image calls, one thread."""
    import collections

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = engines.feed(session, image, transform)  # 8-bit pixels for a graph that takes them
    for _ in range(runs):
        session.run(None, inputs)
    per_op: collections.Counter = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / runs / 1000, 3) for op, us in per_op.most_common()}


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
    engine_graph = "int8, engine's export (pixel-int8 patch product, fused attention)"
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = engines.onnx_graphs(spec, False, tmp)
        engine_dir = engines.onnx_graphs(spec, True, tmp)
        graphs = {"int8, dynamic batch (export format 2)": Path(tmp) / "dynamic-int8.onnx",
                  "int8, batch fixed at 1 (export format 3)": Path(tmp) / "static-int8.onnx"}
        static_fp32 = Path(tmp) / "static-fp32.onnx"
        import onnx

        graph = onnx.load(str(fp32_dir / "image.onnx"))
        for value in (*graph.graph.input, *graph.graph.output):
            value.type.tensor_type.shape.dim[0].ClearField("dim_param")
            value.type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(graph, str(static_fp32))
        for source, (name, target) in zip((fp32_dir / "image.onnx", static_fp32), graphs.items()):
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             per_channel=engines.INT8_OPTIONS["per_channel"], reduce_range=bits == 7,
                             op_types_to_quantize=["MatMul", "Gemm"])  # the earlier exports' options
        graphs[engine_graph] = engine_dir / "image.onnx"
        pool = ThreadPoolExecutor(threads)
        sessions = {name: engines._session(path, 1) for name, path in graphs.items()}
        fp32 = engines._session(fp32_dir / "image.onnx", threads)
        run = {name: per_image(s, pool, loaded.transform) for name, s in sessions.items()}
        run["fp32"] = lambda b: fp32.run(None, {"image": b})[0]
        x = held_out(loaded, max(args.images, args.batch))
        ref = run["fp32"](x)
        meta = json.loads((engine_dir / "meta.json").read_text())
        result = {"machine": machine, "model": spec.key, "weight_bits": bits, "weight_bits_why": why,
                  "engine_rewrites": meta["rewrites"], "engine_probe_min_cosine": meta["probe_min_cosine"],
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
            if name != "fp32":
                if int8_bound:
                    entry["share_of_int8_bound"] = round(rate / int8_bound, 3)
                ratios = [a / b for a, b in zip(per_round[engine_graph], per_round[name])]
                entry["engine_over_this_median_round_ratio"] = round(float(np.median(ratios)), 3)
                entry["engine_over_this_round_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
                entry["ms_per_image_by_operator_1_thread"] = op_profile(graphs[name], x[:1], loaded.transform)
            result["graphs"][name] = entry
            print(name, {k: v for k, v in entry.items() if k not in ("images_per_s_rounds",)}, flush=True)
        result["int8_bound_images_per_s"] = round(int8_bound, 2) if int8_bound else None
    out = ROOT / "bench" / "results" / "int8_source.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "graphs")}, indent=1))


if __name__ == "__main__":
    main()
