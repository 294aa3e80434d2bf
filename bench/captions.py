"""Benchmark: captions of the tiny CoCa fine-tuned on generated shapes, against the same model at random init.

Fine-tunes lakelens-tiny-coca (`lakelens.train.finetune`, CoCaLoss) on captioned shapes from
`lakelens.train.synth`, then captions held-out images with `lakelens.tags.captions.Captioner` and reports
(a) word accuracy: the fraction of held-out images whose caption holds the right colour word, the right
shape word, and both, for the fine-tuned and the random-init model (and what always naming the most common
colour / shape would score); (b) captioning speed, ms/image and images/s (decode + preprocess + generate +
score), batch 16, greedy and beam search, with 1 and with 2 torch threads; and the machine (bench/machine.py).
Writes bench/results/captions.json.

    .venv/bin/python bench/captions.py [--train 2000 --epochs 4 --batch-size 16 --lr 2e-3 --held-out 300]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from machine import SMOKE_HELP, SMOKE_PAIRS, describe, smoke  # noqa: E402

from lakelens.config import FinetuneConfig  # noqa: E402
from lakelens.ingest.embedder import prepare  # noqa: E402
from lakelens.models.registry import ModelSpec  # noqa: E402
from lakelens.tags.captions import DEFAULT_MAX_TOKENS, Captioner  # noqa: E402
from lakelens.train import synth  # noqa: E402
from lakelens.train.finetune import finetune  # noqa: E402

MODEL = "lakelens-tiny-coca"


def word_accuracy(captions: list[str], labels: list[str]) -> dict:
    """Fraction of images whose caption holds the right colour word, the right shape word, and both."""
    colour = shape = both = 0
    for text, label in zip(captions, labels):
        words = set((text or "").lower().split())
        right_colour, right_shape = label.split()
        colour += right_colour in words
        shape += right_shape in words
        both += right_colour in words and right_shape in words
    n = max(1, len(labels))
    return {"colour": round(colour / n, 4), "shape": round(shape / n, 4), "both": round(both / n, 4)}


def true_caption_score(spec: ModelSpec, contents: list[bytes], captions: list[str]) -> float:
    """Mean cosine of each image and its true caption: what the generated captions' scores compare with."""
    loaded = Captioner(spec).loaded
    with torch.inference_mode():
        x = torch.stack([prepare(loaded.preprocess, loaded.image_size, c)[0] for c in contents])
        img = loaded.model.encode_image(x, normalize=True)
        txt = loaded.model.encode_text(loaded.tokenizer(captions), normalize=True)
    return round(float((img * txt).sum(-1).mean()), 4)


def speed(spec: ModelSpec, contents: list[bytes], threads: int, beams: int, max_tokens: int, batch: int = 16) -> dict:
    """ms/image and images/s of one pass over `contents` after a warm-up batch."""
    captioner = Captioner(spec, beams=beams, batch_size=batch, threads=threads, max_tokens=max_tokens)
    captioner(contents[:batch])
    t0 = time.perf_counter()
    for start in range(0, len(contents), batch):
        captioner(contents[start:start + batch])
    seconds = time.perf_counter() - t0
    return {"threads": threads, "beams": beams, "batch": batch, "images": len(contents),
            "ms_per_image": round(1000 * seconds / len(contents), 2), "images_per_s": round(len(contents) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=2000, help="generated training pairs")
    ap.add_argument("--held-out", type=int, default=300, help="held-out images captioned for word accuracy")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--speed-images", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="caption.max_tokens")
    ap.add_argument("--work", default=str(ROOT / "build" / "bench-captions"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "captions.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # captions of at most 6 tokens: a barely trained model never ends one, so each runs to the limit
    smoke(args, train=SMOKE_PAIRS, batch_size=60, held_out=4, epochs=1, speed_images=4, max_tokens=6)
    work = Path(args.work)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe(), "model": MODEL,
               "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")}}
    torch.set_num_threads(os.cpu_count() or 1)

    pairs = pd.read_csv(synth.write_dataset(work / "train", args.train, seed=11, px=64))
    held = pd.read_csv(synth.write_dataset(work / "held_out", args.held_out, seed=12, px=64))
    contents = [Path(p).read_bytes() for p in held["path"]]
    labels = held["label"].tolist()
    majority = {kind: collections.Counter(lab.split()[i] for lab in labels).most_common(1)[0][1] / len(labels)
                for i, kind in enumerate(("colour", "shape"))}

    random_init = ModelSpec(MODEL)
    before = Captioner(random_init, max_tokens=args.max_tokens)(contents)
    t0 = time.time()
    conf = FinetuneConfig(out=str(work / "finetune"), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=20, val_fraction=0.1, seed=0)
    result = finetune(pairs, random_init, conf, resume=False, progress=False)
    train_seconds = round(time.time() - t0, 1)
    tuned = ModelSpec(MODEL, result.final_checkpoint).with_digest()
    after = Captioner(tuned, max_tokens=args.max_tokens)(contents)
    after_beam = Captioner(tuned, beams=3, max_tokens=args.max_tokens)(contents)

    results["training"] = {"train_pairs": result.train_pairs, "val_pairs": result.val_pairs, "epochs": args.epochs,
                           "seconds": train_seconds,
                           "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                                       for h in result.history]}
    results["accuracy"] = {
        "held_out_images": len(labels), "majority_guess": {k: round(v, 4) for k, v in majority.items()},
        "random_init": word_accuracy([c.text for c in before], labels),
        "fine_tuned_greedy": word_accuracy([c.text for c in after], labels),
        "fine_tuned_beam3": word_accuracy([c.text for c in after_beam], labels),
        "exact_caption_greedy": round(sum(c.text == t for c, t in zip(after, held["caption"])) / len(labels), 4),
        "mean_score_greedy": round(sum(c.score for c in after) / len(after), 4),
        "mean_score_of_true_captions": true_caption_score(tuned, contents, held["caption"].tolist()),
        "examples": [{"true": t, "random_init": b.text, "greedy": a.text, "beam3": m.text, "score": round(a.score, 4)}
                     for t, b, a, m in list(zip(held["caption"], before, after, after_beam))[:6]],
    }
    sample = (contents * (args.speed_images // len(contents) + 1))[:args.speed_images]
    results["speed"] = [speed(tuned, sample, threads, beams, args.max_tokens) for beams in (1, 3) for threads in (1, 2)]
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("accuracy", "speed")}, indent=2))
    print(f"training: {train_seconds} s; load before {results['machine']['loadavg']}, after {results['load_after']}")


if __name__ == "__main__":
    main()
