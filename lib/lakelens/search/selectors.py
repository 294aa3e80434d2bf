"""The vector side of a query over a loaded version's shards, with its filters: a common filter (held by
COMMON_PREFIX of the images or more) after a plain search deep enough to hold k matches, a rare one inside
FAISS's scan as a selector. A path prefix's ids and a rare filter's selector cost a scan or about a
search to work out, so both are remembered in an IdCache."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lakelens.errors import QueryError
from lakelens.index.shards import search_shards
from lakelens.search.idcache import IdCache
from lakelens.search.results import hits_frame, with_notes
from lakelens.search.versions import LoadedVersion

COMMON_PREFIX = 0.05  # a prefix held by this share of the images or more is filtered after the search


def prefix_ids(cache: IdCache, st: LoadedVersion, prefix: str) -> np.ndarray:
    """Ids of the indexed paths that start with `prefix` (a scan of every path: remembered)."""
    return cache.ids(("prefix", st.version, prefix), lambda: st.meta.with_prefix(prefix))


def selector_of(cache: IdCache, st: LoadedVersion, allowed: np.ndarray):
    """A FAISS selector of allowed ids (building one costs about as much as a search: remembered)."""
    key = ("selector", st.version, len(allowed), hash(allowed.tobytes()))
    return cache.selector(key, lambda: st.meta.expand(allowed))  # the images' regions pass with them


def search_vectors(st: LoadedVersion, vectors, k, min_score, allowed, nprobe, ef_search, cache: IdCache,
                   pool=None) -> list[pd.DataFrame]:
    """A batch of query vectors -> the first k result rows of each (notes in attrs), among the sorted
    `allowed` ids when given."""
    dim = st.manifest["dim"]
    q = np.asarray(vectors, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise QueryError(f"query vectors must have shape (n, {dim}), got {q.shape}")
    if not np.isfinite(q).all():
        raise QueryError("query vector has NaN or infinite values")
    q = np.ascontiguousarray(q)
    params = st.manifest.get("search_params", {})
    nprobe = params.get("nprobe") if nprobe is None else nprobe
    ef_search = params.get("efSearch") if ef_search is None else ef_search

    def run(fetch, selector=None) -> list[pd.DataFrame]:
        scores, ids = search_shards(st.shards, st.rerank, q, fetch, nprobe, ef_search,
                                    int(st.manifest.get("rerank") or 0), pool, selector, st.excluded, st.quantizer)
        return [with_notes(hits_frame(st.meta, s, i, k, min_score, allowed), notes) for s, i in zip(scores, ids)]

    # a hit is an image or one of its regions, and a list holds each image once: with regions, as many
    # entries as an image has make sure k images come back
    per, entries = st.meta.per_image, len(st.meta.entries)
    notes = []
    if allowed is None:
        return run(min(entries or 1, k * per))
    if len(allowed) < k:
        notes.append(f"only {len(allowed)} indexed image(s) match the filters")
    if not len(allowed):
        return [with_notes(hits_frame(st.meta, np.zeros(0, np.float32), np.zeros(0, np.int64), k, min_score,
                                      allowed), notes) for _ in q]
    share = len(allowed) / max(1, len(st.meta))
    if share >= COMMON_PREFIX:
        # a common filter: a plain search deep enough to hold k matches is cheaper than testing
        # every scanned id against a large set; the selector below covers the rare shortfall
        frames = run(min(entries, int(np.ceil(4 * k / share)) * per))
        if all(len(f) >= min(k, len(allowed)) for f in frames):
            return frames
    # a rare filter: it runs inside FAISS's scan, so cost and results stay those of a k search
    return run(min(k * per, len(allowed) * per), selector_of(cache, st, allowed))
