"""`lakelens eval`: an index + a captions table (path, caption[, label]) -> retrieval metrics JSON and a recall plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.errors import DataError
from lakelens.ingest.paths import to_local, to_stored
from lakelens.search import Searcher
from lakelens.train import metrics as ev


class PairsTableError(DataError):
    """A captions / pairs table lacks a required column."""


def _is_delta(path: str) -> bool:
    """A local folder with a _delta_log, or a remote URI (s3a://, abfss://, ...) that names no CSV or
    Parquet file: only Spark reads those."""
    if "://" in path and not path.startswith("file:"):
        return not path.lower().endswith((".csv", ".parquet"))
    return (to_local(to_stored(path)) / "_delta_log").is_dir()


def read_captions(path: str, spark_conf=None) -> pd.DataFrame:
    """A Delta table (read with Spark), or a CSV or Parquet file/folder, with columns path, caption and
    optionally label and split."""
    if _is_delta(path):
        # Spark only for Delta captions tables: CSV and Parquet evaluations never start a JVM
        from lakelens.ingest.table import read_pairs
        from lakelens.spark import get_session

        spark, owned = get_session(spark_conf)
        try:
            df = read_pairs(spark, path)
        finally:
            if owned:
                spark.stop()
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"captions table not found: {path}")
        df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    missing = {"path", "caption"} - set(df.columns)
    if missing:
        raise PairsTableError(f"captions table {path} lacks column(s) {', '.join(sorted(missing))}")
    return df


def evaluate_index(index_dir: str, captions: pd.DataFrame, ks=(1, 5, 10)) -> dict:
    """Text->image and image->text Recall@K over the captioned images, top-K accuracy, precision@K by
    label, and the ANN index's recall against exact search on the same text queries."""
    searcher = Searcher.open(index_dir)
    captions = captions.reset_index(drop=True)
    uris = captions["path"].map(to_stored)
    images = list(dict.fromkeys(uris))  # the captioned images, in order
    known = searcher.id_paths()
    path_to_id = dict(zip(known["path"], known["id"]))
    vectors, present = [], []
    for uri in images:
        vec = None
        if uri in path_to_id:
            vec = searcher.vector_of(int(path_to_id[uri]))
        present.append(vec is not None)
        vectors.append(vec if vec is not None else np.zeros(searcher.manifest["dim"], np.float32))
    image_vecs = np.stack(vectors)
    text_vecs = np.concatenate([searcher.embedder.embed_texts(captions["caption"].iloc[i:i + 256].tolist())
                                for i in range(0, len(captions), 256)])
    col = {uri: j for j, uri in enumerate(images)}
    targets = np.array([col[u] if present[col[u]] else -1 for u in uris])
    scores = text_vecs @ image_vecs.T
    scores[:, ~np.array(present)] = -np.inf  # images missing from the index cannot be retrieved
    t2i = ev.recall_at_k(ev.ranks_of_targets(scores, targets), ks)
    caption_rows = {}
    for i, u in enumerate(uris):
        caption_rows.setdefault(col[u], []).append(i)
    i2t_ranks = ev.best_ranks(scores.T, [caption_rows[j] if present[j] else [-1] for j in range(len(images))])
    i2t = ev.recall_at_k(i2t_ranks, ks)
    kmax = max(ks)
    exact_ids = np.array([path_to_id.get(u, -1) for u in images], dtype=np.int64)  # no float round trip
    exact_top = [exact_ids[np.argsort(-row, kind="stable")[:kmax]] for row in scores]
    ann_top = [f["id"].to_numpy() for f in searcher.search_vectors(text_vecs, k=kmax)]
    metrics = {"queries": int(len(captions)), "images": int(len(images)),
               "missing_images": int(len(images) - sum(present)), "index_version": searcher.version,
               "model": searcher.manifest["model"]["key"]}
    for k in ks:
        metrics[f"t2i_recall@{k}"] = t2i[k]
        metrics[f"t2i_top{k}_accuracy"] = t2i[k]
        metrics[f"i2t_recall@{k}"] = i2t[k]
    if "label" in captions.columns:
        image_labels = captions.assign(uri=uris).drop_duplicates("uri").set_index("uri").loc[images, "label"]
        prec = ev.precision_at_k(scores, captions["label"].tolist(), image_labels.tolist(), ks)
        metrics.update({f"t2i_precision@{k}": prec[k] for k in ks})
    metrics[f"ann_recall@{kmax}"] = ev.ann_recall(ann_top, exact_top, kmax)
    return metrics


def run_eval(index_dir: str, captions_path: str, ks=(1, 5, 10), out: str | None = None,
             plot: str | None = None, spark_conf=None) -> dict:
    metrics = evaluate_index(index_dir, read_captions(captions_path, spark_conf), ks)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2) + "\n")
    if plot:
        ev.plot_recall({"text -> image": {k: metrics[f"t2i_recall@{k}"] for k in ks},
                        "image -> text": {k: metrics[f"i2t_recall@{k}"] for k in ks}}, plot,
                       f"Recall@K, {metrics['model']} ({metrics['queries']} captions)")
    return metrics
