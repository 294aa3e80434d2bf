"""What every query returns: result rows (rank, score, id, path; `box` with regions), best first, each
image once, within MAX_K; pages of them (k, offset)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lakelens.errors import QueryError

MAX_K = 10_000
RESULT_COLUMNS = ["rank", "score", "id", "path"]


def check_offset(offset) -> int:
    """A page's offset as a Python int, or a QueryError."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise QueryError(f"offset must be an integer >= 0, got {offset!r}")
    return int(offset)


def check_limit(limit) -> None:
    """A listing's page size (tag counts, duplicate groups): 1 to MAX_K, or a QueryError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_K:
        raise QueryError(f"limit must be an integer between 1 and {MAX_K}, got {limit!r}")


def check_page(k, offset) -> tuple[int, int]:
    """k and offset as Python ints (numpy's fail inside FAISS), or a QueryError."""
    check_offset(offset)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 or k + offset > MAX_K:
        raise QueryError(f"k must be an integer between 1 and {MAX_K} (k + offset at most {MAX_K}), "
                         f"got k={k!r}, offset={offset!r}")
    return int(k), int(offset)


def hits_frame(meta, scores, ids, k, min_score=None, allowed=None) -> pd.DataFrame:
    """Best-first hits -> result rows, each image once: a hit on a region is its image, with the box
    of its best entry (the `box` column, when the version holds regions). `meta`: the version's MetaStore;
    `allowed`: sorted ids the rows must be among, or None."""
    keep = ids != -1
    if min_score is not None:
        keep &= scores >= min_score
    entry, images = ids, ids
    if meta.has_regions:
        images = meta.resolve(ids)[0]
        first = np.zeros(len(ids), bool)
        first[np.unique(images, return_index=True)[1]] = True  # the best entry of each image
        keep &= first
    if allowed is not None and len(ids):
        pos = np.clip(np.searchsorted(allowed, images), 0, max(0, len(allowed) - 1))
        keep &= (allowed[pos] == images) if len(allowed) else False
    scores, ids, entry = scores[keep][:k], images[keep][:k], entry[keep][:k]
    paths = meta.paths(entry)
    df = pd.DataFrame({"score": np.asarray(scores, float), "id": ids, "path": paths})
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    if meta.has_regions:
        df["box"] = meta.boxes(entry)
        return df[[*RESULT_COLUMNS, "box"]]
    return df[RESULT_COLUMNS]


def with_notes(frame: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    frame.attrs["notes"] = list(notes)
    return frame


def skip(frame: pd.DataFrame, offset: int) -> pd.DataFrame:
    """The rows after the first `offset` (a page), ranks and notes kept."""
    page = frame.iloc[offset:].reset_index(drop=True)
    page.attrs = frame.attrs
    return page


def first_rows(ranked, want: int, drop=None, groups=None) -> pd.DataFrame:
    """The first `want` rows of the list `ranked(n)` gives (its first n rows), less those `drop(ids)` masks
    (the images a subtracted phrase names) and, with `groups` (DuplicateGroups), one per duplicate group:
    deeper (doubling) until enough are left or the list ends. Every page of a query thus cuts one list."""
    n = min(MAX_K, 4 * want if groups is not None else want)
    while True:
        whole = ranked(n)
        frame = whole
        if drop is not None:
            frame = frame[~drop(frame["id"].to_numpy(np.int64))].reset_index(drop=True)
            frame["rank"] = np.arange(1, len(frame) + 1)
            frame.attrs = whole.attrs
        if groups is not None:
            frame = groups.collapse(frame, want)
        if len(frame) >= want or len(whole) < n or n >= MAX_K:
            out = frame.iloc[:want]
            out.attrs = whole.attrs
            return out
        n = min(MAX_K, 2 * n)
