"""Benchmark: retrieval quality before and after fine-tuning, on the generated shapes and on Fashion-MNIST,
each through the whole demo (Spark embed job -> Delta -> index -> `lakelens eval`, fine-tune, again).
Writes bench/results/finetune.json; the baseline is the same pipeline with the random-init model.

    .venv/bin/python bench/finetune.py [--datasets shapes,fashion-mnist] [--work build]

Each demo's folder is WORK/bench-DATASET (bench/engines_eval.py reads build/bench-shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from machine import SMOKE_HELP, SMOKE_PAIRS, smoke  # bench/ is on the path: this script's folder

from lakelens.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]

# The targets: shapes Recall@10 at least 5x random init; Fashion-MNIST precision@10 >= 0.80.
TARGETS = {"shapes": ("ratio", 5.0), "fashion-mnist": ("after", 0.80)}
KEEP = ("t2i_recall@1", "t2i_recall@5", "t2i_recall@10", "t2i_recall@50", "i2t_recall@10",
        "t2i_precision@1", "t2i_precision@10", "ann_recall@50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", default="shapes,fashion-mnist")
    ap.add_argument("--work", default=str(ROOT / "build"), help="the demos' folders: WORK/bench-DATASET")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # the demo at the size of its test, without the caption model (bench/captions.py runs that)
    sizes = dict(n_train=SMOKE_PAIRS, n_images=20, epochs=1, with_captions=False) if smoke(args, datasets="shapes") else {}
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0], "runs": {}}
    for name in args.datasets.split(","):
        r = run_demo(out=str(Path(args.work) / f"bench-{name}"), dataset=name,
                     conf_path=str(ROOT / "conf" / "local.yaml"), **sizes)
        kind, bar = TARGETS[name]
        results["runs"][name] = {
            "train_pairs": r["train_pairs"], "held_out_images": r["held_out_images"], "epochs": r["epochs"],
            "headline": r["headline"], "before": r["before"], "after": r["after"], "ratio": r["ratio"],
            "target": f"{kind} >= {bar}", "target_met": (r[kind] or 0) >= bar,
            "metrics_before": {k: r["metrics_before"][k] for k in KEEP if k in r["metrics_before"]},
            "metrics_after": {k: r["metrics_after"][k] for k in KEEP if k in r["metrics_after"]},
            "held_out_loss": [round(h["val_loss"], 4) for h in r["finetune_history"]],
            "seconds": {k: r[k] for k in ("before_seconds", "finetune_seconds", "after_seconds", "seconds")}}
    results["load_after"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({n: {k: v[k] for k in ("headline", "before", "after", "ratio", "target_met")}
                      for n, v in results["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
