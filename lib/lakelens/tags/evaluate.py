"""Tag quality against labels (`lakelens eval --labels`): per-tag precision / recall / F1, micro and macro,
of a tags table's rows, or of zero-shot tags computed from an index's stored vectors with a vocabulary.

A labels table has columns `path` and `tags`: a Delta table, Parquet (tags a list column or a `|`-separated
string) or CSV (`|`-separated). With a vocabulary, a label word may be a tag or a synonym, and a tag's
ancestors count as labelled too (a "dog" image is an "animal" image)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lakelens.errors import DataError
from lakelens.ingest.paths import to_stored
from lakelens.ingest.small_tables import read_small_table
from lakelens.tags import calibrate as cal


def read_labels(path: str, spark_conf=None, spark=None) -> pd.DataFrame:
    """(path as stored in the tables, tags as a list of words) per labelled image."""
    df = read_small_table(path, ("path", "tags"), what="labels table", spark=spark, spark_conf=spark_conf,
                          csv_dtype={"path": str, "tags": str})
    return pd.DataFrame({"path": df["path"].map(to_stored), "tags": df["tags"].map(cal.split_labels)})


def _truth(labels: pd.DataFrame, vocab, names: list[str]) -> tuple[np.ndarray, list[str]]:
    if vocab is not None:
        return cal.truth_matrix(vocab, labels["tags"].tolist())
    col = {t: j for j, t in enumerate(names)}
    out = np.zeros((len(labels), len(names)), bool)
    for i, words in enumerate(labels["tags"]):
        out[i, [col[w] for w in words]] = True
    return out, []


def with_ancestors(pred: np.ndarray, vocab) -> np.ndarray:
    """Predicted tags and their ancestors, as truth_matrix counts the labels: an image tagged "circle" is
    a "shape" image to both sides (and to tag:shape searches)."""
    out = np.array(pred, dtype=bool)
    if vocab is None:
        return out
    col = {t: j for j, t in enumerate(vocab.tags)}
    for j, tag in enumerate(vocab.tags):
        for parent in vocab.ancestors(tag):
            out[:, col[parent]] |= out[:, j]
    return out


def evaluate_tags_table(spark, tags_table: str, labels: pd.DataFrame, vocab=None, source: str = "zero-shot") -> dict:
    """Metrics of the `source` rows of a tags table on the labelled images (rows of other images are not
    read to the driver: the labelled paths are joined on the executors)."""
    from pyspark.sql import functions as F

    labels = labels.drop_duplicates("path").reset_index(drop=True)
    wanted = spark.createDataFrame(labels[["path"]])
    rows = (spark.read.format("delta").load(tags_table).where(F.col("source") == source)
            .join(wanted, "path", "left_semi").select("path", "tag", "model", "vocab").toPandas())
    names = vocab.tags if vocab is not None else sorted({w for ws in labels["tags"] for w in ws} | set(rows["tag"]))
    truth, unknown = _truth(labels, vocab, names)
    col, row_of = {t: j for j, t in enumerate(names)}, {p: i for i, p in enumerate(labels["path"])}
    pred = np.zeros_like(truth)
    known = rows[rows["tag"].isin(col)]
    pred[known["path"].map(row_of).to_numpy(int), known["tag"].map(col).to_numpy(int)] = True
    report = cal.prf(truth, with_ancestors(pred, vocab), names)
    report.update({"source": source, "tags_table": tags_table, "models": sorted(set(rows["model"].dropna())),
                   "vocab_digests": sorted(set(rows["vocab"].dropna())), "unknown_label_words": unknown[:50],
                   "untagged_images": int(len(labels) - rows["path"].nunique())})
    return report


def evaluate_index_tags(index_dir: str, labels: pd.DataFrame, vocab, threshold: float = 0.25, max_tags: int = 10,
                        templates: str = "simple", thresholds_file: str | None = None) -> dict:
    """Zero-shot tags computed from an index's stored vectors with a vocabulary (the tag job's scoring,
    the same thresholds rule), against the labels."""
    from lakelens.search import Searcher
    from lakelens.tags.vocab import tag_vectors

    searcher = Searcher.open(index_dir)
    known = searcher.id_paths()
    path_to_id = dict(zip(known["path"], known["id"]))
    labels = labels.drop_duplicates("path")
    labels = labels[labels["path"].isin(path_to_id)].reset_index(drop=True)
    if labels.empty:
        raise DataError(f"none of the labelled paths is in the index {index_dir} (paths must match, e.g. file:/...)")
    vecs = np.stack([searcher.vector_of(int(path_to_id[p])) for p in labels["path"]]).astype(np.float32)
    model = searcher.manifest["model"]["key"]
    text = tag_vectors(vocab, searcher.model_spec, templates, embedder=searcher.embedder)
    thresholds, how = cal.thresholds_for(vocab, model, templates, threshold, thresholds_file)
    truth, unknown = cal.truth_matrix(vocab, labels["tags"].tolist())
    report = cal.prf(truth, with_ancestors(cal.predicted(vecs @ text.T, thresholds, max_tags), vocab), vocab.tags)
    report.update({"index_version": searcher.version, "model": model, "vocab": vocab.digest, "thresholds_used": how,
                   "max_tags": max_tags, "unknown_label_words": unknown[:50]})
    return report
