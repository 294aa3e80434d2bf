"""Hybrid search: reciprocal rank fusion (RRF) of the vector side's list and the keyword side's, fused in
blocks of positions each at its own depth so that pages join up, with each side's rank on every row."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lakelens.search.results import hits_frame

RRF_K = 60


def rrf(ranked: list[np.ndarray], k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of id lists, each best first: score(id) = sum over lists of 1 / (k + rank),
    ranks from 1. Returns (ids, scores) best first; ties keep the order of first appearance."""
    lists = [np.asarray(ids, np.int64) for ids in ranked]
    every = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    if not len(every):
        return every, np.zeros(0, np.float64)
    part = np.concatenate([1.0 / (k + np.arange(1, len(ids) + 1)) for ids in lists])
    ids, first, which = np.unique(every, return_index=True, return_inverse=True)
    score = np.bincount(which, weights=part)  # summed in list order, as a loop over the lists would
    order = np.lexsort((first, -score))
    return ids[order], score[order]


FUSED_BLOCK = 50  # hybrid: the first 50 results fused from lists 100 deep, the next 50 from 200, then doubling


def fused_blocks(n: int, cap: int) -> list[tuple[int, int]]:
    """(end, depth) of the blocks of fused positions that cover the first n: block ends 50, 100, 200, ...
    (at most cap), each fused from lists twice as deep as its end (at least 100, at most cap)."""
    out, end = [], FUSED_BLOCK
    while True:
        out.append((min(end, cap), min(cap, max(2 * end, 2 * FUSED_BLOCK))))
        if end >= min(n, cap):
            return out
        end *= 2


def fuse(vector_ids: np.ndarray, keyword_ids: np.ndarray, n: int, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first n ids of the hybrid list, with their scores and the depth each was fused at: RRF of the
    two lists, each best first and at least as deep as the last block's depth (fused_blocks). RRF of
    deeper lists reorders what shallower ones fused, so each block of positions is fused once, at its own
    depth, from the lists' first `depth` ids, and holds the best ids that earlier blocks did not: a deeper
    page never changes an earlier one, and pages of one query join up to what one query as long as them
    returns."""
    ids, scores, depths, placed = [], [], [], set()
    for end, depth in fused_blocks(n, cap):
        fused, fused_scores = rrf([vector_ids[:depth], keyword_ids[:depth]])
        for i, score in zip(fused.tolist(), fused_scores.tolist()):
            if len(ids) >= end:
                break
            if i not in placed:
                placed.add(i)
                ids.append(i)
                scores.append(score)
                depths.append(depth)
        if len(ids) < end:  # both lists hold fewer ids than this depth: there are no more
            break
    return np.asarray(ids[:n], np.int64), np.asarray(scores[:n], np.float64), np.asarray(depths[:n], np.int64)


def ranks(ids: pd.Series, ranked, within: dict) -> pd.Series:
    """Each id's rank (from 1) in a ranked id list, or None where it is not in its first within[id] ids."""
    pos = {int(i): r for r, i in enumerate(np.asarray(ranked, np.int64), start=1)}
    found = [pos.get(int(i)) for i in ids]
    return pd.Series([r if r is not None and r <= within[int(i)] else None for i, r in zip(ids, found)],
                     index=ids.index, dtype=object)


def hybrid_frame(meta, vector_frame: pd.DataFrame, keyword_ids: np.ndarray, n: int, cap: int) -> pd.DataFrame:
    """The first n rows of the hybrid list of a vector side's result rows and a keyword side's ids (each
    as deep as fused_blocks(n, cap) asks), with `vector_rank` and `keyword_rank` and the vector side's notes;
    `box`, where the vector side has one, is the region it matched."""
    ids, fused, depths = fuse(vector_frame["id"].to_numpy(np.int64), keyword_ids, n, cap)
    frame = hits_frame(meta, fused, ids, n)
    # each side's rank as the fusion of the image's block saw it: the same on every page
    within = dict(zip(ids.tolist(), depths.tolist()))
    frame["vector_rank"] = ranks(frame["id"], vector_frame["id"], within)
    frame["keyword_rank"] = ranks(frame["id"], keyword_ids, within)
    if "box" in vector_frame:  # the region the vector side matched, where it did
        boxes = dict(zip(vector_frame["id"], vector_frame["box"]))
        frame["box"] = [boxes.get(i) if r is not None else None for i, r in zip(frame["id"], frame["vector_rank"])]
    frame.attrs["notes"] = vector_frame.attrs.get("notes", [])
    return frame
