"""Issue #15 experiment: a statically quantised image tower (activation scales calibrated on probe
images, QDQ) against the engine's int8 graph (ONNX Runtime's dynamic activation scales, so the engine
runs one image per call, `threads` calls at once, to keep a vector independent of its batch) and fp32,
model only, in one run.

For each graph: images/s on a batch of `--batch` preprocessed images (static and fp32: one call per
batch; dynamic: one call per image, as the engine runs it), and the per-image cosine to fp32 on
held-out images that were not used for calibration; for the static graph also whether a vector
depends on its batch (the same image alone and inside a batch). Weights are 8-bit where the CPU has
VNNI and 7-bit (`reduce_range`) where it does not, read from the flags (the engine's graph: 7-bit).
Writes
bench/results/int8_static.json.

    .venv/bin/python bench/int8_static.py [--model ViT-B-32] [--batch 32]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe  # noqa: E402

from lakelens import ModelSpec  # noqa: E402
from lakelens.models import engines, registry  # noqa: E402
from lakelens.train import synth  # noqa: E402


def held_out(loaded, n: int) -> np.ndarray:
    """Preprocessed shapes images drawn with other seeds than the probes (which calibrate)."""
    pictures = [synth.render(s, 160, seed=10_000 + i) for i, s in enumerate(synth.samples(n, seed=123))]
    return np.stack([np.asarray(loaded.preprocess(p), dtype=np.float32) for p in pictures])


def per_image(session, pool: ThreadPoolExecutor, transform=None):
    """A batch through `session` as the engine runs int8: one image per call, the pool's calls at once. A
    graph that takes 8-bit pixels (the engine's int8 tower) gets the batch's pixels (`transform`)."""
    def run(b):
        ((name, x),) = engines.feed(session, b, transform).items()
        return np.concatenate(list(pool.map(lambda i: session.run(None, {name: x[i:i + 1]})[0], range(len(x)))))

    return run


def cosine_to(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row cosine of `got` to `ref`."""
    return (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)


def round_rates(run: dict, x: np.ndarray, rounds: int) -> dict:
    """images/s of each graph in each round, after one warm-up pass each: rounds alternate between the
    graphs (so a slow spell of the machine hits all of them), one pass over the batch each."""
    for fn in run.values():
        fn(x)  # warm-up
    per_round = {name: [] for name in run}
    for _ in range(rounds):
        for name, fn in run.items():
            t0 = time.perf_counter()
            fn(x)
            per_round[name].append(round(len(x) / (time.perf_counter() - t0), 2))
    return per_round


def rates(run: dict, x: np.ndarray, rounds: int = 7) -> dict:
    """images/s of each graph: the median of round_rates."""
    return {name: round(float(np.median(r)), 2) for name, r in round_rates(run, x, rounds).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    machine = describe()
    print(json.dumps(machine))
    vnni = any(f in machine["flags"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    spec = ModelSpec(args.model)
    loaded = registry.load(spec)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = engines.onnx_graphs(spec, False, tmp)
        dynamic_path = engines.onnx_graphs(spec, True, tmp) / "image.onnx"
        calibration = engines.probe_images(loaded, 48)[16:]  # not the engine's 16 check images

        class Probes(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"image": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

            def get_next(self):
                return next(self.batches, None)

        static_path = Path(tmp) / "image-static.onnx"
        t0 = time.time()
        quantize_static(str(fp32_dir / "image.onnx"), str(static_path), Probes(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=not vnni, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        quantise_s = time.time() - t0
        threads = machine["cores"]
        fp32 = engines._session(fp32_dir / "image.onnx", threads)
        dyn = engines._session(dynamic_path, 1)  # as the engine ran it: one image per call, `threads` calls at once
        pool = ThreadPoolExecutor(threads)
        static = engines._session(static_path, threads)
        static1 = engines._session(static_path, 1)
        x = held_out(loaded, args.batch)
        run = {"fp32": lambda b: fp32.run(None, {"image": b})[0],
               "int8-dynamic (per image)": per_image(dyn, pool, loaded.transform),
               "int8-static (batch)": lambda b: static.run(None, {"image": b})[0],
               # the batch in `threads` slices, each one call on one thread, at once
               "int8-static (slices)": lambda b: np.concatenate(list(pool.map(
                   lambda part: static1.run(None, {"image": part})[0], np.array_split(b, threads))))}
        ref = run["fp32"](x)
        speed = rates(run, x)
        result = {"machine": machine, "model": spec.key, "batch": args.batch, "static_weight_bits": 8 if vnni else 7,
                  "vnni": vnni, "calibration_images": len(calibration), "quantise_seconds": round(quantise_s, 1),
                  "graphs": {}}
        for name, fn in run.items():
            got = fn(x)
            cos = cosine_to(ref, got)
            result["graphs"][name] = {"images_per_s": speed[name], "min_cosine_to_fp32": round(float(cos.min()), 5),
                                      "mean_cosine_to_fp32": round(float(cos.mean()), 5)}
            print(name, result["graphs"][name], flush=True)
        alone = run["int8-static (batch)"](x[:1])[0]
        result["static_batch_independent_max_abs_diff"] = float(np.abs(alone - run["int8-static (batch)"](x)[0]).max())
        base = result["graphs"]["int8-dynamic (per image)"]["images_per_s"]
        result["static_over_dynamic"] = round(result["graphs"]["int8-static (batch)"]["images_per_s"] / base, 2)
        result["static_slices_over_dynamic"] = round(result["graphs"]["int8-static (slices)"]["images_per_s"] / base, 2)
        result["static_over_fp32"] = round(result["graphs"]["int8-static (batch)"]["images_per_s"]
                                           / result["graphs"]["fp32"]["images_per_s"], 2)
    out = ROOT / "bench" / "results" / "int8_static.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
