"""torch-bf16 on this CPU: the image tower in fp32, in bf16 autocast (the engine's way before), and as a
copy with its weights cast to bf16 once (the engine's way now), in one run (issue #15):

- model only: images/s on the same `--images` held-out probe images in batches of 32 on all cores,
  rounds alternating between the three, the median of `--rounds`;
- per-image cosine to fp32 on those images;
- what the engine's own probe (`engines.time_bf16`, a batch of 8) measured and which precision the
  `torch-bf16` engine chose here.

    .venv/bin/python bench/bf16.py [--model ViT-B-32] [--images 64] [--rounds 5] [--out ...]
    bench/avx2/run --view vnni .venv/bin/python bench/bf16.py --out bench/results/bf16-vnniview.json

Writes bench/results/bf16.json (or --out).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from machine import probe_run  # bench/ is on the path: this script's folder

from lakelens import ModelSpec
from lakelens.models import engines
from lakelens.models import registry as models


def main() -> int:
    args, machine = probe_run("bf16")
    torch.set_num_threads(machine["cores"])
    spec = ModelSpec(args.model)
    loaded = models.load(spec)
    x = torch.from_numpy(engines.probe_images(loaded, args.images, seed=29))
    fp32 = engines.TorchEngine(loaded)
    cast_once = engines.TorchEngine(loaded, dtype=torch.bfloat16, name="torch-bf16")

    def autocast(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return loaded.model.encode_image(torch.as_tensor(batch), normalize=True).float().numpy()

    ways = {"fp32": fp32.encode_image, "bf16 autocast": autocast, "bf16 cast once": cast_once.encode_image}
    vectors = {name: np.concatenate([fn(x[i:i + 32]) for i in range(0, len(x), 32)]) for name, fn in ways.items()}
    rates: dict = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for i in range(0, len(x), 32):
                fn(x[i:i + 32])
            rates[name].append(len(x) / (time.perf_counter() - t0))
        print({k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    ref = vectors["fp32"] / np.linalg.norm(vectors["fp32"], axis=1, keepdims=True)
    out = {"machine": machine, "model": spec.key, "images": len(x), "rounds": args.rounds, "ways": {}}
    for name in ways:
        v = vectors[name] / np.linalg.norm(vectors[name], axis=1, keepdims=True)
        med = float(np.median(rates[name]))
        out["ways"][name] = {"images_per_s": round(med, 2), "rounds_images_per_s": [round(r, 2) for r in rates[name]],
                             "over_fp32": round(med / float(np.median(rates["fp32"])), 3),
                             "min_cosine_to_fp32": round(float(np.min(np.sum(v * ref, 1))), 6)}
    engines.load.cache_clear()
    eng = engines.load(spec, "torch-bf16", "cpu", machine["cores"])
    out["engine"] = {"bf16_native": engines.bf16_supported(), "probe": eng.timing, "precision": eng.precision}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ways"], indent=1), json.dumps(out["engine"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
