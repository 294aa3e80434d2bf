"""Query syntax shared by every front end: free words, "quoted phrases", tag:dog, -tag:cat,
tag:"traffic light", path:2024/ and -path:tmp/. What is left after the filters is the text the vector side
embeds (with query arithmetic, "beach + sunset - people") and the keyword side scores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lakelens.errors import QueryError
from lakelens.index.keyword import words

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60
_FIELDS = ("tag", "path")
# -?field:"quoted value" | -?field:value | "phrase" | any other run of non-space characters
_TOKEN = re.compile(r'(-?)(\w+):"([^"]*)"|(-?)(\w+):(\S*)|"([^"]*)"|(\S+)')


@dataclass
class ParsedQuery:
    text: str = ""  # what the vector side embeds: free words and phrases, filters removed
    free: list = field(default_factory=list)  # lower-case words outside quotes (keyword side)
    phrases: list = field(default_factory=list)  # each a list of lower-case words
    not_phrases: list = field(default_factory=list)  # phrases after a "-" (query arithmetic): results must not hold them
    tags: list = field(default_factory=list)
    not_tags: list = field(default_factory=list)
    paths: list = field(default_factory=list)  # substrings the path must hold
    not_paths: list = field(default_factory=list)

    @property
    def has_text(self) -> bool:
        return bool(self.text.strip())

    @property
    def has_filters(self) -> bool:
        return bool(self.tags or self.not_tags or self.paths or self.not_paths)

    def to_dict(self) -> dict:
        return {"text": self.text, "phrases": [" ".join(p) for p in self.phrases],
                "not_phrases": [" ".join(p) for p in self.not_phrases], "tags": self.tags,
                "not_tags": self.not_tags, "paths": self.paths, "not_paths": self.not_paths}


def parse_query(text: str | None, tags=(), not_tags=()) -> ParsedQuery:
    """Split a query into its text and its filters; `tags` / `not_tags` add filters given apart (the
    API's and CLI's --tag). An unknown field (foo:bar) stays text: file names hold colons too."""
    text = text or ""
    if text.count('"') % 2:
        raise QueryError(f'unbalanced quote in query {text!r}: close the phrase with "')
    q = ParsedQuery(tags=[_tag(t) for t in tags], not_tags=[_tag(t) for t in not_tags])
    kept, minus = [], False  # minus: after a lone "-" (query arithmetic), a term to subtract, not a keyword
    for m in _TOKEN.finditer(text):
        neg_q, name_q, value_q, neg, name, value, phrase, plain = m.groups()
        name, neg, value = (name_q, neg_q, value_q) if name_q else (name, neg, value)
        if name and name.lower() in _FIELDS:
            if not value.strip():
                raise QueryError(f"{name}: needs a value (e.g. {name}:dog or {name}:\"two words\")")
            if name.lower() == "tag":
                (q.not_tags if neg else q.tags).append(_tag(value))
            else:
                (q.not_paths if neg else q.paths).append(value)
        elif phrase is not None:
            ws = words(phrase)
            if ws:
                (q.not_phrases if minus else q.phrases).append(ws)
                kept.append(phrase.strip())
        else:
            token = m.group(0)
            kept.append(token)
            if token in ("+", "-"):
                minus = token == "-"
            elif not minus:
                q.free += words(token)
    q.text = " ".join(kept)
    both = set(q.tags) & set(q.not_tags)
    if both:
        raise QueryError(f"tag {sorted(both)[0]!r} is both asked for and excluded")
    return q


def _tag(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise QueryError(f"a tag filter needs a tag name, got {value!r}")
    return " ".join(value.strip().lower().split())


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


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
