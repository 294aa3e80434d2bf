"""Retrieval metrics: Recall@K / top-K accuracy from score matrices, precision@K by label, ANN-vs-exact recall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranks_of_targets(scores: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """1-based rank of each query's target column in its score row, ties counted against the target
    (pessimistic: every other candidate with an equal score ranks ahead). Target -1 (missing, e.g. an
    image that failed to embed) gets rank inf: it can never be retrieved."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    out = np.full(len(targets), np.inf)
    for i, t in enumerate(targets):
        if t < 0:
            continue
        s = scores[i, t]
        out[i] = 1 + np.count_nonzero(scores[i] > s) + (np.count_nonzero(scores[i] == s) - 1)
    return out


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose target ranks within the top K; K beyond the candidate count is
    allowed and simply admits every present target."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        raise ValueError("no queries to evaluate")
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def best_ranks(scores: np.ndarray, target_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """Rank of the best-ranked of several targets per query (image -> text: any of its captions). Only
    non-targets rank ahead of it: those scoring higher and, ties counted against the target, those
    scoring the same; another target tied with it is a hit as good as it (a caption listed twice)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(len(target_sets), np.inf)
    for i, targets in enumerate(target_sets):
        valid = np.unique([t for t in targets if t >= 0]).astype(np.int64)
        if len(valid):
            others = np.delete(scores[i], valid)
            out[i] = 1 + np.count_nonzero(others >= scores[i, valid].max())
    return out


def precision_at_k(scores: np.ndarray, query_labels: Sequence, candidate_labels: Sequence,
                   ks: Sequence[int]) -> dict[int, float]:
    """Mean fraction of the top K candidates that share the query's label; with fewer than K
    candidates the denominator is the candidate count. Ties are broken by candidate order (stable)."""
    scores = np.asarray(scores, dtype=np.float64)
    cand = np.asarray(candidate_labels, dtype=object)
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(int(k), scores.shape[1])
        hits = [np.mean(cand[order[i, :kk]] == label) for i, label in enumerate(query_labels)]
        out[int(k)] = float(np.mean(hits))
    return out


def ann_recall(ann_ids: Sequence[Sequence[int]], exact_ids: Sequence[Sequence[int]], k: int) -> float:
    """Overlap of the ANN index's top-k with exact search's top-k on the same queries."""
    per_query = []
    for a, e in zip(ann_ids, exact_ids):
        truth = [x for x in list(e)[:k] if x != -1]
        if truth:
            per_query.append(len(set(list(a)[:k]) & set(truth)) / len(truth))
    if not per_query:
        raise ValueError("no queries with exact results")
    return float(np.mean(per_query))


def plot_recall(curves: dict[str, dict[int, float]], path: str, title: str = "Recall@K") -> str:
    """One line per curve (name -> {K: recall}), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
