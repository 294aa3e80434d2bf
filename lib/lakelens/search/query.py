"""Query syntax shared by every front end: free words, "quoted phrases", tag:dog, -tag:cat,
tag:"traffic light", path:2024/ and -path:tmp/. What is left after the filters is the text the vector side
embeds (with query arithmetic, "beach + sunset - people": query_vectors.py) and the keyword side scores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lakelens.errors import QueryError
from lakelens.index.keyword import words

MODES = ("vector", "keyword", "hybrid")
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
    if text is not None and not isinstance(text, str):
        raise QueryError(f"query text must be a string, not {type(text).__name__}")
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
