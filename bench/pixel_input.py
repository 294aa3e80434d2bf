"""The int8 image tower fed its 8-bit pixels (export format 7, what the engine runs now) against the same
graph fed the normalised float image that it turns back into pixels in front of its patch product (the
form export format 6 had), in one run on one machine (issue #15):

- vectors: the two graphs on the same images, bit for bit;
- model only: one image per call, one thread, one process per core at once (as local[N] runs N tasks),
  on preprocessed images (pixels, or float input);
- worker loop: the Embedder itself on the same JPEG bytes (decode threads beside the model, one image
  per call), one process per core at once: the pixels one as it runs in the job, and the same Embedder
  with its engine switched to the float-input graph and the float transform;
- the per-image preprocessing on one core: resize + crop to pixels, and the float normalisation after it.

    .venv/bin/python bench/pixel_input.py [--images 384] [--rounds 3]

Writes bench/results/pixel_input.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from embed import make_images  # bench/ is on the path: this script's folder
from machine import describe

from lakelens import ModelSpec
from lakelens.ingest import images
from lakelens.models import engines, int8_source

ROOT = Path(__file__).resolve().parents[1]
MODES = ("model, float input", "model, pixels", "worker loop, float input", "worker loop, pixels")


def _worker(mode: str, spec: ModelSpec, cache: str, graphs: dict, files: list[str], repeat: int, out) -> None:
    """One process: time `mode` over `files` and put (images, seconds) on `out`."""
    from lakelens.ingest.embedder import Embedder

    emb = Embedder(spec, batch_size=32, decode_threads=2, engine="onnx-int8", threads=1, onnx_cache=cache)
    if "float" in mode:  # the same engine on the float-input graph, fed the float transform
        eng = emb.engine
        eng._image = engines._session(Path(graphs["float"]), 1)
        eng._input, eng.takes_pixels = "image", False
        emb.transform = eng.transform
    datas = [Path(f).read_bytes() for f in files]
    if mode.startswith("model"):
        x = [emb.transform(images.decode(d, emb.engine.image_size).image) for d in datas]
        emb.embed_tensors(x[:4])
        t0 = time.perf_counter()
        for _ in range(repeat):
            emb.embed_tensors(x)
        out.put((repeat * len(x), time.perf_counter() - t0))
        return
    emb(datas[:4])
    t0 = time.perf_counter()
    n = 0
    for _, results in emb.stream((i, datas[i:i + 32]) for i in range(0, len(datas), 32)):
        n += len(results)
    out.put((n, time.perf_counter() - t0))


def rate(mode: str, spec, cache: str, graphs: dict, files: list[str], procs: int, repeat: int) -> float:
    """Images per second of `procs` processes at once, each over its own share of `files`."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    share = len(files) // procs
    ps = [ctx.Process(target=_worker, args=(mode, spec, cache, graphs, files[k * share:(k + 1) * share], repeat, out))
          for k in range(procs)]
    for p in ps:
        p.start()
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(n / s for n, s in got)


def per_image_ms(fn, items, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best / len(items), 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pixel_input.json"))
    args = ap.parse_args()
    machine = describe()
    print(json.dumps(machine), flush=True)
    procs = machine["cores"]
    spec = ModelSpec(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = engines.onnx_graphs(spec, True, tmp)  # the engine's own export, this CPU's weight bits
        meta = json.loads((folder / "meta.json").read_text())
        t = images.Transform(**meta["transform"])
        graphs = {"pixels": str(folder / "image.onnx"), "float": str(Path(tmp) / "float-input.onnx")}
        int8_source.with_float_input(graphs["pixels"], graphs["float"], t.mean, t.std)
        files = [str(p) for p in make_images(Path(tmp) / "images", args.images, 256, 256)]

        pixels_graph, float_graph = engines._session(Path(graphs["pixels"]), 1), engines._session(Path(graphs["float"]), 1)
        decoded = [images.decode(Path(f).read_bytes(), t.size).image for f in files[:64]]
        a = np.concatenate([pixels_graph.run(None, {"pixels": t.pixels(im)[None]})[0] for im in decoded])
        b = np.concatenate([float_graph.run(None, {"image": t(im)[None]})[0] for im in decoded])
        same = {"images": len(decoded), "identical_vectors": int(sum(np.array_equal(x, y) for x, y in zip(a, b))),
                "max_abs_difference": float(np.abs(a - b).max())}
        print("vectors:", same, flush=True)
        resized = [t.pixels(im) for im in decoded]
        stages = {"pixels (resize, crop, channels first)": per_image_ms(t.pixels, decoded),
                  "float normalisation after it": per_image_ms(t.normalize, resized),
                  "decode (PIL, draft)": per_image_ms(lambda f: images.decode(Path(f).read_bytes(), t.size), files[:64])}
        print("one core, ms per image:", stages, flush=True)

        rounds: dict = {m: [] for m in MODES}
        load_before = [round(v, 2) for v in os.getloadavg()]
        for r in range(args.rounds):  # alternating, so a slow spell of the machine hits every mode
            for mode in MODES:
                rounds[mode].append(round(rate(mode, spec, tmp, graphs, files, procs, repeat=2), 2))
                print(f"round {r + 1} {mode}: {rounds[mode][-1]} images/s", flush=True)
    ratio = {kind: [round(p / f, 3) for p, f in zip(rounds[f"{kind}, pixels"], rounds[f"{kind}, float input"])]
             for kind in ("model", "worker loop")}
    result = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "), "machine": machine, "model": spec.key,
        "weight_bits": meta["weight_bits"], "processes": procs, "images": args.images, "vectors": same,
        "one_core_ms_per_image": stages, "images_per_s_rounds": rounds,
        "images_per_s_median": {m: float(np.median(v)) for m, v in rounds.items()},
        "pixels_over_float_per_round": ratio,
        "worker_loop_over_model_only_median": {
            kind: round(float(np.median(rounds[f"worker loop, {kind}"])) / float(np.median(rounds[f"model, {kind}"])), 3)
            for kind in ("float input", "pixels")},
        "loadavg": [load_before, [round(v, 2) for v in os.getloadavg()]],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
