"""Benchmark: zero-shot tag quality (per-tag precision / recall / F1, micro and macro) on Fashion-MNIST (the
class name as the tag) and on the generated shapes (colour, shape and background words of the caption),
random-init lakelens-tiny against the same model fine-tuned by the demo's recipe; and the tag job's rate
scoring stored vectors on a Delta table of random unit vectors, against a numpy loop over the same vectors.

Each data set is split in two halves by a seed: thresholds are chosen on the first (calibration: per tag,
the lowest with precision >= 0.9; and the best single global threshold), metrics are read on the second.
The fine-tuned model's Fashion-MNIST vectors also go through the real path once (a Delta table, the tag
job, `lakelens eval --tags`'s evaluate_tags_table) to show the job's tags score as the numpy core's do.

    .venv/bin/python bench/tags.py [--train 6000] [--epochs 3] [--rate-rows 100000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402

from lakelens import config, path_id  # noqa: E402
from lakelens.ingest.embedder import Embedder  # noqa: E402
from lakelens.models.registry import ModelSpec  # noqa: E402
from lakelens.tags import calibrate as cal  # noqa: E402
from lakelens.tags.vocab import load_vocab, tag_vectors, vocab_path  # noqa: E402
from lakelens.train import datasets, synth  # noqa: E402

# labels per image in each data set (one class; colour, shape, background): the cap of the "top-k" setting
LABELS_PER_IMAGE = {"fashion-mnist": 1, "shapes": 3}
VOCABS = {"fashion-mnist": vocab_path("fashion-mnist"), "shapes": vocab_path("shapes")}  # built-in vocabularies
SWEEP = np.round(np.arange(-0.5, 1.0001, 0.01), 2)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def eval_sets(n_fashion: int, n_shapes: int) -> dict:
    """name -> (image bytes, label words per image, paths); held-out images only (test split, seed 2)."""
    from PIL import Image

    images, labels = datasets.fashion_mnist("test")
    idx = datasets.balanced_sample(labels, n_fashion, seed=2)
    fm = ([png(Image.fromarray(images[i], "L")) for i in idx], [[datasets.LABELS[labels[i]]] for i in idx],
          [f"file:/bench/fashion/test{i:05d}.png" for i in idx])
    samples = synth.samples(n_shapes, seed=2)
    sh = ([png(synth.render(s, 96, seed=2 * 1_000_003 + i)) for i, s in enumerate(samples)],
          [[s.color, s.shape, s.background] for s in samples], [f"file:/bench/shapes/img{i:06d}.png" for i in range(n_shapes)])
    return {"fashion-mnist": fm, "shapes": sh}


def train_model(work: Path, n: int, epochs: int) -> tuple[str, float]:
    """lakelens-tiny fine-tuned on n captioned training images (Fashion-MNIST train split with varied
    captions and generated shapes, half each): the demo's recipe."""
    from lakelens.train.eval_run import read_captions
    from lakelens.train.finetune import finetune

    fm = pd.read_csv(datasets.write_fashion_mnist(work / "train-fm", "train", n // 2, seed=1, varied_captions=True))
    sh = pd.read_csv(synth.write_dataset(work / "train-shapes", n - n // 2, seed=1))
    pd.concat([fm, sh], ignore_index=True).to_csv(work / "train.csv", index=False)
    conf = config.load(ROOT / "conf" / "local.yaml", [f"finetune.out={work / 'model'}", f"finetune.epochs={epochs}"])
    import torch

    # one thread: with other processes on the 2 cores, two torch threads spin against them (a training
    # step measured 6x slower with 2 threads than with 1 while other work ran)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    tuned = finetune(read_captions(str(work / "train.csv")), ModelSpec("lakelens-tiny"), conf.finetune, resume=False)
    torch.set_num_threads(threads)
    return tuned.final_checkpoint, round(time.time() - t0, 1)


def micro_f1(scores, truth, thresholds, max_tags):
    return cal.prf(truth, cal.predicted(scores, thresholds, max_tags), [str(j) for j in range(truth.shape[1])])["micro"]["f1"]


def quality(spec: ModelSpec, sets: dict, max_tags: int) -> tuple[dict, dict, dict]:
    """Per data set, with the job's cap: metrics on the second half at the best global threshold of the
    first half, at per-tag thresholds calibrated on the first half (target precision 0.9), and top-k (the
    cap at the label count, no threshold); the threshold sweeps; the vectors (for the job run); the
    second half's scores (for the default threshold, chosen once both models ran)."""
    embedder = Embedder(spec, batch_size=128, decode_threads=2)  # onnx-int8, as the embed job
    out, vectors, halves = {}, {}, {}
    for name, (data, labels, paths) in sets.items():
        t0 = time.time()
        vecs = np.stack([r.embedding for i in range(0, len(data), 256) for r in embedder(data[i:i + 256])])
        embed_s = time.time() - t0
        vocab = load_vocab(VOCABS[name])
        scores = vecs @ tag_vectors(vocab, spec, embedder=embedder).T
        truth, unknown = cal.truth_matrix(vocab, labels)
        assert not unknown, unknown
        half = np.random.default_rng(0).permutation(len(vecs)) < len(vecs) // 2  # True: calibration half
        cs, ct, ts, tt = scores[half], truth[half], scores[~half], truth[~half]
        sweep = [micro_f1(cs, ct, np.full(len(vocab), t, np.float32), max_tags) for t in SWEEP]
        best = float(SWEEP[int(np.argmax(sweep))])
        calibrated, status = cal.choose_thresholds(cs, ct, vocab.tags, 0.9, 5, best)
        settings = {"best_global": (np.full(len(vocab), best, np.float32), max_tags), "calibrated": (calibrated, max_tags),
                    "top_k": (np.full(len(vocab), -np.inf, np.float32), LABELS_PER_IMAGE[name])}
        test_sweep = [micro_f1(ts, tt, np.full(len(vocab), t, np.float32), max_tags) for t in SWEEP]
        res = {"images": len(vecs), "calibration_images": int(half.sum()),
               "test_images": int((~half).sum()),
               "embed_images_per_s": round(len(vecs) / embed_s, 1), "best_global_threshold": best,
               "sweep_micro_f1_all": [round(f, 4) for f in sweep],
               "test_sweep_micro_f1": {f"{t:.2f}": round(f, 4) for t, f in zip(SWEEP, test_sweep)},
               "score_of_labelled": {"median": round(float(np.median(scores[truth])), 4),
                                     "p10": round(float(np.percentile(scores[truth], 10)), 4)},
               "score_of_unlabelled": {"median": round(float(np.median(scores[~truth])), 4),
                                       "p90": round(float(np.percentile(scores[~truth], 90)), 4)},
               "calibration_status": {s: sum(v == s for v in status.values()) for s in set(status.values())},
               "calibrated_thresholds": {t: round(float(v), 4) for t, v in zip(vocab.tags, calibrated)}}
        for setting, (thr, cap) in settings.items():
            res[setting] = cal.prf(tt, cal.predicted(ts, thr, cap), vocab.tags)
        out[name] = res
        vectors[name] = (vecs, labels, paths)
        halves[name] = (ts, tt, vocab.tags)
        print(f"  {name}: micro-F1 best global ({best}) {res['best_global']['micro']['f1']:.3f}, calibrated "
              f"{res['calibrated']['micro']['f1']:.3f}, top-{LABELS_PER_IMAGE[name]} {res['top_k']['micro']['f1']:.3f}",
              flush=True)
    return out, vectors, halves


def write_table(spark, location: str, vectors: np.ndarray, paths: list[str], model: str) -> None:
    from delta.tables import DeltaTable

    from lakelens.ingest.table import SCHEMA

    now = datetime(2026, 1, 1)
    pdf = pd.DataFrame({"id": [path_id(p) for p in paths], "path": paths,
                        "content_sha256": [f"{i:064x}" for i in range(len(paths))], "size_bytes": 1000,
                        "modified": now, "width": 64, "height": 64, "model": model,
                        "embedding": list(vectors.astype(np.float32)), "error": None, "embedded_at": now,
                        "regions": None})
    DeltaTable.createIfNotExists(spark).location(location).addColumns(SCHEMA) \
        .property("delta.enableChangeDataFeed", "true").execute()
    for i in range(0, len(pdf), 25_000):
        spark.createDataFrame(pdf.iloc[i:i + 25_000], SCHEMA).write.format("delta").mode("append").save(location)


def job_on_real_vectors(spark, work: Path, spec: ModelSpec, vecs, labels, paths, threshold: float, max_tags: int) -> dict:
    """The fine-tuned Fashion-MNIST vectors through the tag job and evaluate_tags_table (the real path)."""
    from lakelens.tags.evaluate import evaluate_tags_table
    from lakelens.tags.job import TagJob

    table, tags = str(work / "fm-table"), str(work / "fm-tags")
    write_table(spark, table, vecs, paths, spec.key)
    conf = config.load(ROOT / "conf" / "local.yaml", [f"tag.table={table}", f"tag.tags={tags}",
                                                     f"tag.vocab={VOCABS['fashion-mnist']}", f"tag.threshold={threshold}",
                                                     f"tag.max_tags={max_tags}", f"tag.thresholds={work / 'none.json'}"])
    result = TagJob(spark=spark, conf=conf, log=print).launch()
    vocab = load_vocab(VOCABS["fashion-mnist"])
    report = evaluate_tags_table(spark, tags, pd.DataFrame({"path": paths, "tags": labels}), vocab)
    scores = vecs @ tag_vectors(vocab, spec).T
    core = cal.prf(cal.truth_matrix(vocab, labels)[0], cal.predicted(scores, np.full(len(vocab), threshold), max_tags),
                   vocab.tags)
    return {"threshold": threshold, "rows": result.tag_rows, "job_micro": report["micro"], "numpy_micro": core["micro"],
            "same": report["micro"] == core["micro"]}


def rate(spark, work: Path, rows: int, max_tags: int) -> dict:
    """The tag job (photo vocabulary, 197 tags) on a Delta table of `rows` random unit vectors of
    lakelens-tiny's width; baseline: the same scoring in numpy in this process (matrix product + selection)."""
    from delta.tables import DeltaTable

    from lakelens.tags.job import TagJob

    spec = ModelSpec("lakelens-tiny")
    vocab = load_vocab("photo")
    t0 = time.time()
    text = tag_vectors(vocab, spec)
    text_s = time.time() - t0
    x = np.random.default_rng(0).normal(size=(rows, text.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # random vectors score about 0 against every tag: a threshold at the 99th percentile of their scores
    # keeps a few tags per image, so the job writes rows as it would on real data
    threshold = float(np.percentile(x[:2000] @ text.T, 99))
    table, tags = str(work / "rate-table"), str(work / "rate-tags")
    t0 = time.time()
    write_table(spark, table, x, [f"file:/bench/rate/{i:07d}.jpg" for i in range(rows)], spec.key)
    write_s = time.time() - t0
    thr = np.full(len(vocab), threshold, np.float32)

    def numpy_pass():
        for i in range(0, rows, 10_000):
            cal.select_tags(x[i:i + 10_000] @ text.T, thr, max_tags)

    t0 = time.time()
    numpy_pass()
    numpy_s = time.time() - t0
    conf = config.load(ROOT / "conf" / "local.yaml", [f"tag.table={table}", f"tag.tags={tags}",
                                                     "tag.vocab=photo",
                                                     f"tag.threshold={threshold}", f"tag.max_tags={max_tags}",
                                                     f"tag.thresholds={work / 'none.json'}"])
    first = TagJob(spark=spark, conf=conf, log=print).launch()
    # 1% new images: the incremental run
    extra = np.random.default_rng(1).normal(size=(rows // 100, text.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    write_table(spark, table, extra, [f"file:/bench/rate/new{i:07d}.jpg" for i in range(len(extra))], spec.key)
    inc = TagJob(spark=spark, conf=conf, log=print).launch()
    t0 = time.time()
    none = TagJob(spark=spark, conf=conf, log=print).launch()
    none_s = time.time() - t0
    version = DeltaTable.forPath(spark, tags).history(1).first()["version"]
    return {"rows": rows, "dim": int(text.shape[1]), "tags": len(vocab), "threshold": round(threshold, 4),
            "max_tags": max_tags, "table_write_seconds": round(write_s, 1), "text_vectors_seconds": round(text_s, 2),
            "numpy_seconds": round(numpy_s, 2), "numpy_images_per_s": round(rows / numpy_s),
            "job_full": {"seconds": first.seconds, "images_per_s": round(rows / first.seconds), "tag_rows": first.tag_rows},
            "job_incremental": {"new_images": len(extra), "scored": inc.scored, "seconds": inc.seconds,
                                "mode": inc.mode},
            "job_unchanged": {"seconds": round(none_s, 1), "mode": none.mode}, "tags_table_version": version,
            "job_full_x_numpy": round(numpy_s / first.seconds, 3)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["quality"]["random_init"])
    fig, axes = plt.subplots(1, len(names), figsize=(13, 4), gridspec_kw={"width_ratios": [10, 15]})
    for ax, name in zip(axes, names):
        tags = list(results["quality"]["random_init"][name]["calibrated"]["per_tag"])
        xs = np.arange(len(tags))
        for k, (model, label) in enumerate((("random_init", "random init"), ("fine_tuned", "fine-tuned"))):
            per = results["quality"][model][name]["calibrated"]["per_tag"]
            ax.bar(xs + (k - 0.5) * 0.4, [per[t]["f1"] for t in tags], 0.4, label=label)
        ax.set_xticks(xs, tags, rotation=60, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: per-tag F1 (thresholds calibrated to precision 0.9)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("F1 on the held-out half")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=4000, help="fine-tuning pairs (half Fashion-MNIST, half shapes)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fashion", type=int, default=2000, help="held-out Fashion-MNIST test images")
    ap.add_argument("--shapes", type=int, default=1000, help="held-out shapes images")
    ap.add_argument("--pretrained", help="a fine-tuned lakelens-tiny checkpoint to use instead of training one")
    ap.add_argument("--rate-rows", type=int, default=100_000)
    ap.add_argument("--work", default=str(ROOT / "build" / "bench-tags"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tags.json"))
    ap.add_argument("--smoke", action="store_true", help=machine.SMOKE_HELP)
    args = ap.parse_args()
    machine.smoke(args, train=machine.SMOKE_PAIRS, epochs=1, fashion=20, shapes=20, rate_rows=500)
    t_start = time.time()
    work = Path(args.work)
    for old in ("fm-table", "fm-tags", "rate-table", "rate-tags"):  # tables of an earlier run: start afresh
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    conf = config.load(ROOT / "conf" / "local.yaml")
    max_tags, default = conf.tag.max_tags, conf.tag.threshold
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine.describe(), "load_before": os.getloadavg(),
               "max_tags": max_tags, "labels_per_image": LABELS_PER_IMAGE, "target_precision": 0.9}
    print(f"machine: {results['machine']['cpu']}, load {results['load_before']}", flush=True)
    sets = eval_sets(args.fashion, args.shapes)
    print("fine-tuning lakelens-tiny ...", flush=True)
    ap_ckpt = args.pretrained
    ckpt, train_s = (ap_ckpt, 0.0) if ap_ckpt else train_model(work, args.train, args.epochs)
    results["training"] = {"pairs": args.train, "epochs": args.epochs, "seconds": train_s}
    results["quality"] = {}
    vectors, halves = {}, {}
    for key, spec in (("random_init", ModelSpec("lakelens-tiny")),
                      ("fine_tuned", ModelSpec.from_config(config.ModelConfig("lakelens-tiny", ckpt)))):
        print(f"{key}: {spec.key}", flush=True)
        results["quality"][key], vectors[key], halves[key] = quality(spec, sets, max_tags)
    # the default threshold: the one of the sweep with the best mean micro-F1 of the fine-tuned model over
    # both data sets' calibration halves (the job's cap); read on the second halves for both models
    sweeps = [results["quality"]["fine_tuned"][n]["sweep_micro_f1_all"] for n in sets]
    mean = np.mean(sweeps, axis=0)
    chosen = float(SWEEP[int(np.argmax(mean))])
    results["default_choice"] = {"threshold": chosen, "mean_micro_f1_calibration_halves": round(float(mean.max()), 4),
                                 "configured": default, "mean_by_threshold": {f"{t:.2f}": round(float(m), 4) for t, m in
                                                                              zip(SWEEP, mean) if round(t * 100) % 5 == 0}}
    for key in results["quality"]:
        for name, (ts, tt, names) in halves[key].items():
            for label, t in (("chosen_default", chosen), ("configured_default", default)):
                results["quality"][key][name][label] = cal.prf(tt, cal.predicted(ts, np.full(len(names), t), max_tags),
                                                               names)
    print(f"default threshold from the sweep: {chosen} (configured: {default})", flush=True)
    from lakelens.spark import get_session

    spark, owned = get_session(conf.spark)
    try:
        spark.sparkContext.setLogLevel("ERROR")
        tuned = ModelSpec.from_config(config.ModelConfig("lakelens-tiny", ckpt))
        vecs, labels, paths = vectors["fine_tuned"]["fashion-mnist"]
        results["job_vs_numpy"] = job_on_real_vectors(spark, work, tuned, vecs, labels, paths, chosen, max_tags)
        results["rate"] = rate(spark, work, args.rate_rows, max_tags)
    finally:
        if owned:
            spark.stop()
    results["load_after"] = os.getloadavg()
    results["seconds"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_name("tags-f1.png"))
    summary = {m: {n: {s: r[s]["micro"]["f1"] for s in ("chosen_default", "best_global", "calibrated", "top_k")}
                   for n, r in q.items()} for m, q in results["quality"].items()}
    print(json.dumps({"micro_f1": summary, "rate": results["rate"]["job_full"], "job_vs_numpy": results["job_vs_numpy"],
                      "seconds": results["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
