"""Zero-shot tag scoring and per-tag thresholds: the pure numpy core shared by the tag job (inside its pandas
UDF), calibration, `lakelens eval` and the benchmark; and the thresholds file kept beside a vocabulary.

Calibration: per tag, the lowest threshold whose precision on the labelled images is at least the target
(the most images tagged at that precision); tags with too few labelled positives keep the global default,
and a tag that never reaches the target gets a threshold above every labelled score (it tags nothing the
labels could not vouch for). The thresholds file (`photo.thresholds.json` beside `photo.csv`) names the model
key, the vocabulary digest and the templates it was made for; the tag job uses it only when all three match."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lakelens.errors import ConfigError
from lakelens.files import write_text
from lakelens.tags.vocab import is_builtin

THRESHOLDS_FORMAT = 1
CALIBRATED, TOO_FEW, UNREACHABLE = "calibrated", "too few positives", "target not reached"


def select_tags(scores: np.ndarray, thresholds: np.ndarray, max_tags: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the kept (image, tag) pairs: the tags at or over their threshold, at most `max_tags`
    per image (0: no cap), best first within each image. `scores` (n, tags), `thresholds` (tags,)."""
    scores = np.asarray(scores, np.float32)
    passed = np.where(scores >= np.asarray(thresholds, np.float32)[None, :], scores, -np.inf)
    k = passed.shape[1] if not max_tags else min(int(max_tags), passed.shape[1])
    if k == 0 or passed.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = np.argpartition(-passed, k - 1, axis=1)[:, :k] if k < passed.shape[1] else np.tile(
        np.arange(passed.shape[1]), (len(passed), 1))
    order = np.argsort(-np.take_along_axis(passed, top, 1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    keep = np.isfinite(np.take_along_axis(passed, top, 1))
    rows = np.repeat(np.arange(len(passed)), k).reshape(len(passed), k)
    return rows[keep].astype(np.int64), top[keep].astype(np.int64)


def predicted(scores: np.ndarray, thresholds: np.ndarray, max_tags: int = 0) -> np.ndarray:
    """The kept tags as an (n, tags) boolean matrix."""
    out = np.zeros(np.shape(scores), bool)
    rows, cols = select_tags(scores, thresholds, max_tags)
    out[rows, cols] = True
    return out


def prf(truth: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict:
    """Per-tag precision, recall, F1 and support, micro (pooled counts) and macro (mean over the tags with
    labelled positives) averages. Precision of a tag never predicted is 0 (and so is its F1)."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    tp = (truth & pred).sum(0)
    fp = (~truth & pred).sum(0)
    fn = (truth & ~pred).sum(0)

    def ratios(tp, fp, fn):
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0

    per_tag = {}
    for j, name in enumerate(names):
        p, r, f = ratios(int(tp[j]), int(fp[j]), int(fn[j]))
        per_tag[name] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                         "support": int(truth[:, j].sum()), "predicted": int(pred[:, j].sum())}
    p, r, f = ratios(int(tp.sum()), int(fp.sum()), int(fn.sum()))
    labelled = [m for m in per_tag.values() if m["support"]]
    macro = {key: round(float(np.mean([m[key] for m in labelled])), 4) if labelled else 0.0
             for key in ("precision", "recall", "f1")}
    return {"images": int(len(truth)), "tags": len(names), "labelled_tags": len(labelled),
            "micro": {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)},
            "macro": macro, "per_tag": per_tag}


def lowest_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> float | None:
    """The lowest threshold t (one of the scores) with precision(scores >= t) >= target, or None."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.int64)
    tp = np.cumsum(y)
    n = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold takes every item of its score: tied runs end here
    ok = last & (tp >= target * n) & (tp > 0)
    if not ok.any():
        return None
    return float(s[np.flatnonzero(ok)[-1]])


def choose_thresholds(scores: np.ndarray, truth: np.ndarray, names: Sequence[str], target: float = 0.9,
                      min_positives: int = 5, default: float = 0.25) -> tuple[np.ndarray, dict]:
    """Per tag the lowest threshold reaching `target` precision on (scores, truth), both (n, tags).
    Returns (thresholds, status per tag: calibrated | too few positives | target not reached)."""
    scores, truth = np.asarray(scores, np.float32), np.asarray(truth, bool)
    out = np.full(len(names), default, np.float32)
    status = {}
    for j, name in enumerate(names):
        if truth[:, j].sum() < min_positives:
            status[name] = TOO_FEW
            continue
        t = lowest_threshold(scores[:, j], truth[:, j], target)
        if t is None:  # above every labelled score: nothing the labels cannot vouch for
            out[j], status[name] = np.nextafter(np.float32(scores[:, j].max()), np.float32(np.inf)), UNREACHABLE
        else:
            out[j], status[name] = t, CALIBRATED
    return out, status


def truth_matrix(vocab, labels: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """(n, tags) boolean matrix from each image's label words: a word names a tag or one of its synonyms,
    and a tag's ancestors count too (a "dog" is an "animal"). Returns the matrix and the unknown words."""
    col = {t: j for j, t in enumerate(vocab.tags)}
    out = np.zeros((len(labels), len(col)), bool)
    unknown: dict[str, None] = {}
    for i, words in enumerate(labels):
        for word in words:
            tag = vocab.resolve(word)
            if tag is None:
                unknown[str(word)] = None
                continue
            for t in (tag, *vocab.ancestors(tag)):
                out[i, col[t]] = True
    return out, list(unknown)


def split_labels(value) -> list[str]:
    """A labels cell: 'a|b|c' (CSV) or a list / array column; None / NaN: no labels."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [w.strip() for w in value.split("|") if w.strip()]
    return [str(w).strip() for w in value if str(w).strip()]


def format_table(report: dict) -> str:
    """Per-tag precision / recall / F1 (tags with labelled positives or predictions), then micro and macro."""
    lines = [f"{'tag':<22} {'threshold':>9} {'support':>7} {'predicted':>9} {'precision':>9} {'recall':>7} {'F1':>6}"]
    thresholds = report.get("thresholds", {})
    for name, m in report["per_tag"].items():
        if not (m["support"] or m["predicted"]):
            continue
        t = thresholds.get(name)
        lines.append(f"{name[:22]:<22} {'' if t is None else f'{t:.4f}':>9} {m['support']:>7} {m['predicted']:>9} "
                     f"{m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f}")
    for avg in ("micro", "macro"):
        m = report[avg]
        lines.append(f"{avg:<22} {'':>9} {'':>7} {'':>9} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f}")
    return "\n".join(lines)


# --- the thresholds file -------------------------------------------------------------------------------

def thresholds_path(vocab_path: str | Path) -> Path:
    """photo.csv -> photo.thresholds.json in the same folder; for a built-in vocabulary, in
    $LAKELENS_CACHE_DIR/vocab (~/.cache/lakelens/vocab): the installed package is no place to write."""
    p = Path(vocab_path)
    if is_builtin(p):
        p = Path(os.environ.get("LAKELENS_CACHE_DIR") or Path.home() / ".cache" / "lakelens", "vocab", p.name)
    return p.with_name(p.stem + ".thresholds.json")


def write_thresholds(vocab, thresholds: np.ndarray, status: dict, model: str, templates, target: float,
                     min_positives: int, default: float, labelled_images: int, path: str | Path | None = None) -> Path:
    """The calibrated thresholds beside the vocabulary (temp file + rename)."""
    target_path = Path(path) if path else thresholds_path(vocab.path)
    doc = {"format": THRESHOLDS_FORMAT, "vocab": Path(vocab.path).name, "vocab_digest": vocab.digest, "model": model,
           "templates": templates if isinstance(templates, str) else list(templates),
           "target_precision": target, "min_positives": min_positives, "default": default,
           "labelled_images": labelled_images, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           # exact float32 values: a threshold rounded up would drop the image it was chosen at
           "thresholds": {t: float(np.float32(v)) for t, v in zip(vocab.tags, thresholds)}, "status": status}
    target_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(target_path, json.dumps(doc, indent=2) + "\n")
    return target_path


def thresholds_for(vocab, model: str, templates, default: float, path: str | Path | None = None) -> tuple[np.ndarray, str]:
    """Per-tag thresholds for tagging with `model`: the calibrated ones from the thresholds file when it was
    made for this model key, vocabulary digest and templates; else `default` for every tag. Tags the file
    left at its default take the current `default`. Returns (thresholds, a sentence saying which)."""
    p = Path(path) if path else thresholds_path(vocab.path)
    out = np.full(len(vocab), default, np.float32)
    if not p.is_file():
        return out, f"global threshold {default} (no thresholds file {p.name})"
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"tag.thresholds: {p} is not a thresholds file ({e})") from None
    want = {"vocab_digest": vocab.digest, "model": model,
            "templates": templates if isinstance(templates, str) else list(templates)}
    differ = [key for key, value in want.items() if doc.get(key) != value]
    if differ:
        return out, (f"global threshold {default}: {p.name} was calibrated for another "
                     f"{', '.join(k.replace('_digest', '') for k in differ)} ({', '.join(str(doc.get(k)) for k in differ)})")
    values, status = doc.get("thresholds", {}), doc.get("status", {})
    for j, tag in enumerate(vocab.tags):
        if status.get(tag) in (CALIBRATED, UNREACHABLE) and tag in values:
            out[j] = values[tag]
    n = sum(status.get(t) == CALIBRATED for t in vocab.tags)
    return out, f"calibrated thresholds from {p.name} for {n} of {len(vocab)} tags, {default} for the rest"
