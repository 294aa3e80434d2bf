"""Recall@K of the vector, keyword and hybrid search modes on held-out shapes, in one run on one machine.

The demo's recipe, no Spark: lakelens-tiny is fine-tuned on generated shapes (captions name size, colour,
shape, position and background), and lakelens-tiny-coca on the same pairs (contrastive + caption loss).
The held-out images (other seed) are embedded by the fine-tuned CLIP, captioned by the fine-tuned CoCa
(greedy), and tagged zero-shot with the built-in vocabulary shapes (thresholds calibrated on the training images
at precision 0.9). Three index versions are built from the same vectors (build_local), their keyword
side fed by:
  captions      generated captions only (the issue's setting);
  tags          zero-shot tags only;
  captions+tags both.
Every held-out image's true caption is a query; its own image is the target. Recall@1/5/10 per mode:
vector (cosine over the fine-tuned CLIP's vectors), keyword (BM25 over the keyword side), hybrid
(reciprocal rank fusion, k = 60, of both top-100 lists). Also the seconds per image of captioning and
tagging. Writes bench/results/hybrid.json.

    .venv/bin/python bench/hybrid.py [--train 3000] [--held-out 1000] [--epochs 5] [--coca-epochs 4] [--coca-pairs 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import SMOKE_HELP, SMOKE_PAIRS, describe, smoke  # noqa: E402

from lakelens import Embedder, ModelSpec, config, path_id  # noqa: E402
from lakelens import index as ix  # noqa: E402
from lakelens.index.keyword import TagRow  # noqa: E402
from lakelens.search import Searcher  # noqa: E402
from lakelens.tags.calibrate import choose_thresholds, select_tags, truth_matrix  # noqa: E402
from lakelens.tags.captions import Captioner  # noqa: E402
from lakelens.tags.vocab import load_vocab, tag_vectors, vocab_path  # noqa: E402
from lakelens.train import synth  # noqa: E402
from lakelens.train.eval_run import read_captions  # noqa: E402
from lakelens.train.finetune import finetune  # noqa: E402

MODES = ("vector", "keyword", "hybrid")
KS = (1, 5, 10)
VOCAB = vocab_path("shapes")  # the built-in vocabulary
ENGINE = "torch"  # images, tags and queries embedded alike


def train(work: Path, name: str, epochs: int, pairs: Path, *extra: str) -> str:
    conf = config.load(ROOT / "conf" / "local.yaml", [f"finetune.out={work / name}", f"finetune.epochs={epochs}",
                                                      *extra])
    t0 = time.time()
    tuned = finetune(read_captions(str(pairs)), ModelSpec(name), conf.finetune)
    print(f"trained {name} in {time.time() - t0:.0f} s", flush=True)
    return tuned.final_checkpoint


def embed(spec: ModelSpec, paths: list[str]) -> np.ndarray:
    emb = Embedder(spec, engine=ENGINE)
    out = []
    for i in range(0, len(paths), 64):
        out += [r.embedding for r in emb([Path(p).read_bytes() for p in paths[i:i + 64]])]
    return np.stack(out).astype(np.float32)


def words_of(caption: str, vocab) -> list[str]:
    """The vocabulary's tags named in a caption (colour, shape and background words)."""
    return [t for t in vocab.tags if t in caption.lower().split()]


