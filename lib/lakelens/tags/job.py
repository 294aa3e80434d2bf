"""Zero-shot tags of the embeddings table (`lakelens tag`, jobs/tag.py), and their calibration.

The job scores the STORED vectors, never the images: the vocabulary's text matrix and per-tag thresholds
are broadcast to the executors, a mapInPandas computes each image's cosine to every tag and keeps the tags
at or over their threshold (at most `max_tags`, best first), and the rows go to the tags table through
`tags.table.replace_rows` with source `zero-shot`. Nothing per row comes back to the driver.

Region tags (rows embedded with embed.regions): each crop's vector is scored too, and a tag under its
threshold on the whole image whose best crop is at or over it becomes a `region` row with that crop's
score (an object too small to move the whole image's vector). The whole image's tags never change for
it: they take the first places of `max_tags`, and region tags, best first, fill only the places left,
since one of five crops passing is weaker evidence than the whole image passing.

A re-run reads the embeddings table's change feed since the table version of the last run (kept in the
tags table's commit metadata): only new and changed images are scored and the rows of deleted ones go.
Every image is scored again when the vocabulary (its digest), the thresholds, the templates, the cap or
the model changes: a tag's score and meaning depend on all of them."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from lakelens.errors import ConfigError, DataError
from lakelens.ingest.table import REGIONS_TYPE, EmbeddingsTable
from lakelens.models.registry import ModelSpec
from lakelens.spark import Job
from lakelens.tags import calibrate as cal
from lakelens.tags.table import SCHEMA, changes_since, last_state, replace_rows, run_mode
from lakelens.tags.vocab import Vocab, load_vocab, tag_vectors

SOURCE = "zero-shot"
REGION = "region"
STATE_KEYS = ("table", "table_id", "model", "vocab", "templates", "thresholds", "max_tags", "regions")
_WHAT = {"table": "the embeddings table", "table_id": "the embeddings table", "model": "the model",
         "vocab": "the vocabulary", "templates": "the prompt templates", "thresholds": "the thresholds",
         "max_tags": "max_tags", "regions": "region scoring"}
# runs from before region tags left no "regions" key: the same as a run over a table without regions
_ABSENT = {"regions": False}


@dataclass
class TagResult:
    table_version: int | None
    mode: str  # full | incremental | none
    reason: str
    scored: int  # images scored this run
    removed: int  # images whose earlier rows were replaced or removed (incremental)
    tag_rows: int  # rows written this run (zero-shot and region)
    tags: int  # tags in the vocabulary
    model: str
    vocab: str  # the vocabulary's digest
    thresholds: str  # which thresholds applied
    seconds: float
    region_rows: int = 0  # of tag_rows, those with source region

    def to_dict(self) -> dict:
        return asdict(self)


def region_tags(scores: np.ndarray, region_vecs: np.ndarray, owners: np.ndarray, text: np.ndarray,
                thresholds: np.ndarray, max_tags: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """(rows, cols, best crop scores) of the region tags: per image, the tags under their threshold on the
    whole image (`scores`, (n, tags)) whose best crop is at or over it, best first, at most
    `max_tags` - `kept` (the image's zero-shot tags) of them. `region_vecs` (m, dim) are the crops of all
    images, `owners` (m,) their image's row, sorted."""
    none = np.zeros(0, np.int64)
    if not len(region_vecs):
        return none, none, np.zeros(0, np.float32)
    thresholds = np.asarray(thresholds, np.float32)
    crops = region_vecs @ text.T
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    images = owners[starts]
    best = np.maximum.reduceat(crops, starts, axis=0)
    new = (scores[images] < thresholds[None, :]) & (best >= thresholds[None, :])
    rows, cols = cal.select_tags(np.where(new, best, -np.inf), np.full(len(thresholds), -np.inf, np.float32))
    if max_tags:
        first = np.r_[True, rows[1:] != rows[:-1]]
        rank = np.arange(len(rows)) - np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
        keep = rank < max_tags - kept[images[rows]]
        rows, cols = rows[keep], cols[keep]
    return images[rows], cols, best[rows, cols].astype(np.float32)


def _crops(regions: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's `regions` column (per row None or crops of {box, embedding}) -> (vectors, owner rows)."""
    owners, vecs = [], []
    for i, crops in enumerate(regions):
        if crops is None:
            continue
        for crop in crops:
            if crop is not None and crop["embedding"] is not None:
                vecs.append(crop["embedding"])
                owners.append(i)
    if not vecs:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.stack(vecs).astype(np.float32), np.asarray(owners, np.int64)


def score_fn(vocab_state: tuple, vocab_digest: str, source: str = SOURCE):
    """mapInPandas: (id, path, model, embedding[, regions]) -> tag rows (`source`, and `region` rows from
    the crops). `vocab_state` is (names, text matrix as float32 bytes, dim, thresholds, max_tags): it travels
    inside the function (a vocabulary's text vectors are kilobytes to a few megabytes), which works on a
    classic session and on Spark Connect alike."""

    def run(batches):
        names, text_bytes, dim, thresholds, max_tags = vocab_state
        text = np.frombuffer(text_bytes, np.float32).reshape(-1, dim)
        names = np.asarray(names, dtype=object)
        for pdf in batches:
            if pdf.empty:
                continue
            vecs = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
            scores = vecs @ text.T
            rows, cols = cal.select_tags(scores, thresholds, max_tags)
            picked = [(rows, cols, scores[rows, cols], source)]
            if "regions" in pdf.columns:
                kept = np.bincount(rows, minlength=len(pdf))
                crop_vecs, owners = _crops(pdf["regions"].to_numpy(), dim)
                r_rows, r_cols, r_scores = region_tags(scores, crop_vecs, owners, text, thresholds, max_tags, kept)
                picked.append((r_rows, r_cols, r_scores, REGION))
            ids, paths, models = pdf["id"].to_numpy(np.int64), pdf["path"].to_numpy(), pdf["model"].to_numpy()
            for rows, cols, values, src in picked:
                if len(rows):
                    yield pd.DataFrame({"id": ids[rows], "path": paths[rows], "tag": names[cols],
                                        "score": np.asarray(values, np.float32), "source": src,
                                        "model": models[rows], "vocab": vocab_digest})

    return run


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(values, np.float32).tobytes()).hexdigest()[:16]


class TagJob(Job):
    """`TagJob(spark=None, conf=None).launch()` -> TagResult; `.calibrate(labels)` -> report (dict)."""

    def __init__(self, spark=None, conf=None, log: Callable[[str], None] = print):
        super().__init__(spark, conf)
        self.log = log

    # --- shared setup ---------------------------------------------------------------------------
    def _open(self, need_tags: bool):
        c = self.conf.tag
        for key in ("table", "vocab") + (("tags",) if need_tags else ()):
            if not getattr(c, key):
                raise ConfigError(f"tag.{key}: required (--{key} or the config file)")
        vocab = load_vocab(c.vocab)
        table = EmbeddingsTable(self.spark, c.table, c.format)
        if not table.exists():
            raise DataError(f"tag.table: no {c.format} table at {c.table}")
        return c, vocab, table

    def _model(self, rows) -> str | None:
        """The one model key of the table's embedded rows (a column-only scan), None for an empty table."""
        models = [r[0] for r in rows.select("model").distinct().limit(3).collect()]
        if len(models) > 1:
            raise DataError(f"tag.table: the table holds vectors of several models ({', '.join(sorted(models))}); "
                            "tag it once a re-embedding with one model has finished")
        return models[0] if models else None

    def _text(self, vocab: Vocab, model: str) -> np.ndarray:
        spec = ModelSpec.from_key(model)
        spec.check_weights()  # tag vectors must come from the weights that made the image vectors
        return tag_vectors(vocab, spec, self.conf.tag.templates)

    # --- tagging ----------------------------------------------------------------------------------
    def run(self) -> TagResult:
        t0 = time.time()
        c, vocab, table = self._open(need_tags=True)
        spark = self.spark
        version = table.version()
        ok = F.col("error").isNull() & F.col("embedding").isNotNull()
        stored = table.read(version)
        with_regions = "regions" in stored.columns
        columns = ["id", "path", "model", "embedding"] + (["regions"] if with_regions else [])
        rows = stored.where(ok).select(*columns)
        model = self._model(rows) or ""
        if model:
            thresholds, how = cal.thresholds_for(vocab, model, c.templates, c.threshold, c.thresholds or None)
        else:
            thresholds, how = np.full(len(vocab), c.threshold, np.float32), "none (no embedded images)"
        state = {"table": table.location, "table_id": table.table_id(), "model": model, "vocab": vocab.digest,
                 "templates": c.templates, "thresholds": _digest(thresholds), "max_tags": c.max_tags,
                 "regions": with_regions}
        previous = None if c.full else last_state(spark, c.tags, SOURCE)
        differs = None
        changed = [key for key in STATE_KEYS
                   if previous is not None and previous.get(key, _ABSENT.get(key)) != state[key]]
        if changed:
            what = list(dict.fromkeys(_WHAT[k] for k in changed))
            detail = "; ".join(f"{k} {previous.get(k, _ABSENT.get(k))} -> {state[k]}" for k in changed if k != "table_id")
            differs = f"{', '.join(what)} changed since the last run ({detail})"
        mode, reason = run_mode(previous, differs, version, "--full" if c.full else "no earlier run")
        if mode == "none":
            self.log(f"lakelens tag: nothing to do: the table is unchanged since the last run (version {version}) "
                     f"and so are the vocabulary, model and thresholds")
            return TagResult(version, "none", reason, 0, 0, 0, len(vocab), model, vocab.digest, how,
                             round(time.time() - t0, 1))
        touched, removed = None, 0
        if mode == "incremental":
            changes, why = changes_since(spark, table.location, previous, version)
            if changes is None:
                mode, reason = "full", why
            else:
                touched = changes.replaced.select("id").unionByName(changes.rows.select("id")).distinct()
                # the feed's rows carry regions when its table versions have the column (index.update)
                got = changes.rows.columns
                rows = changes.rows.select(*[c if c in got else F.lit(None).cast(REGIONS_TYPE).alias(c) for c in columns])
                removed = changes.replaced.count()  # live_before counts index entries: regions too
        scored = rows.count()
        self.log(f"lakelens tag: {mode} ({reason}): scoring {scored} images against {len(vocab)} tags of "
                 f"{Path(c.vocab).name} (vocab {vocab.digest}, model {model or '-'}); thresholds: {how}")
        if scored and model:
            text = self._text(vocab, model)
            vocab_state = (vocab.tags, text.tobytes(), text.shape[1], thresholds, c.max_tags)
            tagged = rows.mapInPandas(score_fn(vocab_state, vocab.digest), SCHEMA).localCheckpoint()
        else:
            tagged = spark.createDataFrame([], SCHEMA)
        counts = {r["source"]: r["count"] for r in tagged.groupBy("source").count().collect()}
        n_rows, n_region = sum(counts.values()), counts.get(REGION, 0)
        run_state = {**state, "version": version, "scored": scored, "rows": n_rows, "region_rows": n_region}
        # region rows first: the zero-shot commit's state marks the run done, so a run killed between the
        # two is repeated from the earlier state and writes both again
        if with_regions:  # a table without the column has no region rows to write or replace
            replace_rows(spark, c.tags, tagged.where(F.col("source") == REGION), touched, REGION, run_state)
        replace_rows(spark, c.tags, tagged.where(F.col("source") == SOURCE), touched, SOURCE, run_state)
        result = TagResult(version, mode, reason, scored, removed, n_rows, len(vocab), model, vocab.digest, how,
                           round(time.time() - t0, 1), n_region)
        self.log(f"lakelens tag: {n_rows} tag rows ({n_region} from regions) for {scored} images written to "
                 f"{c.tags} ({result.seconds} s)")
        return result

    # --- calibration ------------------------------------------------------------------------------
    def calibrate(self, labels: str, out: str | None = None, labels_frame: pd.DataFrame | None = None) -> dict:
        """Per-tag thresholds from a labels table (path, tags): the labelled images' stored vectors are
        joined by path on the executors and brought to the driver (a labelled set is small), scored, and
        the thresholds written beside the vocabulary with a report (per-tag P/R/F1, micro, macro)."""
        from lakelens.tags.evaluate import read_labels

        c, vocab, table = self._open(need_tags=False)
        spark = self.spark
        frame = labels_frame if labels_frame is not None else read_labels(labels, self.conf.spark, spark)
        ok = F.col("error").isNull() & F.col("embedding").isNotNull()
        version = table.version()
        rows = table.read(version).where(ok).select("path", "model", "embedding")
        wanted = spark.createDataFrame(frame[["path"]].drop_duplicates())
        found = rows.join(wanted, "path", "left_semi").toPandas()
        models = sorted(set(found["model"]))
        if len(models) != 1:
            raise DataError(f"tag --calibrate: {len(found)} of the {len(frame)} labelled images have stored vectors "
                            + (f"of several models ({', '.join(models)})" if models else
                               f"in {c.table} (paths must match the table's, e.g. file:/...)"))
        model = models[0]
        labelled = int(frame["path"].nunique())
        frame = frame.drop_duplicates("path").merge(found[["path", "embedding"]], on="path")
        vecs = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        truth, unknown = cal.truth_matrix(vocab, frame["tags"].tolist())
        scores = vecs @ self._text(vocab, model).T
        thresholds, status = cal.choose_thresholds(scores, truth, vocab.tags, c.target_precision, c.min_positives,
                                                   c.threshold)
        path = cal.write_thresholds(vocab, thresholds, status, model, c.templates, c.target_precision,
                                    c.min_positives, c.threshold, len(frame), c.thresholds or None)
        report = cal.prf(truth, cal.predicted(scores, thresholds, c.max_tags), vocab.tags)
        counts = {s: sum(v == s for v in status.values()) for s in (cal.CALIBRATED, cal.TOO_FEW, cal.UNREACHABLE)}
        report.update({"model": model, "vocab": vocab.digest, "table_version": version, "labelled_images": len(frame),
                       "labelled_without_vectors": labelled - len(frame),
                       "unknown_label_words": unknown[:50], "target_precision": c.target_precision,
                       "max_tags": c.max_tags, "thresholds_file": str(path), "status_counts": counts,
                       "thresholds": {t: round(float(v), 4) for t, v in zip(vocab.tags, thresholds)},
                       "status": status})
        out_path = Path(out) if out else path.with_name(Path(c.vocab).stem + ".calibration.json")
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        self.log(cal.format_table(report))
        self.log(f"lakelens tag --calibrate: {counts[cal.CALIBRATED]} tags calibrated to precision >= "
                 f"{c.target_precision}, {counts[cal.TOO_FEW]} with fewer than {c.min_positives} labelled images "
                 f"keep {c.threshold}, {counts[cal.UNREACHABLE]} never reach it; thresholds {path}; report {out_path}")
        if unknown:
            self.log(f"lakelens tag --calibrate: label words not in the vocabulary (ignored): {', '.join(unknown[:20])}")
        return report
