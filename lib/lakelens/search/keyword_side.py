"""What a query needs from a version's keyword part: the BM25 index, the tag and caption files, the ids a
query's filters allow (tags from the tag file, paths from the version's metadata) and images per tag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.errors import QueryError
from lakelens.index.keyword import KeywordIndex, TagStore
from lakelens.search.query import ParsedQuery


class KeywordSide:
    def __init__(self, folder: Path):
        self.index = KeywordIndex(folder)
        self.tags = TagStore(folder)


def need(side: KeywordSide | None, version: str, what: str) -> KeywordSide:
    if side is None:
        raise QueryError(f"{what} needs tags and a keyword index, and index version {version} has none: "
                         "build it with lakelens index --tags TAGS")
    return side


def allowed_ids(side: KeywordSide | None, version: str, meta, q: ParsedQuery, prefix_ids: np.ndarray | None):
    """Sorted live ids the query's filters allow, or None when it has no filter."""
    sets = [] if prefix_ids is None else [prefix_ids]
    sets += [meta.with_substring(p) for p in q.paths]
    if q.tags or q.not_tags:
        side = need(side, version, "tag: filters")
    sets += [side.tags.ids_with(t) for t in q.tags]
    negatives = [side.tags.ids_with(t) for t in q.not_tags] + [meta.with_substring(p) for p in q.not_paths]
    if not sets and not negatives:
        return None
    allowed = meta.ids if not sets else sets[0]
    for s in sets[1:]:
        allowed = np.intersect1d(allowed, s, assume_unique=True)
    if q.tags:  # the tag file holds only indexed images, but keep the result to this version's live ids
        allowed = np.intersect1d(allowed, meta.ids, assume_unique=True)
    for s in negatives:
        allowed = np.setdiff1d(allowed, s, assume_unique=True)
    return allowed


def browse(side: KeywordSide | None, q: ParsedQuery, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A query of filters only (tag:dog, path:2024/): the allowed ids, by the first tag's score, best first
    (by id without a tag). Returns (scores, ids)."""
    if q.tags and side is not None:
        ids, scores = side.tags.best_for(q.tags[0])
        keep = np.isin(ids, allowed)
        return np.nan_to_num(scores[keep], nan=0.0).astype(np.float32), ids[keep]
    return np.zeros(len(allowed), np.float32), np.asarray(allowed, np.int64)


def decorate(side: KeywordSide | None, frame: pd.DataFrame, meta=None) -> pd.DataFrame:
    """Result rows get their tags (direct ones, best first) and caption, when the version has them: the
    keyword part's caption (lakelens caption), else the source's own (a shard's or a table's, from `meta`)."""
    ids = frame["id"].to_numpy(np.int64)
    own = meta.captions(ids) if meta is not None and len(ids) else [None] * len(ids)
    if side is None:
        if any(c is not None for c in own):
            frame["caption"] = own
        return frame
    frame["tags"] = side.tags.tags_of(ids) if len(ids) else []
    made = side.tags.captions_of(ids) if len(ids) else []
    frame["caption"] = [m if m is not None else o for m, o in zip(made, own)]
    return frame


def holding(side: KeywordSide, phrases: list, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` hold any of the phrases (in their tags, caption or path words), as a mask: the
    results a subtracted phrase ("circle - \"red circle\"") removes. Each phrase is searched among these
    ids only, so the cost follows the results, not the collection."""
    among = np.unique(np.asarray(ids, np.int64))
    found = np.zeros(0, np.int64)
    for phrase in phrases if len(among) else ():
        found = np.union1d(found, side.index.search([], [phrase], [], [], len(among), among)[1])
    return np.isin(ids, found)


def tag_counts(side: KeywordSide, version: str, meta, q: ParsedQuery, found, limit: int) -> dict:
    """Images per tag, most first: over the ids `found` (a query's results), else over the images the
    query's filters allow (every image without a filter)."""
    if found is not None:
        ids = np.sort(np.asarray(found, np.int64))
        scope = "results"
    else:
        ids = allowed_ids(side, version, meta, q, None)
        scope = "all" if ids is None else "filtered"
    total = len(meta) if ids is None else len(ids)
    return {"version": version, "scope": scope, "images": int(total), "tags": side.tags.counts(ids, limit)}
