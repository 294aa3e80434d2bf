"""Issue #15: the int8 image tower in each int8 runtime at hand, against the bound from this machine's
measured int8 product rate, in one run on one machine: is the engine's distance from the bound its own,
or every runtime's?

- onnxruntime: the engine itself (`OnnxEngine`, the graph the job runs: static activation scales, batches
  of INT8_BATCH, one thread per call and a call per core at once), fed 8-bit pixels as the job feeds it;
- openvino + nncf: the engine's fp32 ONNX graph quantised by NNCF (its transformer preset, static
  activation scales calibrated on the same calibration probe images as the engine's), on OpenVINO's CPU
  plugin (oneDNN; AMX where the CPU has it), its non-int8 work in f32 and in the plugin's default (bf16
  where the CPU has native bf16), one single-thread stream per core;
- torch pt2e + inductor: the image tower exported, quantised by torchao's X86InductorQuantizer (static
  int8), compiled by Inductor with freezing (oneDNN int8 products with their elementwise work fused).

Each gets the same held-out probe images, all at once, and runs them in batches of INT8_BATCH; the other runtimes take the float
model input (their normalisation is outside the timing). Per runtime: images/s (median of rounds that
alternate between runtimes, so a slow spell of the machine hits all), the fraction of the bound
(the faster of torch's and ONNX Runtime's int8 product rate / the model's GOP per image,
bench/embed.py's compute_bounds), the per-image cosine to the fp32 graph, and whether an image's vector
depends on its batch. And ONNX Runtime's operator profile of the engine's graph (one thread, a batch a call):
where its time goes, by operator kind.

OpenVINO, NNCF and torchao are not the project's dependencies; install them beside it for this benchmark
(build/bench-runtimes, put at the end of the path so the project's own packages win):

    .venv/bin/pip install --target build/bench-runtimes -r bench/requirements-runtimes.txt
    .venv/bin/python bench/int8_runtimes.py [--model ViT-B-32] [--images 64] [--rounds 5] [--out ...]
    bench/avx2/run --view vnni .venv/bin/python bench/int8_runtimes.py --out bench/results/int8_runtimes-vnniview.json

A runtime that is not installed is recorded as such. Writes bench/results/int8_runtimes.json (or --out).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "build" / "bench-runtimes"))  # last: never shadows the project's packages

from embed import compute_bounds  # noqa: E402  (bench/ is on the path: this script's folder)
from machine import probe_run  # noqa: E402

from lakelens import ModelSpec  # noqa: E402
from lakelens.models import engines  # noqa: E402
from lakelens.models import registry as models  # noqa: E402


def openvino_runners(fp32_graph: Path, calibration: np.ndarray, threads: int) -> dict:
    """name -> fn(float batch) -> vectors, for OpenVINO on NNCF's int8 graph (f32 and default precision, a
    stream per core); {name: the reason} where not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        return {"openvino + nncf": f"not installed ({e})"}
    core = ov.Core()
    t0 = time.perf_counter()
    quantised = nncf.quantize(core.read_model(str(fp32_graph)),
                              nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    print(f"nncf quantise: {time.perf_counter() - t0:.1f} s", flush=True)
    out = {}
    # the plugin's default is bf16 where the CPU has it, else f32 (which the first model already is)
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for precision in ("f32", "default") if bf16 else ("f32",):
        hint = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": "f32"}
        # one stream of one thread per core, a request per stream (OpenVINO's throughput arrangement: the
        # engine's too); one request over all cores ran at 0.85x this here
        model = core.compile_model(quantised, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": threads,
                                                      "PERFORMANCE_HINT": "THROUGHPUT", **hint})
        requests = [model.create_infer_request() for _ in range(threads)]
        shown = str(model.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: ", "").strip(">'\"")

        def parallel(x, requests=requests, per=engines.INT8_BATCH):
            outs = []
            for i in range(0, len(x), per * len(requests)):
                started = []
                for j, request in enumerate(requests):
                    part = x[i + j * per:i + (j + 1) * per]
                    if len(part):
                        request.start_async({0: part})
                        started.append(request)
                for request in started:
                    request.wait()
                    outs.append(request.get_output_tensor(0).data.copy())
            return np.concatenate(outs)

        out[f"openvino nncf int8, rest {shown}, {threads} streams x 1 thread"] = parallel
    return out


def torch_runner(loaded, calibration: np.ndarray, threads: int) -> dict:
    """torchao's PT2E static int8 with Inductor (freezing on); {name: the reason} where not installed."""
    try:
        import torch
        import torch._inductor.config as inductor
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        return {"torch pt2e + inductor": f"not installed ({e})"}
    torch.set_num_threads(threads)
    inductor.freezing = True
    tower = loaded.model.visual.eval()
    batch = torch.from_numpy(calibration[:engines.INT8_BATCH])
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(  # batch dynamic: one image alone runs the same graph
            tower, (batch,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for i in range(0, len(calibration) - engines.INT8_BATCH + 1, engines.INT8_BATCH):
            prepared(torch.from_numpy(calibration[i:i + engines.INT8_BATCH]))
        compiled = torch.compile(convert_pt2e(prepared))
        compiled(batch)
    print(f"torch pt2e quantise + compile: {time.perf_counter() - t0:.1f} s", flush=True)

    def run(x, per=engines.INT8_BATCH):
        with torch.no_grad():
            return np.concatenate([compiled(torch.from_numpy(np.ascontiguousarray(x[i:i + per]))).numpy()
                                   for i in range(0, len(x), per)])

    return {f"torch pt2e int8 + inductor, {threads} threads": run}


def operator_profile(graph: Path, pixels: np.ndarray, per: int, calls: int = 8) -> dict:
    """ONNX Runtime's own profile of the engine's int8 graph (one thread, `per` images a call, as the engine
    runs each call): milliseconds per image by operator kind, and each kind's share."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = f"{tmp}/ort"
        session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        feed = engines.feed(session, pixels[:per], None)
        for _ in range(calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    micros, count = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            micros[op] = micros.get(op, 0) + e["dur"]
            count[op] = count.get(op, 0) + 1
    total = sum(micros.values())
    return {op: {"ms_per_image": round(us / calls / per / 1000, 3), "share": round(us / total, 3),
                 "nodes": count[op] // calls} for op, us in sorted(micros.items(), key=lambda kv: -kv[1])}


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main() -> int:
    args, machine = probe_run("int8_runtimes")
    bounds = compute_bounds(args.model)
    bound = bounds["matmul_int8_gops"] / bounds["gflop_per_image"]
    spec = ModelSpec(args.model)
    loaded = models.load(spec)
    threads = machine["cores"]
    per = engines.INT8_BATCH
    x = engines.probe_images(loaded, args.images, seed=23)  # neither the check's nor the calibration's
    calibration = engines.probe_images(loaded, engines.CALIBRATION_IMAGES, seed=11)  # the engine's own
    result = {"machine": machine, "compute": bounds, "model": spec.key, "images": args.images, "rounds": args.rounds,
              "images_per_call": per, "bound_images_per_s": round(bound, 2), "runtimes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = engines.OnnxEngine(spec, quantized=False, threads=threads, cache_dir=tmp)
        ref = unit(fp32.encode_image(x))
        engine = engines.OnnxEngine(spec, quantized=True, threads=threads, cache_dir=tmp)
        pixels = loaded.transform.to_pixels(x)
        profile = operator_profile(engine.folder / "image.onnx", pixels, per)
        runners = {f"onnxruntime (the engine), {threads} calls x 1 thread": (engine.encode_image, pixels)}
        fp32_graph = engines.onnx_graphs(spec, cache_dir=tmp) / "image.onnx"
        for name, fn in {**openvino_runners(fp32_graph, calibration, threads),
                         **torch_runner(loaded, calibration, threads)}.items():
            if isinstance(fn, str):
                result["runtimes"][name] = {"skipped": fn}
                print(name, fn, flush=True)
            else:
                runners[name] = (fn, x)
        for name, (fn, inputs) in runners.items():
            got = unit(fn(inputs))  # each runner takes all the images and makes its own batches of `per`
            alone = unit(np.concatenate([fn(inputs[i:i + 1]) for i in range(per)]))
            cos = (ref * got).sum(1)
            result["runtimes"][name] = {"min_cosine_to_fp32": round(float(cos.min()), 6),
                                        "mean_cosine_to_fp32": round(float(cos.mean()), 6),
                                        "alone_vs_batch_max_abs_diff": float(np.abs(alone - got[:per]).max()),
                                        "passes_images_per_s": []}
        for _ in range(args.rounds):  # alternating: a slow spell of the machine hits every runtime
            for name, (fn, inputs) in runners.items():
                t0 = time.perf_counter()
                fn(inputs)
                result["runtimes"][name]["passes_images_per_s"].append(
                    round(len(inputs) / (time.perf_counter() - t0), 2))
    for name, r in result["runtimes"].items():
        if "passes_images_per_s" in r:
            r["images_per_s"] = round(float(np.median(r["passes_images_per_s"])), 2)
            r["fraction_of_bound"] = round(r["images_per_s"] / bound, 3)
        print(name, {k: v for k, v in r.items() if k != "passes_images_per_s"}, flush=True)
    result["onnxruntime_operator_profile"] = profile
    for op, row in list(profile.items())[:8]:
        print(f"  {op:24s} {row}")
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