def recall(searcher: Searcher, queries: list[str], targets: np.ndarray, mode: str) -> dict:
    ranks = []
    for q, t in zip(queries, targets):
        found = searcher.search_text(q, k=max(KS), mode=mode)["id"].to_numpy(np.int64)
        hit = np.flatnonzero(found == t)
        ranks.append(hit[0] + 1 if len(hit) else np.inf)
    ranks = np.asarray(ranks, float)
    return {f"recall@{k}": round(float(np.mean(ranks <= k)), 4) for k in KS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--coca-epochs", type=int, default=4)
    ap.add_argument("--coca-pairs", type=int, default=2000)
    ap.add_argument("--coca-batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hybrid.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, train=SMOKE_PAIRS, held_out=8, epochs=1, coca_epochs=1, coca_pairs=SMOKE_PAIRS, coca_batch_size=60)
    result = {"machine": describe(), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_csv = synth.write_dataset(work / "train", args.train, seed=1)
        held = pd.read_csv(synth.write_dataset(work / "held", args.held_out, seed=2))
        clip = ModelSpec.from_config(config.ModelConfig("lakelens-tiny", train(work, "lakelens-tiny", args.epochs,
                                                                                 train_csv)))
        # the CoCa recipe of bench/captions.py: smaller batches, a higher learning rate
        coca = ModelSpec.from_config(config.ModelConfig("lakelens-tiny-coca", train(
            work, "lakelens-tiny-coca", args.coca_epochs, train_csv, f"finetune.batch_size={args.coca_batch_size}",
            "finetune.lr=0.002",
            f"finetune.max_pairs={args.coca_pairs}")))

        paths = list(held["path"])
        vecs = embed(clip, paths)
        tr = pd.read_csv(train_csv)
        train_vecs = embed(clip, list(tr["path"]))

        vocab = load_vocab(VOCAB)
        t0 = time.time()
        text = tag_vectors(vocab, clip, engine=ENGINE)
        truth, _ = truth_matrix(vocab, [words_of(c, vocab) for c in tr["caption"]])
        thresholds, status = choose_thresholds(train_vecs @ text.T, truth, vocab.tags, target=0.9)
        result["thresholds"] = {t: [round(float(x), 4), status[t]] for t, x in zip(vocab.tags, thresholds)}
        t1 = time.time()
        rows, cols = select_tags(vecs @ text.T, thresholds, max_tags=10)
        tag_seconds = time.time() - t1
        scores = vecs @ text.T

        cap = Captioner(coca, batch_size=32)
        t2 = time.time()
        captions = []
        for i in range(0, len(paths), 32):
            captions += cap([Path(p).read_bytes() for p in paths[i:i + 32]])
        caption_seconds = time.time() - t2
        result["rates"] = {"caption_ms_per_image": round(1000 * caption_seconds / len(paths), 2),
                           "tag_images_per_s_scoring_only": round(len(paths) / max(tag_seconds, 1e-9)),
                           "tag_vectors_seconds": round(t1 - t0, 2)}
        result["examples"] = [{"truth": t, "generated": c.text} for t, c in zip(held["caption"][:8], captions[:8])]

        ids = np.array([path_id(f"file:{p}") for p in paths], np.int64)
        tags_of = [[] for _ in paths]
        for r, c in zip(rows, cols):
            tags_of[r].append(TagRow(vocab.tags[c], float(scores[r, c]), "zero-shot"))
        feeds = {"captions": lambda j: ([], [(captions[j].text, captions[j].score)]),
                 "tags": lambda j: (tags_of[j], []),
                 "captions+tags": lambda j: (tags_of[j], [(captions[j].text, captions[j].score)])}
        queries = list(held["caption"])
        result["recall"] = {}
        for feed, of in feeds.items():
            folder = work / f"index-{feed.replace('+', '-')}"
            docs = [(int(i), f"file:{p}", *of(j)) for j, (i, p) in enumerate(zip(ids, paths))]
            ix.build_local(folder, ids, vecs, [f"file:{p}" for p in paths], ix.Choice("Flat", "bench", False),
                           model_key=clip.key, keywords=docs, vocab=vocab)
            searcher = Searcher.open(folder, engine=ENGINE)
            result["recall"][feed] = {m: recall(searcher, queries, ids, m) for m in MODES
                                      if feed == "captions" or m != "vector"}
            print(feed, json.dumps(result["recall"][feed]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rates", "recall")}, indent=2))


if __name__ == "__main__":
    main()
