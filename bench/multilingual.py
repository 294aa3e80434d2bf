"""Benchmark: English + Portuguese captions, one model, two tokenizers. The tiny model is trained from random
init on the generated shapes with both languages' captions, (a) with a byte-pair tokenizer the project
trains on the training captions (Hugging Face `tokenizers`, a `local-dir:` model folder) and (b) with
open_clip's default CLIP tokenizer (`lakelens-tiny`); then text->image Recall@K per language on held-out
images, through an index and `lakelens eval`'s metrics, and a few Portuguese and English queries without
the background words. Writes bench/results/multilingual.json.

    .venv/bin/python bench/multilingual.py [--train 1500] [--held-out 1000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from machine import SMOKE_HELP, describe, smoke  # noqa: E402

from lakelens import Embedder, ModelSpec, path_id  # noqa: E402
from lakelens import index as ix  # noqa: E402
from lakelens.config import FinetuneConfig  # noqa: E402
from lakelens.ingest.paths import to_stored  # noqa: E402
from lakelens.models import local_dir  # noqa: E402
from lakelens.train import synth  # noqa: E402
from lakelens.train.eval_run import evaluate_index, format_by_lang  # noqa: E402
from lakelens.train.finetune import finetune  # noqa: E402

KS = (1, 5, 10, 50)
# (size, colour, shape, position): queries with no background words, a shorter phrasing than any caption
QUERIES = [("large", "red", "circle", "left"), ("small", "blue", "star", "center"), ("large", "yellow", "triangle", "bottom")]


def query_text(size: str, color: str, shape: str, position: str, lang: str) -> str:
    caption = synth.Sample(color, shape, size, position, "grey").caption_in(lang)
    return caption.split(" of a ")[0] if lang == "en" else caption.split(" num fundo")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=1500, help="training images (each with an en and a pt caption)")
    ap.add_argument("--held-out", type=int, default=1000, help="held-out images (each with an en and a pt caption)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "build" / "bench-multilingual"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multilingual.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, train=40, held_out=20, epochs=1)
    work = Path(args.work)
    machine = describe()
    print(f"[multilingual] machine: {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg']}")
    t0 = time.time()
    train = pd.read_csv(synth.write_dataset(work / "train", args.train, seed=1, px=96, langs=synth.LANGS))
    held = pd.read_csv(synth.write_dataset(work / "held-out", args.held_out, seed=2, px=96, langs=synth.LANGS))
    held_samples = synth.samples(args.held_out, seed=2)
    pairs = pd.concat([train.assign(split="train"), held.assign(split="val")], ignore_index=True)
    tokenizer = local_dir.train_tokenizer(train["caption"], vocab_size=1000)
    folder_model = local_dir.write_model_folder(work / "bpe-model", tokenizer)
    variants = {"project BPE tokenizer (local-dir)": ModelSpec(folder_model),
                "CLIP tokenizer (lakelens-tiny)": ModelSpec("lakelens-tiny")}
    results = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "train_images": args.train,
               "held_out_images": args.held_out, "epochs": args.epochs, "langs": list(synth.LANGS),
               "tokenizer_vocab": tokenizer.get_vocab_size(), "runs": {}}
    for name, spec in variants.items():
        t = time.time()
        conf = FinetuneConfig(out=str(work / f"model-{spec.name.split('/')[-1]}"), epochs=args.epochs, batch_size=64,
                              lr=5e-4, warmup_steps=50, seed=0)
        tuned = finetune(pairs, spec, conf, resume=False, progress=False, log=lambda m: print(m, flush=True))
        train_seconds = time.time() - t
        tuned_spec = ModelSpec.from_key(tuned.spec_key)
        emb = Embedder(tuned_spec, engine="torch")
        paths = held.drop_duplicates("path")["path"].tolist()
        vecs = np.stack([r.embedding for r in emb([Path(p).read_bytes() for p in paths])])
        uris = [to_stored(p) for p in paths]
        index_dir = work / f"index-{len(results['runs'])}"
        ix.build_local(index_dir, np.array([path_id(u) for u in uris]), vecs, uris, ix.Choice("Flat", "bench", False),
                       model_key=tuned.spec_key)
        metrics = evaluate_index(str(index_dir), held, KS)
        print(f"[multilingual] {name}:\n{format_by_lang(metrics, KS)}", flush=True)
        queries = {}
        for q in QUERIES:
            for lang in synth.LANGS:
                text = query_text(*q, lang)
                top = np.argsort(-(emb.embed_texts([text])[0] @ vecs.T), kind="stable")[:10]
                hits = [(s.size, s.color, s.shape, s.position) == q for s in (held_samples[i] for i in top)]
                queries[text] = {"lang": lang, "precision@10": float(np.mean(hits)),
                                 "matching_images": int(sum((s.size, s.color, s.shape, s.position) == q
                                                            for s in held_samples))}
        results["runs"][name] = {
            "model": tuned.spec_key, "train_pairs": tuned.train_pairs, "held_out_pairs": tuned.val_pairs,
            "train_seconds": round(train_seconds, 1),
            "recall": {lang: {f"t2i_recall@{k}": metrics["by_lang"][lang][f"t2i_recall@{k}"] for k in KS}
                       for lang in synth.LANGS},
            "recall_all": {f"t2i_recall@{k}": metrics[f"t2i_recall@{k}"] for k in KS},
            "i2t_recall@10": {lang: metrics["by_lang"][lang]["i2t_recall@10"] for lang in synth.LANGS},
            "held_out_loss": [round(h["val_loss"], 4) for h in tuned.history],
            "history_recall@10": {lang: [h.get(f"val_{lang}_t2i_recall@10") for h in tuned.history]
                                  for lang in synth.LANGS},
            "queries": queries}
    results["seconds"] = round(time.time() - t0, 1)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({n: {"recall@10": {lang: r["recall"][lang]["t2i_recall@10"] for lang in synth.LANGS},
                          "train_seconds": r["train_seconds"]} for n, r in results["runs"].items()}, indent=2))
    print(f"[multilingual] {results['seconds']} s; {args.out}")


if __name__ == "__main__":
    main()
