"""Benchmark and evaluation of near-duplicate detection (`lakelens dedup`), in one run on one machine.

1. Pairs by threshold: distinct demo images (Fashion-MNIST test images, 112 px, and generated shapes)
   and near copies the benchmark makes of some of them (resize to half, JPEG re-encode at quality 60,
   5% crop, horizontal flip, small colour shift). All are embedded by the model (default: lakelens-tiny
   fine-tuned here by the demo's recipe on Fashion-MNIST and shapes captions; --model/--pretrained
   for another, e.g. ViT-B-32 with its weights where they exist). Every pair's cosine
   similarity gives precision and recall of "pair of copies" at each threshold: a PR plot
   (bench/results/dedup-pr.png), and the default threshold's precision and recall, per transform too.
   The dedup job then runs on a Delta table of those vectors (exact path) at the default threshold;
   its groups' pairs are scored against the truth.
2. Rate: the dedup job on 100,000 x 512 clustered unit vectors with 2% near copies planted (cosine about
   0.994 to their originals), exact
   blockwise path and index path (the index job's auto index), wall seconds and images/s.

Writes bench/results/dedup.json.

    .venv/bin/python bench/dedup.py [--originals 600] [--rows 100000] [--skip-quality | --skip-rate]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from conftest import clustered  # noqa: E402  (the tests' generator of embedding-shaped vectors)
from machine import SMOKE_HELP, SMOKE_PAIRS, describe, smoke  # noqa: E402

from lakelens import Embedder, IndexJob, ModelSpec, config, get_session, path_id  # noqa: E402
from lakelens.dedup.job import DedupJob  # noqa: E402
from lakelens.ingest.table import SCHEMA  # noqa: E402
from lakelens.train import datasets, synth  # noqa: E402

TRANSFORMS = ("resize", "jpeg", "crop5", "flip", "colour")


def near_copy(img: Image.Image, kind: str) -> Image.Image:
    w, h = img.size
    if kind == "resize":
        return img.resize((w // 2, h // 2), Image.Resampling.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop5":  # 5% off each dimension, half from each side
        dx, dy = round(w * 0.025), round(h * 0.025)
        return img.crop((dx, dy, w - dx, h - dy))
    if kind == "flip":
        return ImageOps.mirror(img)
    if kind == "colour":
        arr = np.asarray(img).astype(np.int16) + np.array([8, -6, 4], np.int16)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    raise ValueError(kind)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def originals(n: int, seed: int = 0) -> list[Image.Image]:
    """n distinct images: half Fashion-MNIST test images (112 px RGB), half generated shapes (96 px)."""
    images, labels = datasets.fashion_mnist("test")
    pick = np.random.default_rng(seed).choice(len(images), n // 2, replace=False)
    fm = [Image.fromarray(images[i]).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC) for i in pick]
    shapes = [synth.render(s, 96, seed=seed * 100_000 + j) for j, s in enumerate(synth.samples(n - n // 2, seed=seed + 1))]
    return fm + shapes


def train_model(work: Path, n: int, epochs: int) -> str:
    """lakelens-tiny fine-tuned on n captioned training images (Fashion-MNIST train split and generated
    shapes, half each): the demo's recipe, so the evaluation sees a model that has learnt images."""
    from lakelens.train.eval_run import read_captions
    from lakelens.train.finetune import finetune

    fm = pd.read_csv(datasets.write_fashion_mnist(work / "train-fm", "train", n // 2, seed=1, varied_captions=True))
    sh = pd.read_csv(synth.write_dataset(work / "train-shapes", n - n // 2, seed=1))
    pairs = pd.concat([fm, sh], ignore_index=True)
    pairs.to_csv(work / "train.csv", index=False)
    conf = config.load(ROOT / "conf" / "local.yaml", [f"finetune.out={work / 'model'}", f"finetune.epochs={epochs}"])
    t0 = time.time()
    tuned = finetune(read_captions(str(work / "train.csv")), ModelSpec("lakelens-tiny"), conf.finetune)
    print(f"trained {tuned.final_checkpoint} in {time.time() - t0:.0f} s")
    return tuned.final_checkpoint


def pr_curve(sims: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prec, rec = [], []
    for t in thresholds:
        found = sims >= t
        tp = int((found & truth).sum())
        prec.append(tp / max(1, int(found.sum())) if found.any() else 1.0)
        rec.append(tp / max(1, int(truth.sum())))
    return np.array(prec), np.array(rec)


def write_table(spark, location: str, vectors: np.ndarray, names: list[str], sizes=None) -> None:
    now = datetime(2026, 1, 1)
    paths = [f"file:/photos/{n}" for n in names]
    pdf = pd.DataFrame({"id": [path_id(p) for p in paths], "path": paths,
                        "content_sha256": [f"{i:064x}" for i in range(len(paths))], "size_bytes": sizes or 100_000,
                        "modified": now, "width": 640, "height": 480, "model": "lakelens-tiny@none",
                        "embedding": list(vectors.astype(np.float32)), "error": None, "embedded_at": now,
                        "regions": None})
    from delta.tables import DeltaTable

    DeltaTable.createIfNotExists(spark).location(location).addColumns(SCHEMA) \
        .property("delta.enableChangeDataFeed", "true").execute()
    step = 20_000  # a new table: appended in slices (the embed job's MERGE is for changes)
    for i in range(0, len(pdf), step):
        spark.createDataFrame(pdf.iloc[i:i + step], SCHEMA).write.format("delta").mode("append").save(location)


def quality(spark, work: Path, n_orig: int, copies_per: int, model: str, pretrained: str, threshold: float,
            guard: float, fig_path: Path) -> dict:
    rng = random.Random(0)
    base = originals(n_orig)
    n_copied = n_orig // 3
    files, origin, kinds = [], [], []
    for i, img in enumerate(base):
        files.append(png(img))
        origin.append(i)
        kinds.append("original")
    for i in range(n_copied):
        for kind in rng.sample(TRANSFORMS, copies_per):
            files.append(png(near_copy(base[i], kind)))
            origin.append(i)
            kinds.append(kind)
    embedder = Embedder(ModelSpec(model, pretrained), engine="torch")
    t0 = time.time()
    vecs = np.stack([r.embedding for r in embedder(files)])
    embed_s = time.time() - t0
    origin, kinds = np.array(origin), np.array(kinds)
    sims = vecs @ vecs.T
    iu = np.triu_indices(len(vecs), 1)
    s, truth = sims[iu], origin[iu[0]] == origin[iu[1]]
    kind_of_pair = np.where(kinds[iu[0]] == "original", kinds[iu[1]], kinds[iu[0]])
    thresholds = np.round(np.arange(0.80, 1.0001, 0.005), 3)
    prec, rec = pr_curve(s, truth, thresholds)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    at = int(np.argmin(np.abs(thresholds - threshold)))
    per_kind = {k: round(float((s[truth & (kind_of_pair == k)] >= threshold).mean()), 4) for k in TRANSFORMS
                if (truth & (kind_of_pair == k)).any()}
    positives = s[truth]
    negatives = s[~truth]

    # the dedup job on the same vectors, exact path, default threshold
    table = str(work / "quality-table")
    write_table(spark, table, vecs, [f"img-{i:05d}-{k}.png" for i, k in enumerate(kinds)])
    conf = config.load(ROOT / "conf" / "local.yaml", [f"dedup.table={table}", f"dedup.out={work / 'quality-dups'}",
                                                     f"dedup.threshold={threshold}", f"dedup.guard={guard}"])
    result = DedupJob(spark=spark, conf=conf, log=print).launch()
    groups = spark.read.format("delta").load(str(work / "quality-dups")).toPandas()
    number = groups["path"].str.extract(r"img-(\d+)-")[0].astype(int).to_numpy()
    found = set()
    for _, part in groups.assign(n=number).groupby("group"):
        members = sorted(part["n"])
        found |= {(a, b) for x, a in enumerate(members) for b in members[x + 1:]}
    true_pairs = {(int(a), int(b)) for a, b in zip(*iu) if origin[a] == origin[b]}
    tp = len(found & true_pairs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(rec, prec, marker=".", ms=3)
    ax1.scatter([rec[at]], [prec[at]], color="red", zorder=3, label=f"threshold {threshold}")
    ax1.set_xlabel("recall (pairs of copies)")
    ax1.set_ylabel("precision")
    ax1.set_title("near-copy pairs: precision vs recall")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(thresholds, prec, label="precision")
    ax2.plot(thresholds, rec, label="recall")
    ax2.plot(thresholds, f1, label="F1", linestyle="--")
    ax2.axvline(threshold, color="red", alpha=0.5)
    ax2.set_xlabel("cosine similarity threshold")
    ax2.set_title(f"by threshold ({len(vecs)} images, {int(truth.sum())} copy pairs)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)
    best = int(np.argmax(f1))
    return {"model": f"{model}@{pretrained}", "images": len(vecs), "originals": n_orig, "copied": n_copied,
            "copies_per_image": copies_per, "copy_pairs": int(truth.sum()), "other_pairs": int((~truth).sum()),
            "embed_seconds": round(embed_s, 1), "threshold": threshold,
            "precision_at_threshold": round(float(prec[at]), 4), "recall_at_threshold": round(float(rec[at]), 4),
            "recall_by_transform": per_kind,
            "best_f1": {"threshold": float(thresholds[best]), "f1": round(float(f1[best]), 4),
                        "precision": round(float(prec[best]), 4), "recall": round(float(rec[best]), 4)},
            "copy_similarity_percentiles": {p: round(float(np.percentile(positives, p)), 4) for p in (1, 5, 50)},
            "other_similarity_percentiles": {p: round(float(np.percentile(negatives, p)), 4) for p in (50, 99, 99.99)},
            "other_similarity_max": round(float(negatives.max()), 4),
            "curve": {"threshold": thresholds.tolist(), "precision": np.round(prec, 4).tolist(),
                      "recall": np.round(rec, 4).tolist()},
            "job": {"groups": result.groups, "pairs_found": len(found), "true_pairs": len(true_pairs),
                    "precision": round(tp / max(1, len(found)), 4), "recall": round(tp / max(1, len(true_pairs)), 4),
                    "split_off": result.split_off, "seconds": result.seconds},
            "plot": str(fig_path.relative_to(ROOT)) if fig_path.is_relative_to(ROOT) else str(fig_path)}


def rate(spark, work: Path, rows: int, dim: int) -> dict:
    """The dedup job over `rows` clustered vectors, 2% of them near copies of others."""
    rng = np.random.default_rng(1)
    base = clustered(rows - rows // 50, dim, clusters=1000, noise=0.4, seed=1, centres_seed=0)
    src = rng.choice(len(base), rows // 50, replace=False)
    copies = base[src] + 0.005 * rng.normal(size=(len(src), dim)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    vecs = np.concatenate([base, copies])
    table = str(work / "rate-table")
    t0 = time.time()
    write_table(spark, table, vecs, [f"r-{i:07d}.jpg" for i in range(len(vecs))])
    out = {"rows": rows, "dim": dim, "planted_copies": len(src), "table_seconds": round(time.time() - t0, 1)}
    conf = config.load(ROOT / "conf" / "local.yaml", [f"dedup.table={table}", f"dedup.out={work / 'rate-exact'}"])
    r = DedupJob(spark=spark, conf=conf, log=print).launch()
    out["exact"] = {"seconds": r.seconds, "images_per_s": round(rows / r.seconds, 1), "groups": r.groups,
                    "duplicates": r.duplicates}
    index = work / "rate-index"
    t0 = time.time()
    built = IndexJob(spark=spark, conf=config.load(ROOT / "conf" / "local.yaml",
                                                   [f"index.table={table}", f"index.index={index}"]), log=print).launch()
    out["index_build_seconds"] = round(time.time() - t0, 1)
    conf = config.load(ROOT / "conf" / "local.yaml", [f"dedup.table={table}", f"dedup.out={work / 'rate-ix'}",
                                                     f"dedup.index={index}"])
    r = DedupJob(spark=spark, conf=conf, log=print).launch()
    out["index"] = {"factory": built.factory, "seconds": r.seconds, "images_per_s": round(rows / r.seconds, 1),
                    "groups": r.groups, "duplicates": r.duplicates}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--originals", type=int, default=600)
    ap.add_argument("--copies", type=int, default=3, help="near copies made of each copied original (of 5 kinds)")
    ap.add_argument("--model", default="lakelens-tiny", help="open_clip architecture (default lakelens-tiny)")
    ap.add_argument("--pretrained", default="", help="its weights (default: lakelens-tiny trained here on --train pairs)")
    ap.add_argument("--train", type=int, default=6000, help="training pairs of the model trained here")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--skip-rate", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dedup.json"),
                    help="the results; the plot beside it, NAME-pr.png")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, originals=12, copies=2, train=SMOKE_PAIRS, epochs=1, rows=2000, dim=16)
    machine = describe()
    print(json.dumps(machine))
    defaults = config.Config().dedup
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}  # a part not run keeps its last result
    spark, _ = get_session(config.load(ROOT / "conf" / "local.yaml").spark)
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        work = Path(tmp)
        if not args.skip_quality:
            t0 = time.time()
            weights = args.pretrained or train_model(work, args.train, args.epochs)
            result["quality_machine"] = machine
            result["training"] = {"pairs": 0 if args.pretrained else args.train, "epochs": args.epochs,
                                  "seconds": round(time.time() - t0, 1)}
            result["quality"] = quality(spark, work, args.originals, args.copies, args.model, weights,
                                        defaults.threshold, defaults.guard, out.with_name(f"{out.stem}-pr.png"))
            if not args.pretrained:
                result["quality"]["model"] = "lakelens-tiny fine-tuned here"
            print(json.dumps({k: v for k, v in result["quality"].items() if k != "curve"}, indent=1))
        if not args.skip_rate:
            result["rate_machine"] = machine
            result["rate"] = rate(spark, work, args.rows, args.dim)
            print(json.dumps(result["rate"], indent=1))
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
